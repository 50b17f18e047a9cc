"""Pallas kernels against their XLA reference ops (interpret mode on CPU), lowered for TPU and GPU from this host,
inside the shard_map layouts, and through the memory layer.  Real-GPU numerics run under the gpu_only marker."""
import dataclasses
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_winners
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels import gather_pool as gp_kernel
from pallas_kernels import key_search as ks_kernel
from pallas_kernels import pre_value_gather as pvg_kernel
from ultramem_jax import MemoryConfig, ive, kernels, key_search, lookup
from ultramem_jax.memory import memory_layer
from ultramem_jax.sharding import build_context

TPU_INTERPRET = {"hlo": True, "tpu_sim": pltpu.InterpretParams()}


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# ---- gather-pool ---------------------------------------------------------------------------------------
def _pool_inputs(rng, T, K, N, D, E, C):
    rows = rng.integers(0, N, (T, K))
    rows[0, 1] = rows[0, 0]  # a row read twice by one token: the backward must add, not overwrite
    return (_normal(rng, N, D), jnp.asarray(rows, jnp.int32), jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32),
            _normal(rng, T, K, C), _normal(rng, T, E, D))


def _check_pool(fn, rng, T, K, N, D, E, C):
    values, rows, blocks, scores, g = _pool_inputs(rng, T, K, N, D, E, C)
    loss = lambda f: lambda v, s: jnp.sum(f(v, rows, blocks, s, E) * g)  # noqa: E731
    want = jax.jit(lambda v, s: ive.gather_pool(v, rows, blocks, s, E))(values, scores)
    got = jax.jit(lambda v, s: fn(v, rows, blocks, s, E))(values, scores)  # jitted: eager compiles op by op
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want_g = jax.jit(jax.grad(loss(ive.gather_pool), (0, 1)))(values, scores)
    got_g = jax.jit(jax.grad(loss(fn), (0, 1)))(values, scores)
    for a, b in zip(got_g, want_g):  # sums over D lanes in another order: error scales with the largest entry
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + float(np.abs(b).max())))
    untouched = np.setdiff1d(np.arange(N), np.asarray(rows))
    assert np.all(np.asarray(got_g[0])[untouched] == 0)  # only selected rows receive gradient


# T, K, N, D, E, C: none of T, K, D a multiple of the block sizes (8 tokens, pow2 Triton tiles, 128 lanes)
POOL_SHAPES = [(13, 20, 300, 96, 4, 2), (5, 7, 50, 100, 9, 4), (16, 32, 64, 64, 1, 1)]


@pytest.mark.parametrize("mode", sorted(TPU_INTERPRET))
@pytest.mark.parametrize("shape", POOL_SHAPES[:2])
def test_tpu_gather_pool_matches_reference(rng, shape, mode):
    fn = functools.partial(gp_kernel.gather_pool, backend="tpu", interpret=TPU_INTERPRET[mode])
    _check_pool(fn, rng, *shape)


@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_gpu_gather_pool_matches_reference(rng, shape):
    fn = functools.partial(gp_kernel.gather_pool, backend="gpu", interpret=True)
    _check_pool(fn, rng, *shape)


def test_tpu_gather_pool_chunks_row_ids_through_smem(rng, monkeypatch):
    """More row ids than one SMEM chunk: the kernel runs chunk by chunk (lax.map) and still matches."""
    monkeypatch.setattr(gp_kernel, "SMEM_ROW_IDS", 64)
    fn = functools.partial(gp_kernel.gather_pool, backend="tpu", interpret=True)
    _check_pool(fn, rng, 37, 6, 40, 32, 4, 2)


# ---- pre-value gather (UltraMemV2) ---------------------------------------------------------------------
def _pvg_inputs(rng, T, K, N, Dp, Dv, C):
    rows = rng.integers(0, N - 1, (T, K))  # row N - 1 is never read: its gradients must stay exactly 0
    rows[0, 1] = rows[0, 0]  # a row read twice by one token: the backward must add, not overwrite
    rows[-1, -1] = rows[0, 0]  # and by two tokens
    return (_normal(rng, N, Dp), _normal(rng, N, Dv), jnp.asarray(rows, jnp.int32), _normal(rng, T, Dp),
            _normal(rng, T, K, C), _normal(rng, T, Dv))


