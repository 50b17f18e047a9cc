"""Tucker Decomposed Query-Key Retrieval (TDQKR) with Multi-Core Scoring (MCS) — method notes A.3–A.4.

Notation (paper → code): r Tucker rank, h = C cores, n' = N keys per side, m_pre = P pre-selected rows/cols,
m = M winners, H heads, T tokens.

* Rank-r key scores (A.2):       S_row[a, i] = <q_row, K_row[i, :, a]>                 (r × n')
* Grid score with core C (eq. 6): S_grid = S_rowᵀ C S_col                                (n' × n')
* MCS (A.4):                      C = Σ_c C⁽ᶜ⁾;  S⁽ᶜ⁾ = S̃_rowᵀ C⁽ᶜ⁾ S̃_col; selection uses Σ_c S⁽ᶜ⁾
* Rank-1 pre-selection (eqs 7–9): C_sum ≈ u σ tᵀ;  I_r = top-m_pre(uᵀ S_row),  I_c = top-m_pre(tᵀ S_col)
* Re-scoring (eq. 10):            G⁽ᶜ⁾ = S_row[:, I_r]ᵀ C⁽ᶜ⁾ S_col[:, I_c]  (m_pre × m_pre), final top-m of Σ_c G⁽ᶜ⁾
* Auxiliary loss (A.3):           L_aux = α/(r−1) · Σ_{i≥2} relu(λ_i − τ)²   on the singular values of C_sum

u and t are the detached leading singular vectors of C_sum, refreshed once per optimizer step by
``refresh_tucker_vectors`` (with sign continuity); no gradient flows through the pre-selection.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rank_key_scores(query_TxHxD: jax.Array, keys_HxNxDxR: jax.Array) -> jax.Array:
    """S[t, h, a, i] = <q[t, h], K[h, i, :, a]>: one score per Tucker rank a.  Returns T×H×R×N.

    A T×H×R×D query is one query per rank (UltraMemV2): S[t, h, a, i] = <q[t, h, a], K[h, i, :, a]>.
    """
    if query_TxHxD.ndim == 4:
        return jnp.einsum("thrd,hndr->thrn", query_TxHxD, keys_HxNxDxR)
    return jnp.einsum("thd,hndr->thrn", query_TxHxD, keys_HxNxDxR)


def tdqkr_topk(scores_row_TxHxRxN: jax.Array, scores_col_TxHxRxN: jax.Array, cores_CxHxRxR: jax.Array,
               u_HxR: jax.Array, t_HxR: jax.Array, preselect: int, topk: int):
    """Approximate top-m of Σ_c S_rowᵀ C⁽ᶜ⁾ S_col over the n'×n' grid.

    Returns ``(scores_TxHxMxC, slots_TxHxM)``: each winner's score under each core (the selection used
    their sum), best first, and its slot id ``i·n' + j``.
    """
    n = scores_row_TxHxRxN.shape[-1]
    # Rank-1 pre-selection: the product-key form (uᵀS_row)(tᵀS_col) of the leading singular pair.
    pre_row_TxHxN = jnp.einsum("thrn,hr->thn", jax.lax.stop_gradient(scores_row_TxHxRxN), u_HxR)
    pre_col_TxHxN = jnp.einsum("thrn,hr->thn", jax.lax.stop_gradient(scores_col_TxHxRxN), t_HxR)
    _, rows_TxHxP = jax.lax.top_k(pre_row_TxHxN, preselect)
    _, cols_TxHxP = jax.lax.top_k(pre_col_TxHxN, preselect)
    sel_row_TxHxRxP = jnp.take_along_axis(scores_row_TxHxRxN, rows_TxHxP[:, :, None, :], axis=-1)
    sel_col_TxHxRxP = jnp.take_along_axis(scores_col_TxHxRxN, cols_TxHxP[:, :, None, :], axis=-1)
    # Re-score the P×P candidates with every core (MCS), select by the sum.
    grid_TxHxCxPxP = jnp.einsum("thai,chab,thbj->thcij", sel_row_TxHxRxP, cores_CxHxRxR, sel_col_TxHxRxP)
    T, H, C, P, _ = grid_TxHxCxPxP.shape
    grid_TxHxCxPP = grid_TxHxCxPxP.reshape(T, H, C, P * P)
    _, flat_TxHxM = jax.lax.top_k(grid_TxHxCxPP.sum(axis=2), topk)
    scores_TxHxCxM = jnp.take_along_axis(grid_TxHxCxPP, flat_TxHxM[:, :, None, :], axis=-1)
    rows = jnp.take_along_axis(rows_TxHxP, flat_TxHxM // P, axis=-1)
    cols = jnp.take_along_axis(cols_TxHxP, flat_TxHxM % P, axis=-1)
    return jnp.moveaxis(scores_TxHxCxM, 2, 3), (rows * n + cols).astype(jnp.int32)


def brute_force_grid_topk(scores_row_TxHxRxN, scores_col_TxHxRxN, cores_CxHxRxR, topk: int):
    """The exact top-m over the whole n'×n' grid (the oracle; O(n'²) per token)."""
    grid = jnp.einsum("thai,chab,thbj->thij", scores_row_TxHxRxN, cores_CxHxRxR, scores_col_TxHxRxN)
    T, H, N, _ = grid.shape
    return jax.lax.top_k(grid.reshape(T, H, N * N), topk)


def refresh_tucker_vectors(cores_CxHxRxR: jax.Array, u_prev_HxR: jax.Array, t_prev_HxR: jax.Array):
    """Leading singular pair (u, t) of C_sum = Σ_c C⁽ᶜ⁾ per head, detached and sign-continuous.

    (u, t) and (−u, −t) describe the same rank-1 matrix, but the two separate top-m's are not sign
    invariant: flipping both would pre-select the most-negative quadrant.  Of the two we keep the pair
    closer (L1) to the previous one; the previous pair starts at the all-positive direction, so the first
    refresh picks the orientation with a non-negative sum (the released code keeps SVD's arbitrary sign).
    """
    c_sum = jax.lax.stop_gradient(cores_CxHxRxR).astype(jnp.float32).sum(axis=0)
    U, _, Vt = jnp.linalg.svd(c_sum)
    u, t = U[:, :, 0], Vt[:, 0, :]
    keep = jnp.abs(u - u_prev_HxR).sum(-1) + jnp.abs(t - t_prev_HxR).sum(-1)
    flip = jnp.abs(-u - u_prev_HxR).sum(-1) + jnp.abs(-t - t_prev_HxR).sum(-1)
    sign = jnp.where(flip < keep, -1.0, 1.0)[:, None]
    return sign * u, sign * t


def initial_tucker_vectors(heads: int, rank: int):
    """The reference direction before the first refresh: all-positive unit vectors."""
    v = jnp.full((heads, rank), 1.0 / jnp.sqrt(rank), jnp.float32)
    return v, v


def core_singular_values(cores_CxHxRxR: jax.Array) -> jax.Array:
    """λ₁ ≥ … ≥ λ_r of C_sum per head (H×R)."""
    return jnp.linalg.svd(cores_CxHxRxR.astype(jnp.float32).sum(axis=0), compute_uv=False)


def tucker_aux_loss(cores_CxHxRxR: jax.Array, alpha: float, tau: float, reduction: str = "paper") -> jax.Array:
    """α/(r−1)·Σ_{i≥2} relu(λ_i − τ)²: keeps C close to rank 1 so the pre-selection is accurate.

    ``paper`` sums the per-head penalties (each head has its own core); ``code`` averages them, as the
    released helper does.
    """
    lam_HxR = core_singular_values(cores_CxHxRxR)
    per_head = jnp.mean(jax.nn.relu(lam_HxR[:, 1:] - tau) ** 2, axis=-1)
    return alpha * (per_head.sum() if reduction == "paper" else per_head.mean())
