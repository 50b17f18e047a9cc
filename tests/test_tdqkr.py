import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultramem_jax import tdqkr
from ultramem_jax.product_keys import product_key_topk


def _no_tie_tokens(grid_TxHxNN, m):
    """Tokens whose m-th and (m+1)-th best grid scores are clearly apart (ties excluded)."""
    s = -np.sort(-grid_TxHxNN, axis=-1)
    return np.all(s[..., m - 1] - s[..., m] > 1e-5, axis=-1)


@pytest.mark.parametrize("trial", range(4))
def test_rank1_core_selects_brute_force_topm(rng, trial):
    """With a rank-1 core (and non-negative row/col scores), the rank-1 pre-selection loses nothing."""
    T, H, R, N, C, m = 24, 2, 2, 40, 2, 12
    s_row = jnp.asarray(rng.uniform(0.0, 1.0, (T, H, R, N)), jnp.float32)
    s_col = jnp.asarray(rng.uniform(0.0, 1.0, (T, H, R, N)), jnp.float32)
    u, t = rng.uniform(0.1, 1.0, (H, R)), rng.uniform(0.1, 1.0, (H, R))
    weights = rng.uniform(0.2, 1.0, (C, H))  # every core is a positive multiple of the same u tᵀ
    cores = jnp.asarray(np.einsum("ch,ha,hb->chab", weights, u, t), jnp.float32)
    u0, t0 = tdqkr.initial_tucker_vectors(H, R)
    uu, tt = tdqkr.refresh_tucker_vectors(cores, u0, t0)
    scores, slots = tdqkr.tdqkr_topk(s_row, s_col, cores, uu, tt, preselect=m, topk=m)
    best, best_slots = tdqkr.brute_force_grid_topk(s_row, s_col, cores, m)
    grid = np.einsum("thai,chab,thbj->thij", s_row, cores, s_col).reshape(T, H, N * N)
    ok = _no_tie_tokens(grid, m)
    assert ok.sum() > T // 2  # the check must actually cover tokens
    np.testing.assert_array_equal(np.asarray(slots)[ok], np.asarray(best_slots)[ok])
    np.testing.assert_allclose(np.asarray(scores.sum(-1))[ok], np.asarray(best)[ok], rtol=1e-5, atol=1e-6)


def test_full_preselection_equals_brute_force_for_any_core(rng):
    """Keeping every row/col in the pre-selection makes TDQKR exact for signed, full-rank cores too."""
    T, H, R, N, C, m = 16, 2, 3, 12, 2, 10
    s_row = jnp.asarray(rng.standard_normal((T, H, R, N)), jnp.float32)
    s_col = jnp.asarray(rng.standard_normal((T, H, R, N)), jnp.float32)
    cores = jnp.asarray(rng.standard_normal((C, H, R, R)), jnp.float32)
    u, t = tdqkr.refresh_tucker_vectors(cores, *tdqkr.initial_tucker_vectors(H, R))
    scores, slots = tdqkr.tdqkr_topk(s_row, s_col, cores, u, t, preselect=N, topk=m)
    best, best_slots = tdqkr.brute_force_grid_topk(s_row, s_col, cores, m)
    grid = np.einsum("thai,chab,thbj->thij", s_row, cores, s_col).reshape(T, H, N * N)
    ok = _no_tie_tokens(grid, m)
    np.testing.assert_array_equal(np.asarray(slots)[ok], np.asarray(best_slots)[ok])
    np.testing.assert_allclose(np.asarray(scores.sum(-1)), np.asarray(best), rtol=1e-5, atol=1e-5)


def test_mcs_scores_are_each_cores_own_grid_score(rng):
    T, H, R, N, C, m = 8, 2, 2, 10, 3, 6
    s_row = jnp.asarray(rng.standard_normal((T, H, R, N)), jnp.float32)
    s_col = jnp.asarray(rng.standard_normal((T, H, R, N)), jnp.float32)
    cores = jnp.asarray(rng.standard_normal((C, H, R, R)), jnp.float32)
    u, t = tdqkr.refresh_tucker_vectors(cores, *tdqkr.initial_tucker_vectors(H, R))
    scores, slots = tdqkr.tdqkr_topk(s_row, s_col, cores, u, t, preselect=5, topk=m)
    i, j = np.asarray(slots) // N, np.asarray(slots) % N
    for tok in range(T):
        for h in range(H):
            for k in range(m):
                for c in range(C):
                    want = np.asarray(s_row)[tok, h, :, i[tok, h, k]] @ np.asarray(cores)[c, h] \
                        @ np.asarray(s_col)[tok, h, :, j[tok, h, k]]
                    assert abs(float(scores[tok, h, k, c]) - want) < 1e-4
    # winners come best first by the summed score
    assert np.all(np.diff(np.asarray(scores.sum(-1)), axis=-1) <= 1e-6)


