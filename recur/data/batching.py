"""Padded, optionally length-bucketed batches of sentences for classification and tagging.

Letters: N sentences, B sentences per batch, T the padded sentence length (the longest in
the batch rounded up to a multiple of `pad_multiple`, so that a jitted step sees few distinct
shapes), W the padded word length in characters (rounded up the same way).

Every batch is a dict of int32 arrays, zero wherever there is no data (use the lengths to
mask; 0 may also be a real tag or label):

    "tokens"        [B, T]     token ids of each sentence
    "lengths"       [B]        words per sentence
    "index"         [B]        position of each sentence in the input lists
    "labels"        [B]        if `labels` were given (one per sentence)
    "tags"          [B, T]     if `tags` were given (one per word)
    "chars"         [B, T, W]  if `chars` were given (character ids of each word)
    "word_lengths"  [B, T]     if `chars` were given

Orders (`order=`):
  "keep":    the input order, every sentence kept; for evaluation.
  "shuffle": a permutation drawn from (seed, epoch).
  "bucket":  like "shuffle", then each pool of `pool_batches` * B consecutive sentences is
             sorted by length and cut into batches, and the batches are shuffled; sentences of
             similar length share a batch, which wastes less padding.
Only the last batch of an epoch can be smaller than B ("keep", "shuffle"), or one batch of the
epoch ("bucket"); `drop_last=True` drops it (training only).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recur.data.epochs import EpochIterator

ORDERS = ("keep", "shuffle", "bucket")


class SequenceBatches(EpochIterator):
    """Iterates over padded batches (dicts of int32 arrays, see the module docstring).

    The order of an epoch depends only on (seed, epoch); `state_dict()` / `load_state_dict()`
    (see `EpochIterator`) resume exactly.
    """

    def __init__(self, tokens: Sequence[Sequence[int]], *, batch_size: int,
                 labels: Sequence[int] | None = None,
                 tags: Sequence[Sequence[int]] | None = None,
                 chars: Sequence[Sequence[Sequence[int]]] | None = None,
                 order: str = "bucket", seed: int = 0, pool_batches: int = 100,
                 pad_multiple: int = 8, drop_last: bool = False):
        """Batches `tokens` (N sentences of token ids) with per-sentence `labels`, per-word
        `tags`, and per-word character ids `chars` (N sentences of words of char ids)."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
        if order == "keep" and drop_last:
            raise ValueError("order='keep' is for evaluation and never drops a sentence; "
                             "drop_last=True needs order='shuffle' or 'bucket'.")
        if batch_size < 1 or pool_batches < 1 or pad_multiple < 1:
            raise ValueError("batch_size, pool_batches and pad_multiple must be >= 1.")
        self.tokens = [_int32_1d(s, "tokens", i) for i, s in enumerate(tokens)]
        if not self.tokens:
            raise ValueError("No sentences to batch.")
        self.lengths_N = np.array([len(s) for s in self.tokens], dtype=np.int32)
        self.labels_N = None if labels is None else np.asarray(labels, dtype=np.int32)
        if self.labels_N is not None and self.labels_N.shape != self.lengths_N.shape:
            raise ValueError(f"{len(self.labels_N)} labels for {len(self.tokens)} sentences.")
        self.tags = None if tags is None else [_int32_1d(s, "tags", i) for i, s in enumerate(tags)]
        self.chars = None if chars is None else [_flat_chars(s, i) for i, s in enumerate(chars)]
        if self.tags is not None:
            _check_per_word("tags", [len(tags) for tags in self.tags], self.lengths_N)
        if self.chars is not None:
            _check_per_word("chars", [len(lens) for _, lens in self.chars], self.lengths_N)
        self.batch_size = batch_size
        self.order = order
        self.seed = seed
        self.pool_batches = pool_batches
        self.pad_multiple = pad_multiple
        self.drop_last = drop_last
        self.epoch, self.position = 0, 0
        self._schedule_epoch = -1
        self._schedule: list[np.ndarray] = []
        if self.num_batches == 0:
            raise ValueError(f"{len(self.tokens)} sentences fill no batch of {batch_size}, and "
                             "drop_last=True drops the partial one.")

    @property
    def num_batches(self) -> int:
        """Batches per epoch: ceil(N / B), or floor with `drop_last`."""
        n, b = len(self.tokens), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def schedule(self, epoch: int) -> list[np.ndarray]:
        """Returns the sentence indices of each batch of `epoch`, in order (int [B] each)."""
        n, b = len(self.tokens), self.batch_size
        if self.order == "keep":
            return np.array_split(np.arange(n), range(b, n, b))
        rng = np.random.default_rng([self.seed, epoch])
        perm_N = rng.permutation(n)
        if self.order == "shuffle":
            batches = np.array_split(perm_N, range(b, n, b))
        else:
            batches = []
            pool = self.pool_batches * b
            for start in range(0, n, pool):
                pool_P = perm_N[start:start + pool]
                pool_P = pool_P[np.argsort(self.lengths_N[pool_P], kind="stable")]
                batches.extend(np.array_split(pool_P, range(b, len(pool_P), b)))
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [idx for idx in batches if len(idx) == b]
        return batches

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Returns batch k of the current epoch (see the module docstring for its arrays)."""
        self._check_index(k)
        if self._schedule_epoch != self.epoch:
            self._schedule, self._schedule_epoch = self.schedule(self.epoch), self.epoch
        return self.collate(self._schedule[k])

    def collate(self, index_B: np.ndarray) -> dict[str, np.ndarray]:
        """Returns the padded batch of the sentences `index_B` (int [B]), in that order."""
        lengths_B = self.lengths_N[index_B]
        t = _round_up(int(lengths_B.max()), self.pad_multiple)
        out = {"tokens": _pad([self.tokens[i] for i in index_B], t),
               "lengths": lengths_B, "index": index_B.astype(np.int32)}
        if self.labels_N is not None:
            out["labels"] = self.labels_N[index_B]
        if self.tags is not None:
            out["tags"] = _pad([self.tags[i] for i in index_B], t)
        if self.chars is not None:
            out["chars"], out["word_lengths"] = _pad_chars([self.chars[i] for i in index_B], t,
                                                           self.pad_multiple)
        return out


def _round_up(n: int, multiple: int) -> int:
    """Returns the smallest positive multiple of `multiple` that is >= n."""
    return max(1, -(-n // multiple)) * multiple


def _int32_1d(seq: Sequence[int], name: str, i: int) -> np.ndarray:
    """Returns `seq` as int32 [len]; raises naming the sentence if it is not integers."""
    arr = np.asarray(seq)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}[{i}] must be a sequence of integer ids; got {arr.dtype} "
                         f"{arr.shape}. Encode tokens with a Vocab first.")
    return arr.astype(np.int32)


def _flat_chars(words: Sequence[Sequence[int]], i: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns one sentence's character ids, concatenated int32 [C], and word lengths [L]."""
    arrays = [_int32_1d(w, "chars", i) for w in words]
    lengths_L = np.array([len(a) for a in arrays], dtype=np.int32)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int32)), lengths_L


