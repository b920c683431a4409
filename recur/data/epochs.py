"""Resumable iteration over epochs of numbered batches.

A batch iterator is a subclass that says how many batches an epoch has and what batch k of
the current epoch is; this base class walks through them and records where it stands as two
plain ints, (epoch, position), which a checkpoint stores beside the model.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class EpochIterator:
    """Yields batch `position`, `position + 1`, ... of epoch `epoch`, then moves to the next.

    `for batch in it:` runs the rest of the current epoch, so a loop over epochs is
    `for epoch in range(n): for batch in it: ...`. A loop left early continues where it
    stopped. `state_dict()` taken after any batch, loaded into a fresh iterator over the same
    data with the same settings, yields exactly the batches an uninterrupted run would.
    """

    epoch: int = 0
    position: int = 0  # the index of the next batch within the epoch

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        raise NotImplementedError

    def batch(self, k: int) -> Any:
        """Returns batch k of the current epoch."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        while self.position < self.num_batches:
            k = self.position
            self.position += 1  # counted before yielding, so a state taken now resumes after k
            yield self.batch(k)
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Returns where the iteration stands: {"epoch": int, "position": int}."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues from a `state_dict()` of an iterator over the same data and settings."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_batches:
            raise ValueError(f"State {state} does not fit this iterator, whose epochs have "
                             f"{self.num_batches} batches (other data or batch size?).")
        self.epoch, self.position = epoch, position

    def _check_index(self, k: int) -> None:
        """Raises IndexError unless 0 <= k < num_batches."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"Batch {k} is out of range; an epoch has {self.num_batches}.")
