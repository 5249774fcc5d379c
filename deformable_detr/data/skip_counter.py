"""A counter of skipped items that DataLoader worker processes share with the main process."""
from __future__ import annotations

import multiprocessing
import multiprocessing.context


class SkipCounter:
    """Process-shared integer: increments made in DataLoader workers are visible to the trainer.

    Backed by shared memory, which forked workers inherit and spawned workers receive while
    they start. Pickling it in any other situation (``pickle.dumps``, ``copy.deepcopy``) yields
    a detached counter that starts from the current value and is no longer shared.
    """

    def __init__(self, start: int = 0):
        # A lock from the spawn context works in forked children too (they inherit it), while
        # one from the fork context refuses to travel to spawned workers.
        self._shared = multiprocessing.get_context("spawn").Value("q", start)

    @property
    def value(self) -> int:
        """Number of items skipped so far, over all processes sharing this counter."""
        return int(self._shared.value)

    def increment(self) -> None:
        with self._shared.get_lock():
            self._shared.value += 1

    def reset(self) -> None:
        with self._shared.get_lock():
            self._shared.value = 0

    def __reduce__(self):
        # Shared memory can only travel to a process being started; elsewhere detach.
        if multiprocessing.context.get_spawning_popen() is not None:
            return _attach, (self._shared,)
        return SkipCounter, (self.value,)

    def __repr__(self) -> str:
        return f"SkipCounter(value={self.value})"


def _attach(shared) -> SkipCounter:
    counter = SkipCounter.__new__(SkipCounter)
    counter._shared = shared
    return counter
