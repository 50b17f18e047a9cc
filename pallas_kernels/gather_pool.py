"""IVE-aware weighted gather-sum as Pallas kernels, forward and backward (TPU Mosaic, GPU Triton).

Same signature and result as the XLA reference ``ultramem_jax.ive.gather_pool`` (the oracle and fallback):

    pooled[t, p, slice c] = Σ_{k: blocks[t,k] = p} scores[t,k,c] · values[rows[t,k], slice c]

Only the K selected rows of each token are read; the T×K×D gathered tensor that XLA materialises in HBM never
exists.  The official CUDA kernel does the pooling as a tensor-core matmul against a one-hot-by-block score
matrix (method notes A.10); so does the TPU kernel here.

TPU: the table stays in HBM (``pl.ANY``).  Row ids are scalar-prefetched to SMEM (in chunks, SMEM is small).
Each grid step starts the DMAs of all ``bt × K`` rows of its token tile at once, then waits token by token and
pools it on the MXU: W_c (E × K, one-hot block × core-c score) @ rows (K × D), keeping the lanes of slice c.
Rows land in a (bt, K, 1, D) buffer: a DMA at a dynamic row offset must hit an untiled (leading) dimension.
Backward: dScores with an XLA gather and dot products; dValues without atomics (TPU has none) by sorting the
T·K contributions by row and a sorted ``segment_sum``.

GPU (Pallas Triton; why Triton rather than Mosaic GPU: see ``key_search.py``): one program per token loads its
K rows with vector-index loads, in power-of-two column chunks (Triton tiles are powers of two; no padded copy
of the table), and pools them per block on the vector units.  The backward is one kernel too: it re-reads the
rows for dScores and scatters dValues with ``atomic_add``, which Pallas expresses, so no hand-written Triton
(jax-triton) kernel is needed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common

SMEM_ROW_IDS = 8192  # row ids prefetched to SMEM per kernel call (32 KiB)
# Widest column chunk a GPU program loads at once (K rows × this many lanes), forward and backward; measured
# best on an H100 over 32…256 (docs/kernels.md): narrow tiles for the register-bound forward, wide ones for
# the atomic-add backward.
GPU_FWD_COLS, GPU_BWD_COLS = 32, 256


# ---- TPU --------------------------------------------------------------------------------------------------
def _tpu_kernel(rows_sref, blocks_ref, scores_ref, values_hbm, out_ref, buf, sems, *, bt, K, C, E):
    i = pl.program_id(0)
    D = out_ref.shape[-1]

    def start_token(j, _):
        def start_row(k, _):
            row = rows_sref[(i * bt + j) * K + k]
            common.tpu().make_async_copy(values_hbm.at[pl.ds(row, 1)], buf.at[j, k], sems.at[j]).start()
            return 0
        return jax.lax.fori_loop(0, K, start_row, 0)

    jax.lax.fori_loop(0, bt, start_token, 0)  # every row of the tile in flight before any wait
    block_iota = jax.lax.broadcasted_iota(jnp.int32, (E, K), 0)
    in_core = common.core_lanes(0, D, C, D, (E, D))
    for j in range(bt):
        def wait_row(k, _, j=j):
            common.tpu().make_async_copy(values_hbm.at[pl.ds(0, 1)], buf.at[j, k], sems.at[j]).wait()
            return 0
        jax.lax.fori_loop(0, K, wait_row, 0)
        rows_KxD = buf[j].reshape(K, D)
        mine = block_iota == blocks_ref[pl.ds(j, 1), :]
        pooled = jnp.zeros((E, D), jnp.float32)
        for c in range(C):
            w_ExK = jnp.where(mine, scores_ref[c, pl.ds(j, 1), :].astype(jnp.float32), 0.0).astype(rows_KxD.dtype)
            part = jnp.dot(w_ExK, rows_KxD, preferred_element_type=jnp.float32)
            pooled = pooled + (part if C == 1 else jnp.where(in_core[c], part, 0.0))
        out_ref[j] = pooled.astype(out_ref.dtype)


def _tpu_forward(values, rows, blocks, scores, num_blocks, interpret):
    T, K = rows.shape
    C, D = scores.shape[-1], values.shape[1]
    bt = 8
    chunk = max(bt, min(common.round_up(T, bt), SMEM_ROW_IDS // K // bt * bt))
    Tp = common.round_up(T, chunk)
    rows_c = common.pad_to(rows, (Tp, K)).reshape(Tp // chunk, chunk * K)
    blocks_c = common.pad_to(blocks, (Tp, K)).reshape(Tp // chunk, chunk, K)
    scores_c = jnp.moveaxis(common.pad_to(scores, (Tp, K, C)), 2, 0).reshape(C, Tp // chunk, chunk, K)
    pltpu = common.tpu()
    call = pl.pallas_call(
        functools.partial(_tpu_kernel, bt=bt, K=K, C=C, E=num_blocks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(chunk // bt,),
            in_specs=[pl.BlockSpec((bt, K), lambda i, r: (i, 0)),
                      pl.BlockSpec((C, bt, K), lambda i, r: (0, i, 0)),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((bt, num_blocks, D), lambda i, r: (i, 0, 0)),
            scratch_shapes=[pltpu.VMEM((bt, K, 1, D), values.dtype), pltpu.SemaphoreType.DMA((bt,))]),
        out_shape=jax.ShapeDtypeStruct((chunk, num_blocks, D), scores.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
        name="ultramem_gather_pool_tpu",
    )
    out = jax.lax.map(lambda a: call(a[0], a[1], a[2], values), (rows_c, blocks_c, jnp.moveaxis(scores_c, 1, 0)))
    return out.reshape(Tp, num_blocks, D)[:T]


def _xla_backward(values, rows, blocks, scores, g_TxExD):
    """dScores by dot products with re-gathered rows; dValues by sort + sorted segment-sum (no atomics)."""
    T, K = rows.shape
    C, (N, D) = scores.shape[-1], values.shape
    g_TxKxCxd = jnp.take_along_axis(g_TxExD, blocks[:, :, None], axis=1).reshape(T, K, C, D // C)
    rows_TxKxCxd = jnp.take(values, rows, axis=0).reshape(T, K, C, D // C).astype(g_TxKxCxd.dtype)
    d_scores = jnp.einsum("tkcd,tkcd->tkc", g_TxKxCxd, rows_TxKxCxd).astype(scores.dtype)
    contrib = (g_TxKxCxd * scores[..., None].astype(g_TxKxCxd.dtype)).reshape(T * K, D)
    flat = rows.reshape(-1)
    order = jnp.argsort(flat)
    d_values = jax.ops.segment_sum(contrib[order], flat[order], num_segments=N, indices_are_sorted=True)
    return d_values.astype(values.dtype), d_scores


# ---- GPU --------------------------------------------------------------------------------------------------
def _gpu_forward_kernel(rows_ref, blocks_ref, scores_ref, values_ref, out_ref, *, C, E, D):
    t = pl.program_id(0)
    rows, blocks = rows_ref[t, :], blocks_ref[t, :]
    s = [scores_ref[t, c, :].astype(jnp.float32) for c in range(C)]
    for off, w in common.column_chunks(D, GPU_FWD_COLS):
        vals = values_ref[rows, pl.ds(off, w)].astype(jnp.float32)
        weighted = common.lane_weights(s, off, w, C, D) * vals
        for e in range(E):
            out_ref[t, e, pl.ds(off, w)] = jnp.sum(jnp.where(blocks[:, None] == e, weighted, 0.0),
                                                   axis=0).astype(out_ref.dtype)


def _gpu_backward_kernel(rows_ref, blocks_ref, scores_ref, values_ref, g_ref, zeros_ref, dv_ref, ds_ref, *, K, C, D):
    """One token: for each selected row k, dScores[k, c] = <g[block_k], V[row_k]> on slice c, and
    dValues[row_k] += score_c(lane) · g[block_k] with an atomic add (rows repeat across and within tokens)."""
    del zeros_ref  # aliased to dv_ref: the scatter target starts at zero
    t = pl.program_id(0)

    def row_body(k, _):
        row, block = rows_ref[t, k], blocks_ref[t, k]
        s = [scores_ref[t, k, c].astype(jnp.float32) for c in range(C)]
        d_scores = [jnp.float32(0.0)] * C
        for off, w in common.column_chunks(D, GPU_BWD_COLS):
            in_core = common.core_lanes(off, w, C, D, (w,))
            g_row = g_ref[t, block, pl.ds(off, w)].astype(jnp.float32)
            prod = g_row * values_ref[row, pl.ds(off, w)].astype(jnp.float32)
            d_scores = [d + jnp.sum(jnp.where(m, prod, 0.0)) for d, m in zip(d_scores, in_core)]
            weights = sum(jnp.where(m, s_c, 0.0) for m, s_c in zip(in_core, s))
            common.triton().atomic_add(dv_ref, (row, pl.ds(off, w)), (weights * g_row).astype(dv_ref.dtype))
        for c in range(C):
            ds_ref[t, k, c] = d_scores[c].astype(ds_ref.dtype)
        return 0

    jax.lax.fori_loop(0, K, row_body, 0)


def _gpu_inputs(rows, blocks, scores, num_blocks):
    """Pads K to a power of two (padding rows point at row 0 with block E: they match no block, add 0)."""
    T, K = rows.shape
    Kp = common.pow2(K)
    return (common.pad_to(rows, (T, Kp)), common.pad_to(blocks, (T, Kp), value=num_blocks),
            common.pad_to(jnp.swapaxes(scores, 1, 2), (T, scores.shape[-1], Kp)))


def _gpu_forward(values, rows, blocks, scores, num_blocks, interpret):
    T, C, D = rows.shape[0], scores.shape[-1], values.shape[1]
    args = (*_gpu_inputs(rows, blocks, scores, num_blocks), values)
    return pl.pallas_call(
        functools.partial(_gpu_forward_kernel, C=C, E=num_blocks, D=D),
        grid=(T,),
        in_specs=[common.whole(a.shape) for a in args],
        out_specs=common.whole((T, num_blocks, D)),
        out_shape=jax.ShapeDtypeStruct((T, num_blocks, D), scores.dtype),
        compiler_params=common.triton_params(num_warps=4),
        interpret=interpret,
        name="ultramem_gather_pool_gpu",
    )(*args)


def _gpu_backward(values, rows, blocks, scores, g_TxExD, interpret):
    T, K = rows.shape
    C, D = scores.shape[-1], values.shape[1]
    args = (rows, blocks, scores, values, g_TxExD, jnp.zeros(values.shape, jnp.float32))
    d_values, d_scores = pl.pallas_call(
        functools.partial(_gpu_backward_kernel, K=K, C=C, D=D),
        grid=(T,),
        in_specs=[common.whole(a.shape) for a in args],
        out_specs=[common.whole(values.shape), common.whole(scores.shape)],
        out_shape=[jax.ShapeDtypeStruct(values.shape, jnp.float32), jax.ShapeDtypeStruct(scores.shape, jnp.float32)],
        input_output_aliases={5: 0},
        compiler_params=common.triton_params(num_warps=4),
        interpret=interpret,
        name="ultramem_gather_pool_gpu_bwd",
    )(*args)
    return d_values.astype(values.dtype), d_scores.astype(scores.dtype)


# ---- the op -----------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks: int, backend: str = "tpu",
                interpret=False):
    """``ive.gather_pool`` as a Pallas kernel; ``backend`` is "tpu" (Mosaic) or "gpu" (Triton).  T×E×D."""
    forward = _tpu_forward if backend == "tpu" else _gpu_forward
    return forward(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks, interpret)


def _fwd(values, rows, blocks, scores, num_blocks, backend, interpret):
    return gather_pool(values, rows, blocks, scores, num_blocks, backend, interpret), (values, rows, blocks, scores)


def _bwd(num_blocks, backend, interpret, res, g_TxExD):
    values, rows, blocks, scores = res
    if backend == "tpu":
        d_values, d_scores = _xla_backward(values, rows, blocks, scores, g_TxExD)
    else:
        d_values, d_scores = _gpu_backward(values, rows, blocks, scores, g_TxExD, interpret)
    return d_values, None, None, d_scores


gather_pool.defvjp(_fwd, _bwd)
