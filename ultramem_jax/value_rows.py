"""The sparse value update's row gradients and row updates under every memory layout (lookup.py's SBP terms).

A replicated table takes ``row_adam`` as it is: one gradient per distinct row of the step, one scatter.  Under a
sharded layout each table shard handles only what it owns, inside a ``shard_map`` over the ambient mesh:

  * its value tap's gradient (lookup.new_tap) holds the rows it gathered: its token group's reads of its own rows
    (number-wise) or of its column slice of every row (dimension-wise), zeros where another shard owns the row;
  * it sums duplicates over its own rows, then over the data-parallel replicas of its slice (axes that split the
    tokens but not the table: an all-gather of the touched rows' ids and gradients, not of the table), so every
    replica applies the same update;
  * the value norm for clipping is the psum of the shards' squared row gradients over the table axes;
  * it updates its rows of the table, both moments and the per-row step counts in place.

Nothing table-sized moves; what crosses the wire per step is the touched rows' gradients over the data-parallel
axes and one scalar.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ultramem_jax import row_adam
from ultramem_jax.lookup import MemoryLayout, _spec, tap_axes


def _sharded(layout: MemoryLayout | None) -> bool:
    return layout is not None and layout.kind != "replicated"


def row_grads(layout: MemoryLayout | None, rows_TxK, tap_grads, num_values: int):
    """(ids, grads, squared norm): each touched row once with its summed gradient, and Σ grads² over the whole
    table.  Replicated: ids U, grads U×D_v.  Sharded: one block per tap shard (S×U, S×U×D_loc, shard-local row
    ids, padding n_loc), for ``update`` under the same layout."""
    if not _sharded(layout):
        ids_U, grads_UxD = row_adam.sum_duplicates(rows_TxK, tap_grads, num_values)
        return ids_U, grads_UxD, jnp.sum(jnp.square(grads_UxD.astype(jnp.float32)))
    R, C, B = layout.row_axes, layout.col_axes, layout.token_axes
    size = jax.sharding.get_abstract_mesh().shape
    gather_axes = tuple(a for a in B if a in R + C)  # table shards that also hold different tokens
    replica_axes = tuple(a for a in B if a not in R + C)  # same table slice, different tokens
    n_loc = num_values // math.prod(size[a] for a in R)

    def body(rows, grads):
        grads = grads[0]
        if gather_axes:  # the token group, as the lookup gathered it
            rows = jax.lax.all_gather(rows, gather_axes, axis=0, tiled=True)
        if R:  # others' rows: the padding id (dropped by the scatters) and exactly zero gradients
            local = rows - jax.lax.axis_index(R) * n_loc
            mine = (local >= 0) & (local < n_loc)
            rows = jnp.where(mine, local, n_loc)
            grads = jnp.where(mine[..., None], grads, 0)
        ids_U, grads_UxD = row_adam.sum_duplicates(rows, grads, n_loc)
        if replica_axes:
            ids_U, grads_UxD = row_adam.sum_duplicates(jax.lax.all_gather(ids_U, replica_axes, axis=0, tiled=True),
                                                       jax.lax.all_gather(grads_UxD, replica_axes, axis=0,
                                                                          tiled=True), n_loc)
        sq = jnp.sum(jnp.square(grads_UxD.astype(jnp.float32)))
        if R + C:
            sq = jax.lax.psum(sq, R + C)
        return ids_U[None], grads_UxD[None], sq

    taps = _spec(tap_axes(layout))
    return jax.shard_map(body, in_specs=(P(_spec(B), None), P(taps, None, None, None)),
                         out_specs=(P(taps, None), P(taps, None, None), P()), check_vma=False)(rows_TxK, tap_grads)


def update(layout: MemoryLayout | None, hyper: row_adam.Hyper, values_NxD, state: row_adam.RowAdamState, ids, grads,
           step):
    """``row_adam.update`` with ``row_grads``' output; under a sharded layout each shard updates its own block."""
    if not _sharded(layout):
        return row_adam.update(hyper, values_NxD, state, ids, grads, step)
    R, C = layout.row_axes, layout.col_axes
    taps = _spec(tap_axes(layout))
    table, rows = P(_spec(R), _spec(C)), P(_spec(R))

    def body(values, m, v, last, ids, grads, step):
        return row_adam.update_arrays(hyper, values, m, v, last, ids[0], grads[0], step)

    values_NxD, state.m[...], state.v[...], state.last[...] = jax.shard_map(
        body, in_specs=(table, table, table, rows, P(taps, None), P(taps, None, None), P()),
        out_specs=(table, table, table, rows), check_vma=False)(
        values_NxD, state.m[...], state.v[...], state.last[...], ids, grads, step)
    return values_NxD
