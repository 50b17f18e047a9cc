import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.optim import OptimConfig, lr_schedule, make_optimizer, param_labels, value_lr_schedule


def test_value_lr_multiplier_decays_linearly_to_one():
    cfg = OptimConfig(learning_rate=1e-3, value_lr_multiplier=4.0, value_lr_decay_frac=0.5)
    T = 1000
    base, value = lr_schedule(cfg, T), value_lr_schedule(cfg, T)
    for step in [10, 100, 250, 499, 500, 800, 999]:
        want = 1 + 3 * max(0.0, 1 - step / 500)
        assert float(value(step)) / float(base(step)) == pytest.approx(want, rel=1e-5)


def test_values_get_their_own_learning_rate(rng):
    """One Adam step moves every parameter by ≈ lr·sign(g); value tables must move M× as far."""
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                      memory=MemoryConfig(num_keys=4, topk=2), memory_placement="0:1")
    model = create_model(cfg)
    labels = param_labels(nnx.state(model, nnx.Param))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(labels)}
    assert {k for k, v in flat.items() if v == "values"} == {"memories/0/values"}
    ocfg = OptimConfig(learning_rate=1e-2, warmup_frac=0.0, weight_decay=0.0, grad_clip=0.0,
                       value_lr_multiplier=5.0)
    opt = nnx.Optimizer(model, make_optimizer(ocfg, 10_000), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) + 0.5, params)
    opt.update(model, grads)  # step 0: the warm-up schedule starts at lr 0
    before = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    after = nnx.state(model, nnx.Param)
    delta_values = float(jnp.abs(after["memories"][0]["values"][...] - before["memories"][0]["values"][...]).mean())
    delta_embed = float(jnp.abs(after["embed"][...] - before["embed"][...]).mean())
    assert delta_values / delta_embed == pytest.approx(5.0, rel=0.05)


def test_optim_config_validation():
    with pytest.raises(ValueError, match="optim.value_lr_multiplier"):
        OptimConfig(value_lr_multiplier=0.5)