def _check_pvg(fn, rng, T, K, N, Dp, Dv, C):
    """Forward and the gradients w.r.t. P, V, the pre-value projection (W_pre x) and the scores."""
    pre_values, values, rows, pre, scores, g = _pvg_inputs(rng, T, K, N, Dp, Dv, C)
    loss = lambda f: lambda p, v, x, s: jnp.sum(f(p, v, rows, x, s) * g)  # noqa: E731
    diff = (pre_values, values, pre, scores)
    fwd = lambda f: jax.jit(lambda p, v, x, s: f(p, v, rows, x, s))  # noqa: E731  (eager compiles op by op)
    np.testing.assert_allclose(fwd(fn)(*diff), fwd(kernels.xla_pre_value_gather)(*diff), rtol=1e-5, atol=1e-4)
    want_g = jax.jit(jax.grad(loss(kernels.xla_pre_value_gather), (0, 1, 2, 3)))(*diff)
    got_g = jax.jit(jax.grad(loss(fn), (0, 1, 2, 3)))(*diff)
    for name, a, b in zip(("P", "V", "pre", "scores"), got_g, want_g):  # f32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + float(np.abs(b).max())), err_msg=name)
    untouched = np.setdiff1d(np.arange(N), np.asarray(rows))
    assert all(np.all(np.asarray(d)[untouched] == 0) for d in got_g[:2])  # only selected rows get gradient


# T, K, N, D_p, D_v, C: T, K, D_p, D_v not multiples of the blocks (8 tokens, pow2 Triton tiles, 128 lanes)
PVG_SHAPES = [(13, 20, 300, 24, 96, 2), (5, 7, 50, 40, 100, 4), (9, 16, 64, 64, 64, 1)]


@pytest.mark.parametrize("mode", sorted(TPU_INTERPRET))
def test_tpu_pre_value_gather_matches_reference(rng, mode):
    fn = functools.partial(pvg_kernel.pre_value_gather, backend="tpu", interpret=TPU_INTERPRET[mode])
    _check_pvg(fn, rng, *PVG_SHAPES[0 if mode == "hlo" else 1])


@pytest.mark.parametrize("shape", PVG_SHAPES)
def test_gpu_pre_value_gather_matches_reference(rng, shape):
    fn = functools.partial(pvg_kernel.pre_value_gather, backend="gpu", interpret=True)
    _check_pvg(fn, rng, *shape)


def test_tpu_pre_value_gather_chunks_row_ids_through_smem(rng, monkeypatch):
    """More row ids than one SMEM chunk: the kernels run chunk by chunk (lax.map) and still match."""
    monkeypatch.setattr(pvg_kernel, "SMEM_ROW_IDS", 48)
    fn = functools.partial(pvg_kernel.pre_value_gather, backend="tpu", interpret=True)
    _check_pvg(fn, rng, 21, 6, 40, 8, 16, 2)


# ---- key search ----------------------------------------------------------------------------------------
def _search_inputs(rng, T, H, D, n, R, C):
    return dict(query_row=_normal(rng, T, H, D), query_col=_normal(rng, T, H, D), keys_row=_normal(rng, H, n, D, R),
                keys_col=_normal(rng, H, n, D, R), cores=jnp.asarray(rng.uniform(-0.2, 1, (C, H, R, R)), jnp.float32),
                u=_normal(rng, H, R), t=_normal(rng, H, R))




SEARCH_CASES = [  # T, H, D, n, R, C, preselect, topk, additive
    (13, 2, 24, 40, 2, 2, 12, 20, False),
    (9, 1, 16, 130, 3, 3, 16, 16, False),
    (11, 3, 20, 37, 1, 1, 10, 30, True),
]


