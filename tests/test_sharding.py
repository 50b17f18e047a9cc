"""Value-table layouts on 8 fake CPU devices: equal to one device, minimal collectives, trainable, reshardable."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ultramem_jax import MemoryConfig, ModelConfig, lookup, training
from ultramem_jax.checkpointing import abstract_like
from ultramem_jax.errors import UsageError
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout
from ultramem_jax.optim import OptimConfig
from ultramem_jax.train_config import TrainConfig

LAYOUTS = {  # on a (data, fsdp, tensor) mesh; tokens are split over data and fsdp
    "replicated": {},
    "number_wise": {"rows": ["tensor"]},
    "dimension_wise": {"cols": ["tensor"]},
    "hybrid": {"rows": ["fsdp"], "cols": ["tensor"]},
    "rows_over_token_axes": {"rows": ["data", "fsdp"]},
}
MESHES = [{"data": 2, "fsdp": 1, "tensor": 4}, {"data": 1, "fsdp": 2, "tensor": 4}, {"data": 1, "fsdp": 1, "tensor": 8}]
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
TOL = dict(rtol=2e-5, atol=2e-5)  # f32; only the order of the partial sums differs from one device


def _inputs(rng, T=32, K=12, N=64, D=16, E=4, C=2, O=24):
    return dict(values=jnp.asarray(rng.standard_normal((N, D)), jnp.float32),
                out_proj=jnp.asarray(rng.standard_normal((E, D, O)), jnp.float32),
                ids=jnp.asarray(rng.integers(0, E * N, (T, K)), jnp.int32),
                scores=jnp.asarray(rng.standard_normal((T, K, C)), jnp.float32), N=N, E=E)


def _sharded(mesh_cfg, layout_cfg, x, batch=None):
    mesh = make_mesh(mesh_cfg)
    rules = logical_rules([], mesh)
    model_cfg = ModelConfig(vocab_size=16, d_model=x["out_proj"].shape[-1], num_layers=2, num_heads=2,
                            memory=MemoryConfig(num_keys=8, value_dim=x["values"].shape[1], topk=2),
                            memory_placement="0:1")
    layout, rules = memory_layout(layout_cfg, mesh, rules, model_cfg, batch or x["ids"].shape[0])
    r = dict(rules)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    tok = batch_sharding(mesh, rules).spec[0]
    args = (put(x["values"], P(r["value_rows"], r["value_dim"])), put(x["out_proj"], P(None, r["value_dim"], None)),
            put(x["ids"], P(tok, None)), put(x["scores"], P(tok, None, None)))

    def loss(values, out_proj, ids, scores):
        out = lookup.memory_lookup(layout, values, out_proj, ids, scores, x["N"], x["E"])
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3), has_aux=True))
    with jax.set_mesh(mesh):
        return fn(*args), fn, args, mesh, layout


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["2x4", "fsdp2x4", "1x8"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(rng, mesh_cfg, name):
    x = _inputs(rng)
    (_, out), grads = _sharded(mesh_cfg, LAYOUTS[name], x)[0]

    def loss(values, out_proj, scores):
        o = lookup.local_lookup(values, out_proj, x["ids"], scores, x["N"], x["E"])
        return jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))), o

    (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jax.device_put(x["values"], jax.devices()[0]), x["out_proj"], x["scores"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOL)
    for g, w, what in zip(grads, want_grads, ["values", "out_proj", "scores"]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=what, **TOL)


def _collectives(hlo: str):
    """(op, result shape) of every collective in compiled HLO text."""
    ops = re.findall(r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                     r"(?:-start)?\(", hlo)
    return sorted((op, re.sub(r"\{[^}]*\}", "", shape)) for shape, op in ops)


@pytest.mark.parametrize("name,mesh_cfg,expected", [
    # tokens over data (2): each device serves 16 of the 32 tokens; output D = 24
    ("number_wise", MESHES[0], [("all-reduce", "f32[16,24]")]),
    ("dimension_wise", MESHES[0], [("all-reduce", "f32[16,24]")]),
    ("replicated", MESHES[0], []),
    # rows over fsdp, which also splits the tokens: gather ids/scores, reduce-scatter D-wide outputs
    ("hybrid", MESHES[1], [("all-gather", "f32[32,12,1]"), ("all-gather", "s32[32,12]"),
                           ("all-reduce", "f32[16,24]"), ("reduce-scatter", "f32[16,24]")]),
])
def test_forward_hlo_has_only_the_minimal_collectives(rng, name, mesh_cfg, expected):
    x = _inputs(rng)
    _, fn, args, mesh, layout = _sharded(mesh_cfg, LAYOUTS[name], x)

    def fwd(values, out_proj, ids, scores):
        return lookup.memory_lookup(layout, values, out_proj, ids, scores, x["N"], x["E"])

    with jax.set_mesh(mesh):
        hlo = jax.jit(fwd).lower(*args).compile().as_text()
    found = _collectives(hlo)
    # XLA may fuse reduce-scatter as all-reduce + slice; the bytes on the wire must still be D per token
    assert found == sorted(expected), found
    assert "f32[64,16]" not in " ".join(s for _, s in found)  # the table never moves
    assert not any(s.startswith("f32[32,12,16]") or s.startswith("f32[16,12,16]") for _, s in found)


def test_backward_hlo_keeps_value_gradients_local(rng):
    """Number-wise: dValues is a local scatter-add. The whole table and the gathered rows never move; a row
    shard's gradient is only all-reduced over the token axis (the data-parallel sum every parameter gets)."""
    x = _inputs(rng, N=96)
    _, fn, args, mesh, _ = _sharded(MESHES[0], LAYOUTS["number_wise"], x)
    with jax.set_mesh(mesh):
        hlo = fn.lower(*args).compile().as_text()
    found = _collectives(hlo)
    # XLA combines collectives: a tuple result "(f32[], f32[24,16], ...)" is checked part by part
    parts = [(op, part) for op, shape in found for part in shape.strip("()").split(", ")]
    table, shard = "f32[96,16]", "f32[24,16]"  # 96 rows over tensor (4): 24 per shard; D = 16
    for op, shape in parts:
        assert shape != table, (op, shape)
        assert not shape.startswith("f32[16,12,16]"), (op, shape)  # T/2 x K x D gathered rows
        assert shape != shard or op == "all-reduce", (op, shape)
    assert ("all-reduce", shard) in parts  # the shard gradient's data-parallel sum (else the parsing broke)
    for line in hlo.splitlines():  # ... over the token axis only, never across row shards
        result = re.match(r"\s*%?\S+\s*=\s*(.*?)\s+all-reduce(-start)?\(", line)  # "%name = SHAPE all-reduce("
        if result and shard in re.sub(r"\{[^}]*\}", "", result.group(1)):
            assert "{'data'}" in line, line[:300]


