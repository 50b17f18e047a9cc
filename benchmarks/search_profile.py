"""The XLA key search stage by stage, the op as it was before issue 13 against ``key_search.search`` now.

    python benchmarks/search_profile.py                        # tiny-x12: 2048 tokens, n' = 576 keys per side
    python benchmarks/search_profile.py --preset tiny --tokens 4096 --repeats 30

Both ops run on the same random inputs in one process, the calls interleaved round-robin so that load from
other processes on the machine hits both alike; each figure is the median over ``--repeats`` calls of a jitted
function after a warm-up call. Stages take their inputs from the previous stage's outputs, so a stage's time
is its own. fwd+bwd differentiates sum(scores · g) in the queries, keys and cores. Prints a table and the ratios.
The old op is kept below, frozen, so the comparison does not depend on git history.
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

from ultramem_jax import key_search, tdqkr  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402


# ---- the op before issue 13 (frozen copy of key_search.search + tdqkr.tdqkr_topk at 965de5c) ------------------
def old_key_scores(q_row, q_col, k_row, k_col):
    return jnp.einsum("thd,hndr->thrn", q_row, k_row), jnp.einsum("thd,hndr->thrn", q_col, k_col)


def old_preselect(s_row, s_col, u, t, preselect):
    pre_row = jnp.einsum("thrn,hr->thn", jax.lax.stop_gradient(s_row), u)
    pre_col = jnp.einsum("thrn,hr->thn", jax.lax.stop_gradient(s_col), t)
    return jax.lax.top_k(pre_row, preselect)[1], jax.lax.top_k(pre_col, preselect)[1]


def old_grid(s_row, s_col, cores, rows, cols):
    sel_row = jnp.take_along_axis(s_row, rows[:, :, None, :], axis=-1)
    sel_col = jnp.take_along_axis(s_col, cols[:, :, None, :], axis=-1)
    grid = jnp.einsum("thai,chab,thbj->thcij", sel_row, cores, sel_col)
    T, H, C, P, _ = grid.shape
    return grid.reshape(T, H, C, P * P)


def old_final(grid, rows, cols, n, topk):
    P = rows.shape[-1]
    _, flat = jax.lax.top_k(grid.sum(axis=2), topk)
    scores = jnp.take_along_axis(grid, flat[:, :, None, :], axis=-1)
    r = jnp.take_along_axis(rows, flat // P, axis=-1)
    c = jnp.take_along_axis(cols, flat % P, axis=-1)
    return jnp.moveaxis(scores, 2, 3), (r * n + c).astype(jnp.int32)


def old_search(q_row, q_col, k_row, k_col, cores, u, t, preselect, topk):
    s_row, s_col = old_key_scores(q_row, q_col, k_row, k_col)
    rows, cols = old_preselect(s_row, s_col, u, t, preselect)
    return old_final(old_grid(s_row, s_col, cores, rows, cols), rows, cols, k_row.shape[1], topk)


# ---- the inputs -------------------------------------------------------------------------------------------
def inputs(rng, T, H, D, n, R, C):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    cores = jnp.asarray(rng.uniform(0.0, 1.0, (C, H, R, R)), jnp.float32)  # the layer's init
    u, t = tdqkr.refresh_tucker_vectors(cores, *tdqkr.initial_tucker_vectors(H, R))
    return dict(q_row=f(T, H, D), q_col=f(T, H, D), k_row=f(H, n, D, R), k_col=f(H, n, D, R), cores=cores, u=u, t=t)


def stages(x, P, M):
    """name → (old (fn, args) or None, new (fn, args) or None), every stage's inputs precomputed."""
    n = x["k_row"].shape[1]
    args = (x["q_row"], x["q_col"], x["k_row"], x["k_col"], x["cores"], x["u"], x["t"])
    # old intermediates
    s_row, s_col = jax.jit(old_key_scores)(x["q_row"], x["q_col"], x["k_row"], x["k_col"])
    rows_o, cols_o = jax.jit(old_preselect, static_argnums=4)(s_row, s_col, x["u"], x["t"], P)
    grid_o = jax.jit(old_grid)(s_row, s_col, x["cores"], rows_o, cols_o)
    # new intermediates
    ks = key_search
    pre_row = jax.jit(ks.preselect_scores)(x["q_row"], x["k_row"], x["u"])
    pre_col = jax.jit(ks.preselect_scores)(x["q_col"], x["k_col"], x["t"])
    rows, cols = ks.top_ids(pre_row, P), ks.top_ids(pre_col, P)
    sr, sc = ks.rank_scores_at(x["q_row"], x["k_row"], rows), ks.rank_scores_at(x["q_col"], x["k_col"], cols)
    grid = ks.candidate_grid(sr, sc, x["cores"], False)
    slots = ks.select(*args, P, M)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((*slots.shape, x["cores"].shape[0])), jnp.float32)

    def grad(search):
        return jax.grad(lambda *a: jnp.sum(search(*a, P, M)[0] * g), argnums=(0, 1, 2, 3, 4))

    return {
        "key scores: old T×H×R×N both sides | new rank-1 pre-scores q·(K u)": (
            (old_key_scores, (x["q_row"], x["q_col"], x["k_row"], x["k_col"])),
            (lambda a, b, c, d, u, t: (ks.preselect_scores(a, c, u), ks.preselect_scores(b, d, t)),
             (x["q_row"], x["q_col"], x["k_row"], x["k_col"], x["u"], x["t"]))),
        "pre-selection top-m_pre, both sides": (
            (lambda a, b, u, t: old_preselect(a, b, u, t, P), (s_row, s_col, x["u"], x["t"])),
            (lambda a, b: (ks.top_ids(a, P), ks.top_ids(b, P)), (pre_row, pre_col))),
        "candidate grid: old C×P×P | new P keys' rank scores + Σ_c grid": (
            (old_grid, (s_row, s_col, x["cores"], rows_o, cols_o)),
            (lambda a, b, c, d, r, s, cores: ks.candidate_grid(ks.rank_scores_at(a, c, r), ks.rank_scores_at(b, d, s),
                                                               cores, False),
             (x["q_row"], x["q_col"], x["k_row"], x["k_col"], rows, cols, x["cores"]))),
        "final top-m + slot ids (old: + per-core scores)": (
            (lambda gr, r, c: old_final(gr, r, c, n, M), (grid_o, rows_o, cols_o)),
            (lambda gr, r, c: ks.winners(gr, r, c, n, M), (grid, rows, cols))),
        "new: per-core scores of the M winners (rescore)": (
            None, (ks.rescore, (*args[:5], slots))),
        "selection alone: old column = row path (select_rows) | new = lane path (select_lanes, CPU)": (
            (lambda *a: ks.select_rows(*a, P, M, False), args), (lambda *a: ks.select_lanes(*a, P, M, False), args)),
        "whole search, forward": ((lambda *a: old_search(*a, P, M), args), (lambda *a: ks.search(*a, P, M), args)),
        "whole search, forward + backward": ((grad(old_search), args), (grad(ks.search), args)),
    }


