"""The whole retrieval search, queries and keys in, winners out: the reference op of the fused search kernel.

    S_row = K_row q_row,  S_col = K_col q_col                          rank-r key scores (tdqkr.py)
    winners = TDQKR + MCS top-m   or   additive product-key top-m      (tdqkr.py, product_keys.py)

``search`` is the oracle and the XLA fallback of ``pallas_kernels.key_search``, which has the same signature.
``rescore`` recomputes the winners' scores from their slot ids; its gradient equals the search's (the top-m
selection itself is piecewise constant), so both the kernels' backward pass and this op's are ``rescore``'s.
Shapes: T tokens, H heads, N keys per side, D key width, R Tucker rank, C cores, P pre-selected keys per side,
M winners per head.

``select`` picks the same winners as ``tdqkr.tdqkr_topk`` / ``product_keys.product_key_topk`` over the full
rank scores (up to float rounding at near-ties) but never forms a T×H×R×N array:
  * the pre-selection score uᵀS_row = q·(K_row u) takes one matmul with the keys folded along the rank
    (an R-th of the rank scores' work);
  * only the P pre-selected keys per token get their R rank scores (a gather, not a T×H×R×N matmul);
  * the P×P grid is scored once with Σ_c C⁽ᶜ⁾ (the selection only needs the sum); the per-core scores of the
    M winners come from ``rescore``;
  * no gradient goes through the selection; ``rescore``'s backward touches only the M winners' keys;
  * the three top-k's run as a sorting network on CPU, where XLA's TopK is a scalar sort per row (topk.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ultramem_jax import topk as topk_lib
from ultramem_jax.gather import take_along


def _pick(keys_HxNxDxR, ids_TxHxK):
    """keys[h, ids[t, h, k]] → T×H×K×D×R."""
    return jax.vmap(lambda keys_NxDxR, ids_TxK: keys_NxDxR[ids_TxK], in_axes=(0, 1), out_axes=1)(keys_HxNxDxR,
                                                                                              ids_TxHxK)


def top_ids(scores_TxHxN, k: int):
    """Ids of the k best scores, best first, ties to the lowest id (``lax.top_k``'s order; a sorting network
    on CPU, topk.py)."""
    return topk_lib.top_k_ids(scores_TxHxN, k)


def preselect_scores(query_TxHxD, keys_HxNxDxR, direction_HxR):
    """<q, K·direction> for every key, T×H×N in float32: the rank-1 pre-selection score uᵀS (tᵀS)."""
    if query_TxHxD.ndim == 4:  # T×H×R×D: one query per Tucker rank (UltraMemV2), so the keys cannot be folded
        folded_HxNxDxR = keys_HxNxDxR.astype(jnp.float32) * direction_HxR.astype(jnp.float32)[:, None, None, :]
        return jnp.einsum("thrd,hndr->thn", query_TxHxD, folded_HxNxDxR.astype(query_TxHxD.dtype),
                          preferred_element_type=jnp.float32)
    folded_HxNxD = jnp.einsum("hndr,hr->hnd", keys_HxNxDxR.astype(jnp.float32), direction_HxR.astype(jnp.float32))
    return jnp.einsum("thd,hnd->thn", query_TxHxD, folded_HxNxD.astype(query_TxHxD.dtype),
                      preferred_element_type=jnp.float32)


def rank_scores_at(query_TxHxD, keys_HxNxDxR, ids_TxHxP):
    """The R rank scores of the keys ``ids`` only, T×H×R×P in float32."""
    spec = "thrd,thpdr->thrp" if query_TxHxD.ndim == 4 else "thd,thpdr->thrp"  # per-rank queries (V2)
    return jnp.einsum(spec, query_TxHxD, _pick(keys_HxNxDxR, ids_TxHxP), preferred_element_type=jnp.float32)


def candidate_grid(s_row_TxHxRxP, s_col_TxHxRxP, cores_CxHxRxR, additive: bool):
    """The P×P candidates' selection scores T×H×P·P (flat index i·P + j): s_row + s_col, or Σ_c S_rowᵀC⁽ᶜ⁾S_col."""
    if additive:
        grid_TxHxPxP = s_row_TxHxRxP[:, :, 0, :, None] + s_col_TxHxRxP[:, :, 0, None, :]
    else:
        c_sum_HxRxR = cores_CxHxRxR.astype(jnp.float32).sum(axis=0)
        grid_TxHxPxP = jnp.einsum("thap,hab,thbq->thpq", s_row_TxHxRxP, c_sum_HxRxR, s_col_TxHxRxP)
    T, H, P, _ = grid_TxHxPxP.shape
    return grid_TxHxPxP.reshape(T, H, P * P)


