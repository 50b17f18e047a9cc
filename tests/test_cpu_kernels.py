"""The C++ CPU kernels (cpu_kernels/) against their XLA reference ops, through the layer, and the build's failure
paths. Inside the sharded lookup's shard_map: tests/test_kernels.py (test_kernels_inside_shard_map_...)."""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_winners, preselect_ties
from flax import nnx

from cpu_kernels import build
from cpu_kernels import gather_pool as native_pool
from cpu_kernels import key_search as native_search
from ultramem_jax import MemoryConfig, ive, kernels, key_search
from ultramem_jax.memory import memory_layer
from ultramem_jax.sharding import build_context

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None,
                                reason=f"native kernels unavailable: {build.unavailable_reason()}")


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _close(got, want, rtol=1e-5):
    """f32 sums in another order than XLA's: the error scales with the largest entry, not each entry's own."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * (1 + float(np.abs(want).max())))


# T, K, N, D, E, C: D / C odd-sized slices, one block, one core, rows shared between tokens
@pytest.mark.parametrize("shape", [(13, 20, 300, 96, 4, 2), (5, 7, 50, 100, 9, 4), (16, 32, 8, 6, 1, 1),
                                   (3, 5, 1000, 24, 2, 3)])
def test_gather_pool_matches_reference(rng, shape):
    T, K, N, D, E, C = shape
    rows = rng.integers(0, N, (T, K))
    rows[0, 1] = rows[0, 0]  # a row read twice by one token: the backward must add, not overwrite
    rows, blocks = jnp.asarray(rows, jnp.int32), jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    values, scores, g = _normal(rng, N, D), _normal(rng, T, K, C), _normal(rng, T, E, D)
    loss = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda v, s: jnp.sum(f(v, rows, blocks, s, E) * g), (0, 1)))
    want, want_g = loss(ive.gather_pool)(values, scores)
    got, got_g = loss(native_pool.gather_pool)(values, scores)
    _close(got, want)
    for a, b in zip(got_g, want_g):
        _close(a, b)
    untouched = np.setdiff1d(np.arange(N), np.asarray(rows))
    assert np.all(np.asarray(got_g[0])[untouched] == 0)  # only selected rows receive gradient


SEARCH_CASES = [  # T, H, D, n, R, C, preselect, topk
    (13, 2, 24, 40, 2, 2, 12, 20),
    (9, 1, 16, 130, 3, 3, 16, 16),
    (30, 3, 7, 11, 1, 1, 5, 9),
]


def _search_inputs(rng, T, H, D, n, R, C):
    return (_normal(rng, T, H, D), _normal(rng, T, H, D), _normal(rng, H, n, D, R), _normal(rng, H, n, D, R),
            jnp.asarray(rng.uniform(-0.2, 1, (C, H, R, R)), jnp.float32), _normal(rng, H, R), _normal(rng, H, R))


@pytest.mark.parametrize("case", SEARCH_CASES)
def test_rescore_matches_reference(rng, case):
    """Random slots (repeats within a token included), so every key and core entry's gradient is exercised."""
    T, H, D, n, R, C, _, M = case
    q_row, q_col, k_row, k_col, cores, _, _ = _search_inputs(rng, T, H, D, n, R, C)
    slots = rng.integers(0, n * n, (T, H, M))
    slots[0, 0, 1] = slots[0, 0, 0]
    slots = jnp.asarray(slots, jnp.int32)
    g = _normal(rng, T, H, M, C)
    loss = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda *a: jnp.sum(f(*a, slots) * g), (0, 1, 2, 3, 4)))
    want, want_g = loss(key_search.rescore)(q_row, q_col, k_row, k_col, cores)
    got, got_g = loss(native_search.rescore)(q_row, q_col, k_row, k_col, cores)
    _close(got, want)
    for a, b in zip(got_g, want_g):
        _close(a, b, 1e-4)