def _check_per_word(name: str, counts: list[int], lengths_N: np.ndarray) -> None:
    """Raises naming the first sentence whose number of `name` entries differs from its words."""
    if len(counts) != len(lengths_N):
        raise ValueError(f"{len(counts)} sentences of {name} for {len(lengths_N)} of tokens.")
    bad = np.flatnonzero(np.asarray(counts) != lengths_N)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"Sentence {i} has {lengths_N[i]} tokens but {counts[i]} {name}.")


def _pad(rows: list[np.ndarray], t: int) -> np.ndarray:
    """Returns the rows zero-padded on the right to length t, int32 [B, t]."""
    out_BxT = np.zeros((len(rows), t), dtype=np.int32)
    for b, row in enumerate(rows):
        out_BxT[b, :len(row)] = row
    return out_BxT


def _pad_chars(rows: list[tuple[np.ndarray, np.ndarray]], t: int,
               multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns character ids int32 [B, t, W] and word lengths int32 [B, t], zero-padded."""
    w = _round_up(max((int(lens.max()) for _, lens in rows if lens.size), default=0), multiple)
    chars_BxTxW = np.zeros((len(rows), t, w), dtype=np.int32)
    word_lengths_BxT = np.zeros((len(rows), t), dtype=np.int32)
    for b, (flat_C, lengths_L) in enumerate(rows):
        word_lengths_BxT[b, :len(lengths_L)] = lengths_L
        word_C = np.repeat(np.arange(len(lengths_L)), lengths_L)  # word of each character
        starts_L = np.cumsum(lengths_L) - lengths_L
        chars_BxTxW[b, word_C, np.arange(len(flat_C)) - starts_L[word_C]] = flat_C
    return chars_BxTxW, word_lengths_BxT
