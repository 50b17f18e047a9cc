"""UltraMemV2's pre-value and value tables and Memory+'s pool under the table layouts (lookup.py, mesh.py) on 8
fake CPU devices: forward and gradients equal to one device, minimal collectives in the HLO, training and a
checkpoint restore across layouts."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from test_sharding import MESHES, ONE_DEVICE, TOL, _collectives, _run_steps, save_at

from ultramem_jax import MemoryConfig, ModelConfig, lookup
from ultramem_jax.checkpointing import abstract_like
from ultramem_jax.errors import UsageError
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout
from ultramem_jax.optim import OptimConfig
from ultramem_jax.train_config import TrainConfig

LAYOUTS = {  # test_sharding's, and columns over an axis that also splits the tokens
    "replicated": {},
    "number_wise": {"rows": ["tensor"]},
    "dimension_wise": {"cols": ["tensor"]},
    "hybrid": {"rows": ["fsdp"], "cols": ["tensor"]},
    "rows_over_token_axes": {"rows": ["data", "fsdp"]},
    "cols_over_token_axes": {"cols": ["fsdp", "tensor"]},  # the released code's: pre_x slices go all-to-all
    "rows_and_cols_over_token_axes": {"rows": ["data"], "cols": ["fsdp", "tensor"]},
}
FSDP, DATA, CUBE = MESHES[1], MESHES[0], {"data": 2, "fsdp": 2, "tensor": 2}
T, K, N, D_V, D_P, O = 32, 12, 64, 32, 24, 20  # distinct sizes, so every collective's shape says what it carries


def _inputs(rng, kind):
    cores = 2 if kind == "v2" else 1
    f = lambda std, *s: jnp.asarray(std * rng.standard_normal(s), jnp.float32)  # noqa: E731
    x = dict(values=f(1, N, D_V), out_proj=f(D_V ** -0.5, 1, D_V, O), scores=f(1, T, K, cores),
             ids=jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32))
    if kind == "v2":  # pre-value dots of unit variance
        x.update(pre_values=f(D_P ** -0.25, N, D_P), pre_x=f(D_P ** -0.25, T, D_P))
    else:
        x.update(gate=f(1, T, D_V))
    return x


def _oracle(x):
    """The lookup written out on one device: every selected row gathered whole, per-core slices pooled."""
    rows_TxKxD = x["values"][x["ids"]]
    scores = x["scores"]
    if "pre_values" in x:  # V2: every score times its pre-value dot
        scores = scores * jnp.einsum("tkp,tp->tk", x["pre_values"][x["ids"]], x["pre_x"])[..., None]
    C = scores.shape[-1]
    w = D_V // C
    pooled = jnp.concatenate([jnp.einsum("tk,tkd->td", scores[..., c], rows_TxKxD[..., c * w:(c + 1) * w])
                              for c in range(C)], axis=-1)
    if "gate" in x:  # Memory+: the gated bag
        pooled = pooled * x["gate"]
    return pooled @ x["out_proj"][0]


def _model_cfg(kind):
    mem = (MemoryConfig.ultramemv2(num_keys=8, value_dim=D_V, pre_value_dim=D_P, topk=2) if kind == "v2" else
           MemoryConfig.memplus(num_keys=8, value_dim=D_V, topk=2))
    return ModelConfig(vocab_size=16, d_model=O, num_layers=2, num_heads=2, memory=mem, memory_placement="0:0")


GRAD_ARGS = {"v2": ("values", "out_proj", "scores", "pre_values", "pre_x"),
             "memplus": ("values", "out_proj", "scores", "gate")}


def _sharded(kind, mesh_cfg, layout_cfg, x):
    """(jitted loss-and-gradients, its sharded arguments, mesh, layout) of the lookup under the layout."""
    mesh = make_mesh(mesh_cfg)
    layout, rules = memory_layout(layout_cfg, mesh, logical_rules([], mesh), _model_cfg(kind), T)
    r = dict(rules)
    tok = batch_sharding(mesh, rules).spec[0]
    specs = dict(values=P(r["value_rows"], r["value_dim"]), pre_values=P(r["value_rows"], r["value_dim"]),
                 out_proj=P(None, r["value_dim"], None), ids=P(tok, None), scores=P(tok, None, None),
                 pre_x=P(tok, None), gate=P(tok, None))
    names = GRAD_ARGS[kind]
    args = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in x.items()}

    def fwd(a):
        extra = (dict(pre_values_NxP=a["pre_values"], pre_x_TxP=a["pre_x"]) if kind == "v2" else
                 dict(gate_TxD=a["gate"]))
        return lookup.memory_lookup(layout, a["values"], a["out_proj"], a["ids"], a["scores"], N, 1, **extra)

    def loss(diff, rest):
        out = fwd({**diff, **rest})
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    split = ({k: args[k] for k in names}, {k: v for k, v in args.items() if k not in names})
    return grad_fn, jax.jit(fwd), split, mesh


def _reference(x, kind):
    names = GRAD_ARGS[kind]

    def loss(diff):
        out = _oracle({**x, **diff})
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

    return jax.value_and_grad(loss, has_aux=True)({k: x[k] for k in names})


CASES = [("v2", n, FSDP) for n in LAYOUTS] + [
    ("v2", "number_wise", DATA), ("v2", "dimension_wise", DATA), ("v2", "dimension_wise", MESHES[2]),
    ("v2", "rows_and_cols_over_token_axes", CUBE),
    ("memplus", "number_wise", FSDP), ("memplus", "dimension_wise", FSDP), ("memplus", "hybrid", FSDP),
    ("memplus", "cols_over_token_axes", FSDP), ("memplus", "rows_and_cols_over_token_axes", CUBE)]


@pytest.mark.parametrize("kind,name,mesh_cfg", CASES,
                         ids=[f"{k}-{n}-{'x'.join(map(str, m.values()))}" for k, n, m in CASES])
def test_lookup_under_layout_matches_one_device_forward_and_gradients(rng, kind, name, mesh_cfg):
    x = _inputs(rng, kind)
    grad_fn, _, (diff, rest), mesh = _sharded(kind, mesh_cfg, LAYOUTS[name], x)
    with jax.set_mesh(mesh):
        (_, out), grads = grad_fn(diff, rest)
    (_, want), want_grads = _reference(x, kind)
    _assert_close(out, want)
    for k in GRAD_ARGS[kind]:
        _assert_close(grads[k], want_grads[k], k)


def _assert_close(got, want, what=""):
    """f32 results whose partial sums run in another order: close relative to the array's scale."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL["rtol"], atol=TOL["atol"] * np.abs(want).max(),
                               err_msg=what)


