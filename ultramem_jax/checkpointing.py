"""Orbax checkpoints: one place that knows the on-disk layout.

Items per step (MaxText-style names):
  ``params``     the model state: parameters plus the TDQKR vectors and IVE permutation (enough to evaluate)
  ``opt_state``  the optimizer state
  ``data_iter``  the Grain iterator position (without grain: plain_loader's global position, as JSON)
  ``meta``       JSON: step, the run config, its fingerprint (what a resume must agree with) and a checksum of
                 every saved array (verified on every restore: a flipped byte that still decodes is caught)
Restores target the *current* mesh, so a checkpoint loads onto whatever devices are present.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ultramem_jax import data, plain_loader
from ultramem_jax.errors import UsageError, warn


def abstract_like(tree):
    """Restore target with the shapes, dtypes and shardings of an existing (freshly initialised) state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---- array checksums -------------------------------------------------------------------------------------

def _leaf_hash(x):
    """A uint32 hash of one array's bit pattern and element positions, computed where the array lives.

    Each element's bits are mixed with its flat index (murmur3's finaliser) and the mixes summed mod 2**32: the
    sum does not depend on the sharding or the reduction order, and any changed or moved element changes it
    (up to a 2**-32 collision).  Elementwise indexing (iota, not a reshape) keeps a sharded array in place."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, width)
    if x.dtype.itemsize == 8:  # bitcast adds a trailing axis of two words
        u = u[..., 0] ^ (u[..., 1] * jnp.uint32(0x27D4EB2F))
    u = u.astype(jnp.uint32)
    idx = jnp.zeros(u.shape, jnp.uint32)
    for d in range(u.ndim):
        idx = idx * jnp.uint32(u.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d)
    h = u ^ (idx * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _tree_hashes(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.stack([_leaf_hash(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def array_checksums(tree) -> list[int]:
    """One checksum per array leaf of ``tree`` (in ``jax.tree.leaves`` order), equal across shardings."""
    return [int(h) for h in np.asarray(jax.device_get(_tree_hashes(tree)))]


def _first_mismatch(tree, want: list[int]) -> str | None:
    got = array_checksums(tree)
    if len(got) != len(want):
        return f"{len(want)} arrays were saved, {len(got)} restored"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for path, a, b in zip(paths, got, want):
        if a != b:
            return f"checksum mismatch in {path}"
    return None


def _state_hash(data_iter) -> str:
    return hashlib.sha256(json.dumps(data_iter.get_state(), sort_keys=True, default=str).encode()).hexdigest()


class CorruptCheckpoint(Exception):
    pass


def _describe(err: Exception) -> str:
    """The root cause's first line: Orbax wraps TensorStore's precise error in a generic one."""
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


# ---- the manager -----------------------------------------------------------------------------------------

class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self._options = (dict(read_only=True, create=False, max_to_keep=None, save_interval_steps=0)
                         if read_only else dict(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))
        self._open()

    def _open(self):
        # which iterator data.train_dataset gives: data owns the one optional import of grain
        self.loader = "grain" if data.grain is not None else plain_loader.LOADER
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "data_iter": data.grain.checkpoint.CheckpointHandler() if data.grain is not None
                    else ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, item_names=tuple(handlers), item_handlers=handlers,
                                             options=ocp.CheckpointManagerOptions(**self._options))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_iter, meta: dict):
        """Saves (asynchronously unless disabled); ``meta`` gets the arrays' checksums, taken now."""
        meta = dict(meta, checksums={"params": array_checksums(params), "opt_state": array_checksums(opt_state)},
                    data_loader=self.loader)
        if jax.process_count() == 1:  # each process has its own iterator position; meta is written by one
            meta["checksums"]["data_iter"] = _state_hash(data_iter)
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data_iter=self._iter_args(data_iter, save=True), meta=ocp.args.JsonSave(meta)))

    def _iter_args(self, data_iter, save: bool):
        if self.loader == "grain":
            checkpoint = data.grain.checkpoint
            return (checkpoint.CheckpointSave if save else checkpoint.CheckpointRestore)(data_iter)
        return ocp.args.JsonSave(data_iter.get_state()) if save else ocp.args.JsonRestore()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _quarantine(self, step: int, why: str):
        path = os.path.join(self.directory, str(step))
        bad = f"{path}.corrupt"
        n = 1
        while os.path.exists(bad):
            bad, n = f"{path}.corrupt{n}", n + 1
        if jax.process_index() == 0:
            shutil.move(path, bad)  # kept, not deleted: the user may want to look at it
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantine {step}")
        state = "corrupt" if "checksum" in why else "unreadable"
        if jax.process_index() == 0:
            warn(f"checkpoint step {step} is {state} ({why}); moved it to {bad} and fell back to the previous "
                 "checkpoint")
        self._open()

    def check_compatible(self, fingerprint: dict, allowed: tuple = ()) -> None:
        """Raises UsageError (touching nothing) if the newest readable checkpoint is from a config that differs
        in a key of ``fingerprint`` (what a resume may not change), other than the keys in ``allowed``."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception:
                continue  # unreadable: restore_latest deals with it
            written_by = meta.get("data_loader", "grain")  # checkpoints from before the fallback: grain
            if written_by != self.loader:
                raise UsageError(f"the checkpoints in {self.directory} hold a {written_by} data iterator, and this "
                                 f"environment's is {self.loader} (grain is "
                                 f"{'installed' if data.grain is not None else 'not installed'}): resume where the "
                                 "run started, or use another output_dir")
            diffs = [d for d in _diff(meta.get("fingerprint", {}), fingerprint)
                     if not any(d[0] == a or d[0].startswith(a + ".") for a in allowed)]
            if diffs:
                key, old, new = diffs[0]
                more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])})" if len(diffs) > 1 else ""
                raise UsageError(f"{key} differs from the checkpoint in {self.directory} (checkpoint {old!r}, "
                                 f"now {new!r}){more}; resuming would change the run's meaning: use another "
                                 f"output_dir, the same value, or resume_override={key} to accept the change")
            return

    def restore_latest(self, params_target, opt_target, data_iter):
        """Restores the newest readable, intact step into the targets; a corrupt step is set aside with one
        warning line.  Returns (step, params, opt_state, meta) or None when there is nothing to restore; a
        failed attempt leaves ``data_iter`` where it was."""
        initial = data_iter.get_state()
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_target), opt_state=ocp.args.StandardRestore(opt_target),
                    data_iter=self._iter_args(data_iter, save=False), meta=ocp.args.JsonRestore()))
                if self.loader != "grain":  # JsonRestore returns the state; grain's handler sets it itself
                    data_iter.set_state(out["data_iter"])
                _verify(out["meta"], params=out["params"], opt_state=out["opt_state"], data_iter=data_iter)
            except Exception as e:  # truncated files, missing items, bad JSON, checksum mismatch, ...
                data_iter.set_state(initial)  # the failed restore may have moved it
                self._quarantine(step, _describe(e) if not isinstance(e, CorruptCheckpoint) else str(e))
                continue
            return step, out["params"], out["opt_state"], out["meta"]
        return None

    def restore_params(self, params_target, step: int | None = None):
        """Only the params item (evaluation), verified against its checksums: the newest intact step unless
        ``step`` is given.  Read-only: a bad step is skipped with one warning line, not moved."""
        if step is not None and step not in self.steps():
            raise UsageError(f"{self.directory} has no checkpoint step {step} (has: {self.steps()})")
        steps = [step] if step is not None else list(reversed(self.steps()))
        last_err = None
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_target), meta=ocp.args.JsonRestore()))
                _verify(out["meta"], params=out["params"])
                return s, out["params"], out["meta"]
            except Exception as e:
                last_err = str(e) if isinstance(e, CorruptCheckpoint) else _describe(e)
                if s != steps[-1]:
                    warn(f"checkpoint step {s} is {'corrupt' if 'checksum' in last_err else 'unreadable'} "
                         f"({last_err}); trying the previous one")
        if last_err is None:
            raise UsageError(f"no checkpoints in {self.directory}")
        raise UsageError(f"no readable checkpoint in {self.directory}: step {steps[-1]}: {last_err}")


def _verify(meta: dict, **restored) -> None:
    """Raises CorruptCheckpoint when a restored item's checksums differ from those saved with it.  Checkpoints
    written before checksums existed have none and pass."""
    sums = meta.get("checksums") or {}
    for name, value in restored.items():
        if name not in sums:
            continue
        why = (None if _state_hash(value) == sums[name] else "iterator state differs") if name == "data_iter" \
            else _first_mismatch(value, sums[name])
        if why:
            raise CorruptCheckpoint(f"{name}: {why}")


def _diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every key whose value differs; a key on one side only (a checkpoint written
    before the fingerprint had it, or after it was dropped) is not a difference."""
    out = []
    for k in sorted(set(old) & set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out