def _train_cfg(layout_cfg, mesh_cfg):
    return TrainConfig(steps=4, batch_size=8, seq_len=16, mesh=mesh_cfg, memory_layout=layout_cfg,
                       # Adam's first step is g/(|g| + eps): with the default eps 1e-8, f32 summation-order noise in a
                       # near-zero gradient becomes a full-size update of either sign, so layouts diverge by chance
                       optim=OptimConfig(warmup_frac=0.0, learning_rate=1e-2, eps=1e-5),
                       model=ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                                         memory=MemoryConfig(num_keys=8, key_dim=8, value_dim=16, topk=4,
                                                             out_proj_std=None),  # a memory loud from step 1
                                         memory_placement="0:1"))


def _run_steps(cfg, steps, tokens, restore=None, after_step=None):
    n = int(np.prod(list(cfg.mesh.values())))
    mesh = make_mesh(cfg.mesh, jax.devices()[:n])
    rules = logical_rules(cfg.logical_axis_rules, mesh)
    layout, rules = memory_layout(cfg.memory_layout, mesh, rules, cfg.model, cfg.batch_size)
    md, ms, od, os_ = training.build(cfg, mesh, rules, layout)
    if restore is not None:
        ms, os_ = restore(ms, os_)
    usage = training.new_usage(cfg, mesh)
    bs = batch_sharding(mesh, rules)
    step = training.make_train_step(md, od, ms, os_, usage, bs)
    losses = []
    for t in tokens[:steps]:
        ms, os_, usage, m = step(ms, os_, usage, jax.device_put(t, bs))
        losses.append(float(m["loss"]))
        if after_step is not None:
            after_step(len(losses), ms, os_)
    return losses, ms, os_


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_steps_under_each_layout_match_one_device(rng, name):
    tokens = rng.integers(0, 64, (3, 8, 17)).astype(np.int32)
    want, _, _ = _run_steps(_train_cfg({}, ONE_DEVICE), 3, tokens)
    got, ms, _ = _run_steps(_train_cfg(LAYOUTS[name], MESHES[1]), 3, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    values = ms["memories"][0]["values"][...]
    want_spec = {"number_wise": P("tensor", None), "dimension_wise": P(None, "tensor"),
                 "hybrid": P("fsdp", "tensor"), "rows_over_token_axes": P(("data", "fsdp"), None),
                 "replicated": P(None, None)}[name]
    assert values.sharding.spec == want_spec or values.sharding.is_equivalent_to(
        NamedSharding(values.sharding.mesh, want_spec), values.ndim)


def save_at(mngr, at_step: int, record):
    """A ``_run_steps`` hook: checkpoints (params, opt_state) after step ``at_step`` and hands the saved model
    state to ``record``, so one run is both the saved run and the reference that the restored runs continue."""
    def hook(step, ms, os_):
        if step == at_step:
            mngr.save(at_step, args=ocp.args.Composite(params=ocp.args.StandardSave(ms),
                                                       opt_state=ocp.args.StandardSave(os_)))
            mngr.wait_until_finished()
            record(ms)
    return hook


def test_checkpoint_saved_under_one_layout_restores_under_another_and_on_one_device(tmp_path, rng):
    """Saved number-wise on 2×4, restored column-split on fsdp 2×4 and on one device. The two targets are
    test_train_steps_under_each_layout_match_one_device's programs (dimension_wise, one device), so they compile
    once per session."""
    tokens = rng.integers(0, 64, (4, 8, 17)).astype(np.int32)
    cfg_a = _train_cfg(LAYOUTS["number_wise"], MESHES[0])
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    saved = {}
    record = lambda ms: saved.update(values=np.asarray(ms["memories"][0]["values"][...]))  # noqa: E731

    # layout A saves after batches 0-1 and continues over batches 0-3: the reference of the restored runs
    losses_a, _, _ = _run_steps(cfg_a, 6, np.concatenate([tokens[:2], tokens]), after_step=save_at(mngr, 2, record))
    reference = losses_a[2:]

    for cfg_b in (_train_cfg(LAYOUTS["dimension_wise"], MESHES[1]), _train_cfg({}, ONE_DEVICE)):
        def restore(ms_b, os_b):
            out = mngr.restore(2, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(ms_b)),
                                                          opt_state=ocp.args.StandardRestore(abstract_like(os_b))))
            values = out["params"]["memories"][0]["values"][...]
            np.testing.assert_array_equal(np.asarray(values), saved["values"])
            assert values.sharding.spec == ms_b["memories"][0]["values"][...].sharding.spec
            return out["params"], out["opt_state"]

        got, _, _ = _run_steps(cfg_b, 4, tokens, restore=restore)
        np.testing.assert_allclose(got, reference, rtol=1e-4)  # training goes on as it would have


