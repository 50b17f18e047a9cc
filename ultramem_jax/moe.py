"""Mixture-of-experts FFN: the paper's MoE baseline ("MoE-…-2inK": each token uses the top 2 of K experts).

    p = softmax(x W_r)                        router probabilities over X experts (float32)
    (w, e) = top-k(p)                         k experts per token, weighted by their router probability
    y = Σ_j w_j · SwiGLU_{e_j}(x)
    L_balance = X · Σ_x f_x · P_x            Switch-style load balancing: f_x the share of the T·k routed slots
                                              that went to expert x, P_x the mean router probability of x

Tokens are sorted by expert and run through ``jax.lax.ragged_dot``, so each expert's weights are read once per
step and the compute is the k active experts' only (no dense all-experts einsum that would make MoE look k/X
times slower than it is).  Expert weights carry the logical axis ``experts`` for expert-parallel sharding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax import sharding as sh
from ultramem_jax.config import MoEConfig


class MoE(nnx.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, mlp_dim: int, init_std: float, out_std: float, *,
                 rngs: nnx.Rngs):
        X, D, F = cfg.num_experts, d_model, cfg.expert_mlp_dim or mlp_dim
        self.cfg = cfg
        normal = lambda shape, std, names: nnx.Param(  # noqa: E731
            std * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=names)
        self.router = normal((D, X), init_std, (sh.EMBED, None))
        self.w_gate = normal((X, D, F), init_std, (sh.EXPERTS, sh.EMBED, sh.MLP))
        self.w_up = normal((X, D, F), init_std, (sh.EXPERTS, sh.EMBED, sh.MLP))
        self.w_down = normal((X, F, D), out_std, (sh.EXPERTS, sh.MLP, sh.EMBED))

    def __call__(self, x_BxSxD):
        """Returns (output B×S×D, info with the balance loss and the experts each token used)."""
        cfg, dt = self.cfg, x_BxSxD.dtype
        B, S, D = x_BxSxD.shape
        X, k = cfg.num_experts, cfg.top_k
        x_TxD = x_BxSxD.reshape(B * S, D)
        probs_TxX = jax.nn.softmax((x_TxD @ self.router[...].astype(dt)).astype(jnp.float32), axis=-1)
        weights_TxK, experts_TxK = jax.lax.top_k(probs_TxX, k)
        if cfg.normalize_top_k:
            weights_TxK = weights_TxK / weights_TxK.sum(-1, keepdims=True)
        # sort the T·k (token, expert) slots by expert and run each expert on its contiguous group
        flat_experts = experts_TxK.reshape(-1)
        order = jnp.argsort(flat_experts)
        tokens_sorted = x_TxD[order // k]
        group_sizes = jnp.bincount(flat_experts, length=X).astype(jnp.int32)
        gate = jax.lax.ragged_dot(tokens_sorted, self.w_gate[...].astype(dt), group_sizes)
        up = jax.lax.ragged_dot(tokens_sorted, self.w_up[...].astype(dt), group_sizes)
        out_sorted = jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.w_down[...].astype(dt), group_sizes)
        out_slots = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(B * S, k, D)
        y_TxD = jnp.einsum("tkd,tk->td", out_slots, weights_TxK.astype(dt))
        share_X = group_sizes.astype(jnp.float32) / (B * S * k)
        balance = X * jnp.sum(share_X * probs_TxX.mean(0))
        return y_TxD.reshape(B, S, D), {"balance_loss": balance, "experts": experts_TxK}
