"""Language-model batches for truncated backpropagation through time (Zaremba et al. 2014).

The token stream is cut into B equal, contiguous streams, one per batch row, and read in
windows of T steps. Row b of batch k continues row b of batch k-1, so a model carries its
recurrent state from one batch to the next and resets it only when an epoch begins.

Letters: N tokens in the stream, B streams (the batch size), L = N // B tokens per stream,
T steps per window.

    stream 0: ids[0 : L]        batch 0 reads columns [0, T) and predicts [1, T+1),
    stream 1: ids[L : 2L]       batch 1 reads [T, 2T) and predicts [T+1, 2T+1), ...
    ...
The last N - B*L tokens (fewer than B) fill no stream and are dropped. Each stream yields
L - 1 (input, target) pairs; when T does not divide L - 1 the last window is shorter than T
(kept by default; `drop_last=True` drops it, so every batch is [B, T]).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class LMBatches:
    """Iterates over (inputs [B, T], targets [B, T]) int32 windows of a token stream.

    Iterating yields the remaining batches of the current epoch and then moves to the next
    epoch, so `for inputs, targets in batches:` is one epoch. `state_dict()` taken after any
    batch, loaded into a fresh `LMBatches` of the same stream, continues with exactly the
    batches that an uninterrupted run would read next (the recurrent state of the model is
    not part of it: checkpoint it with the model).
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, *,
                 drop_last: bool = False):
        """Cuts `ids` (int [N]) into `batch_size` streams read `seq_len` steps at a time."""
        ids_N = np.asarray(ids)
        if ids_N.ndim != 1 or not np.issubdtype(ids_N.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array; got {ids_N.dtype} {ids_N.shape}.")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1; got {batch_size}, {seq_len}.")
        stream_len = len(ids_N) // batch_size
        if stream_len < 2:
            raise ValueError(f"{len(ids_N)} tokens are too few for {batch_size} streams of at "
                             "least 2 tokens (one input, one target).")
        self.streams_BxL = ids_N[:batch_size * stream_len].astype(np.int32).reshape(
            batch_size, stream_len)
        self.num_dropped = len(ids_N) - batch_size * stream_len  # tail that fills no stream
        self.seq_len = seq_len
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index of the next batch within the epoch

    @property
    def batch_size(self) -> int:
        return self.streams_BxL.shape[0]

    @property
    def num_batches(self) -> int:
        """Batches per epoch: ceil((L-1) / T), or floor with `drop_last`."""
        steps = self.streams_BxL.shape[1] - 1
        return steps // self.seq_len if self.drop_last else -(-steps // self.seq_len)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns batch k of an epoch: inputs int32 [B, T'] and targets int32 [B, T'].

        targets[:, t] == inputs[:, t + 1] within the window, and the targets' last column is
        the input that the next window starts with. T' = T except for a shorter last window.
        """
        if not 0 <= k < self.num_batches:
            raise IndexError(f"Batch {k} out of range; an epoch has {self.num_batches}.")
        start = k * self.seq_len
        stop = min(start + self.seq_len, self.streams_BxL.shape[1] - 1)
        inputs_BxT = self.streams_BxL[:, start:stop].copy()
        targets_BxT = self.streams_BxL[:, start + 1:stop + 1].copy()
        return inputs_BxT, targets_BxT

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields the remaining batches of the current epoch, then starts the next epoch."""
        while self.position < self.num_batches:
            k = self.position
            self.position += 1  # counted before yielding: a state taken now resumes after it
            yield self.batch(k)
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Returns where the iteration stands: {"epoch": int, "position": int}."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues from a `state_dict()` of an `LMBatches` over the same data and sizes."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_batches:
            raise ValueError(f"State {state} does not fit: an epoch has {self.num_batches} "
                             "batches (the data or the batch sizes differ from the saved run?).")
        self.epoch, self.position = epoch, position
