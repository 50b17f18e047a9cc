"""Benchmark b: train-step and decode time against the number of physical value slots, all else fixed.

    python benchmarks/scaling.py           # quick: tiny-x12, 2^14 … 2^22 rows per memory layer (about 3.5 min
                                           # on 2 CPU cores; about 9 GB of RAM at 2^22)
    python benchmarks/scaling.py --full    # the same model with 4× the tokens per step (64 × 256); meant for a
                                           # GPU/TPU (minutes on one H100)
    python benchmarks/scaling.py --value-update sparse   # the train step with row-sparse value updates
                                           # (optim.value_update; writes scaling-sparse.md; the value update
                                           # alone: benchmarks/value_update.py)

The memory size is set by ``num_keys`` n (n² physical rows, each of D_v = 64 floats, in each of tiny-x12's four
memory layers); the backbone, m = 16 winners per head and the batch stay fixed.  Per size it times (median
after a warm-up):
  * the full train step (forward, backward, AdamW update: train.py's jitted step);
  * forward + backward alone, without the optimizer;
  * the key search alone, forward + backward, in every memory layer at the train step's token count;
  * a decode step: one forward pass over 64×1 tokens (no KV cache; see benchmarks/inference.py).
The train step's growth then splits into the search (√N keys per side), the optimizer (step minus
forward+backward: AdamW updates every value row every step, as the paper and its code do, so it grows linearly
with the table) and the rest of forward+backward (backbone, the m-row gather and the dense value gradient).

Writes docs/results/scaling[-full].md and scaling[-full].png.
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

from ultramem_jax import training  # noqa: E402
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout  # noqa: E402
from ultramem_jax.params import param_counts  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402
from ultramem_jax.transformer import lm_loss  # noqa: E402

NUM_KEYS = [128, 256, 512, 1024, 2048]  # n² = 2^14 … 2^22 physical rows per layer
PRESET = "tiny-x12"
DECODE_BATCH = 64


def measure(num_keys, batch, seq, repeats, rng, value_update="dense"):
    cfg = load_config([f"model_name={PRESET}", f"model.memory.num_keys={num_keys}", f"batch_size={batch}",
                       f"seq_len={seq}", "steps=1000", f"optim.value_update={value_update}"])
    mesh = make_mesh(cfg.mesh)
    rules = logical_rules(cfg.logical_axis_rules, mesh)
    layout, rules = memory_layout(cfg.memory_layout, mesh, rules, cfg.model, cfg.batch_size)
    sharding = batch_sharding(mesh, rules)
    model_def, model_state, opt_def, opt_state = training.build(cfg, mesh, rules, layout)
    tokens = jax.device_put(jnp.asarray(common.sample_tokens(rng, (batch, seq + 1), cfg.model.vocab_size)), sharding)

    # forward + backward alone (no optimizer), on the same state
    def loss_grad(state, toks):
        model = nnx.merge(model_def, state)
        return nnx.value_and_grad(lm_loss, has_aux=True)(model, toks)[1]
    grad_ms = common.timed_ms(jax.jit(loss_grad), model_state, tokens, repeats=repeats)
    memories = nnx.merge(model_def, model_state).memories
    search_ms = len(memories) * _search_ms(memories[0], batch * seq, repeats, rng)
    decode = jax.jit(lambda state, toks: nnx.merge(model_def, state)(toks)[0])
    step_tokens = jax.device_put(jnp.asarray(common.sample_tokens(rng, (DECODE_BATCH, 1), cfg.model.vocab_size)))
    decode_ms = common.timed_ms(decode, model_state, step_tokens, repeats=repeats)

    usage = training.new_usage(cfg, mesh)
    step = training.make_train_step(model_def, opt_def, model_state, opt_state, usage, sharding)
    state = (model_state, opt_state, usage)
    times = []
    for i in range(repeats + 1):  # the step donates its state: thread it through, first call compiles
        start = time.perf_counter()
        *state, metrics = step(*state, tokens)
        jax.block_until_ready(metrics["loss"])
        if i:
            times.append(time.perf_counter() - start)
    step_ms = 1e3 * sorted(times)[len(times) // 2]
    counts = param_counts(cfg.model)
    return {"num_keys": num_keys, "rows": num_keys ** 2, "total": counts["total"], "step_ms": step_ms,
            "grad_ms": grad_ms, "search_ms": search_ms, "decode_ms": decode_ms}


def _search_ms(layer, tokens, repeats, rng):
    """Forward + backward of one memory layer's retrieval (query, key scores, top-m) over ``tokens`` tokens,
    differentiated in its input and its own parameters but not the value table, which the search never reads."""
    graph, params, rest = nnx.split(layer, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("values"))), ...)
    x = jnp.asarray(rng.standard_normal((tokens, layer.query[...].shape[0])), jnp.float32)

    def search_loss(params, x):
        scores, _ = nnx.merge(graph, params, rest).retrieve(x)
        return jnp.sum(scores.astype(jnp.float32))
    return common.timed_ms(jax.jit(jax.grad(search_loss, argnums=(0, 1))), params, x, repeats=repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="4x the tokens per step; meant for an accelerator")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per point (median); default 5 (GPU 10)")
    p.add_argument("--max-log2-rows", type=int, default=22, help="stop at 2^this physical rows (14…22)")
    p.add_argument("--value-update", choices=("dense", "sparse", "lazy"), default="dense",
                   help="optim.value_update of the train step (fwd+bwd alone stays the dense-gradient one)")
    args = p.parse_args(argv)
    if not 14 <= args.max_log2_rows <= 22:
        common.fail("--max-log2-rows must be in 14…22")
    if args.repeats < 0:
        common.fail("--repeats must be >= 0")
    on_cpu = jax.default_backend() == "cpu"
    repeats = args.repeats or (5 if on_cpu else 10)
    batch, seq = (64, 256) if args.full else (16, 128)
    rng = np.random.default_rng(0)
    rows = []
    for n in [k for k in NUM_KEYS if k * k <= 1 << args.max_log2_rows]:
        r = measure(n, batch, seq, repeats, rng, args.value_update)
        rows.append(r)
        print(f"2^{int(np.log2(r['rows']))} rows: step {r['step_ms']:.1f} ms | fwd+bwd {r['grad_ms']:.1f} ms | "
              f"search {r['search_ms']:.1f} ms | decode {r['decode_ms']:.2f} ms | {r['total'] / 1e6:.1f}M params",
              flush=True)
    first, last = rows[0], rows[-1]
    flag = " --full" if args.full else ""
    suffix = "-full" if args.full else ""
    if args.value_update != "dense":
        flag += f" --value-update {args.value_update}"
        suffix += f"-{args.value_update}"
    layers = load_config([f"model_name={PRESET}"]).model.num_memory_layers
    notes = [f"Device: {common.device_line()}. Mode: {'full' if args.full else 'quick'} "
             f"(`python benchmarks/scaling.py{flag}`), optim.value_update: {args.value_update} (the fwd+bwd column "
             f"is always the dense-gradient one). Model {PRESET} ({layers} memory layers, "
             f"D_v = 64, m = 16 per head, 2 heads), batch {batch} × {seq} tokens per train step; decode = "
             f"{DECODE_BATCH} × 1 tokens. Median of {repeats} timed calls after a warm-up.", "",
             f"Headline: from 2^{int(np.log2(first['rows']))} to 2^{int(np.log2(last['rows']))} rows "
             f"({last['rows'] // first['rows']}× the slots): train step {last['step_ms'] / first['step_ms']:.2f}×, "
             f"forward+backward {last['grad_ms'] / first['grad_ms']:.2f}×, decode {last['decode_ms'] / first['decode_ms']:.2f}×."]
    if len(rows) > 1:
        parts = {"the key search": lambda r: r["search_ms"],
                 "the optimizer (step − fwd+bwd)": lambda r: r["step_ms"] - r["grad_ms"],
                 "the rest of fwd+bwd": lambda r: r["grad_ms"] - r["search_ms"]}
        growth = {name: part(last) - part(first) for name, part in parts.items()}
        total = last["step_ms"] - first["step_ms"]
        notes += ["", f"Where the train step's growth of {total:.1f} ms goes: " + ", ".join(
            f"{name} {ms:+.1f} ms ({ms / total:.0%})" for name, ms in growth.items()) + ". The search is timed on "
            "its own (the step may overlap it with other work); the other two parts are differences of two timings "
            "and carry the noise of both."]
    table = [[f"2^{int(np.log2(r['rows']))}", r["num_keys"], f"{r['total'] / 1e6:.1f}M", f"{r['step_ms']:.1f}",
              f"{r['grad_ms']:.1f}", f"{r['search_ms']:.1f}", f"{r['step_ms'] - r['grad_ms']:.1f}",
              f"{r['decode_ms']:.2f}", f"{r['step_ms'] / first['step_ms']:.2f}",
              f"{r['decode_ms'] / first['decode_ms']:.2f}"] for r in rows]
    common.write_table(os.path.join(common.RESULTS, f"scaling{suffix}.md"),
                       "Benchmark b: cost against memory size", notes,
                       ["physical rows / layer", "num_keys n", "total params", "train step ms", "fwd+bwd ms",
                        "search fwd+bwd ms (all layers)", "step − fwd+bwd ms", "decode ms", "step vs smallest",
                        "decode vs smallest"], table)
    xs = [r["rows"] for r in rows]
    common.plot(os.path.join(common.RESULTS, f"scaling{suffix}.png"),
                f"Cost vs memory size ({jax.devices()[0].device_kind})", "physical value rows per layer", "ms",
                {"train step (with AdamW)": (xs, [r["step_ms"] for r in rows]),
                 "forward+backward": (xs, [r["grad_ms"] for r in rows]),
                 "key search fwd+bwd": (xs, [r["search_ms"] for r in rows]),
                 f"decode ({DECODE_BATCH}×1)": (xs, [r["decode_ms"] for r in rows])}, logx=True, logy=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
