"""The memory lookup (weighted gather → per-block pooling → output projection), local and distributed.

A ``MemoryLayout`` says how the value table V (N × D_v) is split across the mesh, in split / broadcast /
partial-sum (SBP) terms:

  replicated      V: B         no communication
  number_wise     V: S(0)      rows over ``row_axes``: each shard reads only the rows it owns (masked gather)
  dimension_wise  V: S(1)      columns over ``col_axes``: each shard reads its column slice of every row
  hybrid          V: S(0)S(1)  rows over some axes, columns over others

Every shard computes a partial output P (its rows' or its columns' share, already projected to d_model with
its slice of W_o), so what crosses the wire per token is D-sized: a ``psum`` over table axes that do not split
the tokens, and ``all_gather`` of the (small) selected ids and scores then ``psum_scatter`` back over table
axes that also split the tokens.  The table and the gathered T×m×D_v rows never move.  docs/sharding.md has
the per-step signatures and byte counts.

Two per-token inputs ride along, split by columns like V: ``pre_x`` with the pre-value table ``pre_values``
(UltraMemV2: token k's scores are scaled by g_k = <P[row_k], pre_x>; a column shard computes the partial dot
over its slice of P and the T×K partial dots are psum'd once, while a row shard owns whole P rows and needs no
reduction) and ``gate`` (Memory+: the pooled vector ⊙ gate, before the projection).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ultramem_jax import kernels
from ultramem_jax.gather import take_rows


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    row_axes: tuple[str, ...] = ()  # mesh axes splitting the value rows (number-wise)
    col_axes: tuple[str, ...] = ()  # mesh axes splitting the value columns (dimension-wise)
    token_axes: tuple[str, ...] = ()  # mesh axes splitting the tokens (the activations' batch axes)

    @property
    def kind(self) -> str:
        if self.row_axes and self.col_axes:
            return "hybrid"
        return "number_wise" if self.row_axes else ("dimension_wise" if self.col_axes else "replicated")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["m", "v", "last", "step"],
                   meta_fields=["read"])
@dataclasses.dataclass(frozen=True)
class RowSource:
    """What a tapped lookup needs to read a table's rows as the optimizer holds them at ``step`` (``sparse``
    value updates, whose table rows lag by the steps they sat out): the table's row state, ``m`` and ``v`` split
    like the table and ``last`` like its rows, and ``read(rows, m, v, last, step) → rows`` on gathered rows
    (row_adam.Hyper.read, the catch-up of their skipped steps).  Under a sharded layout each shard gets its own
    slice, as of the table."""
    m: jax.Array
    v: jax.Array
    last: jax.Array
    step: jax.Array
    read: Callable


def read_rows(table_NxD, rows_TxK, tap_TxKxD, source: RowSource | None = None):
    """The tapped gather (sparse value updates): the rows of the table held outside autodiff, caught up by
    ``source`` when given (else as stored: ``lazy``), plus the tap, whose gradient is then the rows' gradient at
    the values the forward read."""
    take = lambda x: take_rows(x, rows_TxK)  # noqa: E731
    rows_TxKxD = take(jax.lax.stop_gradient(table_NxD))
    if source is not None:
        rows_TxKxD = source.read(rows_TxKxD, take(source.m), take(source.v), take(source.last),
                                 source.step).astype(table_NxD.dtype)
    return rows_TxKxD + tap_TxKxD


def prevalue_dots(pre_values_NxP, rows_TxK, pre_x_TxP, tap_TxKxP=None, source=None):
    """g_k = <P[row_k], pre_x> in float32 (a partial dot when P and pre_x are one column slice).  ``tap_TxKxP``
    and ``source`` (sparse value updates): the rows are read by ``read_rows``."""
    if tap_TxKxP is None:
        rows_TxKxP = take_rows(pre_values_NxP, rows_TxK)
    else:
        rows_TxKxP = read_rows(pre_values_NxP, rows_TxK, tap_TxKxP, source)
    return jnp.einsum("tkp,tp->tk", rows_TxKxP, pre_x_TxP.astype(rows_TxKxP.dtype),
                      preferred_element_type=jnp.float32)


def local_lookup(values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC, num_values: int, num_blocks: int,
                 impl: str = "xla", gate_TxD=None, tap_TxKxD=None, source=None):
    """out[t] = Σ_p W_pᵀ (gate[t] ⊙ Σ_{k: block=p} s_k ⊙ V[row_k]), with (block, row) = divmod(ids, N).

    ``out_proj`` None means no projection (PKM with D_v = d_model): the pooled vector is the output.
    ``gate`` None means no gate.  ``impl`` picks the gather-pool implementation (``kernels.resolve``);
    ``tap_TxKxD`` and ``source`` (sparse value updates): the rows are read by ``read_rows``.
    """
    blocks, rows = ids_TxK // num_values, ids_TxK % num_values
    gathered = None if tap_TxKxD is None else read_rows(values_NxD, rows, tap_TxKxD, source)
    pooled_TxExD = kernels.gather_pool(values_NxD, rows, blocks, scores_TxKxC, num_blocks, impl, gathered)
    if gate_TxD is not None:
        pooled_TxExD = pooled_TxExD * gate_TxD[:, None, :].astype(pooled_TxExD.dtype)
    if out_proj_ExDxO is None:
        return pooled_TxExD[:, 0]
    return jnp.einsum("tev,evd->td", pooled_TxExD, out_proj_ExDxO.astype(pooled_TxExD.dtype))


def _spec(axes):
    return axes if len(axes) > 1 else (axes[0] if axes else None)


def fused_prevalue_lookup(pre_values_NxP, values_NxD, out_proj_1xDxO, rows_TxK, pre_x_TxP, scores_TxKxC, impl):
    """UltraMemV2 where one shard holds whole P rows: the pre-value dots and the weighted sum in one gather
    (``kernels.pre_value_gather``: each selected P and V row read once), then the single projector."""
    pooled_TxD = kernels.pre_value_gather(pre_values_NxP, values_NxD, rows_TxK, pre_x_TxP, scores_TxKxC, impl)
    return pooled_TxD @ out_proj_1xDxO[0].astype(pooled_TxD.dtype)


def _scaled(scores_TxKxC, dots_TxK):
    return scores_TxKxC * dots_TxK[..., None].astype(scores_TxKxC.dtype)


def memory_lookup(layout: MemoryLayout | None, values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC,
                  num_values: int, num_blocks: int, impl: str = "xla", *, pre_values_NxP=None, pre_x_TxP=None,
                  gate_TxD=None, tap_TxKxD=None, pre_tap_TxKxP=None, source: RowSource | None = None,
                  pre_source: RowSource | None = None):
    """The lookup under ``layout`` (an explicit ``jax.shard_map`` over the ambient mesh), or locally.

    With ``pre_values`` (N × D_p, split like V) and ``pre_x`` (T × D_p), token k's scores are scaled by
    g_k = <P[row_k], pre_x> (UltraMemV2); ``gate`` (T × D_v) multiplies the pooled vector (Memory+).
    ``tap_TxKxD`` and ``pre_tap_TxKxP`` (``new_tap``; sparse value updates) are added to the gathered value and
    pre-value rows; a tapped V2 lookup takes the unfused path (pre-value dots, then the tapped gather-pool), as
    a tapped gather-pool takes XLA's: the kernels' backward builds the dense table gradients.  ``source`` and
    ``pre_source`` (whole, as the tables: each shard gets its slice) catch the gathered rows up first.
    """
    tapped = tap_TxKxD is not None or pre_tap_TxKxP is not None
    if layout is None or layout.kind == "replicated":
        if pre_values_NxP is not None and not tapped:
            return fused_prevalue_lookup(pre_values_NxP, values_NxD, out_proj_ExDxO, ids_TxK % num_values,
                                         pre_x_TxP, scores_TxKxC, impl)
        if pre_values_NxP is not None:
            dots_TxK = prevalue_dots(pre_values_NxP, ids_TxK % num_values, pre_x_TxP, pre_tap_TxKxP, pre_source)
            scores_TxKxC = _scaled(scores_TxKxC, dots_TxK)
        return local_lookup(values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC, num_values, num_blocks, impl,
                            gate_TxD, tap_TxKxD, source)
    R, C, B = layout.row_axes, layout.col_axes, layout.token_axes
    gather_axes = tuple(a for a in B if a in R + C)  # table shards that also hold different tokens
    sum_axes = tuple(a for a in R + C if a not in B)  # table shards that hold the same tokens
    d_total, n_cores = values_NxD.shape[1], scores_TxKxC.shape[-1]
    d_out = out_proj_ExDxO.shape[-1] if out_proj_ExDxO is not None else d_total

    slice_before_gather = not set(gather_axes) & set(C)  # then every gathered token needs the same cores
    cols_split_tokens = bool(set(C) & set(B))  # then per-token inputs come in whole and move in the body

    def my_cores(scores, d_loc):
        """The MCS cores whose value slices this column shard holds."""
        slice_w = d_total // n_cores
        col0 = jax.lax.axis_index(C) * d_loc
        return jax.lax.dynamic_slice_in_dim(scores, col0 // slice_w, max(1, d_loc // slice_w), axis=2), col0

    def my_columns(x_TxF, width):
        """This shard's column slice of a per-token input (pre_x, gate), for every token it serves."""
        if not gather_axes:
            return x_TxF  # in_specs already cut the column slice
        if not cols_split_tokens:  # only row axes split tokens: the slice is cut, gather the group's tokens
            return jax.lax.all_gather(x_TxF, gather_axes, axis=0, tiled=True)
        if set(gather_axes) <= set(C):  # every token owner sends each column shard of its group that slice
            return jax.lax.all_to_all(jnp.take(x_TxF, peer_columns(width), axis=1), gather_axes, split_axis=1,
                                      concat_axis=0, tiled=True)
        x_TxF = jax.lax.all_gather(x_TxF, gather_axes, axis=0, tiled=True)  # rows and cols split tokens
        return jax.lax.dynamic_slice_in_dim(x_TxF, jax.lax.axis_index(C) * width, width, axis=1)

    def peer_columns(width):
        """The columns each member of the gather group holds, member by member (the group's all_gather order):
        this shard's column index with the gather axes' coordinates replaced by the member's."""
        c_sizes, g_sizes = [jax.lax.axis_size(a) for a in C], [jax.lax.axis_size(a) for a in gather_axes]
        stride = {a: math.prod(c_sizes[i + 1:]) for i, a in enumerate(C)}
        coords = np.unravel_index(np.arange(math.prod(g_sizes)), g_sizes)
        base = jax.lax.axis_index(C) - sum(jax.lax.axis_index(a) * stride[a] for a in gather_axes)
        shard_G = base + jnp.asarray(sum(c * stride[a] for c, a in zip(coords, gather_axes)), jnp.int32)
        return (shard_G[:, None] * width + jnp.arange(width)).reshape(-1)

    def body(values_loc, out_proj_loc, ids, scores, pre_values_loc, pre_x, gate, tap, pre_tap, source, pre_source):
        col0 = 0
        if C and slice_before_gather:
            scores, col0 = my_cores(scores, values_loc.shape[1])
        if gather_axes:  # S(0) tokens → B within the group: ids and scores only, K·(4 + 4C) bytes a token
            ids = jax.lax.all_gather(ids, gather_axes, axis=0, tiled=True)
            scores = jax.lax.all_gather(scores, gather_axes, axis=0, tiled=True)
        if C and not slice_before_gather:
            scores, col0 = my_cores(scores, values_loc.shape[1])
        if pre_x is not None:
            pre_x = my_columns(pre_x, pre_values_loc.shape[1])
        if gate is not None:
            gate = my_columns(gate, values_loc.shape[1])
        blocks, rows = ids // num_values, ids % num_values
        n_loc = values_loc.shape[0]
        if R:  # number-wise: keep the rows this shard owns, zero the others' weights
            local = rows - jax.lax.axis_index(R) * n_loc
            mine = (local >= 0) & (local < n_loc)
            rows = jnp.where(mine, local, 0)
            scores = jnp.where(mine[..., None], scores, 0)
        if pre_values_loc is not None and not C and not tapped:  # a row shard owns whole P rows: the fused gather
            out = fused_prevalue_lookup(pre_values_loc, values_loc, out_proj_loc, rows, pre_x, scores, impl)
        else:
            if pre_values_loc is not None:  # column shards sum T×K partial dots before weighting
                dots = prevalue_dots(pre_values_loc, rows, pre_x, None if pre_tap is None else pre_tap[0],
                                     pre_source)
                scores = _scaled(scores, jax.lax.psum(dots, C) if C else dots)
            out = local_lookup(values_loc, out_proj_loc, blocks * n_loc + rows, scores, n_loc, num_blocks, impl,
                               gate, None if tap is None else tap[0], source)
        if out_proj_loc is None:  # no projection: place the column slice in a D-wide partial sum
            zeros = jnp.zeros((out.shape[0], d_out), out.dtype)
            out = jax.lax.dynamic_update_slice_in_dim(zeros, out, col0, axis=1)
        if gather_axes:  # P → S(0) over the group's tokens
            out = jax.lax.psum_scatter(out, gather_axes, scatter_dimension=0, tiled=True)
        if sum_axes:  # P → B
            out = jax.lax.psum(out, sum_axes)
        return out

    tok = P(_spec(B), None)
    table = P(_spec(R), _spec(C))
    tok_cols = P(_spec(B), None if cols_split_tokens else _spec(C))
    opt = lambda a, spec: None if a is None else spec  # noqa: E731
    taps = P(_spec(tap_axes(layout)), None, None, None)
    def sources(s):  # a row source splits as its table: moments like the table, step counts like its rows
        return None if s is None else dataclasses.replace(s, m=table, v=table, last=P(_spec(R)), step=P())

    in_specs = (table, opt(out_proj_ExDxO, P(None, _spec(C), None)), tok, P(_spec(B), None, None),
                opt(pre_values_NxP, table), opt(pre_x_TxP, tok_cols), opt(gate_TxD, tok_cols),
                opt(tap_TxKxD, taps), opt(pre_tap_TxKxP, taps), sources(source), sources(pre_source))
    # check_vma=False: Pallas kernels (the local gather-pool on accelerators) do not carry vma types.
    return jax.shard_map(body, in_specs=in_specs, out_specs=tok, check_vma=False)(
        values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC, pre_values_NxP, pre_x_TxP, gate_TxD, tap_TxKxD,
        pre_tap_TxKxP, source, pre_source)


