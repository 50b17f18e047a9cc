"""Benchmark a: generation speed of dense, MoE and UltraMem against batch size, with a KV cache (the paper's
Fig. 1 analogue: it decodes with a 2048-token KV cache).

    python benchmarks/inference.py           # quick: tiny presets, 512-token context, batches 1, 16, 64 (CPU)
    python benchmarks/inference.py --full    # the 151M-activated presets (2B total for MoE and UltraMem),
                                             # bf16, 2048-token context, batches 1…256; needs a GPU/TPU

Per model and batch size B it runs ultramem_jax.generate's Generator (compiled ahead of time, so no compile
time is counted) on B text prompts and measures
  * decode: ms per step of the on-device decode loop, B new tokens per step.  Every step attends over all
    ``context`` cache slots (masked past each sequence's end), so it costs what a step with a full
    context-token cache costs;
  * prefill: prompt tokens per second of the prefill (B prompts of ``prefill_len`` tokens);
  * bytes read per decode step: every dense weight once, plus the MoE experts that at least one token of
    that step chose, plus the value rows that at least one token retrieved (from a real cached decode step's
    routing), plus the whole KV cache (B × context × layers × 2 × d_model × bytes per element).
MoE and UltraMem are matched in total and activated parameters.  "dense" shares their backbone (as the
paper's Dense-151M does: 0.30 against 0.35 GFLOPs); in quick mode "dense, wide FFN" also matches their
activated parameters.  Weights are untrained (random init): routing and row reuse of a trained model
differ, speed does not depend on the values.

It also times, side by side in the same run, the old generation path (what ``eval --prompt`` did before the
cache: one forward pass over the whole zero-padded context window per new token) against the cached one, on
the ``tiny`` preset at a 512-token context, batch 1, greedy.

Writes docs/results/inference[-full].md, inference[-full]-decode.png and inference[-full]-prefill.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ultramem_jax import table_share  # noqa: E402
from ultramem_jax.generate import Generator, Sampling, decode_logits  # noqa: E402
from ultramem_jax.params import param_counts  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402
from ultramem_jax.transformer import create_model  # noqa: E402

QUICK = [("dense", "tiny-dense", []), ("dense, wide FFN", "tiny-dense-wide", []), ("MoE-2in24", "tiny-moe-2in24", []),
         ("UltraMem-x12", "tiny-x12", []), ("UltraMemV2", "tiny-v2", []), ("Memory+", "tiny-memplus", [])]
FULL = [("dense", "dense-151m", []), ("MoE-2in51", "moe-151m-2in51", []),
        ("UltraMem-x12", "ultramem-151m-x12", []),
        ("UltraMem-x12 (XLA ops)", "ultramem-151m-x12", ["model.memory.kernels=xla"])]
MODES = {  # context, batches, prompt tokens, decode steps per timed call
    "quick": dict(context=512, batches=[1, 16, 64], prefill_len=128, steps=16),
    "full": dict(context=2048, batches=[1, 4, 16, 64, 256], prefill_len=1024, steps=32),
}


def bytes_read_per_step(params, aux, cfg, cache_bytes: int) -> int:
    """What one decode step must read: sparse tables count only the rows / experts used, plus the cache."""
    total = cache_bytes
    moe_layers = iter(aux["moe"])
    moe_used = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        nbytes = leaf.size * leaf.dtype.itemsize
        if "memories" in keys and "values" in keys:
            rows = np.asarray(aux["memory"][keys[keys.index("memories") + 1]]["rows"])
            total += len(np.unique(rows)) * leaf.shape[-1] * leaf.dtype.itemsize
        elif "memory_table" in keys:  # V2's shared pre-value / value tables, Memory+'s pool: rows any layer read
            total += len(shared_table_rows(aux, cfg)) * leaf.shape[-1] * leaf.dtype.itemsize
        elif cfg.moe is not None and "ffn" in keys and keys[-2] in ("w_gate", "w_up", "w_down"):
            block = keys[keys.index("blocks") + 1]
            if block not in moe_used:
                moe_used[block] = len(np.unique(np.asarray(next(moe_layers)["experts"])))
            total += nbytes // leaf.shape[0] * moe_used[block]
        else:
            total += nbytes
    return total


def shared_table_rows(aux, cfg) -> np.ndarray:
    """The rows of the one shared table that any memory layer read: V2's layers report rows of their own ring
    window (table_share.py), Memory+'s rows of the whole pool."""
    mem = cfg.resolved_memory
    rows = []
    for index, layer in enumerate(aux["memory"]):
        offset = table_share.window_offset(mem, index) if mem.is_v2 else 0
        rows.append(np.asarray(table_share.physical_rows(layer["rows"], offset, mem.table_rows)))
    return np.unique(np.concatenate([r.ravel() for r in rows]))