@pytest.mark.parametrize("backend,mode", [("tpu", "hlo"), ("tpu", "tpu_sim"), ("gpu", "hlo")])
@pytest.mark.parametrize("case", SEARCH_CASES)
def test_key_search_matches_reference(rng, case, backend, mode):
    T, H, D, n, R, C, P, M, additive = case
    x = _search_inputs(rng, T, H, D, n, R, C)
    args = list(x.values())
    interpret = TPU_INTERPRET[mode] if backend == "tpu" else True
    kernel = lambda *a: ks_kernel.search(*a, P, M, additive, backend, interpret)  # noqa: E731
    reference = lambda *a: key_search.search(*a, P, M, additive)  # noqa: E731
    want = jax.jit(reference)(*args)  # jitted: eager compiles op by op
    got = jax.jit(kernel)(*args)
    assert_same_winners(got, want)

    # no cotangent on the few winners a near-tie let differ: their keys' gradients would differ by design
    same = np.asarray(got[1]) == np.asarray(want[1])
    g = _normal(rng, *want[0].shape) * same[..., None]
    loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * g)  # noqa: E731
    diff_args = (0, 1, 2, 3) if additive else (0, 1, 2, 3, 4)
    want_g = jax.jit(jax.grad(loss(reference), diff_args))(*args)
    got_g = jax.jit(jax.grad(loss(kernel), diff_args))(*args)
    for a, b in zip(got_g, want_g):
        # f32 sums in a different order: error grows with the largest entry, not each entry's own size
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 + 1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("tile_elems", [64, 1024])  # one and four tokens per GPU program
def test_gpu_key_search_with_small_token_tiles(rng, monkeypatch, tile_elems):
    """The GPU token tile shrinks with n and m_pre (``_gpu_tile``): results must not depend on it."""
    monkeypatch.setattr(ks_kernel, "GPU_TILE_ELEMS", tile_elems)
    T, H, D, n, R, C, P, M, additive = SEARCH_CASES[0]
    args = list(_search_inputs(rng, T, H, D, n, R, C).values())
    assert ks_kernel._gpu_tile(common.pow2(n), common.pow2(P) ** 2) == max(1, tile_elems // 256)
    assert_same_winners(ks_kernel.search(*args, P, M, additive, "gpu", True),
                         key_search.search(*args, P, M, additive))
    assert "triton" in _gpu_lower(lambda *a: ks_kernel.search(*a, P, M, additive, "gpu", False)[0],
                                  [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])


def test_key_search_with_full_preselection_is_brute_force_top_m(rng):
    """Pre-selecting every key makes TDQKR exact for signed full-rank cores: the kernel must then return the
    true top-m of the whole grid, an oracle independent of the reference's pre-selection."""
    from ultramem_jax import tdqkr
    T, H, D, n, R, C, M = 10, 2, 16, 20, 3, 2, 16
    x = _search_inputs(rng, T, H, D, n, R, C)
    scores, slots = ks_kernel.search(*x.values(), n, M, False, "tpu", True)
    s_row = tdqkr.rank_key_scores(x["query_row"], x["keys_row"])
    s_col = tdqkr.rank_key_scores(x["query_col"], x["keys_col"])
    best, best_slots = tdqkr.brute_force_grid_topk(s_row, s_col, x["cores"], M)
    assert_same_winners((scores.sum(-1, keepdims=True), slots), (best[..., None], best_slots))


# ---- the layer and the sharded lookup through the kernels ----------------------------------------------
@pytest.mark.parametrize("cfg", [MemoryConfig(num_keys=8, topk=6, expansion=4, kernels="pallas", out_proj_std=None),
                                 MemoryConfig.pkm(num_keys=8, topk=5, kernels="pallas")], ids=["ultramem", "pkm"])
def test_memory_layer_with_kernels_matches_xla(rng, cfg):
    with build_context():
        layers = [memory_layer(dataclasses.replace(cfg, kernels=k), 32, 2, rngs=nnx.Rngs(3)) for k in ("pallas", "xla")]
    assert [m.impl for m in layers] == ["interpret", "xla"]
    x = _normal(rng, 2, 7, 32)

    def run(layer):
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
        def loss(p):
            out, _ = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(out ** 2), out
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_k, out_k), g_k = run(layers[0])
    (l_x, out_x), g_x = run(layers[1])
    np.testing.assert_allclose(out_k, out_x, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_v2_layer_with_kernels_matches_xla(rng):
    """UltraMemV2 with ``kernels: pallas`` (the fused pre-value gather in interpret mode; the per-rank search
    stays XLA) against ``kernels: xla``: output and the gradients of every parameter and of the shared table."""
    from ultramem_jax.memory_v2 import SharedValueTable, UltraMemV2Layer
    d_model = 24
    cfg = MemoryConfig.ultramemv2(num_keys=6, key_dim=4, value_dim=16, pre_value_dim=8, topk=5, heads=2,
                                  table_layers=3, kernels="pallas")
    models = []
    for k in ("pallas", "xla"):
        with build_context():
            rngs = nnx.Rngs(5)
            c = dataclasses.replace(cfg, kernels=k)
            models.append((UltraMemV2Layer(c, d_model, 3, layer_index=1, mlp_dim=64, rngs=rngs),
                           SharedValueTable(c, d_model, 64, 3, rngs=rngs)))
    assert [m[0].impl for m in models] == ["interpret", "xla"]
    x, cot = _normal(rng, 2, 7, d_model), _normal(rng, 2, 7, d_model)

    def loss(layer, table):
        out, _ = layer(x, table)
        return jnp.sum(out * cot), out

    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out_k), g_k = grad_fn(*models[0])
    (_, out_x), g_x = grad_fn(*models[1])
    np.testing.assert_allclose(out_k, out_x, rtol=1e-4, atol=1e-5)
    leaves_k, leaves_x = jax.tree.leaves(nnx.state(g_k)), jax.tree.leaves(nnx.state(g_x))
    n_params = len(jax.tree.leaves(nnx.state(models[1][0], nnx.Param)))
    assert len(leaves_k) == len(leaves_x) == n_params + 2  # every layer parameter, P and V
    for a, b in zip(leaves_k, leaves_x):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * (1 + float(np.abs(b).max())))


