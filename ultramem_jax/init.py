"""Initialisation of the memory layer — method notes A.7 and F.5/F.6.

Paper ("improved init"): treat the memory like an FFN whose output variance is ≈ 1/(2L):
  values   V ~ N(0, E / (2·m·H·L))
  norms    query-norm weight 1/sqrt(E[Y]), key-norm weight 1/sqrt(D_k), where E[Y] is the mean of the top-m
           of n' standard normals (no closed form: Monte-Carlo), so the selected scores have mean ≈ 1.
Released code: values N(0, 0.02²); both norm weights D_k^-0.33.
PKM: values N(0, 1/D_v).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ultramem_jax.config import MemoryConfig


@functools.lru_cache(maxsize=64)
def expected_topm_mean(n: int, m: int, samples: int = 2000, seed: int = 0) -> float:
    """Monte-Carlo E[Y]: mean of the largest m of n i.i.d. standard normals."""
    draws = np.random.default_rng(seed).standard_normal((samples, n))
    top = -np.partition(-draws, m - 1, axis=1)[:, :m]
    return float(top.mean())


def value_std(cfg: MemoryConfig, num_layers: int) -> float:
    if cfg.value_init == "paper":  # H read as retrieval heads (notes F.6)
        return math.sqrt(cfg.expansion / (2 * cfg.topk * cfg.heads * num_layers))
    if cfg.value_init == "code":
        return 0.02
    return cfg.value_dim ** -0.5


def norm_weights(cfg: MemoryConfig) -> tuple[float, float]:
    """(query-norm weight, key-norm weight) initial constants."""
    if cfg.norm_init == "code":
        w = cfg.key_dim ** -0.33
        return w, w
    e_y = expected_topm_mean(cfg.keys_per_side, min(cfg.topk, cfg.keys_per_side))
    return 1.0 / math.sqrt(max(e_y, 1e-6)), cfg.key_dim ** -0.5
