"""Times the memory layers' hot ops, XLA reference against Pallas kernel, forward and forward+backward.

    python benchmarks/kernels.py                 # the sizes below on this machine's default backend
    python benchmarks/kernels.py --quick         # two small sizes (CPU: interpret mode, a few minutes)
    python benchmarks/kernels.py --markdown docs/results/kernels.md

Per size it prints the time of each path, the bytes floor (what any implementation must move: row ids and
scores read, the m·D_v value rows read (V2's pre-value gather: also the m·D_p pre-value rows and the W_pre x
input), the output written; for the search the queries, keys and winners),
the achieved GB/s against that floor, and the kernel/XLA time ratio.  It also measures this device's plain
copy bandwidth (x → x + 1 on a large array) for comparison.

On CPU the kernels run in Pallas interpret mode: those timings measure the interpreter, not the kernels, and
say nothing about accelerator performance.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ultramem_jax import kernels  # noqa: E402

# tokens, selected rows per token (H·m), physical rows, value width, IVE blocks, cores
POOL_SIZES = [(1024, 64, 1 << 16, 256, 4, 2), (4096, 128, 1 << 18, 384, 4, 2), (16384, 128, 1 << 20, 512, 4, 2)]
# tokens, heads, key width, keys per side, rank, cores, m_pre, m
SEARCH_SIZES = [(1024, 2, 128, 512, 2, 2, 32, 64), (4096, 2, 192, 1024, 2, 2, 64, 64),
                (16384, 2, 256, 2048, 2, 2, 64, 64)]
QUICK_POOL = [(64, 32, 4096, 128, 4, 2), (128, 64, 16384, 256, 4, 2)]
# UltraMemV2's pre-value gather: tokens, selected rows per token, physical rows, D_p, D_v (1 : 3), cores
PVG_SIZES = [(4096, 128, 1 << 18, 128, 384, 2)]
QUICK_PVG = [(64, 32, 4096, 32, 96, 2)]
QUICK_SEARCH = [(64, 2, 64, 128, 2, 2, 16, 16), (128, 2, 64, 256, 2, 2, 32, 32)]


timed = functools.partial(common.timed_ms, best=True)  # ms; the best of the repeats


def copy_bandwidth(repeats):
    x = jnp.ones((1 << 30) // 4 if jax.default_backend() != "cpu" else (16 << 20) // 4, jnp.float32)  # 1 GiB
    t = timed(jax.jit(lambda a: a + 1), x, repeats=repeats)
    return 2 * x.nbytes / t / 1e6


def pool_case(size, impl, rng, repeats):
    T, K, N, D, E, C = size
    values = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
    blocks = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    scores = jnp.asarray(rng.standard_normal((T, K, C)), jnp.float32)
    floor = T * K * (4 + 4 + 4 * C) + T * K * D * 4 + T * E * D * 4
    out = {}
    for name, which in (("xla", "xla"), ("kernel", impl)):
        fwd = jax.jit(lambda v, s, w=which: kernels.gather_pool(v, rows, blocks, s, E, w))
        grad = jax.jit(jax.grad(lambda v, s, w=which: jnp.sum(kernels.gather_pool(v, rows, blocks, s, E, w) ** 2),
                                (0, 1)))
        out[name] = (timed(fwd, values, scores, repeats=repeats), timed(grad, values, scores, repeats=repeats))
    return floor, out


def pvg_case(size, impl, rng, repeats):
    T, K, N, Dp, Dv, C = size
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    args = (f(N, Dp), f(N, Dv), f(T, Dp), f(T, K, C))
    rows = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
    floor = T * K * (4 + 4 * C) + T * Dp * 4 + T * K * (Dp + Dv) * 4 + T * Dv * 4
    out = {}
    for name, which in (("xla", "xla"), ("kernel", impl)):
        op = lambda p, v, x, s, w=which: kernels.pre_value_gather(p, v, rows, x, s, w)  # noqa: E731
        fwd = jax.jit(op)
        grad = jax.jit(jax.grad(lambda *a, op=op: jnp.sum(op(*a) ** 2), (0, 1, 2, 3)))
        out[name] = (timed(fwd, *args, repeats=repeats), timed(grad, *args, repeats=repeats))
    return floor, out


def search_case(size, impl, rng, repeats):
    T, H, Dk, n, R, C, P, M = size
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    args = (f(T, H, Dk), f(T, H, Dk), f(H, n, Dk, R), f(H, n, Dk, R),
            jnp.asarray(rng.uniform(size=(C, H, R, R)), jnp.float32), f(H, R), f(H, R))
    floor = 2 * T * H * Dk * 4 + 2 * H * n * Dk * R * 4 + T * H * M * (4 * C + 4)
    out = {}
    for name, which in (("xla", "xla"), ("kernel", impl)):
        fwd = jax.jit(lambda *a, w=which: kernels.search(*a, P, M, False, w))
        grad = jax.jit(jax.grad(lambda *a, w=which: jnp.sum(kernels.search(*a, P, M, False, w)[0] ** 2),
                                (0, 1, 2, 3, 4)))
        out[name] = (timed(fwd, *args, repeats=repeats), timed(grad, *args, repeats=repeats))
    return floor, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes per op")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (best is kept)")
    parser.add_argument("--markdown", default="", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    platform = jax.default_backend()
    impl = kernels.resolve("pallas")
    interpret = impl == "interpret"
    quick = args.quick or interpret
    repeats = args.repeats or (2 if interpret else 20)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(repeats)
    device = jax.devices()[0].device_kind
    lines = [f"device: {device} ({platform}), jax {jax.__version__}, kernel path: {impl}"
             + (" (INTERPRET MODE: these kernel timings are the Pallas interpreter, not performance)" if interpret
                else ""),
             f"copy bandwidth (x -> x + 1, read + write): {bandwidth:.1f} GB/s", "",
             "| op | size | bytes floor | XLA fwd ms | kernel fwd ms | XLA GB/s | kernel GB/s | kernel/XLA fwd "
             "| XLA fwd+bwd ms | kernel fwd+bwd ms | kernel/XLA fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = [("gather_pool", s, pool_case) for s in (QUICK_POOL if quick else POOL_SIZES)]
    cases += [("pre_value_gather", s, pvg_case) for s in (QUICK_PVG if quick else PVG_SIZES)]
    cases += [("key_search", s, search_case) for s in (QUICK_SEARCH if quick else SEARCH_SIZES)]
    print("\n".join(lines), flush=True)
    for op, size, run in cases:
        floor, t = run(size, impl, rng, repeats)
        (xf, xb), (kf, kb) = t["xla"], t["kernel"]
        label = {"gather_pool": "T={} K={} N={} D={} E={} C={}", "pre_value_gather": "T={} K={} N={} Dp={} Dv={} C={}",
                 "key_search": "T={} H={} Dk={} n={} r={} C={} P={} m={}"}[op]
        line = (f"| {op} | {label.format(*size)} | {floor / 1e6:.2f} MB | {xf:.2f} | {kf:.2f} | "
                f"{floor / xf / 1e6:.2f} | {floor / kf / 1e6:.2f} | {kf / xf:.2f} | {xb:.2f} | {kb:.2f} | "
                f"{kb / xb:.2f} |")
        print(line, flush=True)
        lines.append(line)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
