"""The MoE baseline: routed experts against a per-token loop over dense experts, the balance loss, counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax import ModelConfig
from ultramem_jax.config import MoEConfig
from ultramem_jax.moe import MoE
from ultramem_jax.params import param_counts
from ultramem_jax.sharding import build_context
from ultramem_jax.transformer import create_model, lm_loss


def _moe(cfg, D=16, F=24, seed=0):
    with build_context():
        return MoE(cfg, D, F, init_std=0.3, out_std=0.3, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("grouped_matmul", ["ragged", "blocked"])
@pytest.mark.parametrize("normalize", [False, True])
def test_routed_experts_match_a_per_token_loop(rng, normalize, grouped_matmul):
    cfg = MoEConfig(num_experts=5, top_k=2, normalize_top_k=normalize, grouped_matmul=grouped_matmul)
    moe = _moe(cfg, seed=int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    y, info = moe(x)
    xs = np.asarray(x).reshape(-1, 16)
    router, wg, wu, wd = (np.asarray(p[...], np.float64) for p in (moe.router, moe.w_gate, moe.w_up, moe.w_down))
    logits = xs @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    want = np.zeros_like(xs, dtype=np.float64)
    counts = np.zeros(5)
    for t in range(xs.shape[0]):
        top = np.argsort(-probs[t])[:2]
        w = probs[t, top] / (probs[t, top].sum() if normalize else 1.0)
        for e, we in zip(top, w):
            want[t] += we * (silu(xs[t] @ wg[e]) * (xs[t] @ wu[e])) @ wd[e]
            counts[e] += 1
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), want, rtol=1e-4, atol=1e-5)
    balance = 5 * np.sum(counts / counts.sum() * probs.mean(0))
    np.testing.assert_allclose(info["balance_loss"], balance, rtol=1e-5)


def test_only_chosen_experts_get_gradient(rng):
    cfg = MoEConfig(num_experts=8, top_k=1)
    moe = _moe(cfg)
    x = jnp.asarray(rng.standard_normal((1, 3, 16)), jnp.float32)  # 3 tokens reach at most 3 of 8 experts
    def loss(m):
        y, info = m(x)
        return jnp.sum(y ** 2), info
    grads, info = nnx.jit(nnx.grad(loss, has_aux=True))(moe)  # jitted: eager compiles op by op
    used = np.unique(np.asarray(info["experts"]))
    g_up = np.abs(np.asarray(grads["w_up"][...])).sum((1, 2))
    assert np.all(g_up[used] > 0) and np.all(np.delete(g_up, used) == 0)
    assert np.abs(np.asarray(grads["router"][...])).sum() > 0


def test_moe_lm_counts_trains_and_validates(rng):
    cfg = ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=2,
                      moe=MoEConfig(num_experts=6, top_k=2, expert_mlp_dim=40))
    model = create_model(cfg, seed=1)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == param_counts(cfg)["total"]
    tokens = jnp.asarray(rng.integers(0, 32, (4, 17)), jnp.int32)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def step(p):
        (loss, (ce, aux)), g = jax.value_and_grad(lambda q: lm_loss(nnx.merge(graphdef, q), tokens), has_aux=True)(p)
        return loss, aux["aux_loss"], jax.tree.map(lambda a, b: a - 0.05 * b, p, g)

    first, aux, params = step(params)
    assert float(aux) > 0  # the balance loss is part of the objective
    for _ in range(30):
        loss, _, params = step(params)
    assert float(loss) < float(first) - 0.5
    with pytest.raises(ValueError, match="moe.top_k"):
        ModelConfig(moe=MoEConfig(num_experts=2, top_k=3))


def test_blocked_and_ragged_experts_agree_in_value_and_gradient(rng):
    """Uneven groups (one expert takes most tokens, some none) across several row blocks."""
    ffn_args = dict(D=16, F=24, seed=int(rng.integers(1 << 30)))
    ragged = _moe(MoEConfig(num_experts=7, top_k=2, grouped_matmul="ragged"), **ffn_args)
    blocked = _moe(MoEConfig(num_experts=7, top_k=2, grouped_matmul="blocked"), **ffn_args)
    bias = np.zeros(7, np.float32)
    bias[0], bias[6] = 100.0, -100.0  # every token picks expert 0, none picks expert 6 (empty group)
    x = jnp.asarray(rng.standard_normal((4, 50, 16)), jnp.float32)
    x = x.at[..., 0].set(1.0)  # a constant input lane carries the router bias
    for m in (ragged, blocked):
        m.router[...] = m.router[...].at[0].set(jnp.asarray(bias))
    def loss(m):
        y, info = m(x)
        return jnp.sum(y * jnp.cos(x)), (y, info)
    run = nnx.jit(nnx.grad(loss, has_aux=True))  # jitted: eager compiles op by op; one program per module kind
    (g_r, (y_r, info_r)), (g_b, (y_b, _)) = run(ragged), run(blocked)
    np.testing.assert_allclose(y_b, y_r, rtol=1e-5, atol=1e-5)
    counts = np.bincount(np.asarray(info_r["experts"]).ravel(), minlength=7)
    assert counts[0] == 200 and counts[6] == 0, counts
    for name in ("router", "w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(g_b[name][...], g_r[name][...], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="moe.grouped_matmul"):
        MoEConfig(grouped_matmul="dense").validate()
