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

import numpy as np

from recur.data.epochs import EpochIterator


class LMBatches(EpochIterator):
    """Iterates over (inputs [B, T], targets [B, T]) int32 windows of a token stream.

    `for inputs, targets in batches:` runs the rest of the current epoch (see
    `EpochIterator`); every epoch reads the same batches. `state_dict()` / `load_state_dict()`
    resume exactly; the model's recurrent state is not part of it: checkpoint it with the model.
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
        self.epoch, self.position = 0, 0
        if self.num_batches == 0:
            raise ValueError(f"Streams of {stream_len} tokens hold no full window of "
                             f"{seq_len} steps, and drop_last=True drops the partial one.")

    @property
    def batch_size(self) -> int:
        """B, the number of parallel streams."""
        return self.streams_BxL.shape[0]

    @property
    def num_batches(self) -> int:
        """Batches per epoch: ceil((L-1) / T), or floor with `drop_last`."""
        steps = self.streams_BxL.shape[1] - 1
        return steps // self.seq_len if self.drop_last else -(-steps // self.seq_len)

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns batch k of an epoch: inputs int32 [B, T'] and targets int32 [B, T'].

        targets[:, t] == inputs[:, t + 1] within the window, and the targets' last column is
        the input that the next window starts with. T' = T except for a shorter last window.
        """
        self._check_index(k)
        start = k * self.seq_len
        stop = min(start + self.seq_len, self.streams_BxL.shape[1] - 1)
        inputs_BxT = self.streams_BxL[:, start:stop].copy()
        targets_BxT = self.streams_BxL[:, start + 1:stop + 1].copy()
        return inputs_BxT, targets_BxT
