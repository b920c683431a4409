"""Tagged sentences from CoNLL-U (Universal Dependencies) and generic CoNLL column files.

Both readers return a list of sentences, each a pair (words, tags) of equally long lists of
strings. A tagging task then encodes them with a word, a character and a tag `Vocab`.

CoNLL-U (https://universaldependencies.org/format.html): ten tab-separated fields per word
line; "#" comment lines; a blank line ends each sentence, the last one included. Multiword
token lines (ID "1-2") and empty nodes (ID "8.1") are not words of the sentence and are
skipped, as a tagger of syntactic words needs.

Generic CoNLL (CoNLL-2000 chunking, CoNLL-2003 NER, ...): one token per line, columns
separated by whitespace, a blank line between sentences, "-DOCSTART-" lines skipped. The word
and tag columns are chosen by index, so a new file needs no new code.
"""
from __future__ import annotations

import os
import re

from recur.data import files
from recur.data.lines import DataFormatError, read_lines, split_fields

Sentence = tuple[list[str], list[str]]  # (words, tags), equally long

CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps",
                 "misc")
_NOT_A_WORD = re.compile(r"[0-9]+-[0-9]+|[0-9]+\.[0-9]+")  # multiword token, empty node
EWT_SPLITS = {"train": "en_ewt-ud-train.conllu", "dev": "en_ewt-ud-dev.conllu",
              "test": "en_ewt-ud-test.conllu"}
CONLL2000_SPLITS = {"train": "train.txt", "test": "test.txt"}
CONLL2000_COLUMNS = {"word": 0, "pos": 1, "chunk": 2}


def read_conllu(path: str | os.PathLike, tag: str = "upos",
                encoding: str = "utf-8") -> list[Sentence]:
    """Returns the (words, tags) sentences of a CoNLL-U file; `tag` names the tag field.

    Raises:
      DataFormatError: naming file and line, for an empty file, invalid bytes, a word line
        without exactly 10 fields, an unexpected ID, or a last sentence with no closing blank
        line (a truncated file).
    """
    if tag not in CONLLU_FIELDS:
        raise ValueError(f"tag must be one of the CoNLL-U fields {CONLLU_FIELDS}; got {tag!r}.")
    tag_index = CONLLU_FIELDS.index(tag)
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0  # line of the current sentence's first word
    for number, line in enumerate(read_lines(path, encoding), start=1):
        if not line.strip(" \t"):
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != len(CONLLU_FIELDS):
            raise DataFormatError(path, number, f"a CoNLL-U word line has 10 tab-separated "
                                  f"fields; this one has {len(fields)} (truncated file?).")
        word_id = fields[0]
        if _NOT_A_WORD.fullmatch(word_id):
            continue
        if word_id != str(len(words) + 1):
            raise DataFormatError(path, number, f"expected word ID {len(words) + 1} (or a "
                                  f"range 'a-b' or empty node 'a.b'); got {word_id!r}.")
        start = start if words else number
        words.append(fields[1])
        tags.append(fields[tag_index])
    if words:
        raise DataFormatError(path, start, "the sentence starting here is not ended by a "
                              "blank line before the end of the file (truncated file?).")
    if not sentences:
        raise DataFormatError(path, 1, "the file holds no sentence.")
    return sentences


def read_conll(path: str | os.PathLike, word_column: int = 0, tag_column: int = -1,
               encoding: str = "utf-8") -> list[Sentence]:
    """Returns the (words, tags) sentences of a whitespace-separated CoNLL column file.

    Columns are counted from 0; negative indices count from the last column, as in Python.
    Every token line must have as many columns as the first one.

    Raises:
      DataFormatError: naming file and line, for an empty file, invalid bytes, a line with
        fewer columns than the chosen indices need or than the first token line has.
    """
    needed = max(c + 1 if c >= 0 else -c for c in (word_column, tag_column))
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    width, width_line = 0, 0  # column count of the first token line, and its line number
    for number, line in enumerate(read_lines(path, encoding), start=1):
        fields = split_fields(line)
        if not fields:
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < needed:
            raise DataFormatError(path, number, f"{len(fields)} columns, but word_column="
                                  f"{word_column} and tag_column={tag_column} need {needed}.")
        if not width:
            width, width_line = len(fields), number
        elif len(fields) != width:
            raise DataFormatError(path, number, f"{len(fields)} columns, but line {width_line} "
                                  f"has {width} (truncated or mixed file?).")
        words.append(fields[word_column])
        tags.append(fields[tag_column])
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise DataFormatError(path, 1, "the file holds no sentence.")
    return sentences


def load_ud_english_ewt(tag: str = "upos") -> dict[str, list[Sentence]]:
    """Returns {"train", "dev", "test"} -> sentences of UD English EWT r2.16.

    12,544 / 2,001 / 2,077 sentences of 204,577 / 25,147 / 25,094 words; 17 UPOS tags.
    """
    return {split: read_conllu(files.find_file("ud_english_ewt", name), tag)
            for split, name in EWT_SPLITS.items()}


def load_conll2000(tag: str = "chunk") -> dict[str, list[Sentence]]:
    """Returns {"train", "test"} -> sentences of CoNLL-2000; `tag` is "chunk" or "pos".

    8,936 / 2,012 sentences of 211,727 / 47,377 tokens; chunk tags are IOB2 ("B-NP", "I-NP",
    "O", ...).
    """
    if tag not in ("pos", "chunk"):
        raise ValueError(f"tag must be 'pos' or 'chunk'; got {tag!r}.")
    return {split: read_conll(files.find_file("conll2000", name), 0, CONLL2000_COLUMNS[tag])
            for split, name in CONLL2000_SPLITS.items()}
