"""topk.top_k_ids against lax.top_k (the oracle): the same ids, in the same order, ties and signed zeros too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultramem_jax import topk


@pytest.mark.parametrize("shape,k", [((130, 2, 576), 16), ((13, 2, 40), 12), ((11, 3, 37), 30), ((9, 130), 1),
                                     ((5, 7), 7), ((3, 700), 64)])
def test_network_equals_lax_top_k(rng, shape, k):
    n = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32).reshape(-1, n)
    x[0, : n // 2] = 1.5  # a run of exact ties
    x[1, ::3] = -np.inf
    x[2] = np.where(np.arange(n) % 2, -0.0, 0.0)  # -0 sorts below +0, as in lax.top_k
    if x.shape[0] > 3:
        x[3] = rng.integers(-2, 3, n)  # few distinct values: ties everywhere
    x = jnp.asarray(x.reshape(shape))
    want = jax.lax.top_k(x, k)[1]
    fn = jax.jit(lambda x: topk.top_k_ids(x, k)).lower(x).compile()
    # on CPU the network runs, not XLA's TopK, from NETWORK_MIN_SCORES scores on; below, lax.top_k itself
    hlo = fn.as_text()
    assert ("TopK" in hlo or " sort(" in hlo) == (x.size < topk.NETWORK_MIN_SCORES)  # XLA sorts when k = N
    np.testing.assert_array_equal(fn(x), want)
    np.testing.assert_array_equal(jax.jit(lambda x: topk.network_top_k_ids(x, k))(x), want)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        topk.network_top_k_ids(jnp.zeros((4, 5)), 6)


def test_lanes_top_k_ids_takes_columns(rng):
    """The lane-major entry point: problems on the last axis, candidates on the first, ties to the lower id."""
    x = rng.standard_normal((70, 9)).astype(np.float32)
    x[:20, 0] = 0.5  # tied candidates in one lane
    want = jax.lax.top_k(jnp.asarray(x.T), 10)[1]
    np.testing.assert_array_equal(jax.jit(lambda x: topk.lanes_top_k_ids(x, 10))(jnp.asarray(x)).T, want)
    with pytest.raises(ValueError, match="k must be"):
        topk.lanes_top_k_ids(jnp.zeros((4, 5)), 5)
