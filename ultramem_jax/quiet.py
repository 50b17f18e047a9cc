"""Keeps the libraries' own chatter off the terminal, so that a failure reads as the one ``error:`` line (or a
recovery as the one ``warning:`` line) that this project prints for it.

* absl logging (Orbax: "Given directory is read only", per-save info lines, a failed background write logged
  with its traceback before the same error reaches the caller) is silenced below CRITICAL.
* asyncio: when one TensorStore read of a damaged checkpoint fails, Orbax closes its event loop while other reads
  are still in flight; their completions then each print a "RuntimeError: Event loop is closed" traceback, and
  the abandoned read coroutines that failed too print "Exception ignored in: <coroutine ...>" when collected.
  Those are dropped (the first failure reaches the caller; every other uncaught exception still prints).
"""
from __future__ import annotations

import logging
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