def tap_axes(layout: MemoryLayout) -> tuple[str, ...]:
    """The mesh axes whose shards see different table slices or different tokens, in mesh order: a sharded
    layout's value tap has one T_g×K×D_loc block per combination of them (replicated over the other axes)."""
    used = set(layout.row_axes + layout.col_axes + layout.token_axes)
    return tuple(a for a in jax.sharding.get_abstract_mesh().axis_names if a in used)


def new_tap(layout: MemoryLayout | None, tokens: int, k: int, d: int, dtype):
    """Zeros for the sparse value update's tap (memory.ValueTap): T×K×D_v for a replicated table; under a
    sharded layout S×T_g×K×D_loc, each shard's block matching the rows it gathers inside ``memory_lookup``
    (T_g: its token group's tokens; D_loc: its columns), so the tap's gradient never crosses the wire."""
    if layout is None or layout.kind == "replicated":
        return jnp.zeros((tokens, k, d), dtype)
    size = jax.sharding.get_abstract_mesh().shape
    prod = lambda axes: math.prod(size[a] for a in axes)  # noqa: E731
    R, C, B = layout.row_axes, layout.col_axes, layout.token_axes
    gather_axes = tuple(a for a in B if a in R + C)
    axes = tap_axes(layout)
    shape = (prod(axes), tokens // prod(B) * prod(gather_axes), k, d // prod(C))
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), P(_spec(axes), None, None, None))
