"""Keeps jax from probing for a TPU on hosts that have libtpu installed but no TPU.

The ``dev`` extra installs libtpu so that the tests can compile the TPU kernels on a CPU host.  On such a host
jax's TPU plugin still tries to start and prints a screenful of libtpu warnings before falling back.  Call
``skip_absent_tpu()`` after ``import jax`` and before the first jax computation.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax


def _tpu_host() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or "TPU_WORKER_HOSTNAMES" in os.environ


def skip_absent_tpu() -> None:
    """CPU only, where libtpu is installed, the host has no TPU, jax has no CUDA plugin and JAX_PLATFORMS is
    unset."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _tpu_host():
        return
    if any(importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        return  # a GPU host: leave the choice to jax
    jax.config.update("jax_platforms", "cpu")
