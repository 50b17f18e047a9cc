"""Row gathers for ids that are in range by construction (selected slots, owned rows, tokens).

``jnp.take``'s default mode fills out-of-range ids, which XLA's CPU backend lowers to a masked loop per element:
gathering 65,536 rows of 64 floats took 9.5 ms that way against 2.6 ms in clip mode (jax 0.12, this machine's CPU).
Every caller here has in-range ids (a shard masks the rows it does not own before gathering), so clipping never
changes a value, only the speed; the gradient is the matching clip-mode scatter-add.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def take_rows(x: jax.Array, ids: jax.Array) -> jax.Array:
    """x[ids] along axis 0, for in-range ids."""
    return jnp.take(x, ids, axis=0, mode="clip")


def take_along(x: jax.Array, ids: jax.Array, axis: int) -> jax.Array:
    """jnp.take_along_axis for in-range ids."""
    return jnp.take_along_axis(x, ids, axis=axis, mode="clip")