def cached_step_routing(gen: Generator, prompts_BxP: np.ndarray):
    """The memory rows and MoE experts one cached decode step uses, after a prefill of ``prompts``."""
    B, P_len = prompts_BxP.shape

    @jax.jit
    def step(params, tokens):
        model = nnx.merge(gen.graphdef, gen._empty_cache(B), params)
        logits, _ = model(tokens)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        _, aux = decode_logits(model, nxt[:, None], jnp.full((B, 1), P_len, jnp.int32))
        return {"memory": [{"rows": m["rows"]} for m in aux["memory"]],
                "moe": [{"experts": r["experts"]} for r in aux["moe"]]}

    return step(gen.params, jnp.asarray(prompts_BxP))


def measure(label, preset, extra, mode, dtype, repeats, rng):
    cfg = load_config([f"model_name={preset}", f"model.dtype={dtype}", *extra]).model
    counts = param_counts(cfg)
    model = create_model(cfg, seed=0)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)  # buffers: slot permutation, Tucker vectors
    params = jax.tree.map(lambda a: a.astype(dtype), params)  # inference weights in the activation dtype
    model = nnx.merge(graphdef, params, buffers)
    L, P_len, steps = mode["context"], mode["prefill_len"], mode["steps"]
    # no EOS: every sequence runs all the steps; greedy (sampling costs the same for every model)
    gen = Generator(model, L, max_new_tokens=steps + 1, sampling=Sampling(temperature=0), chunk=steps,
                    cache_dtype=dtype)
    cache_elems_per_seq = L * cfg.num_layers * 2 * cfg.num_heads * cfg.resolved_head_dim
    rows = []
    for B in mode["batches"]:
        prompts = common.sample_tokens(rng, (B, P_len), cfg.vocab_size)
        runs = [gen.generate(list(prompts)) for _ in range(repeats + 1)][1:]  # the first call warms the caches
        assert all(r.decode_tokens == B * steps for r in runs)
        decode_ms = float(np.median([r.decode_s for r in runs])) / steps * 1e3
        prefill_tok_s = float(np.median([r.prefill_tok_s for r in runs]))
        cache_bytes = B * cache_elems_per_seq * jnp.dtype(dtype).itemsize
        nbytes = bytes_read_per_step(params, cached_step_routing(gen, prompts), cfg, cache_bytes)
        rows.append({"model": label, "preset": preset, "total": counts["total"],
                     "activated": counts["activated_per_token"], "batch": B, "decode_ms": decode_ms,
                     "prefill_tok_s": prefill_tok_s, "bytes": nbytes, "cache_bytes": cache_bytes})
        print(f"{label:>24} B={B:<4} decode {decode_ms:8.3f} ms/step | prefill {prefill_tok_s:12,.0f} tok/s"
              f" | read {nbytes / 1e6:9.2f} MB/step ({cache_bytes / 1e6:.2f} MB of it cache)", flush=True)
    return rows


