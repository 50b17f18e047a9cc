"""Compiling the C++ kernels of this package on first use and registering them with XLA's FFI.

The shared library is built once per source, jaxlib and compiler version, into a cache directory
(``ULTRAMEM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ultramem_jax`` or ``~/.cache/ultramem_jax``); concurrent
processes (pytest workers, several hosts' processes on one machine) take a file lock, so one compiles and the
others load its result. Compiler: ``$CXX``, else ``c++``. Nothing is built at install time, so a machine
without a compiler still installs and runs, on the XLA ops.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

try:
    import fcntl
except ImportError:  # not POSIX: no lock, so concurrent first builds may compile twice (the rename stays atomic)
    fcntl = None

HERE = Path(__file__).resolve().parent
SOURCES = ("gather_pool.cc", "rescore.cc", "select.cc")
HEADERS = ("parallel.h",)
# -march=native: the library's cache key holds the CPU's feature flags, so hosts sharing a cache directory
# build their own. Reassociation lets the compiler vectorise the dot products (sums in another order than
# XLA's, as any two backends); no -ffinite-math-only, so NaN and Inf still propagate to the loss.
FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-std=c++17",
         "-shared", "-fPIC", "-w")
TARGETS = {  # FFI target name → exported handler symbol
    "ultramem_gather_pool_fwd": "UltramemGatherPoolForward",
    "ultramem_gather_pool_bwd": "UltramemGatherPoolBackward",
    "ultramem_rescore_fwd": "UltramemRescoreForward",
    "ultramem_rescore_bwd": "UltramemRescoreBackward",
    "ultramem_select": "UltramemSelect",
}


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded here (the message says why)."""


def cache_dir() -> Path:
    if os.environ.get("ULTRAMEM_KERNEL_CACHE"):
        return Path(os.environ["ULTRAMEM_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ultramem_jax"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise KernelBuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    return cxx


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), part of the cache key of a -march=native build."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _library_path(cxx: str) -> Path:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} --version failed: {e}") from None
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((HERE / name).read_bytes())
    digest.update("\0".join([version, jax.__version__, platform.machine(), _cpu_flags(), *FLAGS]).encode())
    return cache_dir() / f"libultramem_cpu-{digest.hexdigest()[:16]}.so"


def _compile(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one compiler per cache directory; the others wait, then load
        if out.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}", *(str(HERE / s) for s in SOURCES),
               "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            raise KernelBuildError(f"{cxx} failed to run: {e}") from None
        if done.returncode != 0:
            os.unlink(tmp)
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            raise KernelBuildError(f"{cxx} exited with {done.returncode}: {first_error.strip()[:300]}")
        os.replace(tmp, out)  # atomic: a reader never sees a half-written library


@functools.cache
def load() -> Path:
    """Builds (if needed) and registers the kernels; returns the library's path. Raises KernelBuildError."""
    cxx = _compiler()
    path = _library_path(cxx)
    if not path.exists():
        try:
            _compile(cxx, path)
        except OSError as e:  # an unwritable cache directory, a full disk
            raise KernelBuildError(f"cannot build into {path.parent}: {e} (set ULTRAMEM_KERNEL_CACHE)") from None
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise KernelBuildError(f"cannot load {path}: {e}") from None
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return path


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernels are built and registered, else why not (one line)."""
    try:
        load()
    except KernelBuildError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 (a jax without the FFI API, an unexpected loader error: fall back)
        return f"{type(e).__name__}: {e}"
    return None