def _flat(found):
    """Every array a collective carries (a combined collective's tuple split into its parts)."""
    return [(op, part) for op, shape in found for part in re.findall(r"\w+\[[\d,]*\]", shape)]


def _hlo_collectives(kind, name, mesh_cfg, rng, backward=False):
    x = _inputs(rng, kind)
    grad_fn, fwd, (diff, rest), mesh = _sharded(kind, mesh_cfg, LAYOUTS[name], x)
    with jax.set_mesh(mesh):
        lowered = grad_fn.lower(diff, rest) if backward else fwd.lower({**diff, **rest})
        return _collectives(_drop_trivial(lowered.compile().as_text()))


def _drop_trivial(hlo: str) -> str:
    """The HLO without collectives over size-1 mesh axes only (shard_map's transpose psums the gradients of
    unsplit inputs over the data axes even when they hold one device; XLA on CPU keeps them; they move nothing)."""
    def trivial(line):
        m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
        if not m:
            return False
        sizes = {k.strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return all(sizes[a.strip("' ")] == 1 for a in m.group(2).split(","))
    return "\n".join(line for line in hlo.splitlines() if not trivial(line))


def _no_gathered_rows(found):
    """No collective carries selected rows (T×K×D_p or T×K×D_v pieces) or a table; only T×K×C_loc scores."""
    for op, shape in _flat(found):
        dims = [int(d) for d in shape[shape.index("[") + 1:-1].split(",") if d]
        assert not (len(dims) == 3 and dims[1] == K and dims[2] > 2), (op, shape)
        assert N not in dims, (op, shape)


@pytest.mark.parametrize("kind,name,mesh_cfg,expected", [
    # tokens over data (2): a device serves 16 tokens; the V2 pre-value dots (16 × K) are reduced once, then the
    # D-wide output; number-wise shards own whole P rows and reduce only the output
    ("v2", "dimension_wise", DATA, [("all-reduce", "f32[16,12]"), ("all-reduce", "f32[16,20]")]),
    ("v2", "number_wise", DATA, [("all-reduce", "f32[16,20]")]),
    # rows over fsdp, which splits tokens: ids, scores and each token's D_p / 4 slice of pre_x are gathered
    ("v2", "hybrid", FSDP, [("all-gather", "f32[32,12,1]"), ("all-gather", "f32[32,6]"), ("all-gather", "s32[32,12]"),
                            ("all-reduce", "f32[16,20]"), ("all-reduce", "f32[32,12]"),
                            ("reduce-scatter", "f32[16,20]")]),
    # columns over fsdp × tensor: each token's owner sends every column shard its D_p / 8 slice (all-to-all)
    ("v2", "cols_over_token_axes", FSDP, [("all-gather", "f32[32,12,2]"), ("all-gather", "s32[32,12]"),
                                          ("all-reduce", "f32[16,20]"), ("all-reduce", "f32[32,12]"),
                                          ("all-to-all", "(f32[16,3], f32[16,3])"),
                                          ("reduce-scatter", "f32[16,20]")]),
    # Memory+: the gate's column slice rides with the values; one D-wide reduction
    ("memplus", "dimension_wise", DATA, [("all-reduce", "f32[16,20]")]),
    ("memplus", "hybrid", FSDP, [("all-gather", "f32[32,12,1]"), ("all-gather", "f32[32,8]"),
                                 ("all-gather", "s32[32,12]"), ("all-reduce", "f32[16,20]"),
                                 ("reduce-scatter", "f32[16,20]")]),
])
def test_forward_hlo_has_only_the_minimal_collectives(rng, kind, name, mesh_cfg, expected):
    found = _hlo_collectives(kind, name, mesh_cfg, rng)
    assert found == sorted(expected), found
    _no_gathered_rows(found)


@pytest.mark.parametrize("kind", ["v2", "memplus"])
def test_backward_hlo_of_dimension_wise_moves_no_rows_and_no_table(rng, kind):
    """Tokens unsplit (1×1×8): table gradients stay local scatter-adds; what crosses is T×K (the dots' and the
    scores' cotangents) and T×D (the output's)."""
    found = _hlo_collectives(kind, "dimension_wise", MESHES[2], rng, backward=True)
    _no_gathered_rows(found)
    if kind == "v2":
        assert ("all-reduce", "f32[32,12]") in _flat(found), found  # the pre-value dots, reduced once forward
    assert {op for op, _ in found} == {"all-reduce"}, found


@pytest.mark.parametrize("layout_cfg,mesh_cfg,memory,message", [
    ({"cols": ["tensor"]}, {"data": 2, "fsdp": 1, "tensor": 4}, dict(value_dim=16, pre_value_dim=6),
     "pre_value_dim=6 does not split evenly"),
    ({"rows": ["tensor"]}, {"data": 1, "fsdp": 1, "tensor": 8}, dict(num_keys=6), "the 36 value rows"),
    ({"cols": ["tensor"]}, {"data": 1, "fsdp": 1, "tensor": 8}, dict(value_dim=24, cores=3), "straddles"),
], ids=["pre_value_dim", "shared_rows", "mcs"])
def test_v2_layouts_that_do_not_fit_fail_at_start(layout_cfg, mesh_cfg, memory, message):
    """V2's shared table (rows n₀²·table_layers, here 1 table: placement on one block) and P's columns
    split like V's."""
    mesh = make_mesh(mesh_cfg)
    model_cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, memory_placement="0:1",
                            memory=MemoryConfig.ultramemv2(**{"num_keys": 8, "topk": 2, **memory}))
    with pytest.raises(UsageError, match=f"^memory_layout.(rows|cols): .*{message}"):
        memory_layout(layout_cfg, mesh, logical_rules([], mesh), model_cfg, batch_size=8)