@pytest.mark.parametrize("layout_cfg,mesh_cfg,model_kw,message", [
    ({"rows": ["tensor"]}, {"data": 1, "fsdp": 1, "tensor": 8}, dict(num_keys=6), "do not split evenly"),
    ({"cols": ["tensor"]}, {"data": 2, "fsdp": 1, "tensor": 4}, dict(num_keys=8, value_dim=24, cores=3),
     "straddles"),
    ({"cols": ["tensor"]}, {"data": 1, "fsdp": 1, "tensor": 8}, dict(num_keys=8, value_dim=12, cores=1),
     "does not split evenly"),
    ({"rows": ["model"]}, {"data": 8}, dict(num_keys=8), "not a mesh axis"),
    ({"rows": ["data"], "cols": ["data"]}, {"data": 8}, dict(num_keys=8), "both rows and cols"),
])
def test_layouts_that_do_not_fit_fail_at_start(layout_cfg, mesh_cfg, model_kw, message):
    mesh = make_mesh(mesh_cfg)
    model_cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2,
                            memory=MemoryConfig(topk=2, **model_kw), memory_placement="0:1")
    with pytest.raises(UsageError, match=message):
        memory_layout(layout_cfg, mesh, logical_rules([], mesh), model_cfg, batch_size=8)


def test_column_slice_narrower_than_the_kernel_needs_fails():
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    model_cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2,
                            memory=MemoryConfig(num_keys=8, value_dim=64, topk=2), memory_placement="0:1")
    with pytest.raises(UsageError, match="narrower than the 128"):
        memory_layout({"cols": ["tensor"]}, mesh, logical_rules([], mesh), model_cfg, 8, min_col_width=128)


@pytest.mark.parametrize("name", ["number_wise", "dimension_wise", "hybrid"])
def test_layout_without_output_projection_matches_single_device(rng, name):
    """PKM reads values of width d_model with no projection: column shards fill their slice of D."""
    mesh = make_mesh(MESHES[1])
    N, D, T, K = 64, 16, 32, 12
    values = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
    scores = jnp.asarray(rng.standard_normal((T, K, 1)), jnp.float32)
    model_cfg = ModelConfig(vocab_size=16, d_model=D, num_layers=2, num_heads=2,
                            memory=MemoryConfig.pkm(num_keys=8, topk=2), memory_placement="0:1")
    layout, rules = memory_layout(LAYOUTS[name], mesh, logical_rules([], mesh), model_cfg, T)
    r = dict(rules)
    tok = batch_sharding(mesh, rules).spec[0]
    args = (jax.device_put(values, NamedSharding(mesh, P(r["value_rows"], r["value_dim"]))),
            jax.device_put(ids, NamedSharding(mesh, P(tok, None))),
            jax.device_put(scores, NamedSharding(mesh, P(tok, None, None))))

    def loss(lookup_fn, v, i, s):
        out = lookup_fn(v, None, i, s, N, 1)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(
            lambda v, i, s: loss(lambda *a: lookup.memory_lookup(layout, *a), v, i, s),
            argnums=(0, 2), has_aux=True))(*args)
    (_, want), want_grads = jax.value_and_grad(lambda v, s: loss(lookup.local_lookup, v, ids, s),
                                               argnums=(0, 1), has_aux=True)(values, scores)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOL)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
