"""The training iterator for environments without Grain (the GPU image has none): NumPy, no threads.

It keeps Grain's structure (``data.train_dataset``): the windows reshuffled every epoch, the epochs one endless
stream, each global batch the next ``global_batch`` positions of it with every host taking a stride, so batches
may span an epoch boundary.  The permutations differ from Grain's, so the two loaders give different batch
orders, and a run resumes only with the loader that wrote its checkpoints (``checkpointing.Checkpointer``).

Its state is the number of global batches consumed, the same on every host, so one JSON item written by the
primary host restores every host.
"""
from __future__ import annotations

import numpy as np

LOADER = "plain"


class WindowBatches:
    """Iterator of (global_batch / process_count, S + 1) int32 batches of ``source``'s windows."""

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.source, self.seed, self.n = source, int(seed), len(source)
        self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
        self.batches = 0
        self._epoch, self._order = -1, None

    def __iter__(self):
        return self

    def _window(self, pos: int) -> np.ndarray:
        epoch = pos // self.n
        if epoch != self._epoch:  # one permutation in memory: 8 bytes a window
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self.source[int(self._order[pos % self.n])]

    def __next__(self) -> np.ndarray:
        start = self.batches * self.global_batch + self.process_index
        batch = np.stack([self._window(p) for p in range(start, start + self.global_batch - self.process_index,
                                                          self.process_count)])
        self.batches += 1
        return batch.astype(np.int32)

    def get_state(self) -> dict:
        return {"loader": LOADER, "batches": self.batches, "seed": self.seed, "windows": self.n,
                "global_batch": self.global_batch}

    def set_state(self, state: dict) -> None:
        want = {k: v for k, v in self.get_state().items() if k != "batches"}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise ValueError(f"iterator state {got} is for another data order than this run's {want}")
        self.batches = int(state["batches"])
