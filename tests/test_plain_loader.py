"""plain_loader (the training iterator where grain is missing): epochs, host strides and resumption, checked
against windows that name themselves."""
import numpy as np
import pytest

from ultramem_jax import data, plain_loader


def _source(rng, seq_len=4):
    """Windows whose first token is their index times seq_len: a batch says which windows it holds."""
    n = int(rng.integers(20, 40))
    return data.WindowSource(data.ArrayStream(np.arange(n * seq_len + 1, dtype=np.int32)), seq_len), seq_len


def _ids(batch, seq_len):
    return (batch[:, 0] // seq_len).tolist()


def test_every_epoch_holds_every_window_once_and_epochs_differ(rng):
    src, s = _source(rng)
    g = int(rng.integers(2, 7))
    it = plain_loader.WindowBatches(src, g, seed=int(rng.integers(1 << 30)))
    stream = sum((_ids(next(it), s) for _ in range(-(-3 * len(src) // g))), [])  # batches may span epochs
    epochs = [stream[e * len(src):(e + 1) * len(src)] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == list(range(len(src)))
    assert epochs[0] != epochs[1]  # reshuffled (equal with probability 1/n!)
    assert next(it).dtype == np.int32 and next(it).shape == (g, s + 1)


def test_hosts_take_strides_of_the_single_host_batches(rng):
    src, s = _source(rng)
    hosts = int(rng.choice([2, 4]))
    g, seed = 4 * hosts, int(rng.integers(1 << 30))
    one = plain_loader.WindowBatches(src, g, seed)
    each = [plain_loader.WindowBatches(src, g, seed, i, hosts) for i in range(hosts)]
    for _ in range(5):
        want = next(one)
        for i, it in enumerate(each):
            np.testing.assert_array_equal(next(it), want[i::hosts])


def test_resumes_exactly_and_a_state_is_only_a_position(rng):
    src, s = _source(rng)
    seed = int(rng.integers(1 << 30))
    it = plain_loader.WindowBatches(src, 3, seed)
    [next(it) for _ in range(int(rng.integers(1, 30)))]
    state = it.get_state()
    want = [next(it) for _ in range(12)]
    again = plain_loader.WindowBatches(src, 3, seed)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again), w)
    # as Grain's: another seed (resume_override=seed) continues from the same position in its own order
    other = plain_loader.WindowBatches(src, 3, seed + 1)
    other.set_state(state)
    assert other.get_state() == state
    fresh = plain_loader.WindowBatches(src, 3, seed + 1)
    [next(fresh) for _ in range(len(want) + state["pos"] // 3 - 12)]
    np.testing.assert_array_equal(next(other), next(fresh))
    with pytest.raises(ValueError, match="not a plain iterator state"):
        other.set_state({"last_seen_indices": {"0": 5}})  # a Grain state
