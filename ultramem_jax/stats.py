"""Memory-layer statistics a run can log: slot usage over a window, selected scores, core spectra."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ultramem_jax import tdqkr


def rows_hit(rows_TxK: jax.Array, num_values: int) -> jax.Array:
    """Boolean N-vector: which physical value rows this batch selected (device side, cheap to OR up)."""
    return jnp.zeros((num_values,), jnp.bool_).at[rows_TxK.reshape(-1)].set(True)


class SlotUsage:
    """Fraction of value rows hit at least once over a window of steps, per memory layer."""

    def __init__(self, num_layers: int, num_values: int):
        self.num_values = num_values
        self._hit = [np.zeros(num_values, bool) for _ in range(num_layers)]

    def update(self, hits_per_layer):
        for acc, hit in zip(self._hit, hits_per_layer):
            acc |= np.asarray(hit)

    def fractions(self, reset: bool = True) -> list[float]:
        out = [float(h.mean()) for h in self._hit]
        if reset:
            for h in self._hit:
                h[:] = False
        return out


def score_stats(mem_info: list[dict]) -> dict[str, float]:
    """Mean top-1 and mean top-m selection score per memory layer."""
    out = {}
    for k, info in enumerate(mem_info):
        out[f"mem{k}/top1_score"] = float(info["top1"])
        out[f"mem{k}/topm_score"] = float(info["topm"])
    return out


def mean_core_singular_values(memories) -> jax.Array | None:
    """(layers, r): singular values of each TDQKR layer's summed Tucker core, averaged over heads (jittable)."""
    tucker = [m for m in memories if m.cfg.retrieval == "tdqkr"]
    if not tucker:
        return None
    return jnp.stack([tdqkr.core_singular_values(m.cores[...]).mean(axis=0) for m in tucker])


def core_spectra(model) -> dict[str, float]:
    """The same, as named floats for logging: ``mem{k}/core_sv{i}``."""
    spectra = mean_core_singular_values(model.memories)
    if spectra is None:
        return {}
    return {f"mem{k}/core_sv{i + 1}": float(v) for k, row in enumerate(np.asarray(spectra)) for i, v in enumerate(row)}
