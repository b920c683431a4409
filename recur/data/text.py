"""Language-modelling corpora as token-id streams: tiny Shakespeare (chars) and PTB (words).

Each loader returns `(splits, vocab)`: `splits` maps a split name to an int32 array [N] of
token ids, N the number of tokens of that split, and `vocab` turns ids back into tokens.
`recur.data.lm_batches.LMBatches` cuts such a stream into training batches.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os

import numpy as np

from recur.data import files
from recur.data.lines import read_lines, split_fields
from recur.data.vocab import Vocab

EOS = "<eos>"
PTB_SPLITS = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
_SHAKESPEARE_ASSET = "tinyshakespeare.txt.gz"


def tinyshakespeare_text() -> str:
    """Returns the tiny Shakespeare corpus, 1,115,394 characters.

    Looks in the data folder and the cache, then in the copy shipped with the package
    (recur/data/assets/tinyshakespeare.txt.gz), and only then downloads. Every copy must
    match the sha256 in `files.SOURCES`.
    """
    try:
        path = files.find_file("tinyshakespeare", "input.txt", download=False)
        return path.read_bytes().decode("utf-8")
    except files.DataNotFoundError:
        pass
    asset = importlib.resources.files("recur.data") / "assets" / _SHAKESPEARE_ASSET
    if asset.is_file():
        data = gzip.decompress(asset.read_bytes())
        expected = files.source("tinyshakespeare", "input.txt").sha256
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise files.ChecksumError(f"Checksum mismatch for the packaged {asset}: expected "
                                      f"sha256 {expected} of its text, got {actual}.")
        return data.decode("utf-8")
    return files.find_file("tinyshakespeare", "input.txt").read_bytes().decode("utf-8")


def load_tinyshakespeare(train_fraction: float = 0.9) -> tuple[dict[str, np.ndarray], Vocab]:
    """Returns the character-level tiny Shakespeare splits and their vocabulary.

    The first `int(train_fraction * N)` characters are "train", the rest "valid" (as in
    nanoGPT: 1,003,854 and 111,540 characters). The vocabulary is the 65 distinct characters of
    the whole text in code-point order, with no padding and no unknown token.

    Returns:
      ({"train": int32 [N_train], "valid": int32 [N_valid]}, vocab)
    """
    text = tinyshakespeare_text()
    vocab = Vocab(sorted(set(text)))
    ids_N = vocab.encode(text)
    n_train = int(train_fraction * len(ids_N))
    return {"train": ids_N[:n_train], "valid": ids_N[n_train:]}, vocab


def read_ptb_tokens(path: str | os.PathLike) -> list[str]:
    """Returns the words of a Mikolov-format PTB file, with "<eos>" after each line."""
    tokens: list[str] = []
    for line in read_lines(path):
        tokens.extend(split_fields(line))
        tokens.append(EOS)
    return tokens


def load_ptb() -> tuple[dict[str, np.ndarray], Vocab]:
    """Returns the word-level Penn Treebank splits (Mikolov et al. 2010) and their vocabulary.

    One "<eos>" ends each line; the files already replace rare words by "<unk>". The
    vocabulary is built from "train": 10,000 tokens, "<unk>" first (id 0), then by decreasing
    count; no padding token.

    Returns:
      ({"train": int32 [929589], "valid": int32 [73760], "test": int32 [82430]}, vocab)
    """
    tokens = {split: read_ptb_tokens(files.find_file("ptb", name))
              for split, name in PTB_SPLITS.items()}
    vocab = Vocab.build(tokens["train"], pad=None, unk="<unk>")
    return {split: vocab.encode(toks) for split, toks in tokens.items()}, vocab