def recompute_vs_cache(dtype, rng, context=512, prompt_len=64, new_tokens=64):
    """Tokens per second of the old path (a forward over the zero-padded context window per token, as
    eval's sampler did) and of the cached Generator, same model, same prompt, greedy, batch 1."""
    cfg = load_config(["model_name=tiny", f"model.dtype={dtype}"]).model
    model = create_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    prompt = [int(t) for t in common.sample_tokens(rng, (prompt_len,), cfg.vocab_size)]

    @jax.jit
    def next_logits(state, tokens, length):
        return nnx.merge(graphdef, state)(tokens)[0][0, length - 1]

    def old_path():
        ids = list(prompt)
        for _ in range(new_tokens):
            padded = np.zeros((1, context), np.int32)
            padded[0, :len(ids)] = ids
            ids.append(int(jnp.argmax(next_logits(state, jnp.asarray(padded), len(ids)))))
        return ids[prompt_len:]

    old_path()  # compile
    t0 = time.perf_counter()
    old_tokens = old_path()
    old_s = time.perf_counter() - t0
    gen = Generator(model, context, max_new_tokens=new_tokens, sampling=Sampling(temperature=0), chunk=new_tokens)
    gen.generate([prompt])  # compile
    r = gen.generate([prompt])
    assert r.tokens[0] == old_tokens, "the cached path must produce the recompute path's greedy tokens"
    return {"old_tok_s": new_tokens / old_s, "cached_tok_s": new_tokens / (r.prefill_s + r.decode_s),
            "cached_decode_tok_s": r.decode_tok_s, "context": context, "prompt_len": prompt_len,
            "new_tokens": new_tokens}


