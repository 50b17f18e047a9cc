"""Compile time of the bitonic top-k (topk.py) against ``lax.top_k``: the key search alone and tiny-x12's train step.

    python benchmarks/topk_compile.py [--preset tiny-x12] [--search-only]

Compiles each twice with a fresh jit (the second figure shows how much of the first was one-off warm-up), once
with the sorting network (the CPU default) and once with ``lax.top_k`` patched in (the search before topk.py).
Prints seconds; nothing is executed.
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
from jax import lax  # noqa: E402

from ultramem_jax import topk, training  # noqa: E402
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402


def compile_s(preset: str, with_step: bool = True) -> tuple[float, float]:
    """(key search fwd+bwd of one memory layer, the whole train step): compile seconds with a fresh jit."""
    cfg = load_config([f"model_name={preset}", "batch_size=16", "seq_len=128", "steps=100"])
    mesh = make_mesh(cfg.mesh)
    rules = logical_rules(cfg.logical_axis_rules, mesh)
    layout, rules = memory_layout(cfg.memory_layout, mesh, rules, cfg.model, cfg.batch_size)
    sharding = batch_sharding(mesh, rules)
    md, ms, od, os_ = training.build(cfg, mesh, rules, layout)
    from flax import nnx
    layer = nnx.merge(md, ms).memories[0]
    graph, params, rest = nnx.split(layer, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("values"))), ...)
    x = jnp.zeros((16 * 128, layer.query[...].shape[0]), jnp.float32)

    def search_loss(params, x):
        scores, _ = nnx.merge(graph, params, rest).retrieve(x)
        return jnp.sum(scores.astype(jnp.float32))
    t = time.perf_counter()
    jax.jit(jax.grad(search_loss, argnums=(0, 1))).lower(params, x).compile()
    search = time.perf_counter() - t
    if not with_step:
        return search, float("nan")
    usage = training.new_usage(cfg, mesh)
    step = training.make_train_step(md, od, ms, os_, usage, sharding)
    tokens = jax.device_put(np.zeros((16, 129), np.int32), sharding)
    t = time.perf_counter()
    step.lower(ms, os_, usage, tokens).compile()
    return search, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-x12")
    p.add_argument("--search-only", action="store_true", help="skip the train step's compile")
    args = p.parse_args(argv)
    print(f"device: {common.device_line()}; preset {args.preset}")
    network = topk.top_k_ids
    for name, fn in (("bitonic network", network), ("lax.top_k", lambda x, k: lax.top_k(x, k)[1])):
        topk.top_k_ids = fn
        for attempt in (1, 2):
            search, step = compile_s(args.preset, not args.search_only)
            print(f"{name:16s} compile #{attempt}: key search fwd+bwd {search:.1f} s | train step {step:.1f} s",
                  flush=True)
    topk.top_k_ids = network
    return 0


if __name__ == "__main__":
    sys.exit(main())
