"""UltraMemV2 (memory_v2.py, table_share.py): the layer against a dense brute-force oracle, the shared table's
windows against a direct construction, V2's init against its variance formula, presets against Table 10."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax import MemoryConfig, ModelConfig, create_model, table_share
from ultramem_jax.config import MoEConfig
from ultramem_jax.memory_v2 import SharedValueTable, UltraMemV2Layer
from ultramem_jax.params import memory_layer_params, param_counts, shared_table_params
from ultramem_jax.sharding import build_context
from ultramem_jax.train_config import load_config


def _build(cfg, d_model, num_layers, layer_index, mlp_dim, seed):
    """A layer and its table, ``cfg`` already carrying table_layers (as the model resolves it)."""
    with build_context():
        rngs = nnx.Rngs(seed)
        table = SharedValueTable(cfg, d_model, mlp_dim, num_layers, rngs=rngs)
        layer = UltraMemV2Layer(cfg, d_model, num_layers, layer_index=layer_index, mlp_dim=mlp_dim, rngs=rngs)
    return layer, table


def _direct_window(n0, table_layers, num_rows, first_table):
    """The rows a window reads, built as the paper draws it: whole per-layer tables in ring order from
    ``first_table``, cut to ``num_rows``."""
    tables = [np.arange(k * n0 * n0, (k + 1) * n0 * n0) for k in range(table_layers)]
    order = [(first_table + j) % table_layers for j in range(table_layers)]
    return np.concatenate([tables[k] for k in order])[:num_rows]


def _rms(x, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _dense_oracle(params, x_TxD, cfg, perm, window_rows):
    """The V2 forward pass with everything the layer avoids materialised: the n'×n' score grid of every core,
    an exact top-m over it, and the whole virtual table (every slot's P and V row) in a dense matmul."""
    T = x_TxD.shape[0]
    H, R, Dk, C, m = cfg.heads, cfg.rank, cfg.key_dim, cfg.cores, cfg.topk
    n = cfg.keys_per_side
    q = x_TxD @ params["query"]
    q = q.reshape(T, 2, R, Dk) if cfg.query_per_rank else jnp.repeat(q.reshape(T, 2, 1, Dk), R, axis=2)
    q = _rms(q, cfg.norm_eps) * params["query_norm"]
    keys = jnp.moveaxis(_rms(jnp.moveaxis(params["keys"], 3, -1), cfg.norm_eps) * params["key_norm"], -1, 3)
    s_row = jnp.einsum("tad,hida->thai", q[:, 0], keys[:, 0])  # rank a's query against rank a's key vectors
    s_col = jnp.einsum("tad,hida->thai", q[:, 1], keys[:, 1])
    grid_TxHxCxNN = jnp.einsum("thai,chab,thbj->thcij", s_row, params["cores"], s_col).reshape(T, H, C, n * n)
    _, slots_TxHxM = jax.lax.top_k(grid_TxHxCxNN.sum(2), m)
    picked_TxHxCxM = jnp.take_along_axis(grid_TxHxCxNN, slots_TxHxM[:, :, None, :], axis=-1)
    if cfg.score_activation == "softmax":
        picked_TxHxCxM = jax.nn.softmax(picked_TxHxCxM, axis=-1)
    # dense weights over all E·N virtual slots, per core
    onehot_TxHxMxV = jax.nn.one_hot(slots_TxHxM, n * n)
    weights_TxCxV = jnp.einsum("thcm,thmv->tcv", picked_TxHxCxM, onehot_TxHxMxV)
    virtual = np.arange(n * n)
    physical = window_rows[(virtual if perm is None else perm[virtual]) % cfg.num_values]
    P_VxDp, V_VxDv = params["pre_values"][physical], params["values"][physical]  # the whole virtual table
    gate_TxV = (x_TxD @ params["pre_proj"]) @ P_VxDp.T
    slice_w = cfg.value_dim // C
    out = jnp.concatenate([(weights_TxCxV[:, c] * gate_TxV) @ V_VxDv[:, c * slice_w:(c + 1) * slice_w]
                           for c in range(C)], axis=-1)
    return out @ params["out_proj"][0]


NAMES = ("query", "query_norm", "keys", "key_norm", "cores", "pre_proj", "out_proj")


@pytest.mark.parametrize("case", [
    dict(heads=2, expansion=4, query_per_rank=True, sharing="ring", layer_index=2),
    dict(heads=1, expansion=1, query_per_rank=False, sharing="block", layer_index=1,
         score_activation="softmax", value_init="code", balance_loss=1e-2),
], ids=["per-rank-ring-E4", "per-side-block-softmax"])
def test_layer_equals_dense_oracle_forward_and_backward(rng, case):
    case = dict(case)
    layer_index = case.pop("layer_index")
    n0, table_layers, d_model = 6, 3, 24
    cfg = MemoryConfig.ultramemv2(num_keys=n0, key_dim=4, value_dim=8, pre_value_dim=6, topk=5,
                                  table_layers=table_layers, share_ratio=0.5, norm_eps=float(rng.uniform(0.01, 1)),
                                  **case)
    cfg = cfg.resolved(d_model)
    cfg = dataclasses.replace(cfg, preselect=cfg.keys_per_side)  # exact search: the pre-selection cuts nothing
    layer, table = _build(cfg, d_model, 4, layer_index, 64, int(rng.integers(1 << 30)))
    layer.cores[...] = jnp.asarray(rng.uniform(-1, 1, layer.cores.shape), jnp.float32)  # any sign, any rank
    layer.refresh_tucker()
    x = jnp.asarray(rng.standard_normal((2, 4, d_model)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 4, d_model)), jnp.float32)

    offset_table = (layer_index if cfg.sharing == "ring"
                    else layer_index // table_share.block_size(cfg) * table_share.block_size(cfg))
    window = _direct_window(n0, table_layers, cfg.num_values, offset_table)
    assert cfg.num_values > n0 * n0  # the window spans more than one layer table (and wraps for layer 2)
    perm = None if layer.permutation is None else np.asarray(layer.permutation[...])

    def layer_loss(layer, table):
        out, info = layer(x, table)
        return jnp.sum(out * cot) + info.get("balance_loss", 0.0), (out, info)

    def oracle_loss(params):
        out = _dense_oracle(params, x.reshape(-1, d_model), cfg, perm, window)
        return jnp.sum(out * cot.reshape(-1, d_model)), out

    params = {k: getattr(layer, k)[...] for k in NAMES}
    params.update(values=table.values[...], pre_values=table.pre_values[...])
    # jitted: eager mode compiles each op on its own, most of this test's time
    (_, (out, info)), (g_layer, g_table) = nnx.jit(nnx.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))(
        layer, table)
    (_, want), g_want = jax.jit(jax.value_and_grad(oracle_loss, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, d_model), np.asarray(want), rtol=2e-4, atol=2e-5)
    for k in ("values", "pre_values"):
        got_k = np.asarray(g_table[k][...])
        np.testing.assert_allclose(got_k, np.asarray(g_want[k]), rtol=2e-4, atol=2e-5, err_msg=k)
        read = np.zeros(cfg.table_rows, bool)
        read[window[np.asarray(info["rows"]).ravel()]] = True  # info's rows are window-relative
        assert np.all(got_k[~read] == 0) and np.all(np.abs(got_k[read]).sum(-1) > 0), k
    if not cfg.balance_loss:  # the balance loss adds gradient to queries and keys that the oracle lacks
        for k in NAMES:
            np.testing.assert_allclose(np.asarray(g_layer[k][...]), np.asarray(g_want[k]), rtol=5e-4, atol=5e-5,
                                       err_msg=k)
    else:
        assert float(info["balance_loss"]) > 0
    if cfg.query_per_rank:  # every (side, rank) query is used: no zero block in W_q's gradient (the release's)
        g_q = np.abs(np.asarray(g_layer["query"][...])).reshape(d_model, 2, cfg.rank, cfg.key_dim).sum((0, 3))
        assert np.all(g_q > 0)


