"""Benchmark a: inference speed of dense, MoE and UltraMem against batch size (the paper's Fig. 1 analogue).

    python benchmarks/inference.py           # quick: tiny presets, batches 1…256 (1 min on 2 CPU cores)
    python benchmarks/inference.py --full    # the 151M-activated presets (2B total for MoE and UltraMem),
                                             # bf16 weights; needs a GPU/TPU (≈5 min on one H100)

Per model and batch size B it measures
  * decode: one forward pass over B×1 new tokens, the per-token step of generation.  There is no KV cache in
    this codebase, so the step attends to the new token only: it times the weights' side of decoding (the
    FFN / MoE / memory reads the paper's Fig. 1 is about), not attention over a long context;
  * prefill: one forward pass over B×S tokens, reported as tokens per second;
  * bytes read per decode step, from the routing of that very batch: every dense weight once, plus the MoE
    experts that at least one token chose, plus the value rows that at least one token retrieved.
MoE and UltraMem are matched in total and activated parameters.  "dense" shares their backbone (as the
paper's Dense-151M does: 0.30 against 0.35 GFLOPs); in quick mode "dense, wide FFN" also matches their
activated parameters.  Inputs are byte windows of English text.  Weights are untrained (random init):
routing and row reuse of a trained model differ, speed does not depend on the values.

Writes docs/results/inference[-full].md, inference[-full]-decode.png and inference[-full]-prefill.png.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ultramem_jax.params import param_counts  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402
from ultramem_jax.transformer import create_model  # noqa: E402

QUICK = [("dense", "tiny-dense", []), ("dense, wide FFN", "tiny-dense-wide", []), ("MoE-2in24", "tiny-moe-2in24", []),
         ("UltraMem-x12", "tiny-x12", [])]
FULL = [("dense", "dense-151m", []), ("MoE-2in51", "moe-151m-2in51", []),
        ("UltraMem-x12", "ultramem-151m-x12", []),
        ("UltraMem-x12 (XLA ops)", "ultramem-151m-x12", ["model.memory.kernels=xla"])]
BATCHES = [1, 4, 16, 64, 256]


def bytes_read_per_step(params, aux, cfg) -> int:
    """Weights a forward pass must read for this batch: sparse tables count only the rows / experts used."""
    total = 0
    moe_layers = iter(aux["moe"])
    moe_used = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        nbytes = leaf.size * leaf.dtype.itemsize
        if "memories" in keys and "values" in keys:
            rows = np.asarray(aux["memory"][keys[keys.index("memories") + 1]]["rows"])
            total += len(np.unique(rows)) * leaf.shape[-1] * leaf.dtype.itemsize
        elif cfg.moe is not None and "ffn" in keys and keys[-2] in ("w_gate", "w_up", "w_down"):
            block = keys[keys.index("blocks") + 1]
            if block not in moe_used:
                moe_used[block] = len(np.unique(np.asarray(next(moe_layers)["experts"])))
            total += nbytes // leaf.shape[0] * moe_used[block]
        else:
            total += nbytes
    return total


def measure(label, preset, extra, batches, prefill_len, dtype, repeats, rng):
    cfg = load_config([f"model_name={preset}", f"model.dtype={dtype}", *extra]).model
    counts = param_counts(cfg)
    model = create_model(cfg, seed=0)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)  # buffers: slot permutation, Tucker vectors
    params = jax.tree.map(lambda a: a.astype(dtype), params)  # inference weights in the activation dtype
    del model
    forward = jax.jit(lambda p, tokens: nnx.merge(graphdef, p, buffers)(tokens)[0][:, -1])  # next-token logits
    routed = jax.jit(lambda p, tokens: nnx.merge(graphdef, p, buffers)(tokens)[1])
    rows = []
    for B in batches:
        step_tokens = jnp.asarray(common.sample_tokens(rng, (B, 1), cfg.vocab_size))
        decode_ms = common.timed_ms(forward, params, step_tokens, repeats=repeats)
        prompt = jnp.asarray(common.sample_tokens(rng, (B, prefill_len), cfg.vocab_size))
        prefill_ms = common.timed_ms(forward, params, prompt, repeats=max(2, repeats // 3))
        nbytes = bytes_read_per_step(params, routed(params, step_tokens), cfg)
        rows.append({"model": label, "preset": preset, "total": counts["total"],
                     "activated": counts["activated_per_token"], "batch": B, "decode_ms": decode_ms,
                     "prefill_tok_s": B * prefill_len / (prefill_ms / 1e3), "bytes": nbytes})
        print(f"{label:>24} B={B:<4} decode {decode_ms:8.3f} ms | prefill {rows[-1]['prefill_tok_s']:12,.0f} tok/s"
              f" | read {nbytes / 1e6:9.2f} MB/step", flush=True)
    return rows


def report(rows, models, full, dtype, prefill_len, repeats):
    by = {(r["model"], r["batch"]): r for r in rows}
    ultra = next(lbl for lbl, *_ in models if lbl.startswith("UltraMem"))
    moe = next(lbl for lbl, *_ in models if lbl.startswith("MoE"))
    denses = [lbl for lbl, *_ in models if lbl.startswith("dense")]
    ratio_rows = [[B, f"{by[(ultra, B)]['decode_ms'] / by[(moe, B)]['decode_ms']:.2f}",
                   *[f"{by[(ultra, B)]['decode_ms'] / by[(d, B)]['decode_ms']:.2f}" for d in denses],
                   f"{by[(ultra, B)]['bytes'] / by[(moe, B)]['bytes']:.2f}"] for B in BATCHES]
    suffix = "-full" if full else ""
    table = [[r["model"], r["preset"], f"{r['total'] / 1e6:.1f}M", f"{r['activated'] / 1e6:.2f}M", r["batch"],
              f"{r['decode_ms']:.3f}", f"{r['batch'] / r['decode_ms'] * 1e3:,.0f}", f"{r['prefill_tok_s']:,.0f}",
              f"{r['bytes'] / 1e6:.2f}"] for r in rows]
    notes = [f"Device: {common.device_line()}; weights and activations {dtype}. Mode: "
             f"{'full' if full else 'quick'} (`python benchmarks/inference.py{' --full' if full else ''}`).",
             "Decode = one forward pass over B×1 new tokens without a KV cache (the weights' side of decoding; "
             f"attention over a long context is not included). Prefill = B×{prefill_len} tokens. Medians of "
             f"{repeats} (decode) and {max(2, repeats // 3)} (prefill) timed calls after a warm-up. Bytes read = "
             "weights the step must read: dense weights once, plus the experts / value rows this batch's "
             "routing used (untrained weights, English byte inputs).", "",
             f"Headline (UltraMem {ultra!r} over MoE {moe!r} and over dense, decode latency; bytes read):", "",
             "| batch | UltraMem/MoE latency | " + " | ".join(f"UltraMem/{d} latency" for d in denses)
             + " | UltraMem/MoE bytes |", "|---|---|" + "---|" * len(denses) + "---|",
             *[f"| {' | '.join(str(c) for c in rr)} |" for rr in ratio_rows], "", "All points:"]
    common.write_table(os.path.join(common.RESULTS, f"inference{suffix}.md"),
                       "Benchmark a: inference latency and throughput against batch size", notes,
                       ["model", "preset", "total params", "activated / token", "batch", "decode ms / step",
                        "decode tokens/s", "prefill tokens/s", "MB read / decode step"], table)
    labels = [lbl for lbl, *_ in models]
    common.plot(os.path.join(common.RESULTS, f"inference{suffix}-decode.png"),
                f"Decode step latency ({jax.devices()[0].device_kind})", "batch size", "ms per step (B×1 tokens)",
                {lbl: (BATCHES, [by[(lbl, B)]["decode_ms"] for B in BATCHES]) for lbl in labels}, logx=True, logy=True)
    common.plot(os.path.join(common.RESULTS, f"inference{suffix}-prefill.png"),
                f"Prefill throughput, {prefill_len}-token prompts", "batch size", "tokens / s",
                {lbl: (BATCHES, [by[(lbl, B)]["prefill_tok_s"] for B in BATCHES]) for lbl in labels}, logx=True,
                logy=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="151M-activated presets (needs an accelerator)")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per point (median); default 10")
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.full and on_cpu:
        common.fail("--full builds 2B-parameter models and times them at batch 256: run it on a GPU/TPU")
    if args.repeats < 0:
        common.fail("--repeats must be >= 0")
    repeats = args.repeats or 10
    models, prefill_len = (FULL, 256) if args.full else (QUICK, 64)
    if on_cpu:  # XLA:CPU has no fast bf16 matmuls; on an accelerator inference runs in bf16
        dtype = "float32"
    else:
        dtype = "bfloat16"
        x = jnp.ones((4096, 4096), jnp.bfloat16)  # bring the clocks up before the first timed point
        for _ in range(200):
            x = (x @ x) * 1e-3
        jax.block_until_ready(x)
    rng = np.random.default_rng(0)
    rows = []
    for i, (label, preset, extra) in enumerate(models):
        rows += measure(label, preset, extra, BATCHES, prefill_len, dtype, repeats, rng)
        if any(lbl.startswith("UltraMem") for lbl, *_ in models[:i + 1]):  # a cut-off run keeps what it measured
            report(rows, models[:i + 1], args.full, dtype, prefill_len, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
