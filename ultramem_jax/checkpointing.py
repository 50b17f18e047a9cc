"""Orbax checkpoints: one place that knows the on-disk layout.

Items per step (MaxText-style names):
  ``params``     the model state: parameters plus the TDQKR vectors and IVE permutation (enough to evaluate)
  ``opt_state``  the optimizer state
  ``data_iter``  the Grain iterator position
  ``meta``       JSON: step, the run config, and its fingerprint (what a resume must agree with)
Restores target the *current* mesh, so a checkpoint loads onto whatever devices are present.
"""
from __future__ import annotations

import os
import shutil
import warnings

import grain
import jax
import orbax.checkpoint as ocp

from ultramem_jax.errors import UsageError


def abstract_like(tree):
    """Restore target with the shapes, dtypes and shardings of an existing (freshly initialised) state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self._options = (dict(read_only=True, create=False, max_to_keep=None, save_interval_steps=0)
                         if read_only else dict(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))
        self._open()

    def _open(self):
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "data_iter": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, item_names=tuple(handlers), item_handlers=handlers,
                                             options=ocp.CheckpointManagerOptions(**self._options))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_iter, meta: dict):
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

    def wait(self):
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _quarantine(self, step: int, err: Exception):
        path = os.path.join(self.directory, str(step))
        bad = f"{path}.corrupt"
        n = 1
        while os.path.exists(bad):
            bad, n = f"{path}.corrupt{n}", n + 1
        shutil.move(path, bad)  # kept, not deleted: the user may want to look at it
        warnings.warn(f"checkpoint step {step} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:160]});"
                      f" moved it to {bad} and fell back to the previous checkpoint", stacklevel=3)
        self._open()

    def check_compatible(self, fingerprint: dict) -> None:
        """Raises UsageError (touching nothing) if the newest readable checkpoint is from another config."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception:
                continue  # unreadable: restore_latest deals with it
            diffs = _diff(meta.get("fingerprint", {}), fingerprint)
            if diffs:
                raise UsageError(f"{self.directory} holds checkpoints of an incompatible config ({'; '.join(diffs[:4])})"
                                 "; use another output_dir or the same config")
            return

    def restore_latest(self, params_target, opt_target, data_iter):
        """Restores the newest readable step into the targets; a corrupt step is set aside with a warning.
        Returns (step, params, opt_state, meta) or None when there is nothing to restore."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_target), opt_state=ocp.args.StandardRestore(opt_target),
                    data_iter=grain.checkpoint.CheckpointRestore(data_iter), meta=ocp.args.JsonRestore()))
            except Exception as e:  # truncated files, missing items, bad JSON, ...
                self._quarantine(step, e)
                continue
            return step, out["params"], out["opt_state"], out["meta"]
        return None

    def restore_params(self, params_target, step: int | None = None):
        """Only the params item (evaluation): newest readable step unless ``step`` is given."""
        steps = [step] if step is not None else list(reversed(self.steps()))
        if step is not None and step not in self.steps():
            raise UsageError(f"{self.directory} has no checkpoint step {step} (has: {self.steps()})")
        last_err = None
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_target), meta=ocp.args.JsonRestore()))
                return s, out["params"], out["meta"]
            except Exception as e:
                last_err = e
                warnings.warn(f"checkpoint step {s} is unreadable ({type(e).__name__}); trying the previous one",
                              stacklevel=2)
        if last_err is None:
            raise UsageError(f"no checkpoints in {self.directory}")
        raise UsageError(f"no readable checkpoint in {self.directory}: {str(last_err).splitlines()[0][:200]}")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r}, config {b!r}")
    return out
