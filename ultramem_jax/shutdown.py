"""Stopping a run without losing it: SIGTERM (preemption) and Ctrl-C both ask the loop to save a checkpoint at
the end of the current step and exit; a second Ctrl-C quits at once (the previous checkpoint stays intact)."""
from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    def __init__(self):
        self.signum = None
        self._previous = {}

    def __bool__(self):
        return self.signum is not None

    def install(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            print("interrupted again: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)  # at once: no waiting on threads or async writes
        if self.signum is None:
            self.signum = signum
            if signum == signal.SIGINT:
                print("interrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)",
                      file=sys.stderr, flush=True)
