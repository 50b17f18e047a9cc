"""Processes and devices: fake CPU devices for trying layouts, and ``jax.distributed`` for multi-process runs.

A multi-process run starts the same command once per process.  On a TPU slice, a SLURM job or Open MPI the
coordinator and process ids come from the environment.  Elsewhere (several processes on one machine, or
hosts you start yourself) set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` in each process's environment; on CPU the processes' collectives go over gloo (TCP).
"""
from __future__ import annotations

import os

import jax

from ultramem_jax.errors import UsageError

CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE")


def _env_int(name: str, lo: int, hi: int) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise UsageError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def configure_cpu_devices() -> None:
    """``ULTRAMEM_CPU_DEVICES=8``: this process gets 8 fake CPU devices (call before the first jax computation)."""
    n = _env_int("ULTRAMEM_CPU_DEVICES", 1, 4096)
    if n is not None:
        jax.config.update("jax_num_cpu_devices", n)


def initialize(mode: str) -> None:
    """``mode``: on | off | auto (on when a cluster environment is present)."""
    if mode == "off" or (mode == "auto" and not any(v in os.environ for v in CLUSTER_ENV)):
        return
    num = _env_int("JAX_NUM_PROCESSES", 1, 1 << 20)
    pid = _env_int("JAX_PROCESS_ID", 0, 1 << 20)
    if num is not None and pid is not None and pid >= num:
        raise UsageError(f"JAX_PROCESS_ID={pid} must be below JAX_NUM_PROCESSES={num}")
    from ultramem_jax.quiet import drop_stdout_lines
    drop_stdout_lines()  # gloo's per-communicator connection lines (CPU collectives; harmless elsewhere)
    try:
        jax.distributed.initialize(num_processes=num, process_id=pid)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"jax.distributed.initialize failed: {(str(e).splitlines() or [''])[0][:200]} (set "
                         "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or distributed=off)") from None
