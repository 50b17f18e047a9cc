"""The value-table update alone, dense against row-sparse (optim.value_update), from 2^14 to 2^22 rows.

    python benchmarks/value_update.py                      # 2^14 … 2^22 rows (about 1.5 GB of RAM at 2^22)
    python benchmarks/value_update.py --max-log2-rows 16   # a quick look

One memory layer of tiny-x12's shape (D_v = 64; a train step of 16 × 128 tokens reads 2 heads × 16 rows each,
65,536 row reads) at optimizer step 1000 with the default optimizer settings.  Per size, the median of jitted,
buffer-donating calls of:
  dense    what the train step does with ``value_update: dense``: the table's gradient (a scatter-add of the
           row gradients into N × D_v zeros, as autodiff builds it) and optax's AdamW over every row;
  sparse   ``value_update: sparse``: duplicate ids summed, the touched rows caught up on their skipped steps
           (every row's last update drawn from the 300 steps before, so the catch-up runs its full horizon)
           and updated, written back in place (row_adam.update);
  lazy     ``value_update: lazy``: the same without the catch-up;
  flush    ``sparse``'s catch-up of every row (once per checkpoint or evaluation, not per step).
Prints one line per size and the ratios of the largest size to the smallest, also of the rows a step touches
(its distinct ids: at 2^14 rows the 65,536 reads hit about 16,100, at 2^22 about 65,000) and of the sparse
update's cost per touched row.  ``--clock cpu`` times the
process's CPU time (all threads) instead of the wall clock: steadier on a loaded machine, where a niced run's
wall time is mostly waiting.
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
import optax  # noqa: E402

from ultramem_jax import row_adam  # noqa: E402
from ultramem_jax.optim import OptimConfig, make_optimizer, value_row_hyper  # noqa: E402

D_V, READS, STEP, TOTAL = 64, 16 * 128 * 2 * 16, 1000, 10_000


def median_ms(fn, state, inputs, repeats, clock=time.perf_counter):
    """``fn(*state, *inputs)`` donates and returns its state: thread it through; the first call compiles.  The
    ids and gradients go in as arguments (as constants XLA would fold the dense gradient away)."""
    times = []
    for i in range(repeats + 1):
        t = clock()
        state = fn(*state, *inputs)
        jax.block_until_ready(state)
        if i:
            times.append(clock() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def measure(log2_rows, repeats, rng, clock=time.perf_counter):
    n = 1 << log2_rows
    table = jnp.asarray(rng.standard_normal((n, D_V)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, n, READS), jnp.int32)
    grads = jnp.asarray(rng.standard_normal((READS, D_V)) * 1e-2, jnp.float32)
    out = {"touched": int(np.unique(np.asarray(ids)).size)}

    cfg = OptimConfig()  # one optax AdamW over a table that make_optimizer labels as a value table
    tx = make_optimizer(cfg, TOTAL)
    params = {"values": table + 0}  # donated: the sparse runs below start from the same table

    def dense(params, opt_state, ids, grads):
        g = jnp.zeros_like(params["values"]).at[ids].add(grads)
        updates, opt_state = tx.update({"values": g}, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    out["dense"] = median_ms(jax.jit(dense, donate_argnums=(0, 1)), (params, tx.init(params)), (ids, grads), repeats,
                             clock)

    for mode in ("sparse", "lazy"):
        hyper = value_row_hyper(OptimConfig(value_update=mode), TOTAL)

        def sparse(values, m, v, last, ids, grads, hyper=hyper):
            state = row_adam.RowAdamState(values)
            state.m[...], state.v[...], state.last[...] = m, v, last
            uniq, summed = row_adam.sum_duplicates(ids, grads, n)
            values = row_adam.update(hyper, values, state, uniq, summed, jnp.int32(STEP))
            state.last[...] = last  # the next call again finds rows last updated up to 300 steps ago
            return values, state.m[...], state.v[...], state.last[...]
        last = jnp.asarray(rng.integers(STEP - 300, STEP, n), jnp.int32)
        moments = (jnp.abs(table) * 1e-3, jnp.square(table) * 1e-4)
        fresh = lambda: (table + 0, moments[0] + 0, moments[1] + 0, last + 0)  # noqa: E731 (each run donates its own)
        out[mode] = median_ms(jax.jit(sparse, donate_argnums=(0, 1, 2, 3)), fresh(), (ids, grads), repeats, clock)
        if mode == "sparse":
            def flush(values, m, v, last, hyper=hyper):
                state = row_adam.RowAdamState(values)
                state.m[...], state.v[...], state.last[...] = m, v, last
                values = row_adam.flush(hyper, values, state, jnp.int32(STEP))
                return values, state.m[...], state.v[...], last
            out["flush"] = median_ms(jax.jit(flush, donate_argnums=(0, 1, 2, 3)), fresh(), (), max(1, repeats // 2),
                                      clock)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (median)")
    p.add_argument("--min-log2-rows", type=int, default=14)
    p.add_argument("--max-log2-rows", type=int, default=22)
    common.add_clock_argument(p)
    args = p.parse_args(argv)
    if not 10 <= args.min_log2_rows <= args.max_log2_rows <= 26:
        common.fail("need 10 <= --min-log2-rows <= --max-log2-rows <= 26")
    if args.repeats < 1:
        common.fail("--repeats must be >= 1")
    rng = np.random.default_rng(0)
    print(f"device: {common.device_line()}; D_v {D_V}, {READS:,} row reads per step, median of {args.repeats} "
          f"({args.clock} clock)")
    rows = {}
    for k in range(args.min_log2_rows, args.max_log2_rows + 1, 2 if args.max_log2_rows - args.min_log2_rows > 4
                   else 1):
        rows[k] = measure(k, args.repeats, rng, common.CLOCKS[args.clock])
        r = rows[k]
        print(f"2^{k} rows ({r['touched']:,} touched): dense {r['dense']:.2f} ms | sparse {r['sparse']:.2f} ms "
              f"({per_row_us(r):.2f} us a touched row) | lazy {r['lazy']:.2f} ms | flush {r['flush']:.2f} ms | "
              f"dense/sparse {r['dense'] / r['sparse']:.1f}x", flush=True)
    lo, hi = rows[min(rows)], rows[max(rows)]
    print(f"growth 2^{min(rows)} -> 2^{max(rows)}: dense {hi['dense'] / lo['dense']:.2f}x, "
          f"sparse {hi['sparse'] / lo['sparse']:.2f}x, lazy {hi['lazy'] / lo['lazy']:.2f}x, "
          f"flush {hi['flush'] / lo['flush']:.2f}x")
    print(f"touched rows {hi['touched'] / lo['touched']:.2f}x (2^{min(rows)} rows hold fewer distinct ids than a "
          f"step's reads); sparse per touched row {per_row_us(hi) / per_row_us(lo):.2f}x")
    return 0


def per_row_us(r: dict) -> float:
    return 1e3 * r["sparse"] / r["touched"]


if __name__ == "__main__":
    sys.exit(main())