@pytest.mark.parametrize("additive", [False, True], ids=["tdqkr", "additive"])
@pytest.mark.parametrize("case", SEARCH_CASES + [(40, 2, 16, 408, 2, 2, 32, 16)])  # the last: tiny-x12's
def test_search_matches_reference(rng, case, additive):
    T, H, D, n, R, C, P, M = case
    if additive:
        R = C = 1
    args = _search_inputs(rng, T, H, D, n, R, C)
    want = jax.jit(lambda *a: key_search.search(*a, P, M, additive))(*args)
    got = jax.jit(lambda *a: native_search.search(*a, P, M, additive))(*args)
    q_row, q_col, k_row, k_col, _, u, t = args
    ones = np.ones((H, 1))
    ties = preselect_ties(q_row, q_col, k_row, k_col, ones if additive else u, ones if additive else t, P)
    assert_same_winners(got, want, skip=ties)
    total = np.asarray(got[0]).sum(-1)  # best first, up to the rounding of the two ways the kernel sums the cores
    assert np.all(np.diff(total, axis=-1) <= 1e-5 + 1e-6 * np.abs(total[..., 1:]))


def test_full_preselection_is_brute_force_top_m(rng):
    """Pre-selecting every key makes TDQKR exact for signed full-rank cores: the native search must then
    return the true top-m of the whole grid, an oracle independent of the reference's pre-selection."""
    from ultramem_jax import tdqkr
    T, H, D, n, R, C, M = 10, 2, 16, 20, 3, 2, 16
    q_row, q_col, k_row, k_col, cores, u, t = _search_inputs(rng, T, H, D, n, R, C)
    scores, slots = native_search.search(q_row, q_col, k_row, k_col, cores, u, t, n, M)
    best, best_slots = tdqkr.brute_force_grid_topk(tdqkr.rank_key_scores(q_row, k_row),
                                                   tdqkr.rank_key_scores(q_col, k_col), cores, M)
    assert_same_winners((scores.sum(-1, keepdims=True), slots), (best[..., None], best_slots))


def test_select_breaks_ties_to_the_lower_id(rng):
    """Equal scores everywhere (zero queries): lax.top_k's order, the lowest slot ids in order."""
    T, H, D, n, R, C, P, M = 3, 2, 8, 12, 2, 2, 5, 7
    _, _, k_row, k_col, cores, u, t = _search_inputs(rng, T, H, D, n, R, C)
    zeros = jnp.zeros((T, H, D), jnp.float32)
    got = native_search.select(zeros, zeros, k_row, k_col, cores, u, t, P, M)
    want = key_search.select(zeros, zeros, k_row, k_col, cores, u, t, P, M)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[0, 0], [0, 1, 2, 3, 4, n, n + 1])  # rows 0, 1 x cols 0..4 in flat order


def test_select_with_nan_scores_returns_slots_in_range(rng):
    T, H, D, n, R, C, P, M = 4, 1, 8, 10, 2, 2, 4, 6
    q_row, q_col, k_row, k_col, cores, u, t = _search_inputs(rng, T, H, D, n, R, C)
    q_row = q_row.at[1].set(jnp.nan)
    slots = np.asarray(native_search.select(q_row, q_col, k_row, k_col, cores, u, t, P, M))
    assert slots.min() >= 0 and slots.max() < n * n
    assert all(len(set(row)) == M for row in slots.reshape(-1, M))  # distinct winners, NaN token included


def test_results_do_not_depend_on_the_run(rng):
    """The work is split over threads that claim parts as they come: the results must be bitwise the same."""
    T, K, N, D, E, C = 257, 24, 500, 64, 4, 2
    rows = jnp.asarray(rng.integers(0, 40, (T, K)), jnp.int32)  # few rows: many tokens add into each
    blocks = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    values, scores = _normal(rng, N, D), _normal(rng, T, K, C)
    grad = jax.jit(jax.grad(lambda v, s: jnp.sum(jnp.sin(native_pool.gather_pool(v, rows, blocks, s, E))), (0, 1)))
    q_row, q_col, k_row, k_col, cores, u, t = _search_inputs(rng, T, 2, 16, 30, 2, 2)
    search_grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(native_search.search(*a, u, t, 8, 8)[0])),
                                   (0, 1, 2, 3, 4)))
    first = (grad(values, scores), search_grad(q_row, q_col, k_row, k_col, cores))
    for _ in range(3):
        again = (grad(values, scores), search_grad(q_row, q_col, k_row, k_col, cores))
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(first)):
            np.testing.assert_array_equal(a, b)


