"""Which implementation runs the memory layers' hot ops: the XLA reference, a Pallas kernel or a C++ CPU kernel.

``memory.kernels`` in the config:
  xla     the reference ops (``key_search.search``, ``ive.gather_pool``, ``xla_pre_value_gather``) everywhere;
  pallas  the Pallas kernels: Mosaic on TPU, Triton on GPU, and the TPU kernels in interpret mode on CPU
          (slow; for testing the kernel path end to end);
  native  the C++ CPU kernels (cpu_kernels/: the search's selection, the winners' rescoring and the gather-pool,
          forward and backward; UltraMemV2's per-rank search and pre-value gather stay XLA's), compiled on first
          use; CPU only;
  auto    the kernels on TPU; on GPU the gather-pool kernel with the XLA search (on an H100 the search kernel
          ran 1.1–1.6× slower than XLA's top_k while the gather-pool kernel took 0.4–0.8× XLA's time,
          docs/kernels.md); on CPU the native kernels where they build (a C++ compiler is on PATH), else XLA
          with one warning.

On GPU the kernels use Pallas' Triton backend, deprecated since jax 0.11: where a jax release no longer has
it, ``auto`` falls back to XLA and ``pallas`` fails with that reason.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ultramem_jax import ive, key_search
from ultramem_jax.gather import take_rows

CHOICES = ("xla", "pallas", "native", "auto")
IMPLS = ("xla", "tpu", "gpu", "gpu_pool", "interpret", "native")  # gpu_pool: only the gather-pool kernel
log = logging.getLogger(__name__)


def triton_available() -> bool:
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def native_unavailable_reason() -> str | None:
    """None when the C++ CPU kernels are built and registered (building them on first call), else why not."""
    from cpu_kernels import build
    return build.unavailable_reason()


@functools.cache
def _warn_native_unavailable(reason: str) -> None:
    """Once per reason, however many layers resolve ``auto``."""
    log.warning("memory.kernels auto: the native CPU kernels are unavailable (%s); using XLA", reason)


def resolve(choice: str, platform: str | None = None) -> str:
    """``kernels`` config value → one of IMPLS for ``platform`` (default: jax's default backend)."""
    if choice not in CHOICES:
        raise ValueError(f"memory.kernels: must be one of {list(CHOICES)}, got {choice!r}")
    platform = platform or jax.default_backend()
    if choice == "xla":
        return "xla"
    if choice == "native" or (choice == "auto" and platform == "cpu"):
        if platform != "cpu":
            raise ValueError(f"memory.kernels: native kernels run on CPU only, not on {platform}; use auto")
        reason = native_unavailable_reason()
        if reason is None:
            return "native"
        if choice == "native":
            raise ValueError(f"memory.kernels: the native CPU kernels are unavailable: {reason}")
        _warn_native_unavailable(reason)
        return "xla"
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        if triton_available():
            return "gpu" if choice == "pallas" else "gpu_pool"
        if choice == "pallas":
            raise ValueError("memory.kernels: pallas on GPU needs jax.experimental.pallas.triton, which this jax "
                             f"({jax.__version__}) does not have; use kernels: xla")
        return "xla"
    return "interpret" if choice == "pallas" else "xla"


def _backend(impl: str) -> tuple[str, bool]:
    return ("gpu", False) if impl in ("gpu", "gpu_pool") else ("tpu", impl == "interpret")


def gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks: int, impl: str = "xla",
                gathered_TxKxD=None):
    """``ive.gather_pool`` by ``impl``.  The TPU kernel DMAs 32-bit rows; other tables take the XLA path, and so
    do rows the caller already read (sparse value updates' tapped read: the kernels' backward builds the dense
    table gradient).  The native kernel takes float32 tables and scores only."""
    if impl == "native" and gathered_TxKxD is None and values_NxD.dtype == scores_TxKxC.dtype == jnp.float32:
        from cpu_kernels import gather_pool as native
        return native.gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks)
    if impl in ("xla", "native") or gathered_TxKxD is not None or (impl in ("tpu", "interpret") and
                                                                    values_NxD.dtype.itemsize != 4):
        return ive.gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks, gathered_TxKxD)
    from pallas_kernels import gather_pool as kernel
    backend, interpret = _backend(impl)
    return kernel.gather_pool(values_NxD, rows_TxK, blocks_TxK, scores_TxKxC, num_blocks, backend, interpret)