def time_interleaved(fns, repeats, clock=time.perf_counter):
    """Median ms of each jitted fn, calling them round-robin."""
    jitted = [jax.jit(f) for f, _ in fns]
    for f, (_, a) in zip(jitted, fns):
        jax.block_until_ready(f(*a))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, (f, (_, a)) in enumerate(zip(jitted, fns)):
            t0 = clock()
            jax.block_until_ready(f(*a))
            times[i].append(clock() - t0)
    return [1e3 * float(np.median(ts)) for ts in times]


def check_same(x, P, M):
    """Fraction of winners the two ops agree on (they differ only at float near-ties), max score difference."""
    args = tuple(x.values())
    so, lo = jax.jit(lambda *a: old_search(*a, P, M))(*args)
    sn, ln = jax.jit(lambda *a: key_search.search(*a, P, M))(*args)
    return float(jnp.mean(lo == ln)), float(jnp.max(jnp.abs(so - sn)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-x12", help="model preset whose memory shapes to use")
    p.add_argument("--tokens", type=int, default=0, help="tokens per call; default the preset's batch × seq")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per stage (median)")
    common.add_clock_argument(p)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tokens < 0:
        common.fail("--repeats must be >= 1 and --tokens >= 0")
    try:
        cfg = load_config([f"model_name={args.preset}"])
    except (ValueError, FileNotFoundError, KeyError) as e:
        common.fail(f"--preset {args.preset}: {e}")
    mem = cfg.model.memory.resolved(cfg.model.d_model)
    if mem.retrieval != "tdqkr":
        common.fail(f"--preset {args.preset}: profiles the TDQKR search; this preset uses {mem.retrieval}")
    T = args.tokens or cfg.batch_size * cfg.seq_len
    H, D, n, R, C, P, M = mem.heads, mem.key_dim, mem.keys_per_side, mem.rank, mem.cores, mem.m_pre, mem.topk
    print(f"{common.device_line()} | {args.preset}: T={T} tokens, H={H} heads, n'={n} keys per side, D={D}, "
          f"R={R}, C={C}, m_pre={P}, m={M} | median {args.clock} time of {args.repeats} calls, interleaved", flush=True)
    x = inputs(np.random.default_rng(0), T, H, D, n, R, C)
    same, diff = check_same(x, P, M)
    print(f"same winners: {same:.4%} of slots; max |score difference| {diff:.2e}")
    rows = stages(x, P, M)
    fns = [f for pair in rows.values() for f in pair if f is not None]
    clock = common.CLOCKS[args.clock]
    ms = iter(time_interleaved(fns, args.repeats, clock))
    print(f"{'stage':<70} {'old ms':>8} {'new ms':>8} {'old/new':>8}")
    for name, (old, new) in rows.items():
        o = next(ms) if old is not None else None
        w = next(ms) if new is not None else None
        fmt = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
        ratio = f"{o / w:7.2f}×" if o is not None and w is not None else f"{'':>8}"
        print(f"{name:<70} {fmt(o)} {fmt(w)} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
