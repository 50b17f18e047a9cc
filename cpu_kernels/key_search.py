"""The key search with the winners' scores from a native CPU kernel (rescore.cc), with
``ultramem_jax.key_search.search``'s signature.

The selection is XLA's (``key_search.select``: no gradient); ``rescore`` — the scores of the M winners and,
backward, the gradients of the queries, keys and Tucker cores — is the C++ kernel. TDQKR with one float32 query
per side only; the caller (kernels.py) takes the XLA op for PKM scoring and UltraMemV2's per-rank queries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels import build
from ultramem_jax import key_search


def search(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False):
    """Returns ``(scores_TxHxMxC, slots_TxHxM)``, best first; slot = row·N + col."""
    if additive:
        raise ValueError("cpu_kernels.key_search: TDQKR scoring only (additive is XLA's)")
    slots_TxHxM = key_search.select(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR,
                                    cores_CxHxRxR, u_HxR, t_HxR, preselect, topk)
    return rescore(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
                   slots_TxHxM), slots_TxHxM


def rescore(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, slots_TxHxM):
    """``key_search.rescore`` (TDQKR): Σ_ab s_row[a] C_c[a, b] s_col[b] of each winner, T×H×M×C."""
    rank_major = lambda k: jnp.swapaxes(k, 2, 3)  # noqa: E731  H×N×R×D: contiguous D-long dots in the kernel
    return _rescore(query_row_TxHxD, query_col_TxHxD, rank_major(keys_row_HxNxDxR), rank_major(keys_col_HxNxDxR),
                    cores_CxHxRxR, slots_TxHxM)


@jax.custom_vjp
def _rescore(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxRxD, keys_col_HxNxRxD, cores_CxHxRxR, slots_TxHxM):
    build.load()
    T, H, M = slots_TxHxM.shape
    out = jax.ShapeDtypeStruct((T, H, M, cores_CxHxRxR.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("ultramem_rescore_fwd", out, vmap_method="sequential")(
        query_row_TxHxD, query_col_TxHxD, keys_row_HxNxRxD, keys_col_HxNxRxD, cores_CxHxRxR,
        slots_TxHxM.astype(jnp.int32))


def _fwd(*args):
    return _rescore(*args), args


def _bwd(res, d_scores_TxHxMxC):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in res[:5])
    grads = jax.ffi.ffi_call("ultramem_rescore_bwd", shapes, vmap_method="sequential")(
        *res[:5], res[5].astype(jnp.int32), d_scores_TxHxMxC.astype(jnp.float32))
    return (*grads, None)


_rescore.defvjp(_fwd, _bwd)