def xla_pre_value_gather(pre_values_NxP, values_NxD, rows_TxK, pre_TxP, scores_TxKxC):
    """UltraMemV2's weighted gather (anchors-2026.md §1.3), the reference of ``pallas_kernels.pre_value_gather``:

        g[t, k] = <P[rows[t,k]], pre[t]>
        out[t, c-th slice] = Σ_k g[t,k] · scores[t,k,c] · V[rows[t,k], c-th slice]

    ``pre`` is W_pre x (T × D_p).  Returns T × D_v in the scores' dtype; the gathered rows are cast to it.
    This reference gathers T×K×D_p and T×K×D_v rows; its gradients w.r.t. the tables are scatter-adds.
    """
    T, K, C = scores_TxKxC.shape
    dt = scores_TxKxC.dtype
    pre_rows_TxKxP = take_rows(pre_values_NxP, rows_TxK).astype(dt)
    gate_TxK = jnp.einsum("tkp,tp->tk", pre_rows_TxKxP, pre_TxP.astype(dt))
    rows_TxKxCxd = take_rows(values_NxD, rows_TxK).reshape(T, K, C, -1).astype(dt)
    out_TxCxd = jnp.einsum("tkc,tkcd->tcd", scores_TxKxC * gate_TxK[..., None], rows_TxKxCxd)
    return out_TxCxd.reshape(T, values_NxD.shape[1])


def pre_value_gather(pre_values_NxP, values_NxD, rows_TxK, pre_TxP, scores_TxKxC, impl: str = "xla"):
    """``xla_pre_value_gather`` by ``impl``.  As for ``gather_pool``, the TPU kernel DMAs 32-bit rows only.
    ``gpu_pool`` (``auto`` on GPU) keeps XLA: the GPU kernel has not been timed on a GPU yet."""
    small = impl in ("tpu", "interpret") and min(pre_values_NxP.dtype.itemsize, values_NxD.dtype.itemsize) != 4
    if impl in ("xla", "gpu_pool", "native") or small:
        return xla_pre_value_gather(pre_values_NxP, values_NxD, rows_TxK, pre_TxP, scores_TxKxC)
    from pallas_kernels import pre_value_gather as kernel
    backend, interpret = _backend(impl)
    return kernel.pre_value_gather(pre_values_NxP, values_NxD, rows_TxK, pre_TxP, scores_TxKxC, backend, interpret)


def search(query_row, query_col, keys_row, keys_col, cores, u, t, preselect: int, topk: int, additive: bool,
           impl: str = "xla"):
    """``key_search.search`` by ``impl``.  Per-rank queries (UltraMemV2, T×H×R×D) take the XLA path: the
    search kernel scores one query per side.  The native kernels: float32 queries and keys only."""
    if impl == "native" and query_row.ndim == 3 and all(
            x.dtype == jnp.float32 for x in (query_row, query_col, keys_row, keys_col, *([] if additive else [cores]))):
        from cpu_kernels import key_search as native
        return native.search(query_row, query_col, keys_row, keys_col, cores, u, t, preselect, topk, additive)
    if impl in ("xla", "gpu_pool", "native") or query_row.ndim == 4:
        return key_search.search(query_row, query_col, keys_row, keys_col, cores, u, t, preselect, topk, additive)
    from pallas_kernels import key_search as kernel
    backend, interpret = _backend(impl)
    return kernel.search(query_row, query_col, keys_row, keys_col, cores, u, t, preselect, topk, additive, backend,
                         interpret)
