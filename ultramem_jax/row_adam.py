"""Row-sparse AdamW for the value tables (``optim.value_update: sparse | lazy``): cost follows the rows a step
touches, not the table.

The train step differentiates with respect to the *gathered* rows (memory.ValueTap), so the table's gradient
is never built at N × D_v; ``sum_duplicates`` turns the T·K row cotangents into one gradient per touched row,
and ``update`` reads, updates and writes back only those rows of the table and of both moments (scatters into
the donated buffers).  ``last[r]`` counts the optimizer steps row r has been brought up to.

``sparse``: dense AdamW's trajectory (losses, gradients, table and moments), up to the ε approximation below.  A
row untouched for steps s … t−1 had a zero gradient there, so dense AdamW would have applied, with ρ = β₁/√β₂ and the step-j constants lr_j, ĉ1_j = 1 − β₁^(j+1), ĉ2_j = 1 − β₂^(j+1):

    m ← β₁^k m,   v ← β₂^k v                                                (k = t − s)
    p ← A p − Σ_{d=1..k} α_d m / (β_d √v + ε),   A = Π_j (1 − lr_j·wd),   j = s + d − 1,
         α_d = lr_j β₁^d / ĉ1_j · Π_{i>j} (1 − lr_i·wd),   β_d = √(β₂^d / ĉ2_j)

The stored row lags by those steps until it is next updated, so whatever uses it applies this catch-up first:
the train step's lookups read the gathered rows through ``Hyper.read`` (lookup.RowSource: the forward pass,
and so the gradient, sees dense AdamW's parameters, not the stale row), ``update`` applies it to a touched row
before the step's own AdamW update (storing what the forward read, then the step), and ``flush`` to every row
(checkpoints and evaluation then see the dense optimizer's table and moments).  A and the weight
decay products come from a float64 table of Σ log(1 − lr_j·wd) over the run's schedule.  The momentum sum is
elementwise only through √v, so it is taken in a factorised form that needs two scalars per row, not a loop
over the skipped steps per element:

    Σ_d α_d / (β_d x + ε)  ≈  B₁ / (x + ε·B₂/B₁),   B₁ = Σ_d α_d / β_d,   B₂ = Σ_d α_d / β_d²   (x = √v)

exact without ε, and exact to first order in ε/(β_d x) (Padé in ε): the only departure from dense AdamW, of
relative size (ε/√v̂)² per skipped step while √v̂ ≫ ε, and bounded for rows whose √v̂ is near ε (by convexity
never larger than dense AdamW's step).  The sums stop after ``horizon(b1, b2)`` terms (ρ^d < 1e-9 beyond,
ρ = β₁/√β₂); ``tests/test_sparse_update.py`` measures the agreement.  B₁ and B₂ cost O(1) per row, not
O(horizon): divided by A's factor they depend on ``last`` alone once k ≥ horizon (a table over the run's steps,
built once in float64), and on k alone below it (``horizon`` sums per step, shared by every row).

``lazy``: plain lazy AdamW (PKM's SparseAdam with decoupled weight decay): untouched rows and their moments
stay as they are, and are read as they are; a touched row takes one AdamW step with its stale moments and the
global bias correction.  Its trajectory differs from dense AdamW's by design.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

RHO_TAIL = 1e-9  # the catch-up sum stops where ρ^d falls below this


class RowAdamState(nnx.Pytree):
    """One value table's moments and per-row step counts (part of the optimizer state, checkpointed)."""

    def __init__(self, values_NxD: jax.Array):
        table = getattr(values_NxD, "sharding", None)  # sharded tables: the moments and counts shard alike
        rows = None
        if isinstance(table, NamedSharding):
            rows = NamedSharding(table.mesh, P(table.spec[0] if len(table.spec) else None))
        else:
            table = None
        self.m = nnx.OptState(jnp.zeros(values_NxD.shape, values_NxD.dtype, device=table))
        self.v = nnx.OptState(jnp.zeros(values_NxD.shape, values_NxD.dtype, device=table))
        self.last = nnx.OptState(jnp.zeros(values_NxD.shape[:1], jnp.int32, device=rows))


def horizon(b1: float, b2: float) -> int:
    rho = b1 / math.sqrt(b2)
    if rho >= 1:
        raise ValueError(f"optim.value_update: sparse needs b1 < sqrt(value b2) (got b1={b1}, b2={b2}): the "
                         "skipped steps' momentum then dies out")
    return 1 if rho == 0 else max(1, math.ceil(math.log(RHO_TAIL) / math.log(rho)))


