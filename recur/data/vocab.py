"""A vocabulary: a bijection between tokens and the ids 0 .. n-1."""
from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PAD = "<pad>"
UNK = "<unk>"


class Vocab:
    """Tokens and their ids, with an optional padding token (always id 0) and unknown token.

    Attributes:
      tokens: the token of each id, as a tuple.
      pad: the padding token (id 0), or None when sequences are never padded.
      unk: the token that unknown tokens encode to, or None: unknown tokens are an error.
    """

    def __init__(self, tokens: Iterable[str], *, pad: str | None = None, unk: str | None = None):
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.pad = pad
        self.unk = unk
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            dups = [t for t, n in collections.Counter(self.tokens).items() if n > 1]
            raise ValueError(f"Vocab tokens must be distinct; repeated: {dups[:10]}.")
        if pad is not None and (not self.tokens or self.tokens[0] != pad):
            raise ValueError(f"The padding token {pad!r} must be the first token (id 0).")
        if unk is not None and unk not in self._ids:
            raise ValueError(f"The unknown token {unk!r} is not among the tokens.")

    @classmethod
    def build(cls, stream: Iterable[str], *, min_freq: int = 1, max_size: int | None = None,
              pad: str | None = PAD, unk: str | None = UNK,
              specials: Sequence[str] = ()) -> Vocab:
        """Returns the vocabulary of a token stream.

        Ids: `pad` (0), `unk`, then `specials`, then the tokens seen at least `min_freq` times
        by decreasing count, ties broken by the token's string order (deterministic). A
        special token that also occurs in the stream keeps its special place.

        Args:
          stream: the tokens, e.g. every token of the training split.
          min_freq: rarer tokens are left out (they then encode to `unk`).
          max_size: at most this many ids in all, specials included; None: no limit.
          pad, unk: the padding and unknown tokens, or None for none.
          specials: further reserved tokens (e.g. "<eos>"), placed after pad and unk.
        """
        head = [t for t in (pad, unk, *specials) if t is not None]
        if len(set(head)) != len(head):
            raise ValueError(f"pad, unk and specials must be distinct; got {head}.")
        counts = collections.Counter(stream)
        rest = sorted((t for t, n in counts.items() if n >= min_freq and t not in head),
                      key=lambda t: (-counts[t], t))
        tokens = head + rest
        if max_size is not None:
            tokens = tokens[:max_size]
        if unk is None and len(tokens) - len(head) < len(counts.keys() - set(head)):
            raise ValueError("min_freq or max_size leaves tokens of the stream out of the "
                             "vocabulary, and there is no unk token to encode them to.")
        return cls(tokens, pad=pad, unk=unk)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens, pad={self.pad!r}, unk={self.unk!r})"

    @property
    def pad_id(self) -> int:
        """The id of the padding token (always 0); raises if the vocab has none."""
        if self.pad is None:
            raise ValueError("This vocab has no padding token.")
        return 0

    @property
    def unk_id(self) -> int | None:
        """The id of the unknown token, or None."""
        return None if self.unk is None else self._ids[self.unk]

    def id(self, token: str) -> int:
        """Returns the id of one token (the unk id for an unknown token; error if no unk)."""
        return int(self.encode([token])[0])

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """Returns the ids of `tokens`, int32 [N]; unknown tokens map to `unk`.

        Raises:
          KeyError: a token is unknown and the vocab has no unk token (names the token and its
            position).
        """
        tokens = tokens if isinstance(tokens, Sequence) else list(tokens)
        ids = self._ids
        if self.unk is not None:
            unk = ids[self.unk]
            return np.fromiter((ids.get(t, unk) for t in tokens), np.int32, len(tokens))
        try:
            return np.fromiter((ids[t] for t in tokens), np.int32, len(tokens))
        except KeyError:
            i, token = next((i, t) for i, t in enumerate(tokens) if t not in ids)
            raise KeyError(f"Token {token!r} (position {i}) is not in the vocabulary of "
                           f"{len(self)} tokens, which has no unk token.") from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Returns the tokens of `ids`."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= len(self)):
            raise IndexError(f"Ids must lie in [0, {len(self)}); got {ids_N.min()}..{ids_N.max()}.")
        return [self.tokens[i] for i in ids_N]

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable description, e.g. to store with a checkpoint."""
        return {"tokens": list(self.tokens), "pad": self.pad, "unk": self.unk}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        """Returns the vocab that `to_dict` described."""
        return cls(d["tokens"], pad=d["pad"], unk=d["unk"])

    def to_json(self) -> str:
        """Returns the vocab as a JSON string."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        """Returns the vocab that `to_json` wrote."""
        return cls.from_dict(json.loads(text))
