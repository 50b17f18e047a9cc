import jax.numpy as jnp
import numpy as np

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.stats import SlotUsage, core_spectra, rows_hit, score_stats


def test_slot_usage_over_a_window(rng):
    N = 100
    usage = SlotUsage(num_layers=2, num_values=N)
    seen = [set(), set()]
    for _ in range(3):
        batch = [rng.integers(0, N, (4, 5)) for _ in range(2)]
        usage.update([rows_hit(jnp.asarray(b), N) for b in batch])
        for s, b in zip(seen, batch):
            s.update(b.ravel().tolist())
    assert usage.fractions() == [len(s) / N for s in seen]
    assert usage.fractions() == [0.0, 0.0]  # the window was reset


def test_score_stats_and_core_spectra():
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                      memory=MemoryConfig(num_keys=4, topk=2), memory_placement="0:1")
    model = create_model(cfg)
    _, aux = model(jnp.zeros((1, 4), jnp.int32))
    stats = score_stats(aux["memory"])
    assert stats["mem0/top1_score"] >= stats["mem0/topm_score"]  # winners come best first
    spectra = core_spectra(model)
    lam = np.linalg.svd(np.asarray(model.memories[0].cores[...]).sum(0), compute_uv=False).mean(0)
    np.testing.assert_allclose([spectra["mem0/core_sv1"], spectra["mem0/core_sv2"]], lam, rtol=1e-5)
