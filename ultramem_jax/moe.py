"""Mixture-of-experts FFN: the paper's MoE baseline ("MoE-…-2inK": each token uses the top 2 of K experts).

    p = softmax(x W_r)                        router probabilities over X experts (float32)
    (w, e) = top-k(p)                         k experts per token, weighted by their router probability
    y = Σ_j w_j · SwiGLU_{e_j}(x)
    L_balance = X · Σ_x f_x · P_x            Switch-style load balancing: f_x the share of the T·k routed slots
                                              that went to expert x, P_x the mean router probability of x

Tokens are sorted by expert, so the compute is the k active experts' only (no dense all-experts einsum that
would make MoE look X/k times slower than it is).  Two exact ways to run the sorted groups (``grouped_matmul``):
  ragged   ``jax.lax.ragged_dot``: each expert's weights read once per step; the accelerator path;
  blocked  each group padded to a multiple of a row block, each block multiplied by its expert's weights (a
           batched einsum): at most X·(block−1) padding rows.  XLA:CPU lowers ragged_dot to a slow loop (a
           tiny MoE step took 10× a dense one); this takes about 1.4× the active FLOPs instead.
  auto     blocked on CPU, ragged elsewhere.
Expert weights carry the logical axis ``experts`` for expert-parallel sharding.
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
        weights = tuple(w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down))
        if grouped_matmul_impl(cfg.grouped_matmul) == "ragged":
            out_sorted = _experts_ragged(tokens_sorted, group_sizes, *weights)
        else:
            out_sorted = _experts_blocked(tokens_sorted, group_sizes, *weights)
        out_slots = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(B * S, k, D)
        y_TxD = jnp.einsum("tkd,tk->td", out_slots, weights_TxK.astype(dt))
        share_X = group_sizes.astype(jnp.float32) / (B * S * k)
        balance = X * jnp.sum(share_X * probs_TxX.mean(0))
        return y_TxD.reshape(B, S, D), {"balance_loss": balance, "experts": experts_TxK}


def grouped_matmul_impl(choice: str) -> str:
    if choice == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged"
    return choice


def _experts_ragged(tokens_NxD, group_sizes_X, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD):
    gate = jax.lax.ragged_dot(tokens_NxD, w_gate_XxDxF, group_sizes_X)
    up = jax.lax.ragged_dot(tokens_NxD, w_up_XxDxF, group_sizes_X)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_XxFxD, group_sizes_X)


def _experts_blocked(tokens_NxD, group_sizes_X, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD):
    """The sorted token groups, each padded to whole blocks of ``b`` rows; every block runs its own expert."""
    N, D = tokens_NxD.shape
    X = group_sizes_X.shape[0]
    b = int(min(128, max(8, 1 << max(0, (N // (2 * X)).bit_length() - 1))))  # ~half a group: little padding
    num_blocks = -(-(N + X * (b - 1)) // b)  # enough for any split of N rows over X experts
    padded_X = -(-group_sizes_X // b) * b
    start_X = jnp.cumsum(group_sizes_X) - group_sizes_X
    padded_start_X = jnp.cumsum(padded_X) - padded_X
    expert_N = jnp.repeat(jnp.arange(X), group_sizes_X, total_repeat_length=N)
    dest_N = padded_start_X[expert_N] + jnp.arange(N) - start_X[expert_N]
    x_BxbxD = jnp.zeros((num_blocks * b, D), tokens_NxD.dtype).at[dest_N].set(tokens_NxD).reshape(num_blocks, b, D)
    # blocks past the last group hold zero rows; they borrow expert X-1 and their output is never read
    block_expert_B = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_X), jnp.arange(num_blocks) * b, side="right"),
                                 X - 1)
    gate = jnp.einsum("nbd,ndf->nbf", x_BxbxD, w_gate_XxDxF[block_expert_B])
    up = jnp.einsum("nbd,ndf->nbf", x_BxbxD, w_up_XxDxF[block_expert_B])
    out_BxbxD = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(gate) * up, w_down_XxFxD[block_expert_B])
    return out_BxbxD.reshape(num_blocks * b, D)[dest_N]