def test_ring_and_block_windows_equal_direct_construction(rng):
    for _ in range(20):
        table_layers = int(rng.integers(2, 9))
        n0 = int(rng.integers(2, 7))
        ratio = float(rng.uniform(1 / table_layers, 1))
        for sharing in ("ring", "block"):
            cfg = MemoryConfig.ultramemv2(num_keys=n0, topk=1, table_layers=table_layers, share_ratio=ratio,
                                          sharing=sharing)
            N = cfg.num_values
            assert N == math.isqrt(int(n0 * n0 * table_layers * ratio + 1e-6)) ** 2
            g = max(1, round(ratio * table_layers))
            for layer in range(table_layers):
                first = layer if sharing == "ring" else (layer // g) * g
                got = np.asarray(table_share.physical_rows(jnp.arange(N), table_share.window_offset(cfg, layer),
                                                           cfg.table_rows))
                np.testing.assert_array_equal(got, _direct_window(n0, table_layers, N, first),
                                              err_msg=f"{sharing} L={table_layers} n0={n0} ratio={ratio} layer={layer}")


def test_memory_output_variance_at_init_matches_v2_formula(rng):
    """V2's init sets σ_V so that the memory's output variance equals the FFN's, 0.064·k_inner/(2L), for
    selected scores of mean square 1 + σ_s² (Eq. 22 = Eq. 26).  With the scores the layer really selects,
    the output variance must be that target times E[s²] / (1 + σ_s²)."""
    d_model, mlp_dim, num_layers = 256, 640, 6
    sigma_s2 = float(rng.uniform(0, 1))
    cfg = MemoryConfig.ultramemv2(num_keys=32, key_dim=32, value_dim=64, pre_value_dim=64, topk=16,
                                  table_layers=4, init_score_var=sigma_s2).resolved(d_model)
    layer, table = _build(cfg, d_model, num_layers, 1, mlp_dim, int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((4, 256, d_model)), jnp.float32)
    out, _ = layer(x, table)
    raw, _ = layer.retrieve(x.reshape(-1, d_model))
    mean_sq_score = float(jnp.mean(raw.astype(jnp.float32) ** 2))
    target = 0.064 * (mlp_dim / d_model) / (2 * num_layers) * mean_sq_score / (1 + sigma_s2)
    measured = float(jnp.var(out))
    assert abs(measured / target - 1) < 0.10, (measured, target)


def _abstract_param_count(model_cfg):
    model = nnx.eval_shape(lambda: create_model(model_cfg))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["tiny-v2", "tiny-v2-pv64", "ultramemv2-227m", "ultramemv2-1b-7b", "olmoe-227m"])
