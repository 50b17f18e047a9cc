"""UltraMemV2's fused gather: pre-value dot and weighted value sum in one pass, forward and backward (TPU Mosaic,
GPU Triton).

Same signature and result as the XLA reference ``ultramem_jax.kernels.xla_pre_value_gather`` (the oracle and
fallback):

    g[t, k]            = <P[rows[t,k]], pre[t]>                        (pre = W_pre x, PEER-style, no activation)
    out[t, slice c]    = Σ_k g[t,k] · scores[t,k,c] · V[rows[t,k], slice c]

Each selected P row and V row is read once per pass (forward, backward); the T×K×D_p and T×K×D_v gathered
rows that XLA materialises never exist (the TPU backward does write T·K × D contributions for its sorted
segment-sum, below, as V1's gather-pool backward does).  The forward also returns g (T×K, small) for the backward, which
then needs no second read of P to recompute it.  With G = dL/dout:

    h[t,k,c] = <G[t, slice c], V[row, slice c]>     dScores = g·h      dg = Σ_c s_c·h
    dPre[t]  = Σ_k dg[t,k] · P[row]                 dP[row] += dg·pre[t]
    dV[row, slice c] += g·s_c·G[t, slice c]

TPU: organised as ``gather_pool.py``'s kernel (row ids scalar-prefetched to SMEM in chunks, all rows of an
8-token tile DMA'd from HBM at once into (bt, K, 1, D) buffers, then token by token on the MXU): g = pre · Pᵀ
(1 × K), out = Σ_c (s_c ⊙ g) · V (1 × D_v, keeping core c's lanes).  The backward kernel re-reads the rows once
for dScores, dg and dPre; dP and dV need no row, only per-token vectors, and are summed by sorting the T·K
contributions by row and a sorted ``segment_sum`` (TPU has no atomics), as V1's gather-pool backward does.

GPU (Triton): one program per token, vector-index row loads in power-of-two column chunks; the backward is one
kernel that walks the token's K rows, reading each V and P row once, and scatters dP and dV with ``atomic_add``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common

SMEM_ROW_IDS = 8192  # row ids prefetched to SMEM per kernel call (32 KiB), as gather_pool.py
GPU_FWD_COLS, GPU_BWD_COLS = 32, 256  # gather_pool.py's measured column chunks (docs/kernels.md); not re-tuned
BT = 8  # tokens per TPU grid step (one sublane tile)
NT = (((1,), (1,)), ((), ()))  # dot_general numbers for a · bᵀ (contract both operands' last dims)


# ---- TPU --------------------------------------------------------------------------------------------------
def _start_rows(rows_sref, i, K, tables):
    """Starts the DMAs of every selected row of the tile, for each (table in HBM, VMEM buffer, semaphores)."""
    def start_token(j, _):
        def start_row(k, _):
            row = rows_sref[(i * BT + j) * K + k]
            for hbm, buf, sems in tables:
                common.tpu().make_async_copy(hbm.at[pl.ds(row, 1)], buf.at[j, k], sems.at[j]).start()
            return 0
        return jax.lax.fori_loop(0, K, start_row, 0)

    jax.lax.fori_loop(0, BT, start_token, 0)  # every row of the tile in flight before any wait


def _wait_rows(j, K, tables):
    """Waits for token j's rows; returns them as K × D arrays, one per table."""
    def wait_row(k, _):
        for hbm, buf, sems in tables:
            common.tpu().make_async_copy(hbm.at[pl.ds(0, 1)], buf.at[j, k], sems.at[j]).wait()
        return 0

    jax.lax.fori_loop(0, K, wait_row, 0)
    return [buf[j].reshape(K, buf.shape[-1]) for _, buf, _ in tables]


def _tpu_forward_kernel(rows_sref, pre_ref, scores_ref, p_hbm, v_hbm, out_ref, g_ref, p_buf, v_buf, p_sems, v_sems,
                        *, K, C):
    D = out_ref.shape[-1]
    tables = ((p_hbm, p_buf, p_sems), (v_hbm, v_buf, v_sems))
    _start_rows(rows_sref, pl.program_id(0), K, tables)
    in_core = common.core_lanes(0, D, C, D, (1, D))
    for j in range(BT):
        p_KxP, v_KxD = _wait_rows(j, K, tables)
        pre_1xP = pre_ref[pl.ds(j, 1), :].astype(jnp.float32)
        g_1xK = jax.lax.dot_general(pre_1xP, p_KxP.astype(jnp.float32), NT, preferred_element_type=jnp.float32)
        g_ref[pl.ds(j, 1), :] = g_1xK
        out = jnp.zeros((1, D), jnp.float32)
        for c in range(C):
            w_1xK = scores_ref[j, pl.ds(c, 1), :].astype(jnp.float32) * g_1xK
            part = jnp.dot(w_1xK, v_KxD.astype(jnp.float32), preferred_element_type=jnp.float32)
            out = out + (part if C == 1 else jnp.where(in_core[c], part, 0.0))
        out_ref[pl.ds(j, 1), :] = out.astype(out_ref.dtype)