def test_refresh_is_leading_singular_pair_and_sign_continuous(rng):
    H, R = 3, 2
    cores = jnp.asarray(rng.standard_normal((2, H, R, R)), jnp.float32)
    u, t = tdqkr.refresh_tucker_vectors(cores, *tdqkr.initial_tucker_vectors(H, R))
    c_sum = np.asarray(cores).sum(0)
    for h in range(H):
        U, S, Vt = np.linalg.svd(c_sum[h])
        np.testing.assert_allclose(np.outer(u[h], t[h]) * S[0], np.outer(U[:, 0], Vt[0]) * S[0], atol=1e-5)
    # keeps the orientation closest to the previous one
    u2, t2 = tdqkr.refresh_tucker_vectors(cores, -u, -t)
    np.testing.assert_allclose(u2, -u, atol=1e-6)
    np.testing.assert_allclose(t2, -t, atol=1e-6)
    u3, t3 = tdqkr.refresh_tucker_vectors(cores, u, t)
    np.testing.assert_allclose(u3, u, atol=1e-6)
    # a positive core starts all-positive (Perron), so the pre-selection picks the largest scores
    pos = jnp.asarray(rng.uniform(0.1, 1.0, (1, H, R, R)), jnp.float32)
    up, tp = tdqkr.refresh_tucker_vectors(pos, *tdqkr.initial_tucker_vectors(H, R))
    assert np.all(np.asarray(up) > 0) and np.all(np.asarray(tp) > 0)


def test_aux_loss_matches_numpy_and_has_gradient(rng):
    alpha, tau = 1e-3, 0.15
    # Per head, the summed core has singular values (2, s2) with s2 > tau, split at random over C=2 cores.
    rotations = np.linalg.qr(rng.standard_normal((2, 2, 2, 2)))[0]  # (head, left|right, 2, 2)
    s2 = rng.uniform(0.3, 1.0, 2)
    core_sum = np.einsum("hab,hb,hcb->hac", rotations[:, 0], np.stack([np.full(2, 2.0), s2], -1), rotations[:, 1])
    noise = rng.standard_normal((2, 2, 2))
    cores = jnp.asarray(np.stack([core_sum - noise, noise]), jnp.float32)
    lam = np.linalg.svd(np.asarray(cores).sum(0), compute_uv=False)
    want_per_head = np.maximum(lam[:, 1] - tau, 0) ** 2
    np.testing.assert_allclose(lam[:, 1], s2, rtol=1e-5)
    np.testing.assert_allclose(tdqkr.tucker_aux_loss(cores, alpha, tau, "paper"), alpha * want_per_head.sum(),
                               rtol=1e-4)
    np.testing.assert_allclose(tdqkr.tucker_aux_loss(cores, alpha, tau, "code"), alpha * want_per_head.mean(),
                               rtol=1e-4)
    g = jax.grad(lambda c: tdqkr.tucker_aux_loss(c, alpha, tau))(cores)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    # a rank-1 core is not penalised
    u = rng.standard_normal((2, 2))
    rank1 = jnp.asarray(np.einsum("ha,hb->hab", u, u)[None], jnp.float32)
    assert float(tdqkr.tucker_aux_loss(rank1, alpha, tau)) == 0.0


def test_product_key_topk_is_exact(rng):
    T, H, N, m = 10, 3, 30, 8
    s_row = jnp.asarray(rng.standard_normal((T, H, N)), jnp.float32)
    s_col = jnp.asarray(rng.standard_normal((T, H, N)), jnp.float32)
    scores, slots = product_key_topk(s_row, s_col, preselect=m, topk=m)
    grid = (np.asarray(s_row)[..., :, None] + np.asarray(s_col)[..., None, :]).reshape(T, H, N * N)
    best, best_slots = jax.lax.top_k(grid, m)
    ok = _no_tie_tokens(grid, m)
    np.testing.assert_array_equal(np.asarray(slots)[ok], np.asarray(best_slots)[ok])
    np.testing.assert_allclose(scores, best, rtol=1e-6)