MODELS = {  # two memory layers, so V2's windows of the one table and Memory+'s one pool are read twice
    # 2 per-layer tables of 8² rows; share_ratio 1: windows of ⌊√128⌋² = 121 rows at offsets 0 and 64, the
    # second wrapping around the table's end (the ring): the layers share rows
    "v2_shared": MemoryConfig.ultramemv2(num_keys=8, key_dim=8, value_dim=16, pre_value_dim=8, topk=4,
                                         share_ratio=1.0),
    "memplus": MemoryConfig.memplus(num_keys=8, key_dim=8, value_dim=16, heads=2, topk=4),
}


def _train_cfg(model, layout_cfg, mesh_cfg):
    return TrainConfig(steps=4, batch_size=8, seq_len=16, mesh=mesh_cfg, memory_layout=layout_cfg,
                       optim=OptimConfig(warmup_frac=0.0, learning_rate=1e-2, eps=1e-5),  # as test_sharding's
                       model=ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                                         memory=MODELS[model], memory_placement="all"))


TABLE_SPECS = {"number_wise": P("tensor", None), "dimension_wise": P(None, "tensor"), "hybrid": P("fsdp", "tensor")}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["v2_shared", "memplus"])
def test_train_steps_under_each_layout_match_one_device(rng, model):
    """Three optimizer steps (forward, gradients, updates of the shared tables) under the hybrid layout (rows and
    columns split at once) give the single-device losses, with the shared tables split as the layout says. Each
    layout's forward and gradients are checked at the lookup above; this checks the model and optimizer around
    it (one layout keeps `make test` short)."""
    tokens = rng.integers(0, 64, (3, 8, 17)).astype(np.int32)
    want, _, _ = _run_steps(_train_cfg(model, {}, ONE_DEVICE), 3, tokens)
    for name, spec in [("hybrid", TABLE_SPECS["hybrid"])]:
        got, ms, _ = _run_steps(_train_cfg(model, LAYOUTS[name], FSDP), 3, tokens)
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=name)
        for table in ("values", "pre_values") if model != "memplus" else ("values",):
            arr = ms["memory_table"][table][...]
            assert arr.sharding.is_equivalent_to(NamedSharding(arr.sharding.mesh, spec), arr.ndim), (name, table)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["v2_shared"])  # Memory+'s pool is one table, as V1's (tests/test_sharding.py)
