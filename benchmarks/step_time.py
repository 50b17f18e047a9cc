"""Train-step time of UltraMem against the dense model matched to it in activated parameters, side by side.

    python benchmarks/step_time.py                 # tiny-x12 vs tiny-dense-wide, the presets' 16 × 128 tokens
    python benchmarks/step_time.py --repeats 20 --pairs tiny-x12:tiny-dense-wide tiny:tiny-dense
    python benchmarks/step_time.py --value-update sparse   # also the memory model with row-sparse value updates
    python benchmarks/step_time.py --xla-kernels           # also the memory model on XLA's ops, not the C++ kernels

Each model's jitted train step (train.py's: forward, backward, AdamW, the TDQKR refresh) is compiled and warmed
up, then the steps are called round-robin, so that load from other processes hits every model alike; a figure
is the median wall time of ``--repeats`` steps. ``--old-search`` also times the memory model with the key
search as it was before issue 13 (benchmarks/search_profile.py's frozen copy), so the search's share of the
step shows in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ultramem_jax import key_search, training  # noqa: E402
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout  # noqa: E402
from ultramem_jax.params import param_counts  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402


def old_search(q_row, q_col, k_row, k_col, cores, u, t, preselect, topk, additive=False):
    import search_profile
    if additive:
        raise ValueError("--old-search covers the TDQKR presets only")
    return search_profile.old_search(q_row, q_col, k_row, k_col, cores, u, t, preselect, topk)


class Runner:
    """One preset's compiled train step and its (donated) state, stepped one call at a time."""

    def __init__(self, preset, overrides, rng):
        cfg = load_config([f"model_name={preset}", "steps=1000", *overrides])
        mesh = make_mesh(cfg.mesh)
        rules = logical_rules(cfg.logical_axis_rules, mesh)
        layout, rules = memory_layout(cfg.memory_layout, mesh, rules, cfg.model, cfg.batch_size)
        sharding = batch_sharding(mesh, rules)
        model_def, model_state, opt_def, opt_state = training.build(cfg, mesh, rules, layout)
        usage = training.new_usage(cfg, mesh)
        self.step = training.make_train_step(model_def, opt_def, model_state, opt_state, usage, sharding)
        self.state = (model_state, opt_state, usage)
        toks = common.sample_tokens(rng, (cfg.batch_size, cfg.seq_len + 1), cfg.model.vocab_size)
        self.tokens = jax.device_put(jnp.asarray(toks), sharding)
        counts = param_counts(cfg.model)
        self.label = f"{preset} ({counts['activated_per_token'] / 1e6:.2f}M activated, " \
                     f"{cfg.batch_size}×{cfg.seq_len} tokens)"

    def __call__(self):
        *self.state, metrics = self.step(*self.state, self.tokens)
        jax.block_until_ready(metrics["loss"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=["tiny-x12:tiny-dense-wide"],
                   help="MEMORY_PRESET:DENSE_PRESET pairs to compare")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per model (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model after compiling")
    p.add_argument("--old-search", action="store_true", help="also time each memory preset with the old search")
    p.add_argument("--xla-kernels", action="store_true",
                   help="also time each memory preset with memory.kernels=xla (on CPU, auto takes the C++ kernels)")
    p.add_argument("--value-update", choices=("sparse", "lazy"), default=None,
                   help="also time each memory preset with this optim.value_update (row-sparse value tables)")
    common.add_clock_argument(p)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        common.fail("--repeats must be >= 1 and --warmup >= 0")
    pairs = []
    for pair in args.pairs:
        if pair.count(":") != 1 or not all(pair.split(":")):
            common.fail(f"--pairs: expected MEMORY_PRESET:DENSE_PRESET, got {pair!r}")
        pairs.append(tuple(pair.split(":")))
    rng = np.random.default_rng(0)
    runners = {}
    try:
        for memory, dense in pairs:
            runners[(memory, "new")] = Runner(memory, [], rng)
            runners[(dense, "")] = Runner(dense, [], rng)
            if args.value_update:
                runners[(memory, args.value_update)] = Runner(memory, [f"optim.value_update={args.value_update}"], rng)
            if args.xla_kernels:
                runners[(memory, "xla")] = Runner(memory, ["model.memory.kernels=xla"], rng)
            if args.old_search:
                with mock.patch.object(key_search, "search", old_search):  # XLA's ops: the C++ search has no old
                    runner = Runner(memory, ["model.memory.kernels=xla"], rng)
                    runner()  # compile while the old op is in place; the jitted step keeps it
                runners[(memory, "old")] = runner
    except (ValueError, FileNotFoundError, KeyError) as e:
        common.fail(str(e))
    for run in runners.values():
        for _ in range(1 + args.warmup):
            run()
    clock = common.CLOCKS[args.clock]
    times = {key: [] for key in runners}
    for _ in range(args.repeats):
        for key, run in runners.items():
            t0 = clock()
            run()
            times[key].append(clock() - t0)
    ms = {key: 1e3 * float(np.median(ts)) for key, ts in times.items()}
    print(f"{common.device_line()} | median {args.clock} time of {args.repeats} train steps, models interleaved")
    for (name, search), run in runners.items():
        tag = {"new": " [search now]", "old": " [XLA kernels, search before issue 13]", "": "", "xla": " [XLA kernels]",
               args.value_update: f" [search now, value_update {args.value_update}]"}[search]
        print(f"  {run.label}{tag}: {ms[(name, search)]:.1f} ms")
    for memory, dense in pairs:
        line = f"{memory} / {dense}: {ms[(memory, 'new')] / ms[(dense, '')]:.2f}×"
        if args.value_update:
            line += f"; with value_update {args.value_update} {ms[(memory, args.value_update)] / ms[(dense, '')]:.2f}×"
        if args.xla_kernels:
            line += f"; with XLA kernels {ms[(memory, 'xla')] / ms[(dense, '')]:.2f}×"
        if args.old_search:
            line += f" (with the old search {ms[(memory, 'old')] / ms[(dense, '')]:.2f}×)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