@pytest.mark.parametrize("layout", [lookup.MemoryLayout(row_axes=("tensor",), token_axes=("data",)),
                                    lookup.MemoryLayout(col_axes=("tensor",), token_axes=("data",)),
                                    lookup.MemoryLayout(row_axes=("data",), col_axes=("tensor",), token_axes=("data",))],
                         ids=lambda l: l.kind)
@pytest.mark.parametrize("impl", ["interpret", "native"])  # Pallas (TPU kernels interpreted), C++ (cpu_kernels/)
def test_kernels_inside_shard_map_match_one_device(rng, layout, impl):
    if impl == "native" and kernels.native_unavailable_reason() is not None:
        pytest.skip(f"native kernels unavailable: {kernels.native_unavailable_reason()}")
    from ultramem_jax.mesh import make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    T, K, N, D, E, C, O = 16, 6, 32, 16, 4, 2, 8
    values, out_proj = _normal(rng, N, D), _normal(rng, E, D, O)
    ids = jnp.asarray(rng.integers(0, E * N, (T, K)), jnp.int32)
    scores = _normal(rng, T, K, C)

    def loss(impl, layout):
        def f(v, w, s):
            out = lookup.memory_lookup(layout, v, w, ids, s, N, E, impl=impl)
            return jnp.sum(jnp.sin(out)), out
        return jax.value_and_grad(f, (0, 1, 2), has_aux=True)

    (_, want), want_g = loss("xla", None)(values, out_proj, scores)
    with jax.set_mesh(mesh):
        step = jax.jit(loss(impl, layout))
        (_, got), got_g = step(values, out_proj, scores)
        if impl == "native":
            assert "ultramem_gather_pool_fwd" in step.lower(values, out_proj, scores).as_text()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):  # f32 partial sums in another order: scale the tolerance to the values (~1)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [lookup.MemoryLayout(row_axes=("tensor",), token_axes=("data",)),
                                    lookup.MemoryLayout(row_axes=("data", "tensor"), token_axes=("data",))],
                         ids=["rows", "rows_over_token_axes"])
