"""A lower bound on a training step's memory per device, checked before anything is built.

Sizes that cannot fit (``seq_len=1000000``, a batch of millions) would otherwise fail minutes later inside
XLA with a screen of allocator output.  The bound counts only what must exist at once: parameters, gradients
and the two AdamW moments (float32, spread over every device at best), and the activations of one step spread
over the devices that split the batch: the float32 logits, and one layer's attention weights (the XLA
attention materialises batch × heads × seq_len² of them; a fused GPU kernel in bfloat16 does not).
So a refused run could not have run; a run that passes may still be too big.
"""
from __future__ import annotations

import os

import jax

from ultramem_jax.errors import UsageError
from ultramem_jax.params import param_counts


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def lower_bound_bytes(cfg, per_dev_batch: int, n_devices: int, platform: str) -> dict[str, float]:
    m = cfg.model
    out = {"parameters, gradients and optimizer state": 16.0 * param_counts(m)["total"] / n_devices,
           "logits": 4.0 * per_dev_batch * cfg.seq_len * m.vocab_size}
    if not (platform == "gpu" and m.dtype == "bfloat16"):
        out["attention weights of one layer"] = 4.0 * per_dev_batch * m.num_heads * float(cfg.seq_len) ** 2
    return out


def available_bytes(devices) -> tuple[float, str] | None:
    """(bytes, what) per device: the accelerator's allocator limit, or the host's RAM shared by its CPU devices."""
    local = [d for d in devices if d.process_index == jax.process_index()] or list(jax.local_devices())
    try:
        stats = local[0].memory_stats()
    except Exception:  # not every backend reports it
        stats = None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{local[0].device_kind} memory"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return ram / len(local), f"host RAM shared by {len(local)} CPU device(s)"


def check_fits(cfg, data_sharding) -> None:
    """Raises UsageError when the lower bound exceeds what a device has (``data_sharding``: the batch's)."""
    devices = list(data_sharding.mesh.devices.flat)
    avail = available_bytes(devices)
    if avail is None:
        return
    per_dev_batch = data_sharding.shard_shape((cfg.batch_size, 1))[0]
    parts = lower_bound_bytes(cfg, per_dev_batch, len(devices), devices[0].platform)
    need = sum(parts.values())
    if need > avail[0]:
        top = max(parts, key=parts.get)
        raise UsageError(f"seq_len={cfg.seq_len}, batch_size={cfg.batch_size} and this model need at least "
                         f"{_gib(need)} per device ({top}: {_gib(parts[top])}), more than the {_gib(avail[0])} of "
                         f"{avail[1]}; lower seq_len or batch_size, or use more devices")
