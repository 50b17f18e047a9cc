import jax.numpy as jnp
import numpy as np
import pytest

from ultramem_jax import MemoryConfig, UltraMemLayer, ive
from ultramem_jax.sharding import build_context
from flax import nnx


def test_gather_pool_weights_each_slice_by_its_own_core(rng):
    """MCS: slice c of every selected row is weighted by core c's score; blocks pool separately."""
    N, D, T, K, C, E = 50, 12, 7, 9, 3, 4
    values = rng.standard_normal((N, D)).astype(np.float32)
    rows = rng.integers(0, N, (T, K))
    blocks = rng.integers(0, E, (T, K))
    scores = rng.standard_normal((T, K, C)).astype(np.float32)
    got = np.asarray(ive.gather_pool(jnp.asarray(values), jnp.asarray(rows), jnp.asarray(blocks),
                                     jnp.asarray(scores), E))
    want = np.zeros((T, E, D), np.float32)
    w = D // C
    for t in range(T):
        for k in range(K):
            for c in range(C):
                want[t, blocks[t, k], c * w:(c + 1) * w] += scores[t, k, c] * values[rows[t, k], c * w:(c + 1) * w]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_permutation_is_a_bijection_onto_blocks_and_rows():
    N, E = 36, 4
    perm = ive.make_permutation(3, E * N)
    blocks, rows = ive.virtual_to_physical(jnp.arange(E * N), jnp.asarray(perm), N)
    pairs = set(zip(np.asarray(blocks).tolist(), np.asarray(rows).tolist()))
    assert len(pairs) == E * N and all(0 <= b < E and 0 <= r < N for b, r in pairs)


def _layer(cfg, d_model=32, seed=0):
    with build_context():
        return UltraMemLayer(cfg, d_model, num_layers=2, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("cores,expansion", [(1, 4), (2, 4), (2, 9)])
def test_ive_equals_materialised_virtual_table(rng, cores, expansion):
    """Pool-then-project equals a weighted sum over the E·N-row table Ṽ = [V W_1; ...; V W_E] (per MCS slice)."""
    cfg = MemoryConfig(num_keys=6, key_dim=8, value_dim=8, topk=5, heads=2, cores=cores, expansion=expansion,
                       score_activation="identity", seed=int(rng.integers(1 << 30)))
    layer = _layer(cfg, seed=int(rng.integers(1 << 30)))
    # fresh random parameters so nothing relies on init scales
    layer.values[...] = jnp.asarray(rng.standard_normal(layer.values[...].shape), jnp.float32)
    layer.out_proj[...] = jnp.asarray(rng.standard_normal(layer.out_proj[...].shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    out, _ = layer(x)
    scores_TxHxMxC, slots_TxHxM = layer.retrieve(x.reshape(10, 32))
    N, Dv, C = cfg.num_values, 8, cores
    want = np.zeros((10, 32), np.float32)
    for c in range(C):
        mask = np.zeros(Dv, np.float32)
        mask[c * Dv // C:(c + 1) * Dv // C] = 1
        table = np.asarray(ive.materialised_virtual_table(layer.values[...] * mask, layer.out_proj[...],
                                                          layer.permutation[...], N))
        assert table.shape == (expansion * N, 32)
        want += np.einsum("thm,thmo->to", np.asarray(scores_TxHxMxC)[..., c], table[np.asarray(slots_TxHxM)])
    np.testing.assert_allclose(np.asarray(out).reshape(10, 32), want, rtol=1e-4, atol=1e-4)
