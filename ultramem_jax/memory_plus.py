"""Memory+ (Meta, "Memory Layers at Scale", arXiv 2412.09764; anchors-2026.md §2.1), the other strong memory
layer, as a Flax NNX module.  It sits in place of the FFN of the blocks it is placed in.

Per token (x: the block's normalised FFN input):

    q_h = W_q x  (one query per head; optional RMSNorm on queries and keys)
    winners, s = top-m of s_row[i] + s_col[j] over the n×n product-key grid     (product_keys.py, per head)
    w = softmax over each head's m winners
    bag = Σ_h Σ_k w_hk · V[slot_hk]                     the weighted gather of V1 (lookup.py), one block
    out = W_v (bag ⊙ silu(W_g x))                       swilu gating

V is one pool of n² rows of width D_v (default d_model) that every Memory+ layer of the model reads
(``SharedValueTable``, Meta's class-level ``VALUES``).  Init as Meta's code: values N(0, 1/D_v), the query
projection xavier (as a normal of the same variance), W_g and W_v N(0, 1/D); keys stay V1's N(0, 1/D_k)
(Meta: uniform ±1/√k_dim).  Training values at a constant LR with their own gradient clip is the optimizer's
``value_learning_rate`` / ``value_grad_clip``.
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from ultramem_jax import kernels, lookup
from ultramem_jax import sharding as sh
from ultramem_jax.config import MemoryConfig
from ultramem_jax.memory import UltraMemLayer, _param


class MemoryPlusLayer(UltraMemLayer):
    """Memory+ over a shared value pool; retrieval (product keys, per-head queries) is V1/PKM's."""

    def __init__(self, cfg: MemoryConfig, d_model: int, num_layers: int, *, rngs: nnx.Rngs):
        if cfg.kind != "memplus":
            raise ValueError("memory.kind: MemoryPlusLayer needs kind memplus (MemoryConfig.memplus(...))")
        cfg.validate(d_model)
        cfg = cfg.resolved(d_model)
        self.cfg, self.d_model = cfg, d_model
        heads = 1 if cfg.share_query else cfg.heads
        q_std = math.sqrt(2 / (d_model + heads * 2 * cfg.key_dim))  # xavier
        self._init_retrieval(cfg, d_model, query_ranks=1, query_std=q_std, rngs=rngs)
        self.swilu_proj = _param(None, rngs, (d_model, cfg.value_dim), (sh.EMBED, sh.VALUE_DIM), std=d_model ** -0.5)
        out_std = d_model ** -0.5 if cfg.out_proj_std is None else cfg.out_proj_std
        self.out_proj = _param(None, rngs, (cfg.value_dim, d_model), (sh.VALUE_DIM, sh.EMBED), std=out_std)
        self.permutation = None
        self.layout: lookup.MemoryLayout | None = None  # how the pool is split (set by create_model)
        self.impl = kernels.resolve(cfg.kernels)

    def __call__(self, x_BxSxD: jax.Array, table):
        """Returns (output B×S×D, info), reading ``table.values`` (the shared pool)."""
        cfg = self.cfg
        x_TxD = x_BxSxD.reshape(-1, x_BxSxD.shape[-1])
        raw_TxHxMx1, slots_TxHxM, balance = self._select(x_TxD)
        weights_TxHxMx1 = self._activate(raw_TxHxMx1)
        K = cfg.heads * cfg.topk
        slots_TxK = slots_TxHxM.reshape(-1, K)
        gate_TxV = jax.nn.silu(x_TxD @ self.swilu_proj[...].astype(x_TxD.dtype))
        # gate and W_v inside the lookup: a column shard projects its gated slice, one D-wide reduction
        out_TxD = lookup.memory_lookup(self.layout, table.values[...], self.out_proj[...][None], slots_TxK,
                                       weights_TxHxMx1.reshape(-1, K, 1), cfg.num_values, 1, impl=self.impl,
                                       gate_TxD=gate_TxV, tap_TxKxD=self._value_tap(), source=self._tap_source())
        return self._finish(out_TxD, x_BxSxD.shape, raw_TxHxMx1, slots_TxK, balance)
