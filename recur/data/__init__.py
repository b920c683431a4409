"""Datasets and batching: files found or downloaded and verified, vocabularies, loaders that
return token ids or tagged sentences, and resumable batch iterators.

Data is looked for under `$RECUR_DATA_DIR/<dataset>/`, then in the cache (`$RECUR_CACHE_DIR`,
default `~/.cache/recur`), then downloaded; see `recur.data.files`.
"""
from recur.data.batching import SequenceBatches
from recur.data.conll import (Sentence, load_conll2000, load_ud_english_ewt, read_conll,
                              read_conllu)
from recur.data.epochs import EpochIterator
from recur.data.files import ChecksumError, DataNotFoundError, find_file
from recur.data.lines import DataFormatError
from recur.data.lm_batches import LMBatches
from recur.data.sst2 import load_sst2, read_sst2
from recur.data.text import load_ptb, load_tinyshakespeare, read_ptb_tokens
from recur.data.vocab import Vocab

__all__ = [
    "ChecksumError", "DataFormatError", "DataNotFoundError", "EpochIterator", "LMBatches",
    "Sentence", "SequenceBatches", "Vocab", "find_file", "load_conll2000", "load_ptb",
    "load_sst2", "load_tinyshakespeare", "load_ud_english_ewt", "read_conll", "read_conllu",
    "read_ptb_tokens", "read_sst2",
]