def report(rows, models, full, dtype, mode, repeats, old_new):
    by = {(r["model"], r["batch"]): r for r in rows}
    batches = mode["batches"]
    ultra = next(lbl for lbl, *_ in models if lbl.startswith("UltraMem"))
    moe = next(lbl for lbl, *_ in models if lbl.startswith("MoE"))
    denses = [lbl for lbl, *_ in models if lbl.startswith("dense")]
    ratio_rows = [[B, f"{by[(ultra, B)]['decode_ms'] / by[(moe, B)]['decode_ms']:.2f}",
                   *[f"{by[(ultra, B)]['decode_ms'] / by[(d, B)]['decode_ms']:.2f}" for d in denses],
                   f"{by[(ultra, B)]['bytes'] / by[(moe, B)]['bytes']:.2f}"] for B in batches]
    suffix = "-full" if full else ""
    table = [[r["model"], r["preset"], f"{r['total'] / 1e6:.1f}M", f"{r['activated'] / 1e6:.2f}M", r["batch"],
              f"{r['decode_ms']:.3f}", f"{r['batch'] / r['decode_ms'] * 1e3:,.0f}", f"{r['prefill_tok_s']:,.0f}",
              f"{r['bytes'] / 1e6:.2f}", f"{r['cache_bytes'] / 1e6:.2f}"] for r in rows]
    L, P_len, steps = mode["context"], mode["prefill_len"], mode["steps"]
    notes = [f"Device: {common.device_line()}; weights, activations and KV cache {dtype}. Mode: "
             f"{'full' if full else 'quick'} (`python benchmarks/inference.py{' --full' if full else ''}`).",
             f"Decode = one step of ultramem_jax.generate's on-device decode loop with a {L}-token KV cache: B new "
             f"tokens, each attending over all {L} cache slots (masked past its sequence's end, so the cost is "
             f"that of a full cache). Median over {repeats} runs of {steps} steps. Prefill = B prompts of "
             f"{P_len} tokens, median of {repeats}. Compilation is excluded (compiled ahead of time). Bytes read "
             "= what a step must read: dense weights once, plus the experts / value rows this step's routing "
             "used (untrained weights, English byte inputs), plus the whole KV cache.", ""]
    if old_new is not None:
        o = old_new
        notes += [f"Old recompute path against the cache, same run (tiny preset, {o['context']}-token context, "
                  f"batch 1, greedy, {o['prompt_len']}-token prompt, {o['new_tokens']} new tokens, identical "
                  "tokens from both):", "",
                  "| path | tokens/s | × old |", "|---|---|---|",
                  f"| old: one forward over the padded {o['context']}-token window per token | {o['old_tok_s']:,.1f} "
                  "| 1 |",
                  f"| KV cache, prefill + decode | {o['cached_tok_s']:,.1f} | "
                  f"{o['cached_tok_s'] / o['old_tok_s']:.1f} |",
                  f"| KV cache, decode steps only | {o['cached_decode_tok_s']:,.1f} | "
                  f"{o['cached_decode_tok_s'] / o['old_tok_s']:.1f} |", ""]
    notes += [f"Headline (UltraMem {ultra!r} over MoE {moe!r} and over dense, decode latency; bytes read):", "",
              "| batch | UltraMem/MoE latency | " + " | ".join(f"UltraMem/{d} latency" for d in denses)
              + " | UltraMem/MoE bytes |", "|---|---|" + "---|" * len(denses) + "---|",
              *[f"| {' | '.join(str(c) for c in rr)} |" for rr in ratio_rows], "", "All points:"]
    common.write_table(os.path.join(common.RESULTS, f"inference{suffix}.md"),
                       "Benchmark a: generation latency and throughput against batch size, with a KV cache", notes,
                       ["model", "preset", "total params", "activated / token", "batch", "decode ms / step",
                        "decode tokens/s", "prefill tokens/s", "MB read / decode step", "of which KV cache MB"],
                       table)
    labels = [lbl for lbl, *_ in models]
    common.plot(os.path.join(common.RESULTS, f"inference{suffix}-decode.png"),
                f"Decode step latency, {L}-token KV cache ({jax.devices()[0].device_kind})", "batch size",
                "ms per step (B new tokens)",
                {lbl: (batches, [by[(lbl, B)]["decode_ms"] for B in batches]) for lbl in labels}, logx=True, logy=True)
    common.plot(os.path.join(common.RESULTS, f"inference{suffix}-prefill.png"),
                f"Prefill throughput, {P_len}-token prompts", "batch size", "tokens / s",
                {lbl: (batches, [by[(lbl, B)]["prefill_tok_s"] for B in batches]) for lbl in labels}, logx=True,
                logy=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="151M-activated presets (needs an accelerator)")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per point (median); default 3 quick, 5 full")
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.full and on_cpu:
        common.fail("--full builds 2B-parameter models and times them at batch 256: run it on a GPU/TPU")
    if args.repeats < 0:
        common.fail("--repeats must be >= 0")
    repeats = args.repeats or (5 if args.full else 3)
    models, mode = (FULL, MODES["full"]) if args.full else (QUICK, MODES["quick"])
    if on_cpu:  # XLA:CPU has no fast bf16 matmuls; on an accelerator inference runs in bf16
        dtype = "float32"
    else:
        dtype = "bfloat16"
        x = jnp.ones((4096, 4096), jnp.bfloat16)  # bring the clocks up before the first timed point
        for _ in range(200):
            x = (x @ x) * 1e-3
        jax.block_until_ready(x)
    rng = np.random.default_rng(0)
    old_new = recompute_vs_cache(dtype, rng)
    print(f"tiny, {old_new['context']}-token context, batch 1: old recompute path {old_new['old_tok_s']:,.1f} tok/s | "
          f"KV cache {old_new['cached_tok_s']:,.1f} tok/s with prefill, {old_new['cached_decode_tok_s']:,.1f} decode "
          f"only | {old_new['cached_tok_s'] / old_new['old_tok_s']:.1f}x and "
          f"{old_new['cached_decode_tok_s'] / old_new['old_tok_s']:.1f}x", flush=True)
    rows = []
    for i, (label, preset, extra) in enumerate(models):
        rows += measure(label, preset, extra, mode, dtype, repeats, rng)
        if any(lbl.startswith("UltraMem") for lbl, *_ in models[:i + 1]):  # a cut-off run keeps what it measured
            report(rows, models[:i + 1], args.full, dtype, mode, repeats, old_new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
