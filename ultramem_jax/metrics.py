"""Metrics sinks: a JSONL file and TensorBoard event files under the run's output_dir (process 0 only)."""
from __future__ import annotations

import json
import os


class MetricsLogger:
    def __init__(self, output_dir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step and os.path.exists(self.path):  # drop records the resumed run will write again
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif not resume_step and os.path.exists(self.path):
            os.replace(self.path, self.path + ".old")
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, step: int, metrics: dict, kind: str = "train"):
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()
