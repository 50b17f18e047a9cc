"""Row-sparse AdamW for the value tables (``optim.value_update: sparse | lazy``): cost follows the rows a step
touches, not the table.

The train step differentiates with respect to the *gathered* rows (memory.ValueTap), so the table's gradient
is never built at N × D_v; ``sum_duplicates`` turns the T·K row cotangents into one gradient per touched row,
and ``update`` reads, updates and writes back only those rows of the table and of both moments (scatters into
the donated buffers).  ``last[r]`` counts the optimizer steps row r has been brought up to.

``sparse``: dense AdamW's trajectory (losses, gradients, table and moments), up to float32 rounding and the ~1e-6
relative interpolation error below.  A row untouched for steps s … t−1 had a zero gradient there, so dense AdamW
would have applied, with the step-j constants lr_j, ĉ1_j = 1 − β₁^(j+1), ĉ2_j = 1 − β₂^(j+1):

    m ← β₁^k m,   v ← β₂^k v                                                (k = t − s)
    p ← A p − Σ_{d=1..k} α_d m / (β_d √v + ε),   A = Π_j (1 − lr_j·wd),   j = s + d − 1,
         α_d = lr_j β₁^d / ĉ1_j · Π_{i>j} (1 − lr_i·wd),   β_d = √(β₂^d / ĉ2_j)

The stored row lags by those steps until it is next updated, so whatever uses it applies this catch-up first:
the train step's lookups read the gathered rows through ``Hyper.read`` (lookup.RowSource: the forward pass,
and so the gradient, sees dense AdamW's parameters, not the stale row), ``update`` applies it to a touched row
before the step's own AdamW update (storing what the forward read, then the step), and ``flush`` to every row
(checkpoints and evaluation then see the dense optimizer's table and moments).  A and the weight
decay products come from a float64 table of Σ log(1 − lr_j·wd) over the run's schedule.  The momentum sum is
elementwise through √v, so it cannot be reduced to a few scalars per row exactly; with x = √v, c_d = 1/β_d and
w_d = α_d/β_d it is

    Σ_d α_d / (β_d x + ε)  =  Σ_d w_d f(log c_d),   f(t) = 1 / (x + ε·e^t),

and f is smooth in t = log c (analytic in the strip |Im t| < π, whatever x).  So f is replaced by its Chebyshev
interpolant over the row's range [log c_1, log c_K] (K = min(k, horizon)), which turns the sum into
Σ_i W_i / (x + ε C_i) over ``Hyper.nodes`` fixed points C_i of that range, with per-row weights W_i that are
linear in the w_d (their Chebyshev moments).  ``nodes`` (8–17 for the usual β's) is picked from the widest range
a row can have so the sum is right to ~1e-6 of itself for every √v, from far above ε through ε to far below.
(An earlier one-term form, B₁ / (x + ε·B₂/B₁), was exact only to first order in ε/(β_d x): for entries with √v̂
near ε, whose skipped steps dense AdamW damps by ε, it was 0.5 % off, 1e-3 on a table entry.)  The sums stop
after ``horizon(b1, b2)`` terms (ρ^d < 1e-9 beyond, ρ = β₁/√β₂); ``tests/test_sparse_update.py`` checks them
against NumPy float64 steps.  The weights cost O(1) per row, not O(horizon): divided by A's factor they depend
on ``last`` alone once k ≥ horizon (a table over the run's steps, built once in float64), and on k alone below
it (``horizon`` weight sets per step, shared by every row); each entry then costs ``nodes`` divisions.

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
        # per skipped step j: lr_j·√ĉ2_j/ĉ1_j (with (β₁/√β₂)^d and the decay after j: the weight w_d below)
        j = np.arange(total_steps + 1 + self.horizon)
        lr_j = lr[np.minimum(j, total_steps)]
        terms = lr_j * np.sqrt(1 - b2 ** (j + 1.0)) / (1 - b1 ** (j + 1.0))
        self.term_table = terms.astype(np.float32)
        # the momentum sum Σ_d w_d / (√v + ε c_d) by Chebyshev interpolation in log c over each row's range
        # (module docstring): ``nodes`` points, enough for ~1e-6 of the sum over the widest range a row can have
        H = max(self.horizon, 1)
        half = 0.5 * float(_log_c(np, b2, H - 1, H) - _log_c(np, b2, 0, 1))
        wide = 0.8 * math.pi  # log c ↦ 1/(√v + ε c) is analytic in the strip |Im log c| < π
        rate = (wide + math.hypot(half, wide)) / half if half > 0 else math.inf
        self.nodes = int(np.clip(math.ceil(math.log(2e4) / math.log(rate)), 2, 32))
        i = np.arange(self.nodes)
        self.cheb_x = np.cos((2 * i + 1) * np.pi / (2 * self.nodes))  # the nodes on [-1, 1]
        # node weights from Chebyshev moments μ_m = Σ_d w_d T_m(s_d): W_i = (2/n) Σ'_m T_m(x_i) μ_m
        to_weights = (2.0 / self.nodes) * np.cos(np.outer(i, np.arccos(self.cheb_x)))
        to_weights[0] *= 0.5
        self.to_weights = to_weights
        # a row untouched for k ≥ horizon steps since ``last``: its node weights relative to the decay up to
        # ``last`` (coef_a carries the rest), one row per ``last`` (float64 before the cast)
        decay_at = lambda i: log_decay[np.minimum(i, total_steps + 1)]  # noqa: E731
        last = np.arange(total_steps + 2)
        lo, hi = _log_c(np, b2, last, 1), _log_c(np, b2, last + H - 1, H)
        moments = np.zeros((last.shape[0], self.nodes))
        for d in range(1, self.horizon + 1):
            jj = last + d - 1
            w = (b1 / math.sqrt(b2)) ** d * terms[np.minimum(jj, len(j) - 1)] * np.exp(decay_at(last) - decay_at(jj + 1))
            moments += w[:, None] * _chebyshev(np, _unit(np, _log_c(np, b2, jj, d), lo, hi), self.nodes)
        self.full_weights = (moments @ to_weights).astype(np.float32)
        # and its nodes ε·C_i, one row per ``last`` up to where they stop changing in float32 (ĉ2 → 1): a row's
        # nodes are then one gather, not ``nodes`` exponentials
        eps_c = (eps * _node_c(np, lo, hi, self.cheb_x)).astype(np.float32)
        same = np.all(eps_c == eps_c[-1], axis=1)  # a run of rows equal to the last one ends the table
        self.full_eps_c = eps_c[:1] if same.all() else eps_c[:len(same) - np.argmin(same[::-1]) + 1]

    def read(self, p, m, v, last, step):
        """Gathered rows ``p`` as dense AdamW holds them before step ``step``: their skipped steps since ``last``
        caught up (``_catch_up``'s parameter part).  The sparse train step's lookups read the rows through this
        (``lookup.RowSource``), so the forward pass sees dense AdamW's parameters.

        The caught-up rows are materialised (an optimization barrier): left to itself XLA's CPU backend fused
        the catch-up into the lookup's transposing reshape and split its node sum into a fusion per node, which
        made tiny-x12's sparse train step 803 ms against 502 ms with the barrier (benchmarks/step_time.py)."""
        return jax.lax.optimization_barrier(_catch_up(self, p, m, v, last, step)[0])


def sum_duplicates(ids_TxK: jax.Array, grads_TxKxD: jax.Array, num_rows: int):
    """(ids_U, grads_UxD): each distinct row once with its summed gradient; U = min(T·K, num_rows + 1) slots (no
    more distinct ids can occur: the table's rows and the padding id of a shard's foreign reads), the unused
    ones padded with id ``num_rows`` (outside the table: gathers fill, scatters drop them) and zero gradients.
    Every later per-row cost scales with U, so a table smaller than a step's reads pays for its rows only."""
    ids = ids_TxK.reshape(-1)
    size = min(ids.shape[0], num_rows + 1)
    uniq, inverse = jnp.unique(ids, size=size, fill_value=num_rows, return_inverse=True)
    grads = jax.ops.segment_sum(grads_TxKxD.reshape(ids.shape[0], -1), inverse.reshape(-1), num_segments=size)
    return uniq.astype(jnp.int32), grads


def _log_c(xp, b2, j, d):
    """log c_d = log √(ĉ2_j / β₂^d): the d-th skipped step's √v̂ is √v / c_d (j = last + d − 1)."""
    return 0.5 * (xp.log1p(-xp.power(b2, j + 1.0)) - d * math.log(b2))


def _unit(xp, t, lo, hi):
    """t mapped from [lo, hi] onto [−1, 1] (a one-point range onto 0)."""
    width = hi - lo
    return xp.clip((2 * t - lo - hi) / xp.where(width > 0, width, 1.0), -1.0, 1.0)


def _node_c(xp, lo, hi, cheb_x):
    """The Chebyshev nodes C_i = c at the points ``cheb_x`` of a row's range [lo, hi] = [log c_1, log c_K]
    (…× nodes)."""
    return xp.exp(0.5 * (lo + hi)[..., None] + 0.5 * (hi - lo)[..., None] * cheb_x)


def _chebyshev(xp, s, n):
    """T_0(s) … T_{n−1}(s) along a new last axis."""
    out = [xp.ones_like(s), s]
    for _ in range(2, n):
        out.append(2 * s * out[-1] - out[-2])
    return xp.stack(out[:n], axis=-1)


def _catch_up(h: Hyper, p, m, v, last, step):
    """Rows (p, m, v: …×D, ``last``: … per row) brought from step ``last`` up to ``step`` (exclusive) as dense
    AdamW would with zero gradients.  The momentum sum's node weights take O(1) per row: rows absent for
    ≥ horizon steps read a table indexed by ``last`` (Hyper.full_weights); the rest share this step's
    ``horizon`` possible weight sets (k = 0 … horizon − 1), computed once per call."""
    k = step - last
    b1, b2 = jnp.float32(h.b1), jnp.float32(h.b2)
    log_decay = jnp.asarray(h.log_decay)
    n_tab = log_decay.shape[0] - 1
    decay_at = lambda i: log_decay[jnp.clip(i, 0, n_tab)]  # noqa: E731
    log_c = lambda j, d: _log_c(jnp, h.b2, jnp.asarray(j, jnp.float32), jnp.asarray(d, jnp.float32))  # noqa: E731
    # recent: for k = 0 … H−1 (last = step − k), w_d = (β₁/√β₂)^d · term_j · exp(D[last] − D[j+1]), d ≤ k,
    # j = last + d − 1, and their Chebyshev moments over the row's log c range
    H, n = h.horizon, h.nodes
    d_H = jnp.arange(1, H + 1)
    powers_H = jnp.asarray((h.b1 / math.sqrt(h.b2)) ** np.arange(1, H + 1), jnp.float32)
    terms = jnp.asarray(h.term_table)

    # all H × H (k, d) pairs at once: a fixed ~0.3 MB per array, cheaper to compile (0.8 against 2.9 CPU-s) than
    # a loop over blocks of k
    k_H = jnp.arange(H)[:, None]
    last_H = jnp.maximum(step - k_H, 0)
    j_HxH = jnp.clip(last_H + d_H[None, :] - 1, 0, terms.shape[0] - 1)
    w_HxH = jnp.where(d_H[None, :] <= k_H, powers_H[None, :] * terms[j_HxH]
                      * jnp.exp(decay_at(last_H) - decay_at(last_H + d_H[None, :])), 0.0)
    # each k's range [log c_1, log c_K], K = min(k, H), at least 1 (a row with k = 0 has zero weights)
    K_H = jnp.maximum(k_H, 1)
    lo_H, hi_H = log_c(last_H, 1), log_c(last_H + K_H - 1, K_H)
    s_HxH = _unit(jnp, log_c(j_HxH, d_H[None, :]), lo_H, hi_H)
    moments, t_prev, t_now = [], jnp.ones_like(s_HxH), s_HxH
    for i in range(n):  # Σ_d w_d T_i(s_d), one H × H term at a time (no H × H × nodes temporary)
        if i >= 2:
            t_prev, t_now = t_now, 2 * s_HxH * t_now - t_prev
        moments.append(jnp.sum(w_HxH * (t_prev if i == 0 else t_now), axis=1))
    recent_Hxn = jnp.stack(moments, axis=1) @ jnp.asarray(h.to_weights, jnp.float32)
    # the nodes of the same H ranges
    recent_c_Hxn = h.eps * _node_c(jnp, lo_H[:, 0], hi_H[:, 0], jnp.asarray(h.cheb_x, jnp.float32))
    # per row: the weights and nodes of its k (k < H) or of its ``last`` (k ≥ H), gathered
    full, full_c = jnp.asarray(h.full_weights), jnp.asarray(h.full_eps_c)
    recent = jnp.clip(k, 0, H - 1)
    long = (k >= H)[..., None]
    weights = jnp.where(long, full[jnp.clip(last, 0, full.shape[0] - 1)], recent_Hxn[recent])
    eps_c = jnp.where(long, full_c[jnp.clip(last, 0, full_c.shape[0] - 1)], recent_c_Hxn[recent])
    coef_a = jnp.exp(decay_at(step) - decay_at(last))
    x = jnp.sqrt(v)
    # Σ_i W_i / (√v + ε C_i), one node at a time: an elementwise chain XLA fuses into one loop over the entries,
    # vectorised along D (a reduction over a trailing nodes axis ran scalar on CPU: 6x slower), no …×D×nodes
    # temporary
    total = weights[..., None, 0] / (x + eps_c[..., None, 0])
    for i in range(1, h.nodes):
        total = total + weights[..., None, i] / (x + eps_c[..., None, i])
    kf = k.astype(jnp.float32)[..., None]
    p = coef_a[..., None] * (p - m * total)
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
    the table and moments are dense AdamW's (up to rounding).  Costs a pass over the table; for
    checkpoints and evaluation."""
    if h.mode != "sparse":
        return values_NxD
    p, m, v = _catch_up(h, values_NxD, state.m[...], state.v[...], state.last[...], step)
    state.m[...], state.v[...] = m, v
    state.last[...] = jnp.full_like(state.last[...], step)
    return p
