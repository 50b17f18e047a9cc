"""Keeps the libraries' own chatter off the terminal, so that a failure reads as the one ``error:`` line (or a
recovery as the one ``warning:`` line) that this project prints for it.

* absl logging (Orbax: "Given directory is read only", per-save info lines, a failed background write logged
  with its traceback before the same error reaches the caller) is silenced below CRITICAL.
* asyncio: when one TensorStore read of a damaged checkpoint fails, Orbax closes its event loop while other reads
  are still in flight; their completions then each print a "RuntimeError: Event loop is closed" traceback, and
  the abandoned read coroutines that failed too print "Exception ignored in: <coroutine ...>" when collected.
  Those are dropped (the first failure reaches the caller; every other uncaught exception still prints).
* Gloo, the CPU collectives of a multi-process run, writes "[Gloo] Rank i is connected to n peer ranks" from
  C++ to file descriptor 1 for every communicator it builds (dozens per run, interleaved between threads), with
  no switch to turn it off. ``drop_stdout_lines`` filters them out of the process's stdout at the descriptor.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading


def _is_closed_loop_noise(exc_type, exc) -> bool:
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _is_abandoned_orbax_read(args) -> bool:
    code = getattr(args.object, "cr_code", None)  # a coroutine object
    return code is not None and "orbax" in code.co_filename


def quiet_library_noise() -> None:
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)  # Orbax logs a failed async write with its traceback
    except ImportError:
        pass
    for name in ("absl", "asyncio", "orbax"):  # the error reaches the caller as an exception, printed once
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if getattr(sys.excepthook, "_ultramem", False):
        return
    previous_hook, previous_thread_hook, previous_unraisable = sys.excepthook, threading.excepthook, \
        sys.unraisablehook

    def hook(exc_type, exc, tb):
        if not _is_closed_loop_noise(exc_type, exc):
            previous_hook(exc_type, exc, tb)

    def thread_hook(args):
        if not _is_closed_loop_noise(args.exc_type, args.exc_value):
            previous_thread_hook(args)

    def unraisable_hook(args):  # TensorStore's completion callbacks report through this one
        if not (_is_closed_loop_noise(args.exc_type, args.exc_value) or _is_abandoned_orbax_read(args)):
            previous_unraisable(args)

    hook._ultramem = True
    sys.excepthook, threading.excepthook, sys.unraisablehook = hook, thread_hook, unraisable_hook


GLOO_CONNECTION_NOISE = ("[Gloo] Rank", "peer ranks. Expected number of connected peer ranks is")


def drop_stdout_lines(markers=GLOO_CONNECTION_NOISE) -> None:
    """From now on, lines of this process's stdout that contain any of ``markers`` are dropped, whoever writes
    them (C++ included): file descriptor 1 becomes a pipe that a thread copies, line by line, to the real stdout.
    At exit the real stdout is put back and the pipe drained, so nothing printed before is lost."""
    if getattr(drop_stdout_lines, "_installed", False):
        return
    drop_stdout_lines._installed = True
    sys.stdout.flush()
    real_fd, (read_fd, write_fd) = os.dup(1), os.pipe()
    os.dup2(write_fd, 1)
    os.close(write_fd)
    keep_real = os.dup(real_fd)  # the pump's own copy, closed when it finishes
    encoded = tuple(m.encode() for m in markers)

    def pump():
        pending = b""
        while chunk := os.read(read_fd, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not any(m in line for m in encoded))
            if kept:
                os.write(keep_real, kept)
        if pending and not any(m in pending for m in encoded):
            os.write(keep_real, pending)
        os.close(read_fd)
        os.close(keep_real)

    thread = threading.Thread(target=pump, name="stdout-filter", daemon=True)
    thread.start()

    def restore():  # fd 1 back to the terminal closes the pipe's last write end: the pump drains and stops
        sys.stdout.flush()
        os.dup2(real_fd, 1)
        thread.join(timeout=5)

    atexit.register(restore)