def test_shared_table_checkpoint_restores_under_another_layout(tmp_path, rng, model):
    """V2's shared P and V saved number-wise on 2×4 restore under the hybrid layout (rows over fsdp, columns over
    tensor) on fsdp 2×4, test_train_steps_under_each_layout_match_one_device's program, and training continues as
    it would have (restoring onto one device is V1's test: the same code path)."""
    tokens = rng.integers(0, 64, (4, 8, 17)).astype(np.int32)
    cfg_a = _train_cfg(model, LAYOUTS["number_wise"], DATA)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    saved = {}
    names = ("values", "pre_values") if model != "memplus" else ("values",)
    record = lambda ms: saved.update({k: np.asarray(ms["memory_table"][k][...]) for k in names})  # noqa: E731

    # layout A saves after batches 0-1 and continues over batches 0-3: the reference of the restored run
    losses_a, _, _ = _run_steps(cfg_a, 6, np.concatenate([tokens[:2], tokens]), after_step=save_at(mngr, 2, record))
    reference = losses_a[2:]

    for cfg_b in (_train_cfg(model, LAYOUTS["hybrid"], FSDP),):
        def restore(ms_b, os_b):
            out = mngr.restore(2, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(ms_b)),
                                                          opt_state=ocp.args.StandardRestore(abstract_like(os_b))))
            for k, want in saved.items():
                got = out["params"]["memory_table"][k][...]
                np.testing.assert_array_equal(np.asarray(got), want)
                assert got.sharding.spec == ms_b["memory_table"][k][...].sharding.spec
            return out["params"], out["opt_state"]

        got, _, _ = _run_steps(cfg_b, 4, tokens, restore=restore)
        np.testing.assert_allclose(got, reference, rtol=1e-4)