def test_pre_value_gather_inside_number_wise_shard_map_matches_one_device(rng, layout):
    """UltraMemV2's lookup with the fused kernel on each row shard (masked rows) against XLA on one device."""
    from ultramem_jax.mesh import make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    T, K, N, Dp, Dv, C, O = 16, 6, 32, 8, 16, 2, 8
    ids = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
    diff = (_normal(rng, N, Dp), _normal(rng, N, Dv), _normal(rng, 1, Dv, O), _normal(rng, T, Dp),
            _normal(rng, T, K, C))

    def loss(impl, layout):
        def f(p, v, w, x, s):
            out = lookup.memory_lookup(layout, v, w, ids, s, N, 1, impl=impl, pre_values_NxP=p, pre_x_TxP=x)
            return jnp.sum(jnp.sin(out)), out
        return jax.value_and_grad(f, (0, 1, 2, 3, 4), has_aux=True)

    (_, want), want_g = loss("xla", None)(*diff)
    with jax.set_mesh(mesh):
        (_, got), got_g = jax.jit(loss("interpret", layout))(*diff)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * (1 + float(np.abs(b).max())))


# ---- dispatch ------------------------------------------------------------------------------------------
def test_resolve_picks_by_platform():
    assert kernels.resolve("xla", "tpu") == "xla"
    assert kernels.resolve("auto", "tpu") == "tpu"
    assert kernels.resolve("auto", "cpu") == ("native" if kernels.native_unavailable_reason() is None else "xla")
    assert kernels.resolve("pallas", "cpu") == "interpret"
    assert kernels.resolve("auto", "gpu") == ("gpu_pool" if kernels.triton_available() else "xla")
    with pytest.raises(ValueError, match="memory.kernels"):
        kernels.resolve("cuda")
    with pytest.raises(ValueError, match="memory.kernels"):
        MemoryConfig(kernels="fast").validate(64)


# ---- lowering for the real compilers, from this CPU host -----------------------------------------------
POOL_SPEC = dict(N=4096, D=384, T=100, K=128, E=4, C=2)  # T not a multiple of the token tile


def _pool_fwd_bwd(backend, E):
    def f(values, rows, blocks, scores, g):
        out, vjp = jax.vjp(lambda v, s: gp_kernel.gather_pool(v, rows, blocks, s, E, backend, False), values, scores)
        return out, vjp(g)
    return f


def _pool_specs(dtype, N, D, T, K, E, C):
    return [jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((T, K), jnp.int32),
            jax.ShapeDtypeStruct((T, K), jnp.int32), jax.ShapeDtypeStruct((T, K, C), dtype),
            jax.ShapeDtypeStruct((T, E, D), dtype)]


PVG_SPEC = dict(N=4096, Dp=128, Dv=384, T=100, K=128, C=2)  # V2's D_p : D_v = 1 : 3 (anchors-2026.md §1.1)


def _pvg_fwd_bwd(backend):
    def f(pre_values, values, rows, pre, scores, g):
        out, vjp = jax.vjp(lambda p, v, x, s: pvg_kernel.pre_value_gather(p, v, rows, x, s, backend, False),
                           pre_values, values, pre, scores)
        return out, vjp(g)
    return f


def _pvg_specs(dtype, N, Dp, Dv, T, K, C):
    return [jax.ShapeDtypeStruct((N, Dp), jnp.float32), jax.ShapeDtypeStruct((N, Dv), jnp.float32),
            jax.ShapeDtypeStruct((T, K), jnp.int32), jax.ShapeDtypeStruct((T, Dp), dtype),
            jax.ShapeDtypeStruct((T, K, C), dtype), jax.ShapeDtypeStruct((T, Dv), dtype)]


