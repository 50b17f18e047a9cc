"""Memory-layer statistics a run can log: row reads over a window, selected scores, core spectra.

Memory health, per layer, is what tells whether a memory helps, idles or drowns the stream:
  out_rms / resid_rms   the memory output's RMS next to the residual stream's where it is added
  top1_score, topm_score   the mean selection score of the best and of all m winners
  usage, usage_entropy  the fraction of value rows read over the log window, and the entropy of the reads
                        over rows divided by log N (1: reads spread evenly over every row)
The value-table gradient norm next to the rest's comes from the train step (training.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ultramem_jax import tdqkr


def row_counts(rows_TxK: jax.Array, num_values: int) -> jax.Array:
    """int32 N-vector: how many times this batch read each physical value row (device side, summed up)."""
    return jnp.zeros((num_values,), jnp.int32).at[rows_TxK.reshape(-1)].add(1)


def usage_stats(counts_N) -> tuple[float, float]:
    """(fraction of rows read at least once, entropy of the reads over rows / log N) of a count vector."""
    counts = np.asarray(counts_N, np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).mean()), float(-(p * np.log(p)).sum() / np.log(len(counts)))


def memory_health(mem_info: list[dict]) -> dict:
    """Per-layer device-side health of one forward pass, stacked over memory layers (jittable)."""
    if not mem_info:
        return {}
    out = {"top1_score": jnp.stack([i["top1"] for i in mem_info]),
           "topm_score": jnp.stack([i["topm"] for i in mem_info])}
    if "out_rms" in mem_info[0]:
        out.update(out_rms=jnp.stack([i["out_rms"] for i in mem_info]),
                   resid_rms=jnp.stack([i["resid_rms"] for i in mem_info]))
    return out


def health_line(record: dict, num_layers: int) -> str:
    """The progress line's memory summary, one value per layer: output RMS over the stream's RMS where it is
    added, rows read over the window, and the reads' entropy / log N; then the value and other gradient norms."""
    if not num_layers:
        return ""
    def per_layer(fmt, key, default=float("nan")):
        return ",".join(fmt(record.get(f"mem{k}/{key}", default)) for k in range(num_layers))
    ratios = {k: record.get(f"mem{k}/out_rms", float("nan")) / max(record.get(f"mem{k}/resid_rms", 1.0), 1e-12)
              for k in range(num_layers)}
    line = (" | memory out/stream " + ",".join(f"{ratios[k]:.2f}" for k in range(num_layers)) +
            " used " + per_layer(lambda v: f"{v:.0%}", "usage", 0.0) +
            " H " + per_layer(lambda v: f"{v:.2f}", "usage_entropy", 0.0))
    if "grad_norm_values" in record:
        line += f" | |g| values {record['grad_norm_values']:.2f} rest {record['grad_norm_other']:.2f}"
    return line


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