def test_preset_counts_equal_the_built_model(name):
    """params.py's counts against the parameters a model really creates (abstractly: nothing materialised)."""
    cfg = load_config([f"model_name={name}"]).model
    counts = param_counts(cfg)
    model = nnx.eval_shape(lambda: create_model(cfg))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == counts["total"]
    if cfg.memory is None:
        return
    layer = memory_layer_params(cfg)
    mem = model.memories[0]
    shapes = {k: math.prod(getattr(mem, k).shape) for k in ("query", "keys", "cores", "pre_proj", "out_proj")}
    shapes["norms"] = mem.query_norm.shape[0] + mem.key_norm.shape[0]
    assert {k: layer[k] for k in shapes} == shapes
    assert shared_table_params(cfg) == model.memory_table.values.size + model.memory_table.pre_values.size


def test_tiny_v2_presets_match_tiny_x12():
    x12 = param_counts(load_config(["model_name=tiny-x12"]).model)
    for name in ("tiny-v2", "tiny-v2-pv64"):
        c = param_counts(load_config([f"model_name={name}"]).model)
        for k in ("total", "activated_per_token"):
            assert abs(c[k] / x12[k] - 1) < 0.02, (name, k, c[k], x12[k])


# Table 10's counts (arXiv 2508.18756).  Our reading of its convention, from the two OLMoE rows: totals exclude
# the embeddings (OLMoE-1B-7B's public config, untied, 1024-wide experts: 6.71B without, 6.92B with); activated
# counts at 1B exclude the unembedding (1.076B without, 1.179B with), but at 227M include the tied embedding
# (experts 384 wide, which the 1.18B total implies: 228M with, 190M without).
OLMOE_1B7B = ModelConfig(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16,
                         moe=MoEConfig(num_experts=64, top_k=8, expert_mlp_dim=1024))
