"""Tests of recur.data.vocab.Vocab."""
import numpy as np
import pytest

from recur.data.vocab import Vocab

STREAM = "b a c a b a d".split()  # counts: a 3, b 2, c 1, d 1


def test_build_orders_specials_then_count_then_string():
    vocab = Vocab.build(STREAM, specials=("<eos>",))
    assert vocab.tokens == ("<pad>", "<unk>", "<eos>", "a", "b", "c", "d")
    assert vocab.pad_id == 0 and vocab.unk_id == 1


def test_min_freq_and_max_size_map_rare_tokens_to_unk():
    vocab = Vocab.build(STREAM, min_freq=2)
    assert vocab.tokens == ("<pad>", "<unk>", "a", "b")
    assert vocab.encode(["a", "c", "zzz"]).tolist() == [2, 1, 1]
    assert Vocab.build(STREAM, max_size=3).tokens == ("<pad>", "<unk>", "a")


def test_encode_decode_round_trip_and_dtype():
    vocab = Vocab.build(STREAM, pad=None, unk=None)
    ids = vocab.encode(STREAM)
    assert ids.dtype == np.int32 and ids.shape == (len(STREAM),)
    assert vocab.decode(ids) == STREAM


def test_unknown_token_without_unk_names_the_token():
    vocab = Vocab(["a", "b"])
    with pytest.raises(KeyError, match=r"'zebra' \(position 2\)"):
        vocab.encode(["a", "b", "zebra"])
    with pytest.raises(ValueError, match="no unk token"):
        Vocab.build(STREAM, min_freq=2, unk=None)


def test_json_round_trip():
    vocab = Vocab.build(["é", "ü", "é", "<eos>"], specials=("<eos>",))
    again = Vocab.from_json(vocab.to_json())
    assert again == vocab
    assert again.encode(["ü", "?"]).tolist() == vocab.encode(["ü", "?"]).tolist()


def test_invalid_vocabs_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        Vocab(["a", "b", "a"])
    with pytest.raises(ValueError, match="first token"):
        Vocab(["a", "<pad>"], pad="<pad>")
    with pytest.raises(ValueError, match="not among"):
        Vocab(["a"], unk="<unk>")
    with pytest.raises(IndexError):
        Vocab(["a"]).decode([1])