class Hyper:
    """The value tables' AdamW constants and per-step tables (lr_j and the prefix sums of log(1 − lr_j·wd)), and
    the clipping settings the train step applies to the row gradients (optim.OptimConfig's meaning)."""

    def __init__(self, schedule, total_steps: int, b1: float, b2: float, eps: float, weight_decay: float,
                 mode: str = "sparse", grad_clip: float = 0.0, value_grad_clip: float = 0.0):
        self.b1, self.b2, self.eps, self.wd, self.mode = b1, b2, eps, weight_decay, mode
        self.grad_clip, self.value_grad_clip = grad_clip, value_grad_clip
        self.schedule = schedule
        self.horizon = horizon(b1, b2) if mode == "sparse" else 0
        steps = np.arange(total_steps + 1)
        lr = np.asarray(jax.device_get(jax.vmap(schedule)(jnp.asarray(steps))), np.float64)
        self.lr_table = lr.astype(np.float32)
        # log_decay[i] = Σ_{j<i} log(1 − lr_j·wd), in float64 before the cast (a run never steps past its table)
        log_decay = np.concatenate([[0.0], np.cumsum(np.log1p(-lr * weight_decay))])
        self.log_decay = log_decay.astype(np.float32)
        # per skipped step j: lr_j·√ĉ2_j/ĉ1_j and lr_j·ĉ2_j/ĉ1_j (the momentum sum's B₁ and B₂ terms)
        j = np.arange(total_steps + 1 + self.horizon)
        lr_j = lr[np.minimum(j, total_steps)]
        c1, c2 = 1 - b1 ** (j + 1.0), 1 - b2 ** (j + 1.0)
        terms = (lr_j * np.sqrt(c2) / c1, lr_j * c2 / c1)
        self.term_tables = tuple(t.astype(np.float32) for t in terms)
        # a row untouched for k ≥ horizon steps since ``last``: B₁ and B₂ over its whole horizon, relative to
        # the decay up to ``last`` (coef_a carries the rest), one entry per ``last`` (float64 before the cast)
        decay_at = lambda i: log_decay[np.minimum(i, total_steps + 1)]  # noqa: E731
        last = np.arange(total_steps + 2)
        full = [np.zeros(last.shape), np.zeros(last.shape)]
        ratios = (b1 / math.sqrt(b2), b1 / b2)
        for d in range(1, self.horizon + 1):
            jj = last + d - 1
            decay = np.exp(decay_at(last) - decay_at(jj + 1))
            for i in (0, 1):
                full[i] += ratios[i] ** d * terms[i][np.minimum(jj, len(j) - 1)] * decay
        self.full_tables = tuple(f.astype(np.float32) for f in full)

    def read(self, p, m, v, last, step):
        """Gathered rows ``p`` as dense AdamW holds them before step ``step``: their skipped steps since ``last``
        caught up (``_catch_up``'s parameter part).  The sparse train step's lookups read the rows through this
        (``lookup.RowSource``), so the forward pass sees dense AdamW's parameters."""
        return _catch_up(self, p, m, v, last, step)[0]


def sum_duplicates(ids_TxK: jax.Array, grads_TxKxD: jax.Array, num_rows: int):
    """(ids_U, grads_UxD): each distinct row once with its summed gradient; U = T·K slots, the unused ones
    padded with id ``num_rows`` (outside the table: gathers fill, scatters drop them) and zero gradients."""
    ids = ids_TxK.reshape(-1)
    size = ids.shape[0]
    uniq, inverse = jnp.unique(ids, size=size, fill_value=num_rows, return_inverse=True)
    grads = jax.ops.segment_sum(grads_TxKxD.reshape(size, -1), inverse.reshape(-1), num_segments=size)
    return uniq.astype(jnp.int32), grads


