"""The training iterator for environments without Grain (the GPU image has none): NumPy, no threads.

It keeps Grain's structure (``data.train_dataset``): the windows reshuffled every epoch, the epochs one endless
stream, each global batch the next ``global_batch`` positions of it with every host taking a stride, so batches
may span an epoch boundary.  The permutations differ from Grain's, so the two loaders give different batch
orders, and a run resumes only with the loader that wrote its checkpoints (``checkpointing.Checkpointer``).

Its state is the position in that stream (windows consumed by all hosts together), the same on every host, so
one JSON item written by the primary host restores every host.  As with Grain's, a state is a position only:
restored into an iterator with another seed or batch size (``resume_override``), it continues from there.
"""
from __future__ import annotations

import numpy as np

LOADER = "plain"


class WindowBatches:
    """Iterator of (global_batch / process_count, S + 1) int32 batches of ``source``'s windows."""

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.source, self.seed, self.n = source, int(seed), len(source)
        self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
        self.pos = 0
        self._epoch, self._order = -1, None

    def __iter__(self):
        return self

    def _window(self, pos: int) -> np.ndarray:
        epoch = pos // self.n
        if epoch != self._epoch:  # one permutation in memory: 8 bytes a window
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self.source[int(self._order[pos % self.n])]

    def __next__(self) -> np.ndarray:
        batch = np.stack([self._window(p) for p in range(self.pos + self.process_index, self.pos + self.global_batch,
                                                          self.process_count)])
        self.pos += self.global_batch
        return batch.astype(np.int32)

    def get_state(self) -> dict:
        return {"loader": LOADER, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("loader") != LOADER or not isinstance(state.get("pos"), int):
            raise ValueError(f"not a {LOADER} iterator state: {str(state)[:100]}")
        self.pos = state["pos"]