def _search_fwd_bwd(backend, P, M, additive):
    def f(*args):
        (scores, slots), vjp = jax.vjp(lambda *a: ks_kernel.search(*a, args[5], args[6], P, M, additive, backend,
                                                                    False), *args[:5])
        return scores, slots, vjp((jnp.ones_like(scores), np.zeros(slots.shape, jax.dtypes.float0)))
    return f


def _search_specs(dtype, T=100, H=2, D=192, n=512, R=2, C=2):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    return [s(T, H, D), s(T, H, D), s(H, n, D, R), s(H, n, D, R), s(C, H, R, R), jax.ShapeDtypeStruct((H, R), jnp.float32),
            jax.ShapeDtypeStruct((H, R), jnp.float32)]


KERNELS = {  # name → (function of backend, abstract inputs)
    "gather_pool_f32": (lambda b: _pool_fwd_bwd(b, POOL_SPEC["E"]), _pool_specs(jnp.float32, **POOL_SPEC)),
    "gather_pool_bf16_scores": (lambda b: _pool_fwd_bwd(b, POOL_SPEC["E"]), _pool_specs(jnp.bfloat16, **POOL_SPEC)),
    "pre_value_gather_f32": (_pvg_fwd_bwd, _pvg_specs(jnp.float32, **PVG_SPEC)),
    "pre_value_gather_bf16_scores": (_pvg_fwd_bwd, _pvg_specs(jnp.bfloat16, **PVG_SPEC)),
    "key_search_tdqkr": (lambda b: _search_fwd_bwd(b, 64, 64, False), _search_specs(jnp.float32)),
    "key_search_tdqkr_bf16": (lambda b: _search_fwd_bwd(b, 64, 64, False), _search_specs(jnp.bfloat16)),
    "key_search_product_key": (lambda b: _search_fwd_bwd(b, 32, 48, True), _search_specs(jnp.float32, R=1, C=1)),
}
LIBTPU_WHEELS = platform.system() == "Linux" and platform.machine() == "x86_64"


def _tpu_compile(fn, specs, topology):
    """Compiles for a TPU topology with libtpu (Mosaic's own checks), without a TPU."""
    try:
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001
        if not LIBTPU_WHEELS:
            pytest.skip(f"no libtpu wheel for {platform.system()}/{platform.machine()}")
        raise AssertionError(f"TPU compilation needs libtpu (pip install -e '.[dev]'): {e}") from e
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in specs]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(fn).lower(*args).compile()


def _gpu_lower(fn, specs):
    """Lowers through Pallas' Triton backend for an abstract H100 (compiling to PTX needs the GPU)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


# Each TPU compile costs seconds of the suite's CPU budget: the bf16 variants, where packed layouts make the two
# generations' Mosaic paths differ, compile for both; the f32 ones for v5e only.
TPU_TARGETS = [(name, topology) for name in sorted(KERNELS)
               for topology in (["v5e:2x2", "v6e:2x2"] if "bf16" in name else ["v5e:2x2"])]


@pytest.mark.parametrize("name,topology", TPU_TARGETS)
def test_tpu_kernels_compile_for_tpu(name, topology):
    make, specs = KERNELS[name]
    compiled = _tpu_compile(make("tpu"), specs, topology)
    assert "tpu_custom_call" in compiled.as_text() or "ultramem" in compiled.as_text()


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_gpu_kernels_lower_for_gpu(name):
    make, specs = KERNELS[name]
    text = _gpu_lower(make("gpu"), specs)
    two = name.startswith(("gather_pool", "pre_value_gather"))
    assert text.count("triton") >= (2 if two else 1)  # forward (and backward) kernels


def _misaligned_row_gather(values, rows):
    """A kernel interpret mode accepts but Mosaic rejects: one row of a bf16 table (two rows per packed sublane)
    DMA'd from a dynamic row offset, the reason the gather-pool kernel reads 32-bit tables only."""
    def kernel(rows_ref, v_hbm, o_ref, buf, sem):
        copy = pltpu.make_async_copy(v_hbm.at[pl.ds(rows_ref[0], 1)], buf.at[pl.ds(rows_ref[1], 1)], sem.at[0])
        copy.start()
        copy.wait()
        o_ref[...] = buf[...]
    return pl.pallas_call(kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(1,), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((8, 128), lambda i, r: (0, 0)),
        scratch_shapes=[pltpu.VMEM((8, 128), values.dtype), pltpu.SemaphoreType.DMA((1,))]),
        out_shape=jax.ShapeDtypeStruct((8, 128), values.dtype))(rows, values)