def _catch_up(h: Hyper, p, m, v, last, step):
    """Rows (p, m, v: …×D, ``last``: … per row) brought from step ``last`` up to ``step`` (exclusive) as dense
    AdamW would with zero gradients.  B₁, B₂ take O(1) per row: rows absent for ≥ horizon steps read a table indexed
    by ``last`` (Hyper.full_tables); the rest share this step's ``horizon`` possible sums (k = 1 … horizon − 1),
    computed once per call."""
    k = step - last
    b1, b2 = jnp.float32(h.b1), jnp.float32(h.b2)
    lr_tab, log_decay = jnp.asarray(h.lr_table), jnp.asarray(h.log_decay)
    n_tab = lr_tab.shape[0]
    decay_at = lambda i: log_decay[jnp.clip(i, 0, n_tab)]  # noqa: E731
    end = decay_at(step)
    ratios = (h.b1 / math.sqrt(h.b2), h.b1 / h.b2)
    # recent: for k = 0 … H−1 (last = step − k), Σ_{d ≤ k} ratio^d · term_j · exp(D[last] − D[j+1]), j = last+d−1
    H = h.horizon
    k_H = jnp.arange(H)[:, None]
    d_H = jnp.arange(1, H + 1)[None, :]
    j_HxH = jnp.clip(step - k_H + d_H - 1, 0, h.term_tables[0].shape[0] - 1)
    decay_HxH = jnp.where(d_H <= k_H, jnp.exp(decay_at(step - k_H) - decay_at(step - k_H + d_H)), 0.0)
    coefs = []
    for ratio, terms, full in zip(ratios, h.term_tables, h.full_tables):
        powers = jnp.asarray(ratio ** np.arange(1, H + 1), jnp.float32)[None, :]
        recent_H = jnp.sum(powers * jnp.asarray(terms)[j_HxH] * decay_HxH, axis=1)
        coefs.append(jnp.where(k >= H, jnp.asarray(full)[jnp.clip(last, 0, full.shape[0] - 1)],
                               recent_H[jnp.clip(k, 0, H - 1)]))
    coef_a = jnp.exp(end - decay_at(last))
    coef_b1, coef_b2 = coef_a * coefs[0], coef_a * coefs[1]
    kf = k.astype(jnp.float32)[..., None]
    eps = h.eps * jnp.where(coef_b1 > 0, coef_b2 / jnp.where(coef_b1 > 0, coef_b1, 1.0), 1.0)[..., None]
    p = coef_a[..., None] * p - coef_b1[..., None] * (m / (jnp.sqrt(v) + eps))
    return p, m * b1 ** kf, v * b2 ** kf


def update(h: Hyper, values_NxD, state: RowAdamState, ids_U, grads_UxD, step):
    """One AdamW step (count ``step``, 0-based) of the rows ``ids_U`` (distinct; padding = N) with their
    gradients, after the catch-up of their skipped steps; every other row is left untouched."""
    values_NxD, state.m[...], state.v[...], state.last[...] = update_arrays(
        h, values_NxD, state.m[...], state.v[...], state.last[...], ids_U, grads_UxD, step)
    return values_NxD


def update_arrays(h: Hyper, values_NxD, m_NxD, v_NxD, last_N, ids_U, grads_UxD, step):
    """``update`` on plain arrays (a table shard inside a ``shard_map``): returns (values, m, v, last)."""
    take = lambda x: jnp.take(x, ids_U, axis=0, mode="fill", fill_value=0)  # noqa: E731
    p, m, v = take(values_NxD), take(m_NxD), take(v_NxD)
    if h.mode == "sparse":
        p, m, v = _catch_up(h, p, m, v, take(last_N), step)
    b1, b2 = jnp.float32(h.b1), jnp.float32(h.b2)
    g = grads_UxD.astype(jnp.float32)
    m = (1 - b1) * g + b1 * m  # optax's update_moment order
    v = (1 - b2) * g * g + b2 * v
    count = (step + 1).astype(jnp.float32)
    m_hat, v_hat = m / (1 - b1 ** count), v / (1 - b2 ** count)
    lr = jnp.asarray(h.lr_table)[jnp.minimum(step, h.lr_table.shape[0] - 1)]
    u = m_hat / (jnp.sqrt(v_hat) + h.eps) + h.wd * p
    p = p - lr * u
    put = lambda x, rows: x.at[ids_U].set(rows.astype(x.dtype), mode="drop")  # noqa: E731
    return put(values_NxD, p), put(m_NxD, m), put(v_NxD, v), last_N.at[ids_U].set(step + 1, mode="drop")


def flush(h: Hyper, values_NxD, state: RowAdamState, step):
    """Every row caught up to ``step`` optimizer steps (``sparse``; ``lazy`` has nothing to apply): afterwards
    the table and moments are dense AdamW's (up to the ε approximation).  Costs a pass over the table; for
    checkpoints and evaluation."""
    if h.mode != "sparse":
        return values_NxD
    p, m, v = _catch_up(h, values_NxD, state.m[...], state.v[...], state.last[...], step)
    state.m[...], state.v[...] = m, v
    state.last[...] = jnp.full_like(state.last[...], step)
    return p
