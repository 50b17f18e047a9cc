import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax import MemoryConfig, PKMLayer, UltraMemLayer, tdqkr
from ultramem_jax.sharding import build_context


def _layer(cls, cfg, d_model=32, seed=0):
    with build_context():
        return cls(cfg, d_model, num_layers=2, rngs=nnx.Rngs(seed))


def _grads(layer, x, cotangent):
    """(gradients, info) of one call; jitted, since eager mode compiles each op on its own."""
    def f(layer):
        out, info = layer(x)
        return jnp.sum(out * cotangent), info
    return nnx.jit(nnx.grad(f, has_aux=True))(layer)


@pytest.mark.parametrize("kind", ["ultramem", "pkm"])
def test_gradients_reach_selected_parameters_only(rng, kind):
    if kind == "ultramem":
        cfg, cls = MemoryConfig(num_keys=16, topk=6, heads=2, expansion=4, out_proj_std=None), UltraMemLayer
    else:
        cfg, cls = MemoryConfig.pkm(num_keys=16, topk=6, heads=2), PKMLayer
    layer = _layer(cls, cfg, seed=int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    g, info = _grads(layer, x, cot)
    selected = np.zeros(cfg.num_values, bool)
    selected[np.asarray(info["rows"]).ravel()] = True
    assert 0 < selected.sum() < cfg.num_values  # the test needs both kinds of rows
    gv = np.asarray(g["values"][...])
    assert np.all(gv[~selected] == 0.0), "value rows nobody selected must get exactly zero gradient"
    assert np.all(np.abs(gv[selected]).sum(-1) > 0)
    names = ["keys", "query"] + (["cores", "out_proj", "query_norm", "key_norm"] if kind == "ultramem" else [])
    for name in names:
        arr = np.asarray(g[name][...])
        assert np.all(np.isfinite(arr)) and np.abs(arr).sum() > 0, name
    if kind == "ultramem":  # keys never pre-selected get no gradient either
        gk = np.abs(np.asarray(g["keys"][...])).sum(axis=(3, 4))  # H × 2 × n'
        assert (gk == 0).any() and (gk > 0).any()


def test_layer_selection_matches_brute_force_with_rank1_cores(rng):
    """End to end through the layer (norms, shared query, IVE grid): rank-1 cores lose nothing."""
    eps = float(rng.uniform(0.05, 2.0))  # large enough to change the scores: the layer must use the configured eps
    cfg = MemoryConfig(num_keys=8, key_dim=8, value_dim=16, topk=6, heads=2, expansion=4, norm_eps=eps)
    layer = _layer(UltraMemLayer, cfg, seed=int(rng.integers(1 << 30)))
    H, r = cfg.heads, cfg.rank
    u, t = rng.uniform(0.2, 1, (H, r)), rng.uniform(0.2, 1, (H, r))
    layer.cores[...] = jnp.asarray(np.einsum("ch,ha,hb->chab", rng.uniform(0.5, 1, (2, H)), u, t), jnp.float32)
    layer.keys[...] = jnp.abs(layer.keys[...])  # non-negative keys, query and norms => non-negative scores
    layer.query[...] = jnp.abs(layer.query[...])
    layer.refresh_tucker()
    x = jnp.asarray(np.abs(rng.standard_normal((16, 32))), jnp.float32)
    scores, slots = layer.retrieve(x)
    q = np.asarray(x @ layer.query[...]).reshape(16, 1, 2, 8)
    q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + eps) * np.asarray(layer.query_norm[...])
    k = np.moveaxis(np.asarray(layer.keys[...]), 3, -1)
    k = np.moveaxis(k / np.sqrt((k ** 2).mean(-1, keepdims=True) + eps) * np.asarray(layer.key_norm[...]), -1, 3)
    s_row = np.einsum("td,hndr->thrn", q[:, 0, 0], k[:, 0])
    s_col = np.einsum("td,hndr->thrn", q[:, 0, 1], k[:, 1])
    best, best_slots = tdqkr.brute_force_grid_topk(jnp.asarray(s_row), jnp.asarray(s_col), layer.cores[...], 6)
    np.testing.assert_array_equal(np.sort(np.asarray(slots), -1), np.sort(np.asarray(best_slots), -1))
    np.testing.assert_allclose(np.asarray(scores.sum(-1)), np.asarray(best), rtol=1e-4, atol=1e-5)


def test_pkm_softmax_batchnorm_and_heads(rng):
    cfg = MemoryConfig.pkm(num_keys=12, topk=5, heads=3, query_batchnorm="batch")
    layer = _layer(PKMLayer, cfg)
    assert layer.query[...].shape == (32, 3 * 2 * cfg.resolved(32).key_dim)  # one query per head
    x = jnp.asarray(rng.standard_normal((2, 4, 32)), jnp.float32)
    raw, slots = layer.retrieve(x.reshape(8, 32))
    probs = layer._activate(raw)
    np.testing.assert_allclose(np.asarray(probs.sum(axis=2)), 1.0, rtol=1e-5)
    out, _ = layer(x)
    assert out.shape == x.shape and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="memory.kind"):
        _layer(PKMLayer, MemoryConfig())


def test_tucker_vectors_are_state_not_params():
    layer = _layer(UltraMemLayer, MemoryConfig(num_keys=8, topk=4))
    params = nnx.state(layer, nnx.Param)
    flat = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(params)}
    assert not any("tucker" in k or "permutation" in k for k in flat)
    assert "values" in flat and "cores" in flat


