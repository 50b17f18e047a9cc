"""UltraMemV2's value table shared across layers (paper §3.x "S_g-Ring" / "S_g-Block"; anchors-2026.md §1.3).

One table of ``table_rows = n₀²·L_t`` rows holds L_t per-layer tables of n₀² rows back to back.  Memory layer ℓ
addresses a window of ``N = n²`` rows, n = ⌊√(table_rows·share_ratio)⌋ (so a window covers about
g = share_ratio·L_t per-layer tables), starting at its offset and wrapping around the end of the table:

    row = (local + offset_ℓ) mod table_rows,     local ∈ [0, N)

  ring    offset_ℓ = ℓ·n₀²                  each layer starts at its own table and reads its g−1 successors
                                            (the released code's ``offset``; S_g-Ring)
  block   offset_ℓ = ⌊ℓ/g⌋·g·n₀²           the layers of one block of g read the same window (S_g-Block;
                                            pipeline-friendlier; a last partial block wraps like the ring)
"""
from __future__ import annotations

import jax.numpy as jnp

from ultramem_jax.config import MemoryConfig


def block_size(cfg: MemoryConfig) -> int:
    """g: per-layer tables one window spans (rounded), the layers per block of S_g-Block."""
    return max(1, round(cfg.share_ratio * max(1, cfg.table_layers)))


def window_offset(cfg: MemoryConfig, layer_index: int) -> int:
    """The first row of memory layer ``layer_index``'s window in the shared table."""
    per_layer = cfg.num_keys * cfg.num_keys
    if cfg.sharing == "block":
        g = block_size(cfg)
        return (layer_index // g) * g * per_layer % cfg.table_rows
    return layer_index * per_layer % cfg.table_rows


def physical_rows(local_rows, offset: int, table_rows: int):
    """Window-relative rows → rows of the shared table (wrapping around its end)."""
    return ((local_rows + offset) % table_rows).astype(jnp.int32)
