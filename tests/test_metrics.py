"""Token metrics against NumPy; span F1 against hand-worked cases and a port of conlleval."""
import math
import random
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from recur import metrics


# ---------------------------------------------------------------------------------------------
# Token metrics.

def test_cross_entropy_with_mask_equals_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(3, 5))
    mask = rng.random((3, 5)) < 0.6
    targets[~mask] = -1  # padding ids must not matter
    total, count = 0.0, 0
    for b, t in zip(*np.nonzero(mask)):
        z = logits[b, t].astype(np.float64)
        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[targets[b, t]]
        count += 1
    sum_loss, n = metrics.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                        jnp.asarray(mask))
    assert sum_loss.dtype == jnp.float32 and n.dtype == jnp.int32 and int(n) == count
    np.testing.assert_allclose(sum_loss, total, rtol=1e-5)
    # bfloat16 logits are read in float32: same sum as the float32 copy of those logits.
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    sum_bf16, _ = metrics.cross_entropy(logits_bf16, jnp.asarray(targets), jnp.asarray(mask))
    assert sum_bf16.dtype == jnp.float32
    np.testing.assert_allclose(sum_bf16, metrics.cross_entropy(
        logits_bf16.astype(jnp.float32), jnp.asarray(targets), jnp.asarray(mask))[0])


def test_cross_entropy_without_mask_counts_every_token():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)
    targets = jnp.array([[0, 1, 2], [3, 0, 1]])
    sum_loss, n = metrics.cross_entropy(logits, targets)
    assert int(n) == 6
    np.testing.assert_allclose(
        sum_loss, metrics.cross_entropy(logits, targets, jnp.ones((2, 3), bool))[0])


@pytest.mark.parametrize("vocab", [2, 27, 256, 50257])
def test_uniform_model_has_perplexity_vocab(vocab):
    logits = jnp.full((2, 3, vocab), 1.7, jnp.float32)  # any constant gives the uniform model
    sum_loss, n = metrics.cross_entropy(logits, jnp.zeros((2, 3), jnp.int32))
    mean_nats = sum_loss / n
    np.testing.assert_allclose(metrics.perplexity(mean_nats), vocab, rtol=1e-5)
    np.testing.assert_allclose(metrics.bits_per_char(mean_nats), math.log2(vocab), rtol=1e-5)


def test_bits_per_char_of_ln2_nats_is_one_bit():
    np.testing.assert_allclose(metrics.bits_per_char(math.log(2.0)), 1.0)


def test_accuracy_and_token_accuracy():
    logits = jnp.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0], [5.0, 4.0]])
    np.testing.assert_allclose(metrics.accuracy(logits, jnp.array([1, 0, 0, 1])), 0.5)
    pred = jnp.array([[1, 2, 3], [4, 5, 6]])
    gold = jnp.array([[1, 0, 3], [4, 5, 0]])
    mask = jnp.array([[True, True, True], [True, True, False]])
    # Unmasked: 5 positions; correct among them: (0,0), (0,2), (1,0), (1,1) = 4.
    correct, count = metrics.token_accuracy(pred, gold, mask)
    assert (int(correct), int(count)) == (4, 5)


# ---------------------------------------------------------------------------------------------
# Span extraction, worked by hand. Spans are (type, start, end) with end exclusive.