def winners(grid_TxHxPP, rows_TxHxP, cols_TxHxP, n: int, topk: int):
    """Slot ids (row·n + col) of the ``topk`` best candidates, best first."""
    P = rows_TxHxP.shape[-1]
    flat_TxHxM = top_ids(grid_TxHxPP, topk)
    rows = take_along(rows_TxHxP, flat_TxHxM // P, axis=-1)
    cols = take_along(cols_TxHxP, flat_TxHxM % P, axis=-1)
    return (rows * n + cols).astype(jnp.int32)


# tokens of one head per step of the CPU path's loop: tiny-x12's selection (2048 tokens, 2 heads, 408 keys a side)
# took 35 / 33 / 33 / 28 / 30 ms at 128 / 256 / 512 / 1024 / 2048, the row path 37 ms (fewer loop steps, each
# a few hundred small ops, against arrays that stay in cache)
LANE_CHUNK = 1024


def select(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False):
    """The winners' slot ids T×H×M (slot = row·N + col), best first; no gradient."""
    arrays = selection_inputs(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
                              u_HxR, t_HxR, additive)
    q_row, k_row = arrays[0], arrays[2]
    static = dict(preselect=preselect, topk=topk, additive=additive)
    T, H, N = q_row.shape[0], q_row.shape[1], k_row.shape[1]
    if T * H * N < topk_lib.NETWORK_MIN_SCORES:  # too small to repay the networks' compile (topk.py)
        return select_rows(*arrays, **static)
    return jax.lax.platform_dependent(*arrays, cpu=functools.partial(select_lanes, **static),
                                      default=functools.partial(select_rows, **static))


def selection_inputs(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR,
                     t_HxR, additive: bool):
    """``select``'s arrays outside autodiff (it has no gradient), as every implementation of it takes them:
    ``(q_row, q_col, k_row, k_col, cores, u, t)``. Additive (PKM) scoring has rank 1, no cores and unit
    directions u = t = 1: the pre-selection score is the key score itself, as in product_key_topk."""
    q_row, q_col, k_row, k_col = jax.lax.stop_gradient(
        (query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR))
    if additive:
        ones_HxR = jnp.ones(k_row.shape[::3], jnp.float32)
        return q_row, q_col, k_row, k_col, None, ones_HxR, ones_HxR
    return q_row, q_col, k_row, k_col, jax.lax.stop_gradient(cores_CxHxRxR), u_HxR, t_HxR


def select_rows(q_row, q_col, k_row, k_col, cores_CxHxRxR, u_HxR, t_HxR, preselect, topk, additive):
    """``select`` with a token per row: the TPU/GPU path (``lax.top_k`` along the last axis)."""
    rows_TxHxP = top_ids(preselect_scores(q_row, k_row, u_HxR), preselect)
    cols_TxHxP = top_ids(preselect_scores(q_col, k_col, t_HxR), preselect)
    grid_TxHxPP = candidate_grid(rank_scores_at(q_row, k_row, rows_TxHxP), rank_scores_at(q_col, k_col, cols_TxHxP),
                                 cores_CxHxRxR, additive)
    return winners(grid_TxHxPP, rows_TxHxP, cols_TxHxP, k_row.shape[1], topk)


def select_lanes(q_row, q_col, k_row, k_col, cores_CxHxRxR, u_HxR, t_HxR, preselect, topk, additive,
                 lanes: int = 0):
    """``select`` with a token per lane: the CPU path.

    The sorting networks (topk.py) work on lanes, so here every score is computed with the tokens on the last
    axis: a chunk of ``LANE_CHUNK`` tokens of one head at a time, its arrays small enough for the cache,
    with no transpose between the matmuls and the networks. A chunk's R rank scores of every key come from one
    matmul (R·N·D per token, the size of the pre-selection's), and the pre-selected keys' rank scores are
    gathered from them (P·R numbers per token instead of P·D·R key entries). The gain is modest (tiny-x12:
    37 → 28 ms for both sides of one layer, benchmarks/search_profile.py): the networks' compare-swap passes
    remain most of the time. ``lanes``: tokens per chunk (0: ``LANE_CHUNK``).
    """
    T, H = q_row.shape[:2]
    N = k_row.shape[1]
    lanes = lanes or min(LANE_CHUNK, -(-T // 8) * 8)  # a decode step's few tokens: one small chunk, not 1024
    chunks = -(-T // lanes)
    P = preselect
    c_sum_HxRxR = None if additive else cores_CxHxRxR.astype(jnp.float32).sum(axis=0)

    def per_chunk(q):  # T×H×[R×]D → (H·chunks)×L×[R×]D, head-major
        q = jnp.pad(q, [(0, chunks * lanes - T)] + [(0, 0)] * (q.ndim - 1))
        q = jnp.moveaxis(q.reshape(chunks, lanes, *q.shape[1:]), 2, 0)
        return q.reshape(H * chunks, lanes, *q.shape[3:])

    R = k_row.shape[-1]
    k_row_HxRxNxD, k_col_HxRxNxD = (jnp.transpose(k, (0, 3, 1, 2)) for k in (k_row, k_col))

    def preselected(q_LxD, keys_RxNxD, direction_R):
        """The P best keys by the pre-selection score (P×L) and their R rank scores (R×P×L)."""
        if q_LxD.ndim == 3:  # per-rank queries (V2)
            s_RxNxL = jnp.einsum("rnd,lrd->rnl", keys_RxNxD, q_LxD, preferred_element_type=jnp.float32)
        else:  # one [R·N, D] × [D, L] matmul
            s_RxNxL = jnp.einsum("md,ld->ml", keys_RxNxD.reshape(R * N, -1), q_LxD,
                                 preferred_element_type=jnp.float32).reshape(R, N, -1)
        pre_NxL = jnp.einsum("r,rnl->nl", direction_R.astype(jnp.float32), s_RxNxL)
        ids_PxL = topk_lib.lanes_top_k_ids(pre_NxL, P)
        return ids_PxL, take_along(s_RxNxL, ids_PxL[None], axis=1)

    def chunk_winners(xs):
        q_row_L, q_col_L, h = xs
        rows_PxL, s_row_RxPxL = preselected(q_row_L, k_row_HxRxNxD[h], u_HxR[h])
        cols_PxL, s_col_RxPxL = preselected(q_col_L, k_col_HxRxNxD[h], t_HxR[h])
        if additive:
            grid_PxPxL = s_row_RxPxL[0, :, None] + s_col_RxPxL[0, None, :]
        else:  # Σ_ab s_row[a] C[a, b] s_col[b], elementwise over the lanes (R is small)
            c_RxR = c_sum_HxRxR[h]
            grid_PxPxL = sum(s_row_RxPxL[a, :, None] * s_col_RxPxL[b, None, :] * c_RxR[a, b]
                             for a in range(R) for b in range(R))
        flat_MxL = topk_lib.lanes_top_k_ids(grid_PxPxL.reshape(P * P, lanes), topk)
        rows = take_along(rows_PxL, flat_MxL // P, axis=0)
        cols = take_along(cols_PxL, flat_MxL % P, axis=0)
        return (rows * N + cols).astype(jnp.int32)

    heads = jnp.repeat(jnp.arange(H, dtype=jnp.int32), chunks)
    slots_GxMxL = jax.lax.map(chunk_winners, (per_chunk(q_row), per_chunk(q_col), heads))
    slots_CxLxHxM = slots_GxMxL.reshape(H, chunks, topk, lanes).transpose(1, 3, 0, 2)
    return slots_CxLxHxM.reshape(chunks * lanes, H, topk)[:T]


def search(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False):
    """Returns ``(scores_TxHxMxC, slots_TxHxM)``, best first; slot = row·N + col.

    Queries are T×H×D, or T×H×R×D for one query per Tucker rank (UltraMemV2).

    ``additive`` selects PKM scoring (s_row + s_col, rank 1, one core); ``cores``, ``u``, ``t`` are then unused.
    """
    slots_TxHxM = select(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
                         u_HxR, t_HxR, preselect, topk, additive)
    scores_TxHxMxC = rescore(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
                             slots_TxHxM, additive)
    return scores_TxHxMxC, slots_TxHxM


def rescore(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
            slots_TxHxM, additive: bool = False):
    """The scores ``search`` returns for the winners ``slots``, computed from their keys alone."""
    n = keys_row_HxNxDxR.shape[1]
    rows, cols = slots_TxHxM // n, slots_TxHxM % n
    spec = "thrd,thmdr->thmr" if query_row_TxHxD.ndim == 4 else "thd,thmdr->thmr"  # per-rank queries (V2)
    s_row_TxHxMxR = jnp.einsum(spec, query_row_TxHxD, _pick(keys_row_HxNxDxR, rows))
    s_col_TxHxMxR = jnp.einsum(spec, query_col_TxHxD, _pick(keys_col_HxNxDxR, cols))
    if additive:
        return (s_row_TxHxMxR[..., 0] + s_col_TxHxMxR[..., 0])[..., None]
    return jnp.einsum("thma,chab,thmb->thmc", s_row_TxHxMxR, cores_CxHxRxR, s_col_TxHxMxR)