def _tpu_backward_kernel(rows_sref, pre_ref, scores_ref, g_ref, dout_ref, p_hbm, v_hbm, ds_ref, dg_ref, dpre_ref,
                         p_buf, v_buf, p_sems, v_sems, *, K, C):
    D = dout_ref.shape[-1]
    tables = ((p_hbm, p_buf, p_sems), (v_hbm, v_buf, v_sems))
    _start_rows(rows_sref, pl.program_id(0), K, tables)
    in_core = common.core_lanes(0, D, C, D, (1, D))
    for j in range(BT):
        p_KxP, v_KxD = _wait_rows(j, K, tables)
        dout_1xD = dout_ref[pl.ds(j, 1), :].astype(jnp.float32)
        g_1xK = g_ref[pl.ds(j, 1), :]
        dg_1xK = jnp.zeros((1, K), jnp.float32)
        for c in range(C):
            dout_c = dout_1xD if C == 1 else jnp.where(in_core[c], dout_1xD, 0.0)
            h_1xK = jax.lax.dot_general(dout_c, v_KxD.astype(jnp.float32), NT, preferred_element_type=jnp.float32)
            ds_ref[j, pl.ds(c, 1), :] = g_1xK * h_1xK
            dg_1xK = dg_1xK + scores_ref[j, pl.ds(c, 1), :].astype(jnp.float32) * h_1xK
        dg_ref[pl.ds(j, 1), :] = dg_1xK
        dpre_ref[pl.ds(j, 1), :] = jnp.dot(dg_1xK, p_KxP.astype(jnp.float32), preferred_element_type=jnp.float32)


