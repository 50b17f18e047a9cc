"""The key search as native CPU kernels (select.cc, rescore.cc), with ``ultramem_jax.key_search.search``'s
signature.

``select`` picks the winners (no gradient); ``rescore`` computes their scores and, backward, the gradients of the
queries, keys and Tucker cores. One query per side in float32 (the caller, kernels.py, takes the XLA op for
UltraMemV2's per-rank queries); PKM's additive scoring selects here and rescores with the XLA op.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import build
from ultramem_jax import key_search

KEY_LANES = 16  # select.cc's kLanes: the keys it scores per block


def search(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False):
    """Returns ``(scores_TxHxMxC, slots_TxHxM)``, best first; slot = row·N + col."""
    args = (query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR)
    slots_TxHxM = select(*args, u_HxR, t_HxR, preselect, topk, additive)
    if additive:
        return key_search.rescore(*args, slots_TxHxM, additive=True), slots_TxHxM
    return rescore(*args, slots_TxHxM), slots_TxHxM


def select(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False):
    """``key_search.select``: the winners' slot ids T×H×M, best first (ties to the lower id); no gradient."""
    build.load()
    q_row, q_col, k_row, k_col, cores, u, t = key_search.selection_inputs(
        query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR, additive)
    H, N = k_row.shape[:2]
    # the grid needs only Σ_c C⁽ᶜ⁾; additive scoring ignores it
    core_sum_HxRxR = jnp.zeros((H, 1, 1), jnp.float32) if cores is None else cores.astype(jnp.float32).sum(axis=0)
    u, t = (jax.lax.stop_gradient(x).astype(jnp.float32) for x in (u, t))
    pad = -N % KEY_LANES

    def keys_last(k):  # H×R×D×N_pad: keys contiguous, in whole blocks of the kernel's accumulators
        return jnp.pad(jnp.transpose(k, (0, 3, 2, 1)).astype(jnp.float32), [(0, 0)] * 3 + [(0, pad)])
    T = q_row.shape[0]
    out = jax.ShapeDtypeStruct((T, H, topk), jnp.int32)
    return jax.ffi.ffi_call("ultramem_select", out, vmap_method="sequential")(
        q_row, q_col, keys_last(k_row), keys_last(k_col), core_sum_HxRxR, u, t, num_keys=np.int64(N),
        preselect=np.int64(preselect), topk=np.int64(topk), additive=bool(additive))


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
