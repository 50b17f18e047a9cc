"""Product-key retrieval (PKM, Lample et al. 2019): additive row + column scores over an n×n key grid.

Slot (i, j) of the grid scores ``s_row[i] + s_col[j]``.  The top-m of the grid lies inside
top-m(rows) × top-m(cols), so two top-m's over n keys and one over m² candidates replace a top-m over n².
Shapes: T tokens, H heads, N keys per side, M selected.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def product_key_topk(scores_row_TxHxN: jax.Array, scores_col_TxHxN: jax.Array, preselect: int, topk: int):
    """Exact top-``topk`` of ``s_row[i] + s_col[j]`` over the grid.

    Returns ``(scores_TxHxM, slots_TxHxM)``: the winners' scores, best first, and their slot ids
    ``i·N + j``.  Scores are differentiable w.r.t. the inputs (through the selected entries only).
    """
    n = scores_row_TxHxN.shape[-1]
    top_row_TxHxP, idx_row_TxHxP = jax.lax.top_k(scores_row_TxHxN, preselect)
    top_col_TxHxP, idx_col_TxHxP = jax.lax.top_k(scores_col_TxHxN, preselect)
    grid_TxHxPxP = top_row_TxHxP[..., :, None] + top_col_TxHxP[..., None, :]
    grid_TxHxPP = grid_TxHxPxP.reshape(*grid_TxHxPxP.shape[:-2], preselect * preselect)
    scores_TxHxM, flat_TxHxM = jax.lax.top_k(grid_TxHxPP, topk)
    rows = jnp.take_along_axis(idx_row_TxHxP, flat_TxHxM // preselect, axis=-1)
    cols = jnp.take_along_axis(idx_col_TxHxP, flat_TxHxM % preselect, axis=-1)
    return scores_TxHxM, (rows * n + cols).astype(jnp.int32)