def _tpu_call(kernel, name, tables, rows, token_args, out_dims, interpret):
    """Runs ``kernel`` over 8-token tiles.  ``token_args`` and the (f32) outputs are T-leading (scores T×C×K,
    so that a core's scores are one K-lane row); ``out_dims`` gives the outputs' trailing shapes.  Row ids go to
    SMEM ``chunk`` tokens at a time (``lax.map`` over chunks), as in gather_pool.py."""
    T, K = rows.shape
    chunk = max(BT, min(common.round_up(T, BT), SMEM_ROW_IDS // K // BT * BT))
    Tp = common.round_up(T, chunk)
    split = lambda x: common.pad_to(x, (Tp, *x.shape[1:])).reshape(Tp // chunk, chunk, *x.shape[1:])  # noqa: E731
    tile = lambda dims: pl.BlockSpec((BT, *dims), lambda i, r, n=len(dims): (i,) + (0,) * n)  # noqa: E731
    pltpu = common.tpu()
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(chunk // BT,),
            in_specs=[tile(a.shape[1:]) for a in token_args] + [pl.BlockSpec(memory_space=pl.ANY)] * len(tables),
            out_specs=[tile(d) for d in out_dims],
            scratch_shapes=[pltpu.VMEM((BT, K, 1, t.shape[1]), t.dtype) for t in tables]
            + [pltpu.SemaphoreType.DMA((BT,)) for _ in tables]),
        out_shape=[jax.ShapeDtypeStruct((chunk, *d), jnp.float32) for d in out_dims],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
        name=name,
    )
    rows_c = common.pad_to(rows, (Tp, K)).reshape(Tp // chunk, chunk * K)
    outs = jax.lax.map(lambda a: call(*a, *tables), (rows_c, *map(split, token_args)))
    return [o.reshape(Tp, *o.shape[2:])[:T] for o in outs]


def _tpu_forward(pre_values, values, rows, pre, scores, interpret):
    K, C = scores.shape[1:]
    out, g = _tpu_call(functools.partial(_tpu_forward_kernel, K=K, C=C), "ultramem_pre_value_gather_tpu",
                       (pre_values, values), rows, (pre, jnp.swapaxes(scores, 1, 2)), [(values.shape[1],), (K,)],
                       interpret)
    return out.astype(scores.dtype), g


def _tpu_backward(pre_values, values, rows, pre, scores, g, dout, interpret):
    """dScores, dg, dPre from the kernel (one read of each row); dP and dV by sort + sorted segment-sum."""
    T, K, C = scores.shape
    (N, Dp), Dv = pre_values.shape, values.shape[1]
    d_scores, d_g, d_pre = _tpu_call(
        functools.partial(_tpu_backward_kernel, K=K, C=C), "ultramem_pre_value_gather_tpu_bwd", (pre_values, values),
        rows, (pre, jnp.swapaxes(scores, 1, 2), g, dout), [(C, K), (K,), (Dp,)], interpret)
    flat = rows.reshape(-1)
    order = jnp.argsort(flat)
    contrib_p = (d_g[:, :, None] * pre[:, None, :].astype(jnp.float32)).reshape(T * K, Dp)
    gs_TxKxC = g[..., None] * scores.astype(jnp.float32)
    contrib_v = (gs_TxKxC[..., None] * dout.astype(jnp.float32).reshape(T, 1, C, Dv // C)).reshape(T * K, Dv)
    d_p, d_v = (jax.ops.segment_sum(x[order], flat[order], num_segments=N, indices_are_sorted=True)
                for x in (contrib_p, contrib_v))
    return d_p, d_v, jnp.swapaxes(d_scores, 1, 2), d_pre


# ---- GPU --------------------------------------------------------------------------------------------------
def _gpu_forward_kernel(rows_ref, pre_ref, scores_ref, p_ref, v_ref, out_ref, g_ref, *, C, Dp, Dv):
    t = pl.program_id(0)
    rows = rows_ref[t, :]
    g = 0.0
    for off, w in common.column_chunks(Dp, GPU_FWD_COLS):
        pre = pre_ref[t, pl.ds(off, w)].astype(jnp.float32)
        g = g + jnp.sum(p_ref[rows, pl.ds(off, w)].astype(jnp.float32) * pre[None, :], axis=1)
    g_ref[t, :] = g
    gs = [scores_ref[t, c, :].astype(jnp.float32) * g for c in range(C)]
    for off, w in common.column_chunks(Dv, GPU_FWD_COLS):
        vals = v_ref[rows, pl.ds(off, w)].astype(jnp.float32)
        out_ref[t, pl.ds(off, w)] = jnp.sum(common.lane_weights(gs, off, w, C, Dv) * vals,
                                            axis=0).astype(out_ref.dtype)


def _gpu_backward_kernel(rows_ref, pre_ref, scores_ref, g_ref, dout_ref, p_ref, v_ref, zp_ref, zv_ref,
                         dp_ref, dv_ref, ds_ref, dpre_ref, *, K, C, Dp, Dv):
    """One token: for each selected row k (V row read once, then P row once), h_c = <G, V[row_k]> on slice c,
    dScores = g·h, dg = Σ_c s_c·h, dPre += dg·P[row_k]; dP[row_k] += dg·pre and dV[row_k] += g·s_c(lane)·G
    with atomic adds (rows repeat across and within tokens)."""
    del zp_ref, zv_ref  # aliased to dp_ref, dv_ref: the scatter targets start at zero
    t = pl.program_id(0)
    p_chunks, v_chunks = common.column_chunks(Dp, GPU_BWD_COLS), common.column_chunks(Dv, GPU_BWD_COLS)

    def row_body(k, d_pre):
        row, g = rows_ref[t, k], g_ref[t, k]
        s = [scores_ref[t, k, c].astype(jnp.float32) for c in range(C)]
        h = [jnp.float32(0.0)] * C
        for off, w in v_chunks:
            in_core = common.core_lanes(off, w, C, Dv, (w,))
            dout = dout_ref[t, pl.ds(off, w)].astype(jnp.float32)
            prod = dout * v_ref[row, pl.ds(off, w)].astype(jnp.float32)
            h = [h_c + jnp.sum(jnp.where(m, prod, 0.0)) for h_c, m in zip(h, in_core)]
            weights = sum(jnp.where(m, s_c, 0.0) for m, s_c in zip(in_core, s))
            common.triton().atomic_add(dv_ref, (row, pl.ds(off, w)), (g * weights * dout).astype(dv_ref.dtype))
        d_g = sum(s_c * h_c for s_c, h_c in zip(s, h))
        for c in range(C):
            ds_ref[t, k, c] = (g * h[c]).astype(ds_ref.dtype)
        new = []
        for (off, w), acc in zip(p_chunks, d_pre):
            new.append(acc + d_g * p_ref[row, pl.ds(off, w)].astype(jnp.float32))
            pre = pre_ref[t, pl.ds(off, w)].astype(jnp.float32)
            common.triton().atomic_add(dp_ref, (row, pl.ds(off, w)), (d_g * pre).astype(dp_ref.dtype))
        return tuple(new)

    d_pre = jax.lax.fori_loop(0, K, row_body, tuple(jnp.zeros((w,), jnp.float32) for _, w in p_chunks))
    for (off, w), acc in zip(p_chunks, d_pre):
        dpre_ref[t, pl.ds(off, w)] = acc


def _gpu_forward(pre_values, values, rows, pre, scores, interpret):
    """K is padded to a power of two (padding rows point at row 0 with score 0: they add nothing)."""
    (T, K, C), Dp, Dv = scores.shape, pre.shape[1], values.shape[1]
    Kp = common.pow2(K)
    args = (common.pad_to(rows, (T, Kp)), pre, common.pad_to(jnp.swapaxes(scores, 1, 2), (T, C, Kp)),
            pre_values, values)
    out, g = pl.pallas_call(
        functools.partial(_gpu_forward_kernel, C=C, Dp=Dp, Dv=Dv),
        grid=(T,),
        in_specs=[common.whole(a.shape) for a in args],
        out_specs=[common.whole((T, Dv)), common.whole((T, Kp))],
        out_shape=[jax.ShapeDtypeStruct((T, Dv), scores.dtype), jax.ShapeDtypeStruct((T, Kp), jnp.float32)],
        compiler_params=common.triton_params(num_warps=4),
        interpret=interpret,
        name="ultramem_pre_value_gather_gpu",
    )(*args)
    return out, g[:, :K]


def _gpu_backward(pre_values, values, rows, pre, scores, g, dout, interpret):
    (T, K, C), (N, Dp), Dv = scores.shape, pre_values.shape, values.shape[1]
    args = (rows, pre, scores, g, dout, pre_values, values, jnp.zeros((N, Dp), jnp.float32),
            jnp.zeros((N, Dv), jnp.float32))
    out_shapes = [(N, Dp), (N, Dv), (T, K, C), (T, Dp)]
    return pl.pallas_call(
        functools.partial(_gpu_backward_kernel, K=K, C=C, Dp=Dp, Dv=Dv),
        grid=(T,),
        in_specs=[common.whole(a.shape) for a in args],
        out_specs=[common.whole(s) for s in out_shapes],
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        input_output_aliases={7: 0, 8: 1},
        compiler_params=common.triton_params(num_warps=4),
        interpret=interpret,
        name="ultramem_pre_value_gather_gpu_bwd",
    )(*args)


# ---- the op -----------------------------------------------------------------------------------------------
def _forward(pre_values, values, rows, pre, scores, backend, interpret):
    return (_tpu_forward if backend == "tpu" else _gpu_forward)(pre_values, values, rows, pre, scores, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def pre_value_gather(pre_values_NxP, values_NxD, rows_TxK, pre_TxP, scores_TxKxC, backend: str = "tpu",
                     interpret=False):
    """``kernels.xla_pre_value_gather`` as a Pallas kernel; ``backend`` is "tpu" (Mosaic) or "gpu" (Triton).
    T×D_v, in the scores' dtype."""
    return _forward(pre_values_NxP, values_NxD, rows_TxK, pre_TxP, scores_TxKxC, backend, interpret)[0]


def _fwd(pre_values, values, rows, pre, scores, backend, interpret):
    out, g = _forward(pre_values, values, rows, pre, scores, backend, interpret)
    return out, (pre_values, values, rows, pre, scores, g)


def _bwd(backend, interpret, res, dout):
    pre_values, values, rows, pre, scores, g = res
    backward = _tpu_backward if backend == "tpu" else _gpu_backward
    d_p, d_v, d_scores, d_pre = backward(pre_values, values, rows, pre, scores, g, dout, interpret)
    return (d_p.astype(pre_values.dtype), d_v.astype(values.dtype), None, d_pre.astype(pre.dtype),
            d_scores.astype(scores.dtype))


pre_value_gather.defvjp(_fwd, _bwd)