@pytest.mark.parametrize("scheme, tags, spans", [
    # Well-formed IOB2.
    ("IOB2", "B-PER I-PER O B-LOC", {("PER", 0, 2), ("LOC", 3, 4)}),
    # conlleval reads an I- after O as the start of a chunk.
    ("IOB2", "O I-PER I-PER O", {("PER", 1, 3)}),
    # An I- of another type ends the chunk and starts a new one.
    ("IOB2", "B-PER I-LOC I-LOC", {("PER", 0, 1), ("LOC", 1, 3)}),
    # B- after B- of the same type: two chunks.
    ("IOB2", "B-PER B-PER", {("PER", 0, 1), ("PER", 1, 2)}),
    # A chunk running to the end of the sentence is closed there.
    ("IOB2", "O B-ORG I-ORG", {("ORG", 1, 3)}),
    # Types may contain "-".
    ("IOB2", "B-MISC-X I-MISC-X", {("MISC-X", 0, 2)}),
    # IOB1: chunks start with I-; B- only separates adjacent chunks of the same type.
    ("IOB1", "I-PER I-PER B-PER O I-LOC", {("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)}),
    ("IOB1", "I-PER I-LOC", {("PER", 0, 1), ("LOC", 1, 2)}),
    # Well-formed BIOES.
    ("BIOES", "B-PER E-PER S-LOC O B-ORG I-ORG E-ORG", {("PER", 0, 2), ("LOC", 2, 3),
                                                        ("ORG", 4, 7)}),
    ("BIOES", "S-PER S-PER", {("PER", 0, 1), ("PER", 1, 2)}),
    # Ill-formed BIOES, read after mapping S -> B, E -> I (see extract_spans):
    ("BIOES", "B-PER O", {("PER", 0, 1)}),                     # B- without E-
    ("BIOES", "B-PER I-PER O", {("PER", 0, 2)}),               # B- I- without E-
    ("BIOES", "O E-PER", {("PER", 1, 2)}),                     # E- after O starts a chunk
    ("BIOES", "B-PER E-PER I-PER", {("PER", 0, 3)}),           # E- does not close by itself
    ("BIOES", "B-PER E-LOC", {("PER", 0, 1), ("LOC", 1, 2)}),  # type change
    ("IOBES", "B-PER E-PER S-LOC", {("PER", 0, 2), ("LOC", 2, 3)}),  # alias
    ("IOB2", "", set()),
])
def test_extract_spans(scheme, tags, spans):
    assert metrics.extract_spans(tags.split(), scheme) == spans


@pytest.mark.parametrize("scheme, tag", [
    ("IOB2", "X-PER"), ("IOB2", "E-PER"), ("IOB1", "S-PER"), ("BIOES", "B"), ("IOB2", "PER"),
    ("BIOES", "O-PER"), ("IOB2", "B-"), ("IOB2", "BI-PER"),
])
def test_unknown_tag_raises_naming_it(scheme, tag):
    with pytest.raises(ValueError, match=repr(tag)):
        metrics.extract_spans(["O", tag], scheme)
    with pytest.raises(ValueError, match=f"sentence 1: tag {tag!r}"):
        metrics.span_f1([["O"], ["O", tag]], [["O"], ["O", "O"]], scheme)


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="'BILOU'"):
        metrics.extract_spans(["O"], "BILOU")


# ---------------------------------------------------------------------------------------------
# Span F1, worked by hand.

def _f1(p, r):
    return 2 * p * r / (p + r)


def test_span_f1_iob2_ill_formed_prediction():
    gold = ["B-PER I-PER O B-LOC".split()]            # PER(0,2) LOC(3,4)
    pred = ["B-PER I-LOC O B-LOC".split()]            # PER(0,1) LOC(1,2) LOC(3,4)
    out = metrics.span_f1(gold, pred, "IOB2")         # correct: LOC(3,4)
    assert out["counts"] == {"correct": 1, "gold": 2, "pred": 3}
    assert out["precision"] == pytest.approx(1 / 3) and out["recall"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(0.4)            # 2 * (1/3)(1/2) / (5/6)


def test_span_f1_iob2_i_after_o_matches_b():
    gold = ["B-PER I-PER O B-LOC".split()]
    pred = ["I-PER I-PER O I-LOC".split()]            # same chunks, read as conlleval does
    assert metrics.span_f1(gold, pred, "IOB2")["f1"] == 1.0


def test_span_f1_iob1():
    gold = ["I-PER I-PER B-PER O I-LOC".split()]      # PER(0,2) PER(2,3) LOC(4,5)
    pred = ["I-PER I-PER I-PER O I-LOC".split()]      # PER(0,3) LOC(4,5)
    out = metrics.span_f1(gold, pred, "IOB1")         # correct: LOC(4,5)
    assert out["counts"] == {"correct": 1, "gold": 3, "pred": 2}
    assert (out["precision"], out["recall"]) == pytest.approx((1 / 2, 1 / 3))
    assert out["f1"] == pytest.approx(0.4)
    assert out["per_type"]["PER"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "correct": 0, "gold": 2, "pred": 1})
    assert out["per_type"]["LOC"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "correct": 1, "gold": 1, "pred": 1})


def test_span_f1_bioes_b_without_e():
    gold = ["B-PER E-PER S-LOC O B-ORG I-ORG E-ORG".split()]  # PER(0,2) LOC(2,3) ORG(4,7)
    pred = ["B-PER O S-LOC B-ORG I-ORG O O".split()]          # PER(0,1) LOC(2,3) ORG(3,5)
    out = metrics.span_f1(gold, pred, "BIOES")                # correct: LOC(2,3)
    assert out["counts"] == {"correct": 1, "gold": 3, "pred": 3}
    assert (out["precision"], out["recall"], out["f1"]) == pytest.approx((1 / 3,) * 3)
    assert metrics.span_f1(gold, pred, "IOBES") == out


def test_span_f1_is_micro_averaged_with_per_type_counts():
    gold = ["B-PER I-PER O".split(),                  # PER(0,2)
            "B-LOC O B-PER B-ORG".split(),            # LOC(0,1) PER(2,3) ORG(3,4)
            "O O".split()]
    pred = ["B-PER I-PER O".split(),                  # PER(0,2): correct
            "B-LOC O B-ORG B-ORG".split(),            # LOC(0,1), ORG(3,4): correct; ORG(2,3)
            "B-MISC O".split()]                       # MISC(0,1)
    out = metrics.span_f1(gold, pred, "IOB2")
    # Micro: correct 3, gold 4, pred 5 -> P 3/5, R 3/4 (the macro mean over sentences of
    # recall would be (1 + 2/3) / 2 and is not what is reported).
    assert out["counts"] == {"correct": 3, "gold": 4, "pred": 5}
    assert (out["precision"], out["recall"]) == pytest.approx((3 / 5, 3 / 4))
    assert out["f1"] == pytest.approx(_f1(3 / 5, 3 / 4))
    per = {t: (d["correct"], d["gold"], d["pred"]) for t, d in out["per_type"].items()}
    assert per == {"LOC": (1, 1, 1), "MISC": (0, 0, 1), "ORG": (1, 1, 2), "PER": (1, 2, 1)}
    assert out["per_type"]["ORG"]["precision"] == pytest.approx(1 / 2)
    assert out["per_type"]["PER"]["recall"] == pytest.approx(1 / 2)
    assert out["per_type"]["MISC"]["recall"] == 0.0  # no gold MISC: 0, not a crash


@pytest.mark.parametrize("scheme, sentences", [
    ("IOB1", ["I-PER I-PER B-PER O I-LOC".split(), "O I-ORG".split()]),
    ("IOB2", ["B-PER I-PER O B-LOC".split(), ["B-ORG"]]),
    ("BIOES", ["B-PER E-PER S-LOC".split(), "O B-ORG I-ORG E-ORG".split()]),
])
def test_perfect_prediction_scores_one(scheme, sentences):
    out = metrics.span_f1(sentences, sentences, scheme)
    assert (out["precision"], out["recall"], out["f1"]) == (1.0, 1.0, 1.0)


def test_empty_prediction_scores_zero_without_crashing():
    gold = ["B-PER I-PER O B-LOC".split()]
    out = metrics.span_f1(gold, [["O"] * 4], "IOB2")
    assert (out["precision"], out["recall"], out["f1"]) == (0.0, 0.0, 0.0)
    assert out["counts"] == {"correct": 0, "gold": 2, "pred": 0}
    out = metrics.span_f1([["O"]], [["O"]], "IOB2")  # no chunks anywhere: conlleval prints 0
    assert (out["precision"], out["recall"], out["f1"], out["per_type"]) == (0, 0, 0, {})
    assert metrics.span_f1([], [], "BIOES")["f1"] == 0.0


def test_mismatched_corpora_raise_naming_the_sentence():
    with pytest.raises(ValueError, match="sentence index 1"):
        metrics.span_f1([["O"], ["O"]], [["O"]], "IOB2")
    with pytest.raises(ValueError, match="sentence 2: gold has 2 tags but prediction has 1"):
        metrics.span_f1([["O"], ["O"], ["O", "O"]], [["O"], ["O"], ["O"]], "IOB2")


# ---------------------------------------------------------------------------------------------
# Span F1 against a line-by-line port of conlleval's counting loop (a different algorithm: it
# never builds spans, it tracks whether the current gold and guessed chunks still agree).

def _conll_end_of_chunk(prev_tag, tag, prev_type, type_):
    end = ((prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"),
                               ("E", "E"), ("E", "I"), ("E", "O")})
    if prev_tag != "O" and prev_tag != "." and prev_type != type_:
        end = True
    return end or prev_tag in ("]", "[")


def _conll_start_of_chunk(prev_tag, tag, prev_type, type_):
    start = ((prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"),
                                 ("E", "E"), ("E", "I"), ("O", "E")})
    if tag != "O" and tag != "." and prev_type != type_:
        start = True
    return start or tag in ("[", "]")


def _conlleval_counts(gold_sentences, pred_sentences):
    """(correct, gold, pred) chunk Counters by type, as conlleval's main loop counts them."""
    correct_n, gold_n, pred_n = Counter(), Counter(), Counter()
    in_correct = False
    last_c, last_c_type, last_g, last_g_type = "O", "", "O", ""
    lines = [pair for g, p in zip(gold_sentences, pred_sentences)
             for pair in list(zip(g, p)) + [("O", "O")]]  # a blank line reads as O O
    for correct_tag, guessed_tag in lines:
        c, _, c_type = correct_tag.partition("-")
        g, _, g_type = guessed_tag.partition("-")
        c_end = _conll_end_of_chunk(last_c, c, last_c_type, c_type)
        g_end = _conll_end_of_chunk(last_g, g, last_g_type, g_type)
        if in_correct:
            if c_end and g_end and last_g_type == last_c_type:
                in_correct = False
                correct_n[last_c_type] += 1
            elif c_end != g_end or g_type != c_type:
                in_correct = False
        c_start = _conll_start_of_chunk(last_c, c, last_c_type, c_type)
        g_start = _conll_start_of_chunk(last_g, g, last_g_type, g_type)
        if c_start and g_start and g_type == c_type:
            in_correct = True
        if c_start:
            gold_n[c_type] += 1
        if g_start:
            pred_n[g_type] += 1
        last_c, last_c_type, last_g, last_g_type = c, c_type, g, g_type
    if in_correct:
        correct_n[last_c_type] += 1
    return correct_n, gold_n, pred_n


def _iobes_to_iob2(sentence):
    return [{"S": "B", "E": "I"}.get(t[0], t[0]) + t[1:] if t != "O" else t for t in sentence]


@pytest.mark.parametrize("scheme", ["IOB2", "BIOES"])
def test_span_f1_agrees_with_conlleval_port_on_random_tags(scheme):
    rng = random.Random(0)
    prefixes = "BI" if scheme == "IOB2" else "BIES"
    vocab = ["O", "O"] + [f"{p}-{t}" for p in prefixes for t in ("A", "B")]
    gold, pred = [], []
    for _ in range(300):
        g = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
        p = [t if rng.random() < 0.7 else rng.choice(vocab) for t in g]  # mostly right
        gold.append(g)
        pred.append(p)
    out = metrics.span_f1(gold, pred, scheme)
    correct_n, gold_n, pred_n = _conlleval_counts([_iobes_to_iob2(s) for s in gold],
                                                  [_iobes_to_iob2(s) for s in pred])
    assert out["counts"] == {"correct": sum(correct_n.values()), "gold": sum(gold_n.values()),
                             "pred": sum(pred_n.values())}
    assert 0 < out["counts"]["correct"] < out["counts"]["gold"]  # the test exercises both
    for t, d in out["per_type"].items():
        assert (d["correct"], d["gold"], d["pred"]) == (correct_n[t], gold_n[t], pred_n[t])
