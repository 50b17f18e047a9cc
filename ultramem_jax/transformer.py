"""Decoder-only transformer LM (pre-norm: RMSNorm, RoPE, causal attention, SwiGLU) with skip-layer memories.

Memory k reads the pre-FFN normalised hidden of block ``read_k`` and its output is added to the residual
stream right after block ``add_k`` finishes (method notes A.1).  No memory layers gives the dense baseline.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ultramem_jax import sharding as sh
from ultramem_jax.config import ModelConfig
from ultramem_jax.memory import memory_layer
from ultramem_jax.memory_plus import MemoryPlusLayer
from ultramem_jax.memory_v2 import SharedValueTable, UltraMemV2Layer
from ultramem_jax.moe import MoE


def _normal(rngs, shape, std, names):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=names)


def _rms(x) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(jax.lax.stop_gradient(x).astype(jnp.float32))))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(sh.NORM,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def apply_rope(x_BxSxNxH: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """``positions``: S (shared by the batch) or B×S (per sequence, cached decoding)."""
    half = x_BxSxNxH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs
    angles_BxSxH = angles if angles.ndim == 3 else angles[None]
    sin, cos = jnp.sin(angles_BxSxH)[:, :, None, :], jnp.cos(angles_BxSxH)[:, :, None, :]
    x1, x2 = x_BxSxNxH[..., :half].astype(jnp.float32), x_BxSxNxH[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxSxNxH.dtype)


class Attention(nnx.Module):
    """Causal self-attention; with a KV cache (``init_cache``) it also serves generation:

    * positions S (from 0): prefill.  The new keys and values fill cache slots [0, S) and the tokens attend
      to each other exactly as in training;
    * positions B×S: decode.  Sequence b's new keys and values go to its own slots ``positions[b]`` (the
      RoPE positions offset by that sequence's length so far) and every query attends to the cache slots
      up to its own position.
    Without a cache the module is the training path, unchanged.
    """

    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        D, N, H = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
        names_in = (sh.EMBED, sh.HEADS, sh.HEAD_DIM)
        self.wq = _normal(rngs, (D, N, H), cfg.init_std, names_in)
        self.wk = _normal(rngs, (D, N, H), cfg.init_std, names_in)
        self.wv = _normal(rngs, (D, N, H), cfg.init_std, names_in)
        self.wo = _normal(rngs, (N, H, D), out_std, (sh.HEADS, sh.HEAD_DIM, sh.EMBED))
        self.rope_theta = cfg.rope_theta

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """Adds the cache variables (B×L×N×H each); a model that never calls this has none, as in training."""
        _, N, H = self.wk.shape
        self.cache_k = nnx.Cache(jnp.zeros((batch, max_len, N, H), dtype))
        self.cache_v = nnx.Cache(jnp.zeros((batch, max_len, N, H), dtype))

    def __call__(self, x_BxSxD, positions):
        dt = x_BxSxD.dtype
        q = apply_rope(jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self.wq[...].astype(dt)), positions, self.rope_theta)
        k = apply_rope(jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self.wk[...].astype(dt)), positions, self.rope_theta)
        v = jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self.wv[...].astype(dt))
        cached = hasattr(self, "cache_k")
        if not cached or positions.ndim == 1:
            if cached:  # prefill: positions are 0..S-1 for every sequence
                self.cache_k[...] = jax.lax.dynamic_update_slice_in_dim(
                    self.cache_k[...], k.astype(self.cache_k.dtype), 0, axis=1)
                self.cache_v[...] = jax.lax.dynamic_update_slice_in_dim(
                    self.cache_v[...], v.astype(self.cache_v.dtype), 0, axis=1)
            o_BxSxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            o_BxSxNxH = self._attend_cache(q, k, v, positions)
        return jnp.einsum("bsnh,nhd->bsd", o_BxSxNxH, self.wo[...].astype(dt))

    def _attend_cache(self, q_BxSxNxH, k_BxSxNxH, v_BxSxNxH, positions_BxS):
        """Writes the new keys / values at each sequence's positions, then attends over the cache."""
        B, L = self.cache_k.shape[:2]
        rows_Bx1 = jnp.arange(B)[:, None]
        k_cache = self.cache_k[...].at[rows_Bx1, positions_BxS].set(k_BxSxNxH.astype(self.cache_k.dtype))
        v_cache = self.cache_v[...].at[rows_Bx1, positions_BxS].set(v_BxSxNxH.astype(self.cache_v.dtype))
        self.cache_k[...], self.cache_v[...] = k_cache, v_cache
        # slots past a sequence's position hold padding or nothing yet: masked out
        visible_Bx1xSxL = (jnp.arange(L)[None, None, :] <= positions_BxS[:, :, None])[:, None]
        dt = q_BxSxNxH.dtype
        return jax.nn.dot_product_attention(q_BxSxNxH, k_cache.astype(dt), v_cache.astype(dt), mask=visible_Bx1xSxL)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.resolved_mlp_dim
        self.w_gate = _normal(rngs, (D, F), cfg.init_std, (sh.EMBED, sh.MLP))
        self.w_up = _normal(rngs, (D, F), cfg.init_std, (sh.EMBED, sh.MLP))
        self.w_down = _normal(rngs, (F, D), out_std, (sh.MLP, sh.EMBED))

    def __call__(self, x_BxSxD):
        dt = x_BxSxD.dtype
        h = jax.nn.silu(x_BxSxD @ self.w_gate[...].astype(dt)) * (x_BxSxD @ self.w_up[...].astype(dt))
        return h @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    """``with_ffn=False``: the block's FFN is left out (a Memory+ layer takes its place)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, with_ffn: bool = True):
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-style residual-branch scaling
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, out_std, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model)
        if not with_ffn:
            self.ffn = None
        elif cfg.moe is None:
            self.ffn = SwiGLU(cfg, out_std, rngs=rngs)
        else:
            self.ffn = MoE(cfg.moe, cfg.d_model, cfg.resolved_mlp_dim, cfg.init_std, out_std, rngs=rngs)

    def __call__(self, x_BxSxD, positions):
        """Returns (block output, the pre-FFN normalised hidden that a memory layer may read, MoE info or None)."""
        x_BxSxD = x_BxSxD + self.attn(self.attn_norm(x_BxSxD), positions)
        ffn_in_BxSxD = self.ffn_norm(x_BxSxD)
        if self.ffn is None:
            return x_BxSxD, ffn_in_BxSxD, None
        if isinstance(self.ffn, MoE):
            y, moe_info = self.ffn(ffn_in_BxSxD)
            return x_BxSxD + y, ffn_in_BxSxD, moe_info
        return x_BxSxD + self.ffn(ffn_in_BxSxD), ffn_in_BxSxD, None


class TransformerLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, (sh.VOCAB, sh.EMBED))
        mem = cfg.resolved_memory
        replaced = {read for read, _ in cfg.placement} if mem is not None and mem.kind == "memplus" else set()
        self.blocks = nnx.List([Block(cfg, rngs=rngs, with_ffn=i not in replaced) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        if not cfg.tie_embeddings:
            self.unembed = _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, (sh.EMBED, sh.VOCAB))
        self.placement = cfg.placement
        if mem is not None and mem.is_v2:  # one P/V table for all layers, each reading its window of it
            self.memory_table = SharedValueTable(mem, cfg.d_model, cfg.resolved_mlp_dim, cfg.num_layers, rngs=rngs)
            self.memories = nnx.List([UltraMemV2Layer(mem, cfg.d_model, cfg.num_layers, layer_index=k,
                                                      mlp_dim=cfg.resolved_mlp_dim, rngs=rngs)
                                      for k in range(len(self.placement))])
        elif mem is not None and mem.kind == "memplus":  # one value pool read whole by every layer
            self.memory_table = SharedValueTable(mem, cfg.d_model, cfg.resolved_mlp_dim, cfg.num_layers, rngs=rngs)
            self.memories = nnx.List([MemoryPlusLayer(mem, cfg.d_model, cfg.num_layers, rngs=rngs)
                                      for _ in self.placement])
        else:
            self.memory_table = None
            self.memories = nnx.List([memory_layer(cfg.memory, cfg.d_model, cfg.num_layers, rngs=rngs)
                                      for _ in self.placement])

    def __call__(self, tokens_BxS: jax.Array, *, return_hidden: bool = False, positions_BxS: jax.Array | None = None):
        """Returns (logits B×S×V in float32, aux).

        aux: ``aux_loss`` (the auxiliary losses: Tucker penalties and pre-selection balance losses summed over
        memory layers, plus the MoE balance loss), ``memory`` (per-layer selection info), ``moe`` (per-layer routing info) and,
        with ``return_hidden``, ``hidden`` (the residual stream after every block).

        Generation (generate.py) first calls ``init_cache``; then a call without ``positions_BxS`` is the
        prefill and one with them decodes: the tokens sit at those per-sequence positions and attend to the
        cache.  Memory layers and MoE routing see only the tokens passed in.
        """
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens_BxS, axis=0).astype(dtype)
        positions = jnp.arange(tokens_BxS.shape[1]) if positions_BxS is None else positions_BxS
        read_at = {read: k for k, (read, _) in enumerate(self.placement)}
        add_after = {add: k for k, (_, add) in enumerate(self.placement)}
        pending, mem_info, moe_info, hidden = None, [], [], []
        for i, block in enumerate(self.blocks):
            x, ffn_in, routing = block(x, positions)
            if routing is not None:
                moe_info.append(routing)
            if i in read_at:  # the memory runs off the critical path until its output is due
                memory = self.memories[read_at[i]]
                pending, info = memory(ffn_in) if self.memory_table is None else memory(ffn_in, self.memory_table)
                mem_info.append(info)
            if i in add_after:  # health: how loud the memory is next to the stream it joins
                mem_info[add_after[i]].update(out_rms=_rms(pending), resid_rms=_rms(x))
                x, pending = x + pending.astype(x.dtype), None
            hidden.append(x)
        logits = self.head(x)
        aux_loss = sum((m.aux_loss() for m in self.memories), jnp.zeros((), jnp.float32))
        aux_loss += sum((i["balance_loss"] for i in mem_info if "balance_loss" in i), jnp.zeros((), jnp.float32))
        if moe_info:  # the MoE baseline's load-balancing loss, averaged over layers
            aux_loss += self.cfg.moe.balance_weight * sum(r["balance_loss"] for r in moe_info) / len(moe_info)
        aux = {"aux_loss": aux_loss, "memory": mem_info, "moe": moe_info}
        if return_hidden:
            aux["hidden"] = hidden
        return logits, aux

    def head(self, x_BxSxD: jax.Array) -> jax.Array:
        """Final norm and unembedding: float32 logits for the residual stream ``x``."""
        x = self.final_norm(x_BxSxD)
        unembed = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
        return jnp.einsum("bsd,dv->bsv", x, unembed.astype(x.dtype)).astype(jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """Preallocates every block's KV cache (B×max_len slots, ``dtype`` float32 or bfloat16)."""
        for block in self.blocks:
            block.attn.init_cache(batch, max_len, dtype)

    def refresh_tucker(self):
        """The once-per-step TDQKR refresh of every memory layer (the train step calls this)."""
        for m in self.memories:
            m.refresh_tucker()


def create_model(cfg: ModelConfig, seed: int = 0, mesh=None, rules=None, layout=None) -> TransformerLM:
    """Builds the LM; with a mesh, parameters are created sharded by the logical ``rules``, and ``layout``
    (a ``lookup.MemoryLayout``) distributes the memory lookup over it."""
    with sh.build_context(mesh, rules):
        model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
    for memory in model.memories:
        memory.layout = layout
    return model


def lm_loss(model: TransformerLM, tokens_BxS: jax.Array, mask_BxS: jax.Array | None = None):
    """Next-token cross-entropy (+ Tucker auxiliary loss). Returns (total, (ce, aux))."""
    logits, aux = model(tokens_BxS[:, :-1])
    targets = tokens_BxS[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if mask_BxS is None:
        ce = ce.mean()
    else:
        w = mask_BxS[:, 1:].astype(jnp.float32)
        ce = (ce * w).sum() / jnp.maximum(w.sum(), 1.0)
    return ce + aux["aux_loss"], (ce, aux)
