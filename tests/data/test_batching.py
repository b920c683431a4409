"""Tests of recur.data.batching.SequenceBatches: coverage, padding, determinism, resumption."""
import numpy as np
import pytest

from recur.data.batching import SequenceBatches
from recur.data.conll import load_ud_english_ewt
from recur.data.vocab import Vocab

N, B = 203, 8


def _corpus(n: int = N, seed: int = 0):
    """Random sentences of 1..40 token ids (1..99), per-word tags and character ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 41, size=n)
    tokens = [rng.integers(1, 100, size=k).tolist() for k in lengths]
    tags = [rng.integers(0, 5, size=k).tolist() for k in lengths]
    chars = [[rng.integers(1, 30, size=rng.integers(1, 12)).tolist() for _ in range(k)]
             for k in lengths]
    labels = rng.integers(0, 2, size=n)
    return tokens, tags, chars, labels


def _epoch_indices(batches):
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("order", ["keep", "shuffle", "bucket"])
def test_every_sentence_once_per_epoch_with_zero_padding(order):
    tokens, tags, _, labels = _corpus()
    batches = SequenceBatches(tokens, tags=tags, labels=labels, batch_size=B, order=order,
                              pool_batches=5)
    for _ in range(2):
        seen = []
        for batch in batches:
            t = batch["tokens"].shape[1]
            assert t % 8 == 0 and t >= batch["lengths"].max()
            assert all(a.dtype == np.int32 for a in batch.values())
            for row, i in enumerate(batch["index"]):
                k = batch["lengths"][row]
                assert k == len(tokens[i])
                assert batch["tokens"][row, :k].tolist() == tokens[i]
                assert batch["tags"][row, :k].tolist() == tags[i]
                assert not batch["tokens"][row, k:].any() and not batch["tags"][row, k:].any()
            np.testing.assert_array_equal(batch["labels"], labels[batch["index"]])
            seen.extend(batch["index"].tolist())
        assert sorted(seen) == list(range(N))
        if order == "keep":
            assert seen == list(range(N))


def test_drop_last_keeps_only_full_batches():
    tokens, *_ = _corpus()
    for order in ("shuffle", "bucket"):
        batches = SequenceBatches(tokens, batch_size=B, order=order, drop_last=True)
        sizes = [len(i) for i in _epoch_indices(batches)]
        assert sizes == [B] * (N // B)
    with pytest.raises(ValueError, match="never drops"):
        SequenceBatches(tokens, batch_size=B, order="keep", drop_last=True)


def test_order_depends_only_on_seed_and_epoch():
    tokens, *_ = _corpus()

    def order(seed, epoch):
        batches = SequenceBatches(tokens, batch_size=B, seed=seed)
        batches.load_state_dict({"epoch": epoch, "position": 0})
        return _epoch_indices(batches)

    assert order(1, 3) == order(1, 3)
    assert order(1, 3) != order(1, 4) and order(1, 3) != order(2, 3)


def test_bucketing_wastes_less_padding_than_shuffling():
    tokens, *_ = _corpus(n=1000)

    def padded_cells(order):
        return sum(b["tokens"].size for b in SequenceBatches(tokens, batch_size=B, order=order))

    assert padded_cells("bucket") < 0.8 * padded_cells("shuffle")


@pytest.mark.parametrize("stop_after", [0, 5, 25, 26, 40])
def test_resume_reads_the_same_batches(stop_after):
    tokens, tags, _, _ = _corpus()
    uninterrupted = SequenceBatches(tokens, tags=tags, batch_size=B, seed=7)
    expected = _epoch_indices(uninterrupted) + _epoch_indices(uninterrupted)  # 2 x 26 batches
    first = SequenceBatches(tokens, tags=tags, batch_size=B, seed=7)
    seen = []
    while len(seen) < stop_after:
        for batch in first:
            seen.append(batch["index"].tolist())
            if len(seen) == stop_after:
                break
    resumed = SequenceBatches(tokens, tags=tags, batch_size=B, seed=7)
    resumed.load_state_dict(first.state_dict())
    while len(seen) < len(expected):
        seen.extend(_epoch_indices(resumed))
    assert seen == expected


def test_character_ids_per_word():
    tokens, _, chars, _ = _corpus()
    for batch in SequenceBatches(tokens, chars=chars, batch_size=B, order="shuffle"):
        c, wl = batch["chars"], batch["word_lengths"]
        assert c.shape[:2] == batch["tokens"].shape and c.shape[2] % 8 == 0
        for row, i in enumerate(batch["index"]):
            k = batch["lengths"][row]
            assert not wl[row, k:].any() and not c[row, k:].any()
            for t, word in enumerate(chars[i]):
                assert wl[row, t] == len(word)
                assert c[row, t, :len(word)].tolist() == word and not c[row, t, len(word):].any()


def test_mismatched_inputs_name_the_sentence():
    with pytest.raises(ValueError, match="Sentence 1 has 2 tokens but 1 tags"):
        SequenceBatches([[1], [2, 3]], tags=[[0], [0]], batch_size=2)
    with pytest.raises(ValueError, match="Sentence 0 has 1 tokens but 2 chars"):
        SequenceBatches([[1]], chars=[[[1], [2]]], batch_size=2)
    with pytest.raises(ValueError, match="1 labels for 2 sentences"):
        SequenceBatches([[1], [2]], labels=[0], batch_size=2)
    with pytest.raises(ValueError, match=r"tokens\[1\] must be a sequence of integer ids"):
        SequenceBatches([[1], ["a"]], batch_size=2)


def test_tagging_batches_of_real_sentences_decode_back(require_dataset):
    require_dataset("ud_english_ewt")
    sentences = load_ud_english_ewt()["dev"]
    words = Vocab.build(w for ws, _ in sentences for w in ws)
    letters = Vocab.build(c for ws, _ in sentences for w in ws for c in w)
    upos = Vocab.build((t for _, ts in sentences for t in ts), pad=None, unk=None)
    batches = SequenceBatches([words.encode(ws) for ws, _ in sentences],
                              tags=[upos.encode(ts) for _, ts in sentences],
                              chars=[[letters.encode(w) for w in ws] for ws, _ in sentences],
                              batch_size=64, order="keep")
    decoded = []
    for batch in batches:
        for row, k in enumerate(batch["lengths"]):
            ws = words.decode(batch["tokens"][row, :k])
            lengths = batch["word_lengths"][row]
            spelled = ["".join(letters.decode(batch["chars"][row, t, :lengths[t]]))
                       for t in range(k)]
            assert spelled == ws
            decoded.append((ws, upos.decode(batch["tags"][row, :k])))
    assert decoded == sentences
