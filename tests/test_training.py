import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultramem_jax import MemoryConfig, ModelConfig, training
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout
from ultramem_jax.optim import OptimConfig
from ultramem_jax.train_config import TrainConfig


def _cfg(memory, **optim):
    return TrainConfig(steps=5, batch_size=4, seq_len=16, mesh={"data": 1, "fsdp": 1, "tensor": 1},
                       optim=OptimConfig(warmup_frac=0.0, learning_rate=3e-3, **optim),
                       model=ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, memory=memory,
                                         memory_placement="0:1" if memory else ""))


def _train(cfg, tokens, seed):
    cfg = dataclasses.replace(cfg, seed=seed)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    rules = logical_rules(cfg.logical_axis_rules, mesh)
    layout, rules = memory_layout(cfg.memory_layout, mesh, rules, cfg.model, cfg.batch_size)
    md, ms, od, os_ = training.build(cfg, mesh, rules, layout)
    usage, bs = training.new_usage(cfg, mesh), batch_sharding(mesh, rules)
    step = training.make_train_step(md, od, ms, os_, usage, bs)
    out = []
    for t in tokens:
        ms, os_, usage, m = step(ms, os_, usage, jax.device_put(t, bs))
        out.append(jax.device_get(m))
    return out, usage


def test_silenced_memory_reproduces_the_backbone(rng):
    """Memory output x 0 must train exactly like the model without memory (wiring and optimizer coupling):
    the memory's parameters then get no gradient and must not change the backbone's clipping or updates."""
    tokens = rng.integers(0, 64, (4, 4, 17)).astype(np.int32)
    seed = int(rng.integers(1 << 20))
    # Tucker penalty off: its core gradients would enter the global clip norm (the coupling this test guards)
    silent = MemoryConfig(num_keys=8, key_dim=8, value_dim=16, topk=4, output_scale=0.0, aux_loss=False)
    with_memory, _ = _train(_cfg(silent, grad_clip=0.5), tokens, seed)
    dense, _ = _train(_cfg(None, grad_clip=0.5), tokens, seed)
    np.testing.assert_allclose([m["ce"] for m in with_memory], [m["ce"] for m in dense], rtol=1e-6)
    assert all(float(m["grad_norm_values"]) == 0.0 for m in with_memory)
    np.testing.assert_allclose([m["grad_norm_other"] for m in with_memory], [m["grad_norm"] for m in dense],
                               rtol=1e-5)


def test_step_reports_value_and_other_gradient_norms_and_row_reads(rng):
    tokens = rng.integers(0, 64, (2, 4, 17)).astype(np.int32)
    cfg = _cfg(MemoryConfig(num_keys=8, key_dim=8, value_dim=16, topk=4, out_proj_std=None))
    metrics, usage = _train(cfg, tokens, int(rng.integers(1 << 20)))
    m = metrics[-1]
    np.testing.assert_allclose(m["grad_norm"] ** 2, m["grad_norm_values"] ** 2 + m["grad_norm_other"] ** 2,
                               rtol=1e-5)
    assert m["grad_norm_values"] > 0 and m["grad_norm_other"] > 0
    # every token reads heads·topk rows: the counts add up to exactly that over both steps
    counts = np.asarray(usage[0])
    assert counts.sum() == 2 * 4 * 16 * 2 * 4
    assert m["out_rms"].shape == (1,) and m["resid_rms"].shape == (1,)


def test_health_report_of_a_model_matches_a_direct_forward(rng):
    """eval's report: out/stream RMS and row usage over validation batches, checked against one forward."""
    from ultramem_jax import data
    cfg = _cfg(MemoryConfig(num_keys=8, key_dim=8, value_dim=16, topk=4))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    rules = logical_rules(cfg.logical_axis_rules, mesh)
    md, ms, _, _ = training.build(cfg, mesh, rules)
    stream = data.ArrayStream(rng.integers(0, 64, 4 * 17).astype(np.int32))
    report = training.memory_health_report(md, ms, stream, cfg, batch_sharding(mesh, rules), batches=1)
    tokens = next(data.val_batches(stream, cfg.seq_len, cfg.batch_size, 1))[0]
    _, aux = nnx.merge(md, ms)(jnp.asarray(tokens[:, :-1]))
    np.testing.assert_allclose(report["mem0/out_rms"], float(aux["memory"][0]["out_rms"]), rtol=1e-5)
    rows = np.asarray(aux["memory"][0]["rows"]).ravel()
    assert report["mem0/usage"] == np.unique(rows).size / cfg.model.resolved_memory.num_values
