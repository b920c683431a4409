"""SST-2, binary sentence-level sentiment (Socher et al. 2013), in Kim's (2014) format.

Each line of stsa.binary.{train,dev,test} is `<label> <tokens>`, the label 0 (negative) or
1 (positive), the tokens already lower-cased and separated by spaces.
"""
from __future__ import annotations

import os
import re

import numpy as np

from recur.data import files
from recur.data.lines import DataFormatError, read_lines, split_fields

SST2_SPLITS = {"train": "stsa.binary.train", "dev": "stsa.binary.dev",
               "test": "stsa.binary.test"}
_INTEGER = re.compile(r"[+-]?[0-9]+")


def read_sst2(path: str | os.PathLike,
              encoding: str = "latin-1") -> tuple[list[list[str]], np.ndarray]:
    """Returns the sentences (lists of tokens) and labels (int32 [N], 0 or 1) of one file.

    Lines are split on "\\n" only and tokens on ASCII whitespace only, so a "\\x85" or a
    non-breaking space inside a token never splits it.

    Raises:
      DataFormatError: naming file and line, for an empty file, a line without a label and
        at least one token, or a label that is not an integer or not 0/1.
    """
    sentences: list[list[str]] = []
    labels: list[int] = []
    for number, line in enumerate(read_lines(path, encoding), start=1):
        fields = split_fields(line)
        if len(fields) < 2:
            raise DataFormatError(path, number, f"expected '<label> <tokens>', got {line!r}.")
        label = fields[0]
        if not _INTEGER.fullmatch(label):
            raise DataFormatError(path, number, f"the label {label!r} is not an integer.")
        if label not in ("0", "1"):
            raise DataFormatError(path, number, f"the label {label} is not 0 or 1.")
        labels.append(int(label))
        sentences.append(fields[1:])
    return sentences, np.asarray(labels, dtype=np.int32)


def load_sst2(encoding: str = "latin-1") -> dict[str, tuple[list[list[str]], np.ndarray]]:
    """Returns {"train", "dev", "test"} -> (sentences, labels int32 [N]) of SST-2.

    N is 6,920 / 872 / 1,821. Build the vocabulary from "train" (see `Vocab.build`).
    """
    return {split: read_sst2(files.find_file("sst2", name), encoding)
            for split, name in SST2_SPLITS.items()}
