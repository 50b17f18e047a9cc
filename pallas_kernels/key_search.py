"""Fused retrieval search as one Pallas kernel: key scores → pre-selection → candidate re-scoring → top-m.

Same signature and results as the XLA reference ``ultramem_jax.key_search.search`` (the oracle and fallback).
One program handles one head and a tile of ``bt`` tokens, all in on-chip memory:

  1. S_row[a] = q_row · K_row[a]  (one MXU matmul per Tucker rank; likewise for columns; on GPU this is an
     XLA/cuBLAS matmul before the kernel, see below);
  2. pre-selection: m_pre rounds of "max, then mask" over the n keys of each side of uᵀS_row and tᵀS_col
     (the additive product key uses S itself), keeping each winner's r rank scores;
  3. the m_pre × m_pre candidate grid under every core, G_c = Σ_ab C_c[a,b] S_row[a,i] S_col[b,j] (MCS), flat
     on the lane axis, index f = i·P + j with P = m_pre rounded up to a power of two;
  4. m rounds of max-and-mask over Σ_c G_c, reading each winner's per-core scores and its slot id.

Why max-and-mask instead of ``lax.top_k``: it lowers on both backends and every jax we support (the Mosaic
``top_k`` rule is new in jax 0.12 and rejects stable ordering), ties go to the lowest index exactly like
``lax.top_k``, and at m_pre, m ≈ 16–128 against n ≈ 10³ keys the k passes are cheap vector work.  The official
CUDA code uses a radix select instead (method notes A.10); that pays off for larger k.

Step 3 differs by backend.  TPU (Mosaic): the per-rank row/column scores are spread onto the flat grid with
0/1 matmuls (exact at HIGHEST precision), so everything stays 2-D with tokens on sublanes and no relayout.
GPU (Pallas Triton): broadcasting to a (bt, P, P) block and flattening it, since Triton tiles of a P×P² 0/1
matrix would not fit in registers.
GPU step 1 is outside the kernel: a Triton dot stages its whole D×N key operand in shared memory, which
overflows the H100's 227 KiB at D·N ≥ 64K floats (D=128, n=512 already), while cuBLAS does this matmul at
full speed.  The GPU token tile shrinks as n and m_pre grow so that a tile's score rows stay in registers.

GPU lowering choice: Pallas' Triton backend, not Mosaic GPU.  Mosaic GPU targets Hopper and newer and has no
vector-index row gather short of Blackwell's TMA gather; Triton runs on every NVIDIA GPU jax supports and is
what the gather-pool kernel needs for its atomic-add backward (``gather_pool.py``).  The Triton backend is
deprecated since jax 0.11: when it is missing, ``ultramem_jax.kernels`` falls back to XLA.

Backward: ``jax.custom_vjp`` whose backward is ``jax.vjp`` of ``key_search.rescore`` (an XLA gather of the
m winners' keys and a few small einsums): the kernel only decides *which* slots win.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ultramem_jax import key_search as ref
from ultramem_jax import tdqkr
from pallas_kernels import common

NEG = -jnp.inf
# Score elements across a GPU program's token tile (see _gpu_tile); on an H100, 4096 ran 2–5× faster than 16384
# (docs/kernels.md), i.e. one token per program once n ≥ 1024.
GPU_TILE_ELEMS = 4096


def _take_max(rest, lane, size):
    """One max-and-mask round: the lowest lane holding each row's maximum (``lax.top_k``'s tie order).

    Returns (winner lane bt×1, its one-hot bt×size); the caller masks the winner out with the one-hot."""
    best = jnp.max(rest, axis=1, keepdims=True)
    winner = jnp.min(jnp.where(rest == best, lane, size), axis=1, keepdims=True)
    return winner, lane == winner


def _store_winner(hit, put, arrays, outputs):
    """Writes each array's value at the winner (one-hot ``hit`` along axis 1) into the column ``put`` of its
    output."""
    return tuple(jnp.where(put, jnp.sum(jnp.where(hit, a, 0.0), axis=1, keepdims=True), out)
                 for a, out in zip(arrays, outputs))


def _select_rounds(scores, per_rank, count, width):
    """``count`` rounds of max-and-mask along axis 1 of ``scores`` (bt × n).

    Returns (indices bt×width, [rank scores at those indices] each bt×width), winners in columns 0..count-1.
    """
    bt, n = scores.shape
    lane_n = jax.lax.broadcasted_iota(jnp.int32, (bt, n), 1)
    lane_w = jax.lax.broadcasted_iota(jnp.int32, (bt, width), 1)

    def step(p, carry):
        rest, idx, picked = carry
        winner, hit = _take_max(rest, lane_n, n)
        put = lane_w == p
        idx = jnp.where(put, winner, idx)
        picked = _store_winner(hit, put, per_rank, picked)
        return jnp.where(hit, NEG, rest), idx, picked

    init = (scores, jnp.zeros((bt, width), jnp.int32), tuple(jnp.zeros((bt, width), jnp.float32) for _ in per_rank))
    _, idx, picked = jax.lax.fori_loop(0, count, step, init)
    return idx, picked


def _spread_matmul(x_bxP, P, rows: bool):
    """x[t, f // P] (rows) or x[t, f % P] (columns) for f in [0, P²), as a matmul with a 0/1 matrix."""
    shift = int(math.log2(P))
    src = jax.lax.broadcasted_iota(jnp.int32, (P, P * P), 0)
    f = jax.lax.broadcasted_iota(jnp.int32, (P, P * P), 1)
    sel = (jnp.right_shift(f, shift) if rows else jnp.bitwise_and(f, P - 1)) == src
    return jnp.dot(x_bxP, sel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)


def _spread_broadcast(x_bxP, P, rows: bool):
    bt = x_bxP.shape[0]
    grid = jnp.broadcast_to(x_bxP[:, :, None] if rows else x_bxP[:, None, :], (bt, P, P))
    return grid.reshape(bt, P * P)


def _fused_kernel(scal_ref, qr_ref, qc_ref, kr_ref, kc_ref, scores_ref, slots_ref, *, R, **kw):
    """TPU: one head × one token tile, key scores included (MXU matmuls per Tucker rank)."""
    f32 = jnp.float32
    qr, qc = qr_ref[...].astype(f32), qc_ref[...].astype(f32)
    s_row = [jnp.dot(qr, kr_ref[a].astype(f32), preferred_element_type=f32) for a in range(R)]
    s_col = [jnp.dot(qc, kc_ref[a].astype(f32), preferred_element_type=f32) for a in range(R)]
    _select(scal_ref, s_row, s_col, scores_ref, slots_ref, R=R, **kw)


def _scored_kernel(scal_ref, sr_ref, sc_ref, scores_ref, slots_ref, *, R, **kw):
    """GPU: one head × one token tile, given the rank key scores (R × bt × Np per side)."""
    s_row = [sr_ref[a].astype(jnp.float32) for a in range(R)]
    s_col = [sc_ref[a].astype(jnp.float32) for a in range(R)]
    _select(scal_ref, s_row, s_col, scores_ref, slots_ref, R=R, **kw)


def _select(scal_ref, s_row, s_col, scores_ref, slots_ref, *, n, R, C, P, Pp, M, Mp, additive, gpu):
    """Steps 2–4 on one head's token tile.  scal_ref holds [u (R), t (R), cores (C·R·R)]: of every head in
    SMEM on TPU, of this head's block on GPU."""
    h = pl.program_id(0)
    scalar = (lambda j: scal_ref[0, j]) if gpu else (lambda j: scal_ref[h, j])
    f32 = jnp.float32
    bt, Np = s_row[0].shape
    real = jax.lax.broadcasted_iota(jnp.int32, (bt, Np), 1) < n
    if additive:
        pre_row, pre_col = s_row[0], s_col[0]
    else:  # the rank-1 product-key form of the leading singular pair (u, t)
        pre_row = sum(scalar(a) * s_row[a] for a in range(R))
        pre_col = sum(scalar(R + a) * s_col[a] for a in range(R))
    idx_row, sel_row = _select_rounds(jnp.where(real, pre_row, NEG), s_row, P, Pp)
    idx_col, sel_col = _select_rounds(jnp.where(real, pre_col, NEG), s_col, P, Pp)

    spread_fn = _spread_broadcast if gpu else _spread_matmul
    grid_row = [spread_fn(x, Pp, rows=True) for x in sel_row]
    grid_col = [spread_fn(x, Pp, rows=False) for x in sel_col]
    if additive:
        per_core = [grid_row[0] + grid_col[0]]
    else:
        per_core = [sum(scalar(2 * R + (c * R + a) * R + b) * grid_row[a] * grid_col[b]
                        for a in range(R) for b in range(R)) for c in range(C)]
    F = Pp * Pp
    shift = int(math.log2(Pp))
    flat = jax.lax.broadcasted_iota(jnp.int32, (bt, F), 1)
    cand_i, cand_j = jnp.right_shift(flat, shift), jnp.bitwise_and(flat, Pp - 1)
    total = jnp.where((cand_i < P) & (cand_j < P), sum(per_core), NEG)
    lane_p = jax.lax.broadcasted_iota(jnp.int32, (bt, Pp), 1)
    lane_m = jax.lax.broadcasted_iota(jnp.int32, (bt, Mp), 1)

    def step(m, carry):
        rest, out_scores, out_slots = carry
        g, hit = _take_max(rest, flat, F)
        put = lane_m == m
        out_scores = _store_winner(hit, put, per_core, out_scores)
        row = jnp.sum(jnp.where(lane_p == jnp.right_shift(g, shift), idx_row, 0), axis=1, keepdims=True)
        col = jnp.sum(jnp.where(lane_p == jnp.bitwise_and(g, Pp - 1), idx_col, 0), axis=1, keepdims=True)
        out_slots = jnp.where(put, row * n + col, out_slots)
        return jnp.where(hit, NEG, rest), out_scores, out_slots

    init = (total, tuple(jnp.zeros((bt, Mp), f32) for _ in range(C)), jnp.zeros((bt, Mp), jnp.int32))
    _, out_scores, out_slots = jax.lax.fori_loop(0, M, step, init)
    for c in range(C):
        scores_ref[c] = out_scores[c].astype(scores_ref.dtype)
    slots_ref[...] = out_slots


def _gpu_tile(Np, F):
    """Tokens per GPU program: the widest score rows (Np keys, F = Pp² candidates) times bt stay within
    GPU_TILE_ELEMS, so a tile lives in registers rather than spilling."""
    fit = GPU_TILE_ELEMS // max(Np, F)
    return max(1, min(16, 1 << max(0, fit.bit_length() - 1)))


def _pallas_search(q_row, q_col, k_row, k_col, cores, u, t, preselect, topk, additive, backend, interpret):
    T, H, D = q_row.shape
    _, n, _, R = k_row.shape
    C = 1 if additive else cores.shape[0]
    P, M = preselect, topk
    Pp, Mp = common.pow2(max(P, 8)), common.pow2(max(M, 8))
    gpu = backend == "gpu"
    Np = common.pow2(max(n, 16)) if gpu else common.round_up(n, 128)
    bt = _gpu_tile(Np, Pp * Pp) if gpu else 8
    Tp = common.round_up(T, bt)
    Rp, Cp = (common.pow2(R), common.pow2(C)) if gpu else (R, C)
    f32 = jnp.float32
    sq = common.squeezed()

    if additive:
        scal = jnp.zeros((H, 1), f32)
    else:
        scal = jnp.concatenate([u.astype(f32), t.astype(f32),
                                jnp.swapaxes(cores.astype(f32), 0, 1).reshape(H, C * R * R)], axis=1)
    W = scal.shape[1]
    if gpu:
        # Key scores by XLA (a cuBLAS matmul): the kernel keeps only the selection.  Fusing the matmul as on
        # TPU stages the whole D×N key block in shared memory, which overflows it at D·N ≥ 64K floats.
        def rank_scores(q, k):  # T×H×D, H×N×D×R → H×Rp×Tp×Np
            s = jnp.transpose(tdqkr.rank_key_scores(q, k), (1, 2, 0, 3))
            return common.pad_to(s, (H, Rp, Tp, Np))

        operands = (rank_scores(q_row, k_row), rank_scores(q_col, k_col))
        in_specs = [pl.BlockSpec((sq, Rp, bt, Np), lambda h, i: (h, 0, i, 0))] * 2
        Wp = common.pow2(W)
        scal = common.pad_to(scal, (H, Wp))
        scal_spec = pl.BlockSpec((1, Wp), lambda h, i: (h, 0))
        params = common.triton_params(num_warps=4)
        body = _scored_kernel
    else:
        def queries(q):  # T×H×D → H×Tp×D
            return common.pad_to(jnp.swapaxes(q, 0, 1), (H, Tp, D))

        def keys(k):  # H×N×D×R → H×R×D×Np
            return common.pad_to(jnp.transpose(k, (0, 3, 2, 1)), (H, R, D, Np))

        operands = (queries(q_row), queries(q_col), keys(k_row), keys(k_col))
        in_specs = [pl.BlockSpec((sq, bt, D), lambda h, i: (h, i, 0))] * 2
        in_specs += [pl.BlockSpec((sq, R, D, Np), lambda h, i: (h, 0, 0, 0))] * 2
        scal_spec = pl.BlockSpec(memory_space=common.tpu().SMEM)
        params = common.tpu().CompilerParams(dimension_semantics=("parallel", "parallel"))
        body = _fused_kernel
    out_specs = [pl.BlockSpec((sq, Cp, bt, Mp), lambda h, i: (h, 0, i, 0)),
                 pl.BlockSpec((sq, bt, Mp), lambda h, i: (h, i, 0))]
    kernel = functools.partial(body, n=n, R=R, C=C, P=P, Pp=Pp, M=M, Mp=Mp, additive=additive, gpu=gpu)
    scores, slots = pl.pallas_call(
        kernel,
        grid=(H, Tp // bt),
        in_specs=[scal_spec] + in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((H, Cp, Tp, Mp), q_row.dtype), jax.ShapeDtypeStruct((H, Tp, Mp), jnp.int32)],
        compiler_params=params,
        interpret=interpret,
        name=f"ultramem_key_search_{backend}",
    )(scal, *operands)
    scores_TxHxMxC = jnp.transpose(scores[:, :C, :T, :M], (2, 0, 3, 1))
    return scores_TxHxMxC, jnp.swapaxes(slots[:, :T, :M], 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def search(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR, u_HxR, t_HxR,
           preselect: int, topk: int, additive: bool = False, backend: str = "tpu", interpret=False):
    """``key_search.search`` as a Pallas kernel; ``backend`` is "tpu" (Mosaic) or "gpu" (Triton).

    ``interpret``: False on the accelerator; True or ``pltpu.InterpretParams()`` to run it on CPU.
    """
    return _pallas_search(query_row_TxHxD, query_col_TxHxD, keys_row_HxNxDxR, keys_col_HxNxDxR, cores_CxHxRxR,
                          u_HxR, t_HxR, preselect, topk, additive, backend, interpret)


def _search_fwd(q_row, q_col, k_row, k_col, cores, u, t, preselect, topk, additive, backend, interpret):
    scores, slots = _pallas_search(q_row, q_col, k_row, k_col, cores, u, t, preselect, topk, additive, backend,
                                   interpret)
    return (scores, slots), (q_row, q_col, k_row, k_col, cores, u, t, slots)


def _search_bwd(preselect, topk, additive, backend, interpret, res, cotangents):
    q_row, q_col, k_row, k_col, cores, u, t, slots = res
    d_scores, _ = cotangents  # slot ids are integers: no cotangent
    _, vjp = jax.vjp(lambda *a: ref.rescore(*a, slots, additive), q_row, q_col, k_row, k_col, cores)
    grads = vjp(d_scores.astype(q_row.dtype))
    zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731  u, t are detached buffers
    return (*grads, zeros(u), zeros(t))


search.defvjp(_search_fwd, _search_bwd)
