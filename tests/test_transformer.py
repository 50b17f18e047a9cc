import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax import MemoryConfig, ModelConfig, create_model, lm_loss
from ultramem_jax.optim import OptimConfig, make_optimizer
from ultramem_jax.params import param_counts

TINY = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=2)


def test_skip_layer_output_lands_after_block_j(rng):
    """Memory reads block 1's pre-FFN hidden and is added after block 2: blocks 0..1 are untouched, and the
    stream after block 2 moves by exactly the memory's output on block 1's input."""
    cfg = ModelConfig(**TINY, memory=MemoryConfig(num_keys=8, topk=4, out_proj_std=None), memory_placement="1:2")
    model = create_model(cfg, seed=int(rng.integers(1 << 30)))
    model.memories[0].values[...] = jnp.asarray(rng.standard_normal(model.memories[0].values[...].shape))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)))
    _, aux = model(tokens, return_hidden=True)
    # the same model with the memory silenced
    saved = model.memories[0].values[...]
    model.memories[0].values[...] = jnp.zeros_like(saved)
    _, aux0 = model(tokens, return_hidden=True)
    model.memories[0].values[...] = saved
    h, h0 = aux["hidden"], aux0["hidden"]
    np.testing.assert_array_equal(h[0], h0[0])
    np.testing.assert_array_equal(h[1], h0[1])
    # recompute the memory output from block 1's ffn input
    x = jnp.take(model.embed[...], tokens, axis=0)
    pos = jnp.arange(9)
    x, _, _ = model.blocks[0](x, pos)
    _, ffn_in, _ = model.blocks[1](x, pos)
    mem_out, _ = model.memories[0](ffn_in)
    assert float(jnp.abs(mem_out).max()) > 1e-3
    np.testing.assert_allclose(h[2] - h0[2], mem_out, rtol=1e-4, atol=1e-5)
    assert not np.allclose(h[3], h0[3])


@pytest.mark.parametrize("memory,placement", [
    (None, ""),
    (MemoryConfig(num_keys=8, topk=4), "0:1/2:3"),
    (MemoryConfig(num_keys=8, topk=4, heads=3, cores=2, expansion=9, rank=3), "all"),
    (MemoryConfig.pkm(num_keys=8, topk=4, query_batchnorm="batch"), "1:1"),
])
def test_tiny_lm_forward_backward_and_learns(rng, memory, placement):
    cfg = ModelConfig(**TINY, memory=memory, memory_placement=placement)
    model = create_model(cfg, seed=int(rng.integers(1 << 30)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == param_counts(cfg)["total"]
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(learning_rate=3e-3, warmup_frac=0.0), 50), wrt=nnx.Param)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 16)))

    @nnx.jit
    def step(model, opt, tokens):
        model.refresh_tucker()
        (loss, _), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, tokens)
        opt.update(model, grads)
        return loss, grads

    losses = []
    for i in range(8):
        loss, grads = step(model, opt, tokens)
        losses.append(float(loss))
        if i == 0:
            leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
            assert all(np.all(np.isfinite(g)) for g in leaves)
    assert losses[-1] < losses[0] - 0.05, losses


def test_memory_stats_info_shapes():
    cfg = ModelConfig(**TINY, memory=MemoryConfig(num_keys=8, topk=4, heads=2), memory_placement="0:1/2:3")
    model = create_model(cfg)
    _, aux = model(jnp.zeros((2, 5), jnp.int32))
    assert len(aux["memory"]) == 2
    assert aux["memory"][0]["rows"].shape == (10, 8)
    assert np.isfinite(float(aux["memory"][0]["top1"]))
