"""Small helpers shared by the kernels: padding to block multiples and version-tolerant Pallas imports."""
from __future__ import annotations

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
