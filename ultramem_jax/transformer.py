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


def apply_rope(x_BxSxNxH: jax.Array, positions_S: jax.Array, theta: float) -> jax.Array:
    half = x_BxSxNxH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_SxH = positions_S[:, None].astype(jnp.float32) * freqs[None, :]
    sin, cos = jnp.sin(angles_SxH)[None, :, None, :], jnp.cos(angles_SxH)[None, :, None, :]
    x1, x2 = x_BxSxNxH[..., :half].astype(jnp.float32), x_BxSxNxH[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxSxNxH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        D, N, H = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
        names_in = (sh.EMBED, sh.HEADS, sh.HEAD_DIM)
        self.wq = _normal(rngs, (D, N, H), cfg.init_std, names_in)
        self.wk = _normal(rngs, (D, N, H), cfg.init_std, names_in)
        self.wv = _normal(rngs, (D, N, H), cfg.init_std, names_in)
        self.wo = _normal(rngs, (N, H, D), out_std, (sh.HEADS, sh.HEAD_DIM, sh.EMBED))
        self.rope_theta = cfg.rope_theta

    def __call__(self, x_BxSxD, positions_S):
        dt = x_BxSxD.dtype
        q = apply_rope(jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self.wq[...].astype(dt)), positions_S, self.rope_theta)
        k = apply_rope(jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self.wk[...].astype(dt)), positions_S, self.rope_theta)
        v = jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self.wv[...].astype(dt))
        o_BxSxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("bsnh,nhd->bsd", o_BxSxNxH, self.wo[...].astype(dt))


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
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-style residual-branch scaling
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, out_std, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model)
        if cfg.moe is None:
            self.ffn = SwiGLU(cfg, out_std, rngs=rngs)
        else:
            self.ffn = MoE(cfg.moe, cfg.d_model, cfg.resolved_mlp_dim, cfg.init_std, out_std, rngs=rngs)

    def __call__(self, x_BxSxD, positions_S):
        """Returns (block output, the pre-FFN normalised hidden that a memory layer may read, MoE info or None)."""
        x_BxSxD = x_BxSxD + self.attn(self.attn_norm(x_BxSxD), positions_S)
        ffn_in_BxSxD = self.ffn_norm(x_BxSxD)
        if isinstance(self.ffn, MoE):
            y, moe_info = self.ffn(ffn_in_BxSxD)
            return x_BxSxD + y, ffn_in_BxSxD, moe_info
        return x_BxSxD + self.ffn(ffn_in_BxSxD), ffn_in_BxSxD, None


class TransformerLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, (sh.VOCAB, sh.EMBED))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        if not cfg.tie_embeddings:
            self.unembed = _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, (sh.EMBED, sh.VOCAB))
        self.placement = cfg.placement
        self.memories = nnx.List([memory_layer(cfg.memory, cfg.d_model, cfg.num_layers, rngs=rngs)
                                  for _ in self.placement])

    def __call__(self, tokens_BxS: jax.Array, *, return_hidden: bool = False):
        """Returns (logits B×S×V in float32, aux).

        aux: ``aux_loss`` (the auxiliary losses: Tucker penalties and pre-selection balance losses summed over
        memory layers, plus the MoE balance loss), ``memory`` (per-layer selection info), ``moe`` (per-layer routing info) and,
        with ``return_hidden``, ``hidden`` (the residual stream after every block).
        """
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens_BxS, axis=0).astype(dtype)
        positions_S = jnp.arange(tokens_BxS.shape[1])
        read_at = {read: k for k, (read, _) in enumerate(self.placement)}
        add_after = {add: k for k, (_, add) in enumerate(self.placement)}
        pending, mem_info, moe_info, hidden = None, [], [], []
        for i, block in enumerate(self.blocks):
            x, ffn_in, routing = block(x, positions_S)
            if routing is not None:
                moe_info.append(routing)
            if i in read_at:  # the memory runs off the critical path until its output is due
                pending, info = self.memories[read_at[i]](ffn_in)
                mem_info.append(info)
            if i in add_after:  # health: how loud the memory is next to the stream it joins
                mem_info[add_after[i]].update(out_rms=_rms(pending), resid_rms=_rms(x))
                x, pending = x + pending.astype(x.dtype), None
            hidden.append(x)
        x = self.final_norm(x)
        unembed = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
        logits = jnp.einsum("bsd,dv->bsv", x, unembed.astype(dtype)).astype(jnp.float32)
        aux_loss = sum((m.aux_loss() for m in self.memories), jnp.zeros((), jnp.float32))
        aux_loss += sum((i["balance_loss"] for i in mem_info if "balance_loss" in i), jnp.zeros((), jnp.float32))
        if moe_info:  # the MoE baseline's load-balancing loss, averaged over layers
            aux_loss += self.cfg.moe.balance_weight * sum(r["balance_loss"] for r in moe_info) / len(moe_info)
        aux = {"aux_loss": aux_loss, "memory": mem_info, "moe": moe_info}
        if return_hidden:
            aux["hidden"] = hidden
        return logits, aux

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
