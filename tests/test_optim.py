import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.optim import OptimConfig, lr_schedule, make_optimizer, param_labels, value_lr_schedule


def test_value_lr_multiplier_decays_linearly_to_one():
    cfg = OptimConfig(learning_rate=1e-3, value_lr_multiplier=4.0, value_lr_decay_frac=0.5, value_learning_rate=0.0)
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
                       value_lr_multiplier=5.0, value_learning_rate=0.0)  # the paper's multiplier
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


def _one_memory_model():
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                      memory=MemoryConfig(num_keys=4, topk=2), memory_placement="0:1")
    return create_model(cfg)


def _update(ocfg, grads_fn, steps=1, total=1000):
    model = _one_memory_model()
    opt = nnx.Optimizer(model, make_optimizer(ocfg, total), wrt=nnx.Param)
    before = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))
    for _ in range(steps):
        opt.update(model, grads_fn(nnx.state(model, nnx.Param)))
    after = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda a, b: a - b, after, before)


def test_separate_value_clipping_keeps_the_backbone_update(rng):
    """With value_grad_clip, how loud the value gradient is must not change the other parameters' update; with
    one global clip it does (a loud table shrinks the backbone's step).  eps is large so that Adam's first step
    is not sign(g) and the gradient's scale shows in the update."""
    loud, quiet = float(rng.uniform(50, 100)), float(rng.uniform(1e-4, 1e-3))

    def grads(value_scale):
        return lambda params: jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.full(p.shape, value_scale if "values" in str(path) else 1e-3, jnp.float32), params)

    def other_update(cfg, value_scale):
        d = _update(cfg, grads(value_scale), steps=2)  # step 0 runs at the warm-up's lr 0
        return np.asarray(d["embed"][...])

    common = dict(learning_rate=1e-2, warmup_frac=0.0, weight_decay=0.0, eps=1e-3, grad_clip=1.0)
    separate = OptimConfig(**common, value_grad_clip=1.0)
    np.testing.assert_array_equal(other_update(separate, loud), other_update(separate, quiet))
    joint = OptimConfig(**common)
    assert np.abs(other_update(joint, loud)).max() < 0.1 * np.abs(other_update(joint, quiet)).max()


def test_constant_value_learning_rate_and_value_adam_settings(rng):
    lr = float(rng.uniform(1e-4, 1e-2))
    cfg = OptimConfig(learning_rate=3e-3, warmup_frac=0.1, value_learning_rate=lr, value_lr_multiplier=4.0)
    sched = value_lr_schedule(cfg, 100)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(lr / 2, rel=1e-5)
    for step in (10, 50, 99):  # constant after the warm-up, outside the cosine and the multiplier
        assert float(sched(step)) == pytest.approx(lr, rel=1e-6)
    # value weight decay alone: zero gradients, so only decay moves parameters
    wd = float(rng.uniform(0.05, 0.5))
    zero = lambda params: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    delta = _update(OptimConfig(learning_rate=1e-2, warmup_frac=0.0, weight_decay=0.0, value_weight_decay=wd),
                    zero, steps=2)
    assert float(jnp.abs(delta["embed"][...]).max()) == 0.0
    assert float(jnp.abs(delta["memories"][0]["values"][...]).max()) > 0.0
    with pytest.raises(ValueError, match="optim.value_b2"):
        OptimConfig(value_b2=1.0)