TABLE10 = [  # (model, Table 10 total, activated, activated counts the unembedding)
    ("olmoe-227m", 1.18e9, 227e6, True),
    ("ultramemv2-227m", 1.18e9, 225e6, True),
    (OLMOE_1B7B, 6.71e9, 1070e6, False),
    ("ultramemv2-1b-7b", 6.70e9, 1079e6, False),
]


@pytest.mark.parametrize("model,total,activated,with_unembedding", TABLE10, ids=lambda v: v if isinstance(v, str) else None)
def test_activated_counts_within_2_percent_of_table10(model, total, activated, with_unembedding):
    cfg = load_config([f"model_name={model}"]).model if isinstance(model, str) else model
    c = param_counts(cfg)
    act = c["activated_per_token"] - (0 if with_unembedding else cfg.vocab_size * cfg.d_model)
    assert abs(act / activated - 1) < 0.02, (act, activated)


@pytest.mark.parametrize("model,total,activated,with_unembedding", [
    *TABLE10[:3],
    pytest.param(*TABLE10[3], marks=pytest.mark.xfail(strict=True, reason=(
        "Table 10's V2-1B/7B total and activated differ by 5.62B of unused parameters, but its 528²·16 rows of "
        "D_v + D_p = 1152 hold 5.14B: at 1079M activated the total is 6.22B (-7.2%)"))),
], ids=lambda v: v if isinstance(v, str) else None)
def test_totals_within_2_percent_of_table10(model, total, activated, with_unembedding):
    cfg = load_config([f"model_name={model}"]).model if isinstance(model, str) else model
    non_embedding = param_counts(cfg)["non_embedding"]
    assert abs(non_embedding / total - 1) < 0.02, (non_embedding, total)


@pytest.mark.parametrize("memory,field", [
    (dict(share_ratio=0.0), "memory.share_ratio"),
    (dict(share_ratio=1.5), "memory.share_ratio"),
    (dict(value_init="pkm"), "memory.value_init"),
    (dict(output_proj=False), "memory.output_proj"),
    (dict(table_layers=-1), "memory.table_layers"),
])
def test_invalid_v2_configs_name_the_field(memory, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                    memory=MemoryConfig.ultramemv2(num_keys=8, topk=4, **memory), memory_placement="all")
    with pytest.raises(ValueError, match="^memory.pre_value_dim:"):
        ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                    memory=MemoryConfig(num_keys=8, topk=4, pre_value_dim=8), memory_placement="all")


def test_model_shares_one_table_and_trains_it(rng):
    """Every layer of a built model reads the one shared table; one gradient step reaches rows of it through
    more than one layer's window."""
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=2,
                      memory=MemoryConfig.ultramemv2(num_keys=6, key_dim=8, value_dim=16, topk=4),
                      memory_placement="all")
    model = create_model(cfg, seed=int(rng.integers(1 << 30)))
    assert not any(hasattr(m, "values") for m in model.memories)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)

    def loss(model):
        logits, aux = model(tokens)
        return jnp.mean(logits ** 2), aux
    grads, aux = nnx.jit(nnx.grad(loss, has_aux=True))(model)  # jitted: eager compiles op by op
    mem = cfg.resolved_memory
    touched = np.abs(np.asarray(grads["memory_table"]["values"][...])).sum(-1) > 0
    expected = np.zeros(mem.table_rows, bool)
    for k, info in enumerate(aux["memory"]):
        expected[np.asarray(table_share.physical_rows(info["rows"], table_share.window_offset(mem, k),
                                                      mem.table_rows)).ravel()] = True
    np.testing.assert_array_equal(touched, expected)


def test_pre_value_and_value_tables_form_the_optimizer_value_group():
    from ultramem_jax.optim import param_labels
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                      memory=MemoryConfig.ultramemv2(num_keys=4, key_dim=8, value_dim=16, topk=4),
                      memory_placement="all")
    state = nnx.state(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param)
    labels = {tuple(str(getattr(k, "key", k)) for k in path): lab
              for path, lab in jax.tree_util.tree_leaves_with_path(param_labels(state))}
    grouped = sorted(p for p, lab in labels.items() if lab == "values")
    assert len(grouped) == 2 and {p[:2] for p in grouped} == {("memory_table", "values"),
                                                                ("memory_table", "pre_values")}, grouped
