"""Analytic parameter counts: total, and activated per token.

"Activated per token" counts the parameters that take part in one token's forward pass: every dense weight,
one embedding row, the unembedding (the whole tied embedding when tied), all keys (every key is scored), the
cores, the query and output projections, and only the H·m value rows the token selects (UltraMemV2: H·m
pre-value and value rows).  That is the paper's sense of sparse vs. activated parameters.  ``non_embedding``
is the total without the embedding and unembedding matrices.
"""
from __future__ import annotations

from ultramem_jax.config import ModelConfig


def memory_layer_params(cfg: ModelConfig) -> dict[str, int]:
    """One memory layer's parameters by part, and ``activated``.  UltraMemV2's shared P/V table is not part
    of a layer (``shared_table_params``); its activated rows (m·H rows of D_v + D_p) are."""
    mem = cfg.resolved_memory
    D = cfg.d_model
    q_heads = 1 if mem.share_query else mem.heads
    q_ranks = mem.rank if mem.is_v2 and mem.query_per_rank else 1
    q_feat = q_heads * 2 * q_ranks * mem.key_dim
    counts = {
        "query": D * q_feat + (2 * q_feat if mem.query_batchnorm != "none" else 0),
        "norms": 2 * mem.key_dim if mem.qk_norm else 0,
        "keys": mem.heads * 2 * mem.keys_per_side * mem.key_dim * mem.rank,
        "cores": mem.cores * mem.heads * mem.rank * mem.rank if mem.retrieval == "tdqkr" else 0,
    }
    selected = min(mem.heads * mem.topk, mem.num_values)
    if mem.is_v2:
        counts.update(pre_proj=D * mem.pre_value_dim, out_proj=mem.value_dim * D, values=0)
        row_width = mem.value_dim + mem.pre_value_dim
    elif mem.kind == "memplus":  # swilu gate and value projection; the pool is shared
        counts.update(swilu_proj=D * mem.value_dim, out_proj=mem.value_dim * D, values=0)
        row_width = mem.value_dim
    else:
        counts.update(values=mem.num_values * mem.value_dim,
                      out_proj=mem.expansion * mem.value_dim * D if mem.output_proj else 0)
        row_width = mem.value_dim
    counts["activated"] = sum(v for k, v in counts.items() if k != "values") + selected * row_width
    return counts


def shared_table_params(cfg: ModelConfig) -> int:
    """UltraMemV2's shared pre-value and value tables, Memory+'s shared value pool (0 for other models)."""
    mem = cfg.resolved_memory
    if mem is None or mem.kind not in ("ultramemv2", "memplus"):
        return 0
    return mem.table_rows * (mem.value_dim + (mem.pre_value_dim if mem.is_v2 else 0))


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    D, V, L, N, H, F = (cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.resolved_head_dim,
                        cfg.resolved_mlp_dim)
    if cfg.moe is None:
        ffn = ffn_activated = 3 * D * F
    else:  # the router, then X experts of which k run per token
        X, k, Fe = cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_mlp_dim or F
        ffn, ffn_activated = D * X + X * 3 * D * Fe, D * X + k * 3 * D * Fe
    block = 4 * D * N * H + ffn + 2 * D
    embed = V * D
    unembed = 0 if cfg.tie_embeddings else D * V
    dense = embed + unembed + L * block + D
    # tied: the embedding is also the unembedding, used whole by every token
    total, activated = dense, dense - embed + D - L * (ffn - ffn_activated) + (embed if cfg.tie_embeddings else 0)
    memory_values = 0
    if cfg.memory is not None:
        per_layer = memory_layer_params(cfg)
        n_mem = cfg.num_memory_layers
        layer_total = sum(v for k, v in per_layer.items() if k != "activated")
        total += n_mem * layer_total
        activated += n_mem * per_layer["activated"]
        if cfg.memory.kind == "memplus":  # each Memory+ layer takes the place of its block's FFN
            total, activated = total - n_mem * ffn, activated - n_mem * ffn_activated
        memory_values = n_mem * per_layer["values"] + shared_table_params(cfg)
        total += shared_table_params(cfg)
    return {"total": total, "activated_per_token": activated, "dense": dense, "memory_values": memory_values,
            "embedding": embed, "non_embedding": total - embed - unembed}