def test_lowering_checks_catch_what_interpret_mode_accepts(rng):
    """The harness above must be able to fail: a misaligned TPU DMA and a non-power-of-two Triton block."""
    values = _normal(rng, 64, 128).astype(jnp.bfloat16)
    rows = jnp.asarray([5, 3], jnp.int32)
    with pltpu.force_tpu_interpret_mode():
        np.testing.assert_array_equal(_misaligned_row_gather(values, rows)[3], values[5])
    with pytest.raises(Exception, match="aligned|divisible"):
        _tpu_compile(_misaligned_row_gather, [jax.ShapeDtypeStruct((64, 128), jnp.bfloat16),
                                              jax.ShapeDtypeStruct((2,), jnp.int32)], "v5e:2x2")

    def bad_triton(x):
        return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2),
                              grid=(1,), in_specs=[pl.BlockSpec((3, 5), lambda i: (0, 0))],
                              out_specs=pl.BlockSpec((3, 5), lambda i: (0, 0)),
                              out_shape=jax.ShapeDtypeStruct((3, 5), jnp.float32))(x)
    np.testing.assert_array_equal(pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2),
                                                 out_shape=jax.ShapeDtypeStruct((3, 5), jnp.float32),
                                                 interpret=True)(jnp.ones((3, 5))), 2)
    with pytest.raises(Exception, match="power of 2"):
        _gpu_lower(bad_triton, [jax.ShapeDtypeStruct((3, 5), jnp.float32)])


# ---- on a real GPU (ULTRAMEM_TEST_ACCELERATOR=1 pytest -m gpu_only) ------------------------------------
@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (ULTRAMEM_TEST_ACCELERATOR=1)")
@pytest.mark.parametrize("shape", POOL_SHAPES + [(1000, 128, 1 << 16, 384, 4, 2)])
def test_gpu_gather_pool_on_gpu(rng, shape):
    with jax.default_matmul_precision("highest"):  # the reference's einsum would otherwise run in TF32
        _check_pool(lambda v, r, b, s, E: gp_kernel.gather_pool(v, r, b, s, E, "gpu", False), rng, *shape)


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (ULTRAMEM_TEST_ACCELERATOR=1)")
@pytest.mark.parametrize("shape", PVG_SHAPES + [(1000, 128, 1 << 16, 128, 384, 2)])
def test_gpu_pre_value_gather_on_gpu(rng, shape):
    with jax.default_matmul_precision("highest"):  # the reference's einsums would otherwise run in TF32
        _check_pvg(lambda *a: pvg_kernel.pre_value_gather(*a, "gpu", False), rng, *shape)


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (ULTRAMEM_TEST_ACCELERATOR=1)")
@pytest.mark.parametrize("case", SEARCH_CASES + [(300, 2, 128, 1024, 2, 2, 64, 64, False)])
def test_gpu_key_search_on_gpu(rng, case):
    T, H, D, n, R, C, P, M, additive = case
    args = list(_search_inputs(rng, T, H, D, n, R, C).values())
    with jax.default_matmul_precision("highest"):  # both compute the key scores with an XLA einsum
        want = key_search.search(*args, P, M, additive)
        got = ks_kernel.search(*args, P, M, additive, "gpu", False)
    assert_same_winners(got, want)
