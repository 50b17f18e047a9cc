"""Initialisation of the memory layer — method notes A.7 and F.5/F.6.

Paper ("improved init"): treat the memory like an FFN whose output variance is ≈ 1/(2L):
  values   V ~ N(0, E / (2·m·H·L))
  norms    query-norm weight 1/sqrt(E[Y]), key-norm weight 1/sqrt(D_k), where E[Y] is the mean of the top-m
           of n' standard normals (no closed form: Monte-Carlo), so the selected scores have mean ≈ 1.
Released code: values N(0, 0.02²); both norm weights D_k^-0.33.
PKM: values N(0, 1/D_v).

UltraMemV2 (its App. A; anchors-2026.md §1.1 item 4, method notes F.7):
  linears  every projection of the memory (query, pre-value, output) N(0, 2/(5·D)), as every linear of the
           backbone, so a linear fed a unit-variance input outputs variance 0.4
  tables   P and V share σ_V, set so the memory's output variance at init equals the FFN's:
           σ_mem² = 0.16·(1+σ_s²)·σ_V⁴·D_p·m·H·D_v / D   (Eq. 22)   =   σ_ffn² = 0.064·k_inner / (2L)
           ⇒ σ_V⁴ = 0.2·k_inner·D / (m·H·(1+σ_s²)·D_p·D_v·L)   (Eq. 26; the paper prints σ_V², but P and V
           both carry σ_V, so the left side is σ_V⁴), k_inner = FFN inner width / D
  norms    query- and key-norm weights D_k^-0.4 (the released code's)
Released V2 code: P, V N(0, 0.02²); query 1/√D_k, pre-value 1/√D, output 1/√D_v.
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


def v2_table_std(cfg: MemoryConfig, d_model: int, mlp_dim: int, num_layers: int) -> float:
    """σ_V of UltraMemV2's pre-value and value tables (Eq. 26 with σ_V⁴), or the released code's 0.02."""
    if cfg.value_init == "code":
        return 0.02
    k_inner = mlp_dim / d_model
    var2 = 0.2 * k_inner * d_model / (cfg.topk * cfg.heads * (1 + cfg.init_score_var) * cfg.pre_value_dim
                                      * cfg.value_dim * num_layers)
    return var2 ** 0.25


def v2_linear_stds(cfg: MemoryConfig, d_model: int) -> dict[str, float]:
    """Init std of UltraMemV2's query, pre-value and output projections (paper: all √(2/(5D)); code: 1/√fan-in)."""
    if cfg.value_init == "paper":
        std = math.sqrt(2 / (5 * d_model))
        return {"query": std, "pre_proj": std, "out_proj": std}
    return {"query": cfg.key_dim ** -0.5, "pre_proj": d_model ** -0.5, "out_proj": cfg.value_dim ** -0.5}


def norm_weights(cfg: MemoryConfig) -> tuple[float, float]:
    """(query-norm weight, key-norm weight) initial constants."""
    if cfg.kind == "memplus":  # the ByteDance Memory+ re-implementation's q/k RMSNorm weight
        return 1.0, 1.0
    if cfg.norm_init == "code":
        w = cfg.key_dim ** (-0.4 if cfg.is_v2 else -0.33)  # the V1 and V2 releases differ
        return w, w
    e_y = expected_topm_mean(cfg.keys_per_side, min(cfg.topk, cfg.keys_per_side))
    return 1.0 / math.sqrt(max(e_y, 1e-6)), cfg.key_dim ** -0.5
