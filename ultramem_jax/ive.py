"""Implicit Value Expansion (IVE) and the weighted value gather — method notes A.4–A.5.

The key grid addresses E·N virtual slots; only N physical rows V ∈ R^{N×D_v} exist.  A fixed random
permutation π maps virtual slot v to (block p, physical row):  p = π(v) div N,  row = π(v) mod N.
Virtual block p is V·W_p, so instead of materialising Ṽ we *pool first, project second*:

    o = Σ_p W_pᵀ ( Σ_{k: p_k = p} s_k · V[row_k] )

With MCS the value splits into h = C slices; slice c of every selected row is weighted by core c's score.
``gather_pool`` is the reference op (the oracle and XLA fallback of the Pallas kernels); shapes: T tokens,
K selected rows per token, C cores, E blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ultramem_jax.gather import take_rows


def make_permutation(seed: int, num_virtual: int) -> np.ndarray:
    """The fixed shuffle π of [0, E·N), drawn once (numpy, so it costs no device compile)."""
    return np.random.default_rng(seed).permutation(num_virtual).astype(np.int32)


def virtual_to_physical(slots: jax.Array, permutation: jax.Array | None, num_values: int):
    """Virtual slot ids → (block id in [0, E), physical row in [0, N))."""
    v = slots if permutation is None else take_rows(permutation, slots)
    return v // num_values, v % num_values


def gather_pool(values_NxD: jax.Array, rows_TxK: jax.Array, blocks_TxK: jax.Array, scores_TxKxC: jax.Array,
                num_blocks: int, gathered_TxKxD: jax.Array | None = None) -> jax.Array:
    """pooled[t, p, c-th slice] = Σ_{k: block[t,k]=p} scores[t,k,c] · values[rows[t,k], c-th slice].

    Returns T×E×D.  This reference gathers T×K×D rows; the gradient w.r.t. ``values`` is a scatter-add,
    exactly zero on rows nobody selected.  ``gathered_TxKxD``: the rows, already read by the caller (the sparse
    value update's tapped read, lookup.read_rows); ``values`` is then not read.
    """
    T, K = rows_TxK.shape
    C = scores_TxKxC.shape[-1]
    D = values_NxD.shape[-1]
    if gathered_TxKxD is None:
        gathered_TxKxD = take_rows(values_NxD, rows_TxK)
    rows_TxKxCxd = gathered_TxKxD.reshape(T, K, C, D // C)
    onehot_TxKxE = jax.nn.one_hot(blocks_TxK, num_blocks, dtype=scores_TxKxC.dtype)
    weights_TxKxExC = onehot_TxKxE[..., :, None] * scores_TxKxC[..., None, :]
    pooled_TxExCxd = jnp.einsum("tkec,tkcd->tecd", weights_TxKxExC, rows_TxKxCxd.astype(scores_TxKxC.dtype))
    return pooled_TxExCxd.reshape(T, num_blocks, D)


def materialised_virtual_table(values_NxD, projections_ExDxO, permutation, num_values):
    """Ṽ[v] = V[row(v)] · W_{block(v)}: the E·N×O table IVE never builds (used as a test oracle)."""
    blocks, rows = virtual_to_physical(jnp.arange(projections_ExDxO.shape[0] * num_values), permutation,
                                       num_values)
    return jnp.einsum("vd,vdo->vo", values_NxD[rows], projections_ExDxO[blocks])
