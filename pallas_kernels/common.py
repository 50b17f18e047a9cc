"""Small helpers shared by the kernels: padding to block multiples and version-tolerant Pallas imports."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pow2(x: int) -> int:
    """The smallest power of two >= x (Triton blocks must be powers of two)."""
    return 1 << max(0, int(x) - 1).bit_length()


def pad_to(x, shape, value=0):
    """Pads ``x`` at the end of each axis up to ``shape`` (no copy when it already fits)."""
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return x if not any(p for _, p in pads) else jnp.pad(x, pads, constant_values=value)


def squeezed():
    """The block-shape marker for a squeezed dimension (``pl.Squeezed()``; ``None`` on older jax)."""
    return pl.Squeezed() if hasattr(pl, "Squeezed") else None


def tpu():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu


def triton():
    """Pallas' Triton backend module, or ImportError where a jax release has removed it."""
    from jax.experimental.pallas import triton as pltriton
    return pltriton


def triton_params(num_warps: int = 4, num_stages: int = 2):
    return triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ---- shared by the gather kernels (gather_pool.py, pre_value_gather.py) ------------------------------------
def core_lanes(off, w, C, D, shape):
    """For each MCS core c, which lanes of the column chunk [off, off + w) lie in its value slice (``shape``:
    the lane iota's shape, lanes on the last axis)."""
    lane = off + jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    return [(lane >= c * (D // C)) & (lane < (c + 1) * (D // C)) for c in range(C)]


def column_chunks(D: int, widest: int):
    """[(offset, width)] covering [0, D) with power-of-two widths (Triton tiles) of at most ``widest``."""
    chunks, off = [], 0
    for bit in reversed(range(D.bit_length())):
        if D & (1 << bit):
            w = 1 << bit
            for _ in range(max(1, w // widest)):
                chunks.append((off, min(w, widest)))
                off += min(w, widest)
    return chunks


def lane_weights(s_refs_row, off, w, C, D):
    """Per (row, lane) weight: the score of the core whose value slice holds that lane.  Kp × w."""
    return sum(jnp.where(m, s[:, None], 0.0) for m, s in zip(core_lanes(off, w, C, D, (1, w)), s_refs_row))


def whole(shape):
    """A block that is the whole array, for every program (the GPU kernels index rows themselves)."""
    return pl.BlockSpec(shape, lambda t: (0,) * len(shape))
