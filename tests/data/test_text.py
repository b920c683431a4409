"""Tests of recur.data.text on the real corpora, and of the packaged Shakespeare fallback."""
import gzip
import hashlib
import importlib.resources
import urllib.error

import numpy as np

from recur.data import files, text


def test_tinyshakespeare_split_and_vocab(require_dataset):
    require_dataset("tinyshakespeare")
    splits, vocab = text.load_tinyshakespeare()
    assert len(splits["train"]) == 1_003_854 and len(splits["valid"]) == 111_540
    assert len(vocab) == 65 and vocab.pad is None and vocab.unk is None
    assert all(ids.dtype == np.int32 for ids in splits.values())
    whole = "".join(vocab.decode(np.concatenate([splits["train"], splits["valid"]])))
    path = files.find_file("tinyshakespeare", "input.txt", download=False)
    assert whole == path.read_text(encoding="utf-8")


def test_packaged_shakespeare_is_the_canonical_text():
    asset = importlib.resources.files("recur.data") / "assets" / "tinyshakespeare.txt.gz"
    digest = hashlib.sha256(gzip.decompress(asset.read_bytes())).hexdigest()
    assert digest == files.source("tinyshakespeare", "input.txt").sha256


def test_tinyshakespeare_loads_offline_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(files.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(files.CACHE_DIR_ENV, str(tmp_path / "cache"))

    def offline(url):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(files, "_download", offline)
    splits, vocab = text.load_tinyshakespeare()
    assert len(splits["train"]) + len(splits["valid"]) == 1_115_394 and len(vocab) == 65
    assert not (tmp_path / "cache").exists()  # nothing written


def test_ptb_counts_and_vocab(require_dataset):
    require_dataset("ptb")
    splits, vocab = text.load_ptb()
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 929_589, "valid": 73_760, "test": 82_430}
    assert len(vocab) == 10_000 and "<unk>" in vocab and "<eos>" in vocab
    eos = vocab.id("<eos>")
    assert [int((ids == eos).sum()) for ids in splits.values()] == [42_068, 3_370, 3_761]
    # valid and test have no word outside the training vocabulary: decoding gives the file back
    valid = text.read_ptb_tokens(files.find_file("ptb", "ptb.valid.txt"))
    assert vocab.decode(splits["valid"]) == valid


def test_read_ptb_tokens_appends_eos_per_line(tmp_path):
    path = tmp_path / "toy.txt"
    path.write_bytes(b" a b \n c\n\n")
    assert text.read_ptb_tokens(path) == ["a", "b", "<eos>", "c", "<eos>", "<eos>"]
