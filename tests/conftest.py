import os

# Compiling, not running, is most of the suite's time on 2 cores: the tests' programs are tiny, so LLVM's
# optimisation passes cost far more than they save (-30 % CPU on the sharding tests). Subprocesses inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# 8 fake CPU devices for the sharding tests; must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# CPU unless asked otherwise (ULTRAMEM_TEST_ACCELERATOR=1 pytest -m gpu_only); also keeps an installed libtpu
# (used only to compile kernels for TPU topologies) from probing for a TPU.
if not os.environ.get("ULTRAMEM_TEST_ACCELERATOR"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests only compile for TPU topologies, so they need not own libtpu's single-process lockfile: without this,
# any other jax process on the machine that loaded libtpu fails every TPU compile test.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _share_compilations_within_the_session():
    """One XLA compilation cache for this test session: its workers and every `train.py` subprocess compile the
    same tiny models again and again, and compiling is most of their time on 2 cores. Made by the first process
    (the controller under xdist; workers and subprocesses inherit the variable) and removed when that one exits.
    A cache the user set is left alone."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import atexit
    import shutil
    import tempfile
    cache = tempfile.mkdtemp(prefix="ultramem-test-xla-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)


_share_compilations_within_the_session()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    """A fresh, reported seed per test: different inputs every run, reproducible from the failure line."""
    seed = int.from_bytes(os.urandom(4), "little") if "ULTRAMEM_TEST_SEED" not in os.environ \
        else int(os.environ["ULTRAMEM_TEST_SEED"])
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (rerun with ULTRAMEM_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def assert_same_winners(got, want, atol=1e-4, rtol=1e-4, skip=None):
    """Two searches' ``(scores, slots)``, shared by the Pallas and the C++ kernels' tests. Per token and head the
    winners' totals (Σ over cores), sorted, are equal; where the reference ``want`` had no near-tie, the slot ids
    and per-core scores are equal too. A near-tie: neighbouring totals closer than the scores' own tolerance,
    atol + rtol·|total| (f32 sum order decides their order, and large scores round coarsely). ``skip``: a
    token × head mask left out entirely (``preselect_ties``: there the two searches may score other candidates)."""
    # Vacuity guards only, set well below the usual shares: on small test grids 9 tokens with one near-tie skip
    # 11% (6% of draws), and a head whose u or t is near zero skips all its tokens (at most 1/3 in 64,000 draws)
    # and leaves up to a quarter of the winners near-tied (a 0.9 bound flaked).
    assert skip is None or np.mean(skip) < 0.5, "too many tokens skipped to compare"
    keep = slice(None) if skip is None else ~np.asarray(skip)
    got, want = [np.asarray(x)[keep] for x in got], [np.asarray(x)[keep] for x in want]
    got_s, want_s = got[0], want[0]
    total = want_s.sum(-1)
    np.testing.assert_allclose(np.sort(got_s.sum(-1), -1), np.sort(total, -1), rtol=rtol,
                               atol=atol * want_s.shape[-1])
    tie = atol + rtol * np.abs(total)
    near = np.abs(np.diff(total, axis=-1)) <= np.maximum(tie[..., 1:], tie[..., :-1])
    clear = np.ones(total.shape, bool)
    clear[..., 1:] &= ~near
    clear[..., :-1] &= ~near
    assert clear.mean() > 0.5, "inputs too tied to compare"
    np.testing.assert_allclose(got_s[clear], want_s[clear], rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.asarray(got[1])[clear], np.asarray(want[1])[clear])


def preselect_ties(query_row, query_col, keys_row, keys_col, u, t, preselect, atol=1e-4, rtol=1e-4):
    """Token × head mask of where either side's pre-selection has a near-tie at its boundary (the P-th and the
    next best key's scores uᵀS closer than atol + rtol·|score|): f32 sum order then decides which key enters, and
    two correct searches may rank different candidates."""
    def side(q_TxHxD, k_HxNxDxR, d_HxR):
        pre_TxHxN = np.einsum("thd,hndr,hr->thn", *(np.asarray(x, np.float64) for x in (q_TxHxD, k_HxNxDxR, d_HxR)))
        if preselect >= pre_TxHxN.shape[-1]:
            return np.zeros(pre_TxHxN.shape[:2], bool)
        edge = -np.sort(-pre_TxHxN, axis=-1)[..., preselect - 1:preselect + 1]
        return np.abs(edge[..., 0] - edge[..., 1]) <= atol + rtol * np.abs(edge[..., 0])
    return side(query_row, keys_row, u) | side(query_col, keys_col, t)


def pytest_collection_modifyitems(session, config, items):
    """Longest first, so that the two xdist workers finish together: the end-to-end tests (`slow`, each one or
    more train.py processes) go before the quick ones, which then fill the gaps; the two-process run, the longest
    single test, goes first of all. Order within each group is kept."""
    def rank(item):
        if item.nodeid.startswith("tests/test_multiprocess.py"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2
    items.sort(key=rank)  # stable