# ---- dispatch: the layer, sharded lookups, dtypes --------------------------------------------------------
def test_memory_layer_native_matches_xla(rng):
    """The V1 layer (TDQKR search, IVE gather-pool) with ``kernels: native`` against ``kernels: xla``."""
    cfg = MemoryConfig(num_keys=8, topk=6, expansion=4, heads=2, out_proj_std=None)
    with build_context():
        layers = [memory_layer(dataclasses.replace(cfg, kernels=k), 32, 2, rngs=nnx.Rngs(3)) for k in ("native", "xla")]
    assert [m.impl for m in layers] == ["native", "xla"]
    x, cot = _normal(rng, 2, 7, 32), _normal(rng, 2, 7, 32)

    def run(layer):
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

        def loss(p):
            out, _ = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(out * cot), out
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return step(params), step.lower(params).as_text()

    ((_, out_n), g_n), hlo = run(layers[0])
    ((_, out_x), g_x), _ = run(layers[1])
    assert "ultramem_gather_pool_bwd" in hlo and "ultramem_rescore_bwd" in hlo
    _close(out_n, out_x, 1e-4)
    assert len(jax.tree.leaves(g_n)) == len(jax.tree.leaves(g_x)) > 4
    for a, b in zip(jax.tree.leaves(g_n), jax.tree.leaves(g_x)):
        _close(a, b, 1e-4)


def test_non_float32_inputs_take_the_xla_ops(rng):
    """The kernels are float32 only: bfloat16 tables and scores must take the reference op, not fail."""
    T, K, N, D, E, C = 4, 3, 10, 8, 2, 2
    rows, blocks = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32), jnp.asarray(rng.integers(0, E, (T, K)),
                                                                                   jnp.int32)
    values, scores = _normal(rng, N, D).astype(jnp.bfloat16), _normal(rng, T, K, C).astype(jnp.bfloat16)
    fn = jax.jit(lambda v, s: kernels.gather_pool(v, rows, blocks, s, E, "native"))
    assert "ultramem" not in fn.lower(values, scores).as_text()
    np.testing.assert_array_equal(fn(values, scores), ive.gather_pool(values, rows, blocks, scores, E))


# ---- resolving and building ------------------------------------------------------------------------------
def test_resolve_native_and_auto_on_cpu(monkeypatch, caplog):
    assert kernels.resolve("auto", "cpu") == "native"
    assert kernels.resolve("native", "cpu") == "native"
    with pytest.raises(ValueError, match="native kernels run on CPU only"):
        kernels.resolve("native", "tpu")
    monkeypatch.setattr(kernels, "native_unavailable_reason", lambda: "no C++ compiler: 'c++' is not on PATH")
    kernels._warn_native_unavailable.cache_clear()
    with pytest.raises(ValueError, match="unavailable: no C\\+\\+ compiler"):
        kernels.resolve("native", "cpu")
    with caplog.at_level(logging.WARNING, logger="ultramem_jax.kernels"):
        assert kernels.resolve("auto", "cpu") == "xla"
        assert kernels.resolve("auto", "cpu") == "xla"
    assert [r.getMessage() for r in caplog.records].count(
        "memory.kernels auto: the native CPU kernels are unavailable (no C++ compiler: 'c++' is not on PATH); "
        "using XLA") == 1  # warned once, not per layer


def test_build_failures_name_the_cause_and_leave_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler"):
        build._compiler()
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fake.cc:1:1: error: this compiler only fails' >&2\nexit 3\n")
    broken.chmod(0o755)
    out = tmp_path / "cache" / "lib.so"
    with pytest.raises(build.KernelBuildError, match="exited with 3: fake.cc:1:1: error: this compiler only fails"):
        build._compile(str(broken), out)
    assert [p.name for p in out.parent.iterdir()] == [".lock"]  # no half-written library to load next time


def test_unwritable_cache_is_a_build_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ULTRAMEM_KERNEL_CACHE", str(blocker / "cache"))  # a directory under a file
    build.load.cache_clear()
    try:
        with pytest.raises(build.KernelBuildError, match="cannot build into .*ULTRAMEM_KERNEL_CACHE"):
            build.load()
    finally:
        build.load.cache_clear()


def test_library_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRAMEM_KERNEL_CACHE", str(tmp_path))
    path = build._library_path(build._compiler())
    assert path.parent == tmp_path and path.name.startswith("libultramem_cpu-")
    monkeypatch.setattr(build, "FLAGS", build.FLAGS + ("-DSOMETHING_ELSE",))
    assert build._library_path(build._compiler()) != path
