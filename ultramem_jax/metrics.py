"""Metrics sinks: a JSONL file and TensorBoard event files under the run's output_dir (process 0 only)."""
from __future__ import annotations

import atexit
import json
import math
import os

from ultramem_jax.errors import warn


class MetricsLogger:
    def __init__(self, output_dir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step and os.path.exists(self.path):  # drop records the resumed run will write again
            keep = _records_up_to(self.path, resume_step)
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)  # a kill mid-rewrite leaves the old file whole
        elif not resume_step and os.path.exists(self.path):
            old, n = self.path + ".old", 1
            while os.path.exists(old):  # an earlier run's records are never overwritten
                old, n = f"{self.path}.old{n}", n + 1
            os.replace(self.path, old)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        # closed before the interpreter tears down (also when a run stops on an error): tensorboardX's writer
        # thread, left open, prints a traceback at exit
        atexit.register(self.close)

    def write(self, step: int, metrics: dict, kind: str = "train"):
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
            self._file.flush()
        except OSError as e:  # e.g. a full disk: name the file in the one error line
            raise OSError(e.errno, e.strerror, self.path) from None
        if self._tb is not None and not _tb_writer_alive(self._tb):
            warn(f"TensorBoard's event writer under {os.path.dirname(self.path)} stopped (a full disk?); "
                 "metrics.jsonl keeps every record")
            self._tb = None
        if self._tb is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):  # a diverging run's last record keeps its
                self._tb.add_scalar(f"{kind}/{k}", v, step)          # non-finite values in metrics.jsonl only

    def close(self):
        if self.enabled and not self._file.closed:
            self._file.close()
            if self._tb is not None and _tb_writer_alive(self._tb):  # closing a dead writer would block too
                self._tb.close()


def _tb_writer_alive(tb) -> bool:
    """tensorboardX writes events from a thread fed by a bounded queue. Where that thread died on an OSError (a full
    disk), every later write would block the run forever once the queue filled (seen: train.py hung in its last
    metrics write). Reads tensorboardX's writer thread; a version without these attributes counts as alive."""
    events = getattr(getattr(tb, "file_writer", None), "event_writer", None)
    worker = getattr(events, "_worker", None)
    return worker is None or worker.is_alive()


def _records_up_to(path: str, step: int) -> list[str]:
    """The lines of ``path`` with records up to ``step``.  A line that is not a JSON record (the torn last
    line of a run killed mid-write, by a power cut or a full disk) is dropped with one warning."""
    keep, torn = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    if torn:
        warn(f"{path}: dropped {torn} unreadable line(s) (a write cut short)")
    return keep
