"""The IVE weighted gather-pool as a native CPU kernel (gather_pool.cc), with ``ive.gather_pool``'s signature.

Float32 tables and scores (the caller, kernels.py, takes the XLA op otherwise). Backward: the score gradient
and the dense N×D table gradient in one call.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cpu_kernels import build


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks: int):
    """pooled[t, p, c-th slice] = Σ_{k: block[t,k]=p} scores[t,k,c] · values[rows[t,k], c-th slice] → T×E×D."""
    build.load()
    T = rows_TxK.shape[0]
    out = jax.ShapeDtypeStruct((T, num_blocks, values_NxD.shape[1]), jnp.float32)
    return jax.ffi.ffi_call("ultramem_gather_pool_fwd", out, vmap_method="sequential")(
        values_NxD, rows_TxK.astype(jnp.int32), blocks_TxK.astype(jnp.int32), scores_TxKxC)


def _fwd(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks):
    pooled = gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks)
    return pooled, (values_NxD, rows_TxK, blocks_TxK, scores_TxKxC)


def _bwd(num_blocks, res, d_pooled_TxExD):
    values_NxD, rows_TxK, blocks_TxK, scores_TxKxC = res
    shapes = (jax.ShapeDtypeStruct(values_NxD.shape, jnp.float32), jax.ShapeDtypeStruct(scores_TxKxC.shape,
                                                                                        jnp.float32))
    d_values, d_scores = jax.ffi.ffi_call("ultramem_gather_pool_bwd", shapes, vmap_method="sequential")(
        values_NxD, rows_TxK.astype(jnp.int32), blocks_TxK.astype(jnp.int32), scores_TxKxC,
        d_pooled_TxExD.astype(jnp.float32))
    return d_values, None, None, d_scores


gather_pool.defvjp(_fwd, _bwd)
