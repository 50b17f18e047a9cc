"""Memory+ (memory_plus.py): the layer against a dense brute-force oracle, the FFN it replaces, the shared pool,
presets against the built model and Table 10."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.memory_plus import MemoryPlusLayer
from ultramem_jax.memory_v2 import SharedValueTable
from ultramem_jax.params import param_counts
from ultramem_jax.sharding import build_context
from ultramem_jax.train_config import load_config

NAMES = ("query", "keys", "swilu_proj", "out_proj")


def _rms(x, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _dense_oracle(params, x_TxD, cfg):
    """Memory+ with the whole n×n additive score grid per head, an exact top-m over it, and the bag as a dense
    (T × N) weight matrix times the whole pool."""
    T = x_TxD.shape[0]
    H, Dk, n, m = cfg.heads, cfg.key_dim, cfg.num_keys, cfg.topk
    q = (x_TxD @ params["query"]).reshape(T, H, 2, Dk)
    keys = params["keys"][..., 0]  # H × 2 × n × Dk (rank 1)
    if cfg.qk_norm:
        q, keys = _rms(q, cfg.norm_eps) * params["query_norm"], _rms(keys, cfg.norm_eps) * params["key_norm"]
    s_row = jnp.einsum("thd,hnd->thn", q[:, :, 0], keys[:, 0])
    s_col = jnp.einsum("thd,hnd->thn", q[:, :, 1], keys[:, 1])
    grid_TxHxNN = (s_row[:, :, :, None] + s_col[:, :, None, :]).reshape(T, H, n * n)
    top_TxHxM, slots_TxHxM = jax.lax.top_k(grid_TxHxNN, m)
    w_TxHxM = jax.nn.softmax(top_TxHxM, axis=-1)
    weights_TxN = jnp.einsum("thm,thmn->tn", w_TxHxM, jax.nn.one_hot(slots_TxHxM, n * n))
    bag = weights_TxN @ params["values"]
    return (bag * jax.nn.silu(x_TxD @ params["swilu_proj"])) @ params["out_proj"]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_layer_equals_dense_oracle_forward_and_backward(rng, qk_norm):
    d_model = 24
    cfg = MemoryConfig.memplus(num_keys=7, key_dim=6, value_dim=16, heads=3, topk=5, qk_norm=qk_norm,
                               preselect=7).resolved(d_model)  # exact: the pre-selection keeps every key
    with build_context():
        rngs = nnx.Rngs(int(rng.integers(1 << 30)))
        table = SharedValueTable(cfg, d_model, 64, 4, rngs=rngs)
        layer = MemoryPlusLayer(cfg, d_model, 4, rngs=rngs)
    x = jnp.asarray(rng.standard_normal((2, 4, d_model)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 4, d_model)), jnp.float32)

    def layer_loss(layer, table):
        out, _ = layer(x, table)
        return jnp.sum(out * cot), out

    names = NAMES + (("query_norm", "key_norm") if qk_norm else ())
    # jitted: eager mode compiles each op on its own, most of this test's time
    (_, out), (g_layer, g_table) = nnx.jit(nnx.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))(
        layer, table)
    params = {k: getattr(layer, k)[...] for k in names}
    params["values"] = table.values[...]
    (_, want), g_want = jax.jit(jax.value_and_grad(
        lambda p: (lambda o: (jnp.sum(o * cot.reshape(-1, d_model)), o))(_dense_oracle(p, x.reshape(-1, d_model),
                                                                                         cfg)),
        has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, d_model), np.asarray(want), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g_table["values"][...]), np.asarray(g_want["values"]), rtol=2e-4,
                               atol=2e-5)
    for k in names:
        np.testing.assert_allclose(np.asarray(g_layer[k][...]), np.asarray(g_want[k]), rtol=5e-4, atol=5e-5,
                                   err_msg=k)


def test_memplus_replaces_the_ffn_and_shares_one_pool(rng):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=2, memory_placement="1:1/3:3",
                      memory=MemoryConfig.memplus(num_keys=6, key_dim=8, heads=2, topk=4))
    model = create_model(cfg, seed=int(rng.integers(1 << 30)))
    assert [b.ffn is None for b in model.blocks] == [False, True, False, True]
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == param_counts(cfg)["total"]
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    def loss(model):
        logits, aux = model(tokens)
        return jnp.mean(logits ** 2), aux
    grads, aux = nnx.jit(nnx.grad(loss, has_aux=True))(model)  # jitted: eager compiles op by op
    touched = np.abs(np.asarray(grads["memory_table"]["values"][...])).sum(-1) > 0
    expected = np.zeros(36, bool)
    for info in aux["memory"]:  # both layers' reads land in the one pool
        expected[np.asarray(info["rows"]).ravel()] = True
    np.testing.assert_array_equal(touched, expected)
    with pytest.raises(ValueError, match="^memory_placement: memplus replaces the FFN"):
        ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=2, memory_placement="1:2",
                    memory=MemoryConfig.memplus(num_keys=6, key_dim=8, heads=2, topk=4))


@pytest.mark.parametrize("name", ["tiny-memplus", "memplus-227m"])
def test_preset_counts_equal_the_built_model(name):
    cfg = load_config([f"model_name={name}"]).model
    model = nnx.eval_shape(lambda: create_model(cfg))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == \
        param_counts(cfg)["total"]


def test_presets_match_table10_and_tiny_x12():
    """memplus-227m against Table 10 (total without the embedding, activated with the tied embedding, as for
    the other 227M rows, tests/test_v2.py), tiny-memplus against tiny-x12."""
    c = param_counts(load_config(["model_name=memplus-227m"]).model)
    assert abs(c["non_embedding"] / 1.19e9 - 1) < 0.02 and abs(c["activated_per_token"] / 228e6 - 1) < 0.02
    x12 = param_counts(load_config(["model_name=tiny-x12"]).model)
    tiny = param_counts(load_config(["model_name=tiny-memplus"]).model)
    for k in ("total", "activated_per_token"):
        assert abs(tiny[k] / x12[k] - 1) < 0.02, (k, tiny[k], x12[k])
