import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.stats import core_spectra, health_line, memory_health, row_counts, usage_stats


def test_health_scores_and_core_spectra():
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                      memory=MemoryConfig(num_keys=4, topk=2), memory_placement="0:1")
    model = create_model(cfg)
    _, aux = model(jnp.zeros((1, 4), jnp.int32))
    health = memory_health(aux["memory"])
    assert health["top1_score"][0] >= health["topm_score"][0]  # winners come best first
    spectra = core_spectra(model)
    lam = np.linalg.svd(np.asarray(model.memories[0].cores[...]).sum(0), compute_uv=False).mean(0)
    np.testing.assert_allclose([spectra["mem0/core_sv1"], spectra["mem0/core_sv2"]], lam, rtol=1e-5)


def test_row_counts_and_usage_entropy_against_numpy(rng):
    N = int(rng.integers(20, 200))
    rows = rng.integers(0, N, (int(rng.integers(1, 50)), 7))
    counts = np.asarray(row_counts(jnp.asarray(rows), N))
    np.testing.assert_array_equal(counts, np.bincount(rows.ravel(), minlength=N))
    used, entropy = usage_stats(counts)
    p = np.bincount(rows.ravel(), minlength=N) / rows.size
    assert used == (p > 0).mean()
    assert entropy == pytest.approx(-sum(x * np.log(x) for x in p if x > 0) / np.log(N), rel=1e-9)
    assert usage_stats(np.ones(N))[1] == pytest.approx(1.0)  # reads spread evenly over every row
    assert usage_stats(np.eye(1, N)[0] * 5)[1] == 0.0  # all reads on one row


def test_memory_health_in_the_model_matches_its_output_and_stream(rng):
    """out_rms is the RMS of what the memory adds to the stream, resid_rms the stream's before the add."""
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=2,
                      memory=MemoryConfig(num_keys=4, topk=2), memory_placement="0:1")
    seed = int(rng.integers(1 << 20))
    tokens = jnp.asarray(rng.integers(0, 32, (2, 6)))
    model = create_model(cfg, seed=seed)
    _, aux = model(tokens, return_hidden=True)
    silent = create_model(dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, output_scale=0.0)),
                          seed=seed)
    _, aux0 = silent(tokens, return_hidden=True)
    added = np.asarray(aux["hidden"][1]) - np.asarray(aux0["hidden"][1])
    stream = np.asarray(aux0["hidden"][1])
    info = aux["memory"][0]
    np.testing.assert_allclose(float(info["out_rms"]), np.sqrt((added ** 2).mean()), rtol=1e-4)
    np.testing.assert_allclose(float(info["resid_rms"]), np.sqrt((stream ** 2).mean()), rtol=1e-5)
    line = health_line({"mem0/out_rms": 2.0, "mem0/resid_rms": 4.0, "mem0/usage": 0.5, "mem0/usage_entropy": 0.9,
                        "grad_norm_values": 0.1, "grad_norm_other": 0.3}, 1)
    assert "out/stream 0.50" in line and "used 50%" in line and "values 0.10 rest 0.30" in line
