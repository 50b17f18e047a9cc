"""The whole retrieval search, queries and keys in, winners out: the reference op of the fused search kernel.

    S_row = K_row q_row,  S_col = K_col q_col                          rank-r key scores (tdqkr.py)
    winners = TDQKR + MCS top-m   or   additive product-key top-m      (tdqkr.py, product_keys.py)

``search`` is the oracle and the XLA fallback of ``pallas_kernels.key_search``, which has the same signature.
``rescore`` recomputes the winners' scores from their slot ids; its gradient equals the search's (the top-m
selection itself is piecewise constant), so the kernels' backward pass is ``jax.vjp`` of it.
Shapes: T tokens, H heads, N keys per side, D key width, R Tucker rank, C cores, M winners per head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ultramem_jax import product_keys, tdqkr


def search(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False):
    """Returns ``(scores_TxHxMxC, slots_TxHxM)``, best first; slot = row·N + col.

    Queries are T×H×D, or T×H×R×D for one query per Tucker rank (UltraMemV2).

    ``additive`` selects PKM scoring (s_row + s_col, rank 1, one core); ``cores``, ``u``, ``t`` are then unused.
    """
    s_row = tdqkr.rank_key_scores(query_row_TxHxD, keys_row_HxNxDxR)
    s_col = tdqkr.rank_key_scores(query_col_TxHxD, keys_col_HxNxDxR)
    if additive:
        scores, slots = product_keys.product_key_topk(s_row[:, :, 0], s_col[:, :, 0], preselect, topk)
        return scores[..., None], slots
    return tdqkr.tdqkr_topk(s_row, s_col, cores_CxHxRxR, u_HxR, t_HxR, preselect, topk)


def rescore(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
            slots_TxHxM, additive: bool = False):
    """The scores ``search`` returns for the winners ``slots``, computed from their keys alone."""
    n = keys_row_HxNxDxR.shape[1]
    rows, cols = slots_TxHxM // n, slots_TxHxM % n
    pick = jax.vmap(lambda keys_NxDxR, ids_TxM: keys_NxDxR[ids_TxM], in_axes=(0, 1), out_axes=1)
    spec = "thrd,thmdr->thmr" if query_row_TxHxD.ndim == 4 else "thd,thmdr->thmr"  # per-rank queries (V2)
    s_row_TxHxMxR = jnp.einsum(spec, query_row_TxHxD, pick(keys_row_HxNxDxR, rows))
    s_col_TxHxMxR = jnp.einsum(spec, query_col_TxHxD, pick(keys_col_HxNxDxR, cols))
    if additive:
        return (s_row_TxHxMxR[..., 0] + s_col_TxHxMxR[..., 0])[..., None]
    return jnp.einsum("thma,chab,thmb->thmc", s_row_TxHxMxR, cores_CxHxRxR, s_col_TxHxMxR)
