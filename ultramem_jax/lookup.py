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
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ultramem_jax import kernels


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


def local_lookup(values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC, num_values: int, num_blocks: int,
                 impl: str = "xla", tap_TxKxD=None):
    """out[t] = Σ_p W_pᵀ Σ_{k: block=p} s_k ⊙ V[row_k], with (block, row) = divmod(ids, N).

    ``out_proj`` None means no projection (PKM with D_v = d_model): the pooled vector is the output.
    ``impl`` picks the gather-pool implementation (``kernels.resolve``); ``tap_TxKxD`` (sparse value updates)
    is added to the gathered rows, the table then held outside autodiff.
    """
    blocks, rows = ids_TxK // num_values, ids_TxK % num_values
    pooled_TxExD = kernels.gather_pool(values_NxD, rows, blocks, scores_TxKxC, num_blocks, impl, tap_TxKxD)
    if out_proj_ExDxO is None:
        return pooled_TxExD[:, 0]
    return jnp.einsum("tev,evd->td", pooled_TxExD, out_proj_ExDxO.astype(pooled_TxExD.dtype))


def _spec(axes):
    return axes if len(axes) > 1 else (axes[0] if axes else None)


def memory_lookup(layout: MemoryLayout | None, values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC,
                  num_values: int, num_blocks: int, impl: str = "xla", tap_TxKxD=None):
    """The lookup under ``layout`` (an explicit ``jax.shard_map`` over the ambient mesh), or locally."""
    if layout is None or layout.kind == "replicated":
        return local_lookup(values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC, num_values, num_blocks, impl,
                            tap_TxKxD)
    R, C, B = layout.row_axes, layout.col_axes, layout.token_axes
    gather_axes = tuple(a for a in B if a in R + C)  # table shards that also hold different tokens
    sum_axes = tuple(a for a in R + C if a not in B)  # table shards that hold the same tokens
    d_total, n_cores = values_NxD.shape[1], scores_TxKxC.shape[-1]
    d_out = out_proj_ExDxO.shape[-1] if out_proj_ExDxO is not None else d_total

    slice_before_gather = not set(gather_axes) & set(C)  # then every gathered token needs the same cores

    def my_cores(scores, d_loc):
        """The MCS cores whose value slices this column shard holds."""
        slice_w = d_total // n_cores
        col0 = jax.lax.axis_index(C) * d_loc
        return jax.lax.dynamic_slice_in_dim(scores, col0 // slice_w, max(1, d_loc // slice_w), axis=2), col0

    def body(values_loc, out_proj_loc, ids, scores, tap):
        col0 = 0
        if C and slice_before_gather:
            scores, col0 = my_cores(scores, values_loc.shape[1])
        if gather_axes:  # S(0) tokens → B within the group: ids and scores only, K·(4 + 4C) bytes a token
            ids = jax.lax.all_gather(ids, gather_axes, axis=0, tiled=True)
            scores = jax.lax.all_gather(scores, gather_axes, axis=0, tiled=True)
        if C and not slice_before_gather:
            scores, col0 = my_cores(scores, values_loc.shape[1])
        blocks, rows = ids // num_values, ids % num_values
        n_loc = values_loc.shape[0]
        if R:  # number-wise: keep the rows this shard owns, zero the others' weights
            local = rows - jax.lax.axis_index(R) * n_loc
            mine = (local >= 0) & (local < n_loc)
            rows = jnp.where(mine, local, 0)
            scores = jnp.where(mine[..., None], scores, 0)
        out = local_lookup(values_loc, out_proj_loc, blocks * n_loc + rows, scores, n_loc, num_blocks, impl,
                           None if tap is None else tap[0])
        if out_proj_loc is None:  # no projection: place the column slice in a D-wide partial sum
            zeros = jnp.zeros((out.shape[0], d_out), out.dtype)
            out = jax.lax.dynamic_update_slice_in_dim(zeros, out, col0, axis=1)
        if gather_axes:  # P → S(0) over the group's tokens
            out = jax.lax.psum_scatter(out, gather_axes, scatter_dimension=0, tiled=True)
        if sum_axes:  # P → B
            out = jax.lax.psum(out, sum_axes)
        return out

    tok = P(_spec(B), None)
    in_specs = (P(_spec(R), _spec(C)), None if out_proj_ExDxO is None else P(None, _spec(C), None), tok,
                P(_spec(B), None, None), None if tap_TxKxD is None else P(_spec(tap_axes(layout)), None, None, None))
    # check_vma=False: Pallas kernels (the local gather-pool on accelerators) do not carry vma types.
    return jax.shard_map(body, in_specs=in_specs, out_specs=tok, check_vma=False)(
        values_NxD, out_proj_ExDxO, ids_TxK, scores_TxKxC, tap_TxKxD)


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