def test_norm_eps_defaults_to_the_released_code():
    """The released code's q/k RMSNorm uses eps 1e-5 (docs/ultramem-method.md); a bad eps is refused by name."""
    assert MemoryConfig().norm_eps == 1e-5
    with pytest.raises(ValueError, match="memory.norm_eps"):
        MemoryConfig(norm_eps=0.0).validate(32)


def test_output_scale_and_zero_output_projection(rng):
    """output_scale multiplies the output exactly; a zero-init projection gives a silent memory at init."""
    cfg = MemoryConfig(num_keys=8, topk=4, out_proj_std=None)  # the released code's fan-in init: a loud memory
    seed = int(rng.integers(1 << 30))
    x = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    out, _ = _layer(UltraMemLayer, cfg, seed=seed)(x)
    scale = float(rng.uniform(0.1, 3.0))
    scaled, _ = _layer(UltraMemLayer, dataclasses.replace(cfg, output_scale=scale), seed=seed)(x)
    np.testing.assert_allclose(np.asarray(scaled), scale * np.asarray(out), rtol=1e-5, atol=1e-7)
    silent, _ = _layer(UltraMemLayer, dataclasses.replace(cfg, out_proj_std=0.0), seed=seed)(x)
    assert np.abs(np.asarray(out)).max() > 0 and np.all(np.asarray(silent) == 0.0)


@pytest.mark.parametrize("retrieval", ["tdqkr", "product_key"])
def test_balance_loss_against_numpy(rng, retrieval):
    """β·N·Σ f_n p̄_n per side and head (UltraMemV2 Eq. 19), recomputed from the layer's parameters in NumPy."""
    beta = float(rng.uniform(1e-3, 1.0))
    extra = dict(rank=1, cores=1, aux_loss=False) if retrieval == "product_key" else {}
    cfg = MemoryConfig(num_keys=6, key_dim=8, value_dim=16, topk=5, heads=2, expansion=4, retrieval=retrieval,
                       balance_loss=beta, **extra)
    layer = _layer(UltraMemLayer, cfg, seed=int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((10, 32)), jnp.float32)
    _, slots, loss = layer.retrieve(x, with_balance=True)
    eps = cfg.norm_eps
    q = np.asarray(x @ layer.query[...]).reshape(10, 1, 2, 8)
    q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + eps) * np.asarray(layer.query_norm[...])
    k = np.moveaxis(np.asarray(layer.keys[...]), 3, -1)
    k = np.moveaxis(k / np.sqrt((k ** 2).mean(-1, keepdims=True) + eps) * np.asarray(layer.key_norm[...]), -1, 3)
    n = cfg.keys_per_side
    slots = np.asarray(slots)
    want = 0.0
    for side, ids in ((0, slots // n), (1, slots % n)):
        s = np.einsum("td,hndr->thrn", q[:, 0, side], k[:, side])
        if retrieval == "tdqkr":
            proj = np.asarray((layer.tucker_u if side == 0 else layer.tucker_t)[...])
            logits = np.einsum("thrn,hr->thn", s, proj)
        else:
            logits = s[:, :, 0]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        for h in range(cfg.heads):
            f = np.bincount(ids[:, h].ravel(), minlength=n) / ids[:, h].size
            want += n * (f * p[h]).sum() / cfg.heads
    np.testing.assert_allclose(float(loss), beta * want / 2, rtol=1e-4)
    # the layer reports it and the model adds it to the auxiliary loss
    _, info = layer(x.reshape(2, 5, 32))
    np.testing.assert_allclose(float(info["balance_loss"]), float(loss), rtol=1e-5)


@pytest.mark.parametrize("mode", ["past", "batch"])
def test_query_batchnorm_past_statistics_leak_nothing(rng, mode):
    """``past`` normalises each token's query with earlier steps' statistics only (a token's output ignores every
    other token, future ones included) and then folds this batch in; ``batch`` (PKM's) mixes the whole batch."""
    layer = _layer(UltraMemLayer, MemoryConfig(num_keys=8, topk=4, query_batchnorm=mode))
    bn = layer.query_bn
    F = bn.mean.shape[0]
    mean0, var0 = rng.standard_normal(F), rng.uniform(0.5, 2.0, F)
    scale, bias = rng.standard_normal(F), rng.standard_normal(F)
    bn.scale[...], bn.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    q = rng.standard_normal((12, F)).astype(np.float32)
    q_other = q.copy()
    q_other[6:] = 3.0 * rng.standard_normal((6, F))  # later tokens change

    def normalise(q):
        bn.mean[...], bn.var[...] = jnp.asarray(mean0, jnp.float32), jnp.asarray(var0, jnp.float32)
        return np.asarray(layer._query_batchnorm(jnp.asarray(q)))

    out_other = normalise(q_other)
    out = normalise(q)  # last: the statistics below fold in q
    if mode == "batch":
        assert not np.allclose(out[:6], out_other[:6], atol=1e-3)  # earlier tokens saw the later ones
        return
    np.testing.assert_allclose(out, (q - mean0) / np.sqrt(var0 + 1e-5) * scale + bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out[:6], out_other[:6])
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.9 * mean0 + 0.1 * q.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 * var0 + 0.1 * q.var(0), rtol=1e-5, atol=1e-6)


def test_query_batchnorm_past_statistics_update_in_a_jitted_train_step(rng):
    layer = _layer(UltraMemLayer, MemoryConfig(num_keys=8, topk=4, query_batchnorm="past", out_proj_std=None))
    x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    q = np.asarray(x.reshape(10, 32) @ layer.query[...])

    @nnx.jit
    def step(layer):
        return nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)

    grads = step(layer)
    np.testing.assert_allclose(np.asarray(layer.query_bn.mean[...]), 0.1 * q.mean(0), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grads.query[...]).max()) > 0
