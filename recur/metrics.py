"""Evaluation metrics: token cross-entropy, accuracies, and span (chunk) F1 as in conlleval.

Shape letters: B batch, T time, V vocabulary, K classes.

Token metrics return *sums and counts*, not means, so an evaluation over many batches (with
different numbers of real tokens) averages correctly: mean = sum(sums) / sum(counts).

Span F1 follows the CoNLL-2000 shared-task script ``conlleval`` (Tjong Kim Sang & Buchholz
2000): a chunk is correct when gold and prediction agree on its type, first and last token;
precision = correct / predicted chunks and recall = correct / gold chunks, micro-averaged over
every chunk of the corpus; F1 = 2PR / (P + R). Scores here are fractions in [0, 1] (conlleval
prints percentages), and are 0 where conlleval prints 0: no predicted chunks -> precision 0, no
gold chunks -> recall 0, P + R = 0 -> F1 0.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Span = tuple[str, int, int]

SCHEMES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES", "IOBES": "BIES"}  # allowed prefixes


# ---------------------------------------------------------------------------------------------
# Token metrics.

def cross_entropy(logits_BxTxV: Array, targets_BxT: Array,
                  mask_BxT: Array | None = None) -> tuple[Array, Array]:
    """Summed negative log-likelihood in nats and the number of tokens counted.

        sum_loss = sum_{b,t: mask[b,t]} -log softmax(logits[b, t])[targets[b, t]]

    Returns (sum_loss float32, count int32); the mean is sum_loss / count. The softmax runs in
    float32 whatever the logits' dtype. Masked-out positions may hold any target (e.g. -1 for
    padding); mask is boolean or 0/1, and None counts every token.
    """
    if mask_BxT is None:
        mask_BxT = jnp.ones(jnp.shape(targets_BxT), bool)
    mask_BxT = jnp.asarray(mask_BxT) != 0
    targets_BxT = jnp.where(mask_BxT, targets_BxT, 0)
    log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(log_probs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask_BxT, nll_BxT, 0)), jnp.sum(mask_BxT, dtype=jnp.int32)


def perplexity(mean_nats):
    """exp(mean cross-entropy in nats): a uniform model over V symbols has perplexity V."""
    return jnp.exp(mean_nats)


def bits_per_char(mean_nats):
    """Mean cross-entropy per character converted from nats to bits: nats / ln 2."""
    return mean_nats / math.log(2.0)


def accuracy(logits_BxK: Array, labels_B: Array) -> Array:
    """Fraction of examples whose argmax class equals the label (ties -> lowest index)."""
    return jnp.mean(jnp.argmax(logits_BxK, axis=-1) == labels_B)


def token_accuracy(pred_BxT: Array, gold_BxT: Array,
                   mask_BxT: Array | None = None) -> tuple[Array, Array]:
    """(number of unmasked positions where pred == gold, number of unmasked positions), int32."""
    if mask_BxT is None:
        mask_BxT = jnp.ones(jnp.shape(gold_BxT), bool)
    mask_BxT = jnp.asarray(mask_BxT) != 0
    correct_BxT = mask_BxT & (jnp.asarray(pred_BxT) == jnp.asarray(gold_BxT))
    return jnp.sum(correct_BxT, dtype=jnp.int32), jnp.sum(mask_BxT, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Span metrics (plain Python: tags are strings).

def extract_spans(tags: Sequence[str], scheme: str) -> set[Span]:
    """The chunks of one sentence as {(type, start, end)}, end exclusive (tags[start:end]).

    A tag is "O" or "<prefix>-<type>"; the prefix is split at the first "-", so a type may
    itself contain "-". Allowed prefixes: B, I for "IOB1" and "IOB2"; B, I, E, S for "BIOES"
    (alias "IOBES").

    IOB1 and IOB2 are decoded by conlleval's rules, which are the same for both (conlleval has
    no scheme option). With p, t the previous and current prefixes (p = O before the sentence,
    t = O after it) and a type change meaning p != O and type(p) != type(t):
      a chunk ends before t   if p in {B, I} and t in {B, O}, or the type changes;
      a chunk starts at t     if t = B, or p = O and t = I, or t != O and the type changes.
    So an I-X after O or after another type starts a chunk (ill-formed IOB2 is still read),
    and B-X always starts one (in IOB1 it only separates adjacent chunks of one type).

    BIOES is first mapped to IOB2 by S -> B, E -> I and then decoded as above; this is what
    Lample et al. 2016 (github.com/glample/tagger, ``iobes_iob``) do before running conlleval,
    so scores compare with published BiLSTM-CRF numbers. Well-formed BIOES gives its exact
    chunks. For ill-formed sequences: B-X without E-X ends where the next tag ends it
    (B-X O -> a one-token chunk; B-X I-X O -> a two-token chunk); an E- or I- after O or after
    another type starts a chunk; and an E- does not close its chunk by itself (B-X E-X I-X is
    one chunk of three tokens, S-X I-X one of two), since after mapping it is an I-.

    Raises ValueError naming the tag and position for a tag the scheme does not allow.
    """
    allowed = _allowed_prefixes(scheme)
    spans: set[Span] = set()
    prev_prefix, prev_type, start = "O", "", None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = _split_tag(tag, allowed, scheme, i)
        if allowed == "BIES":
            prefix = {"S": "B", "E": "I"}.get(prefix, prefix)
        type_change = prev_prefix != "O" and prev_type != type_
        if start is not None and ((prev_prefix in "BI" and prefix in "BO") or type_change):
            spans.add((prev_type, start, i))
            start = None
        if prefix == "B" or (prev_prefix == "O" and prefix == "I") or \
                (prefix != "O" and prev_type != type_):
            start = i
        prev_prefix, prev_type = prefix, type_
    return spans


def span_f1(gold_sentences: Sequence[Sequence[str]], pred_sentences: Sequence[Sequence[str]],
            scheme: str) -> dict:
    """Micro-averaged chunk precision, recall and F1 over a corpus, as fractions in [0, 1].

    Returns {"precision", "recall", "f1",
             "per_type": {type: {"precision", "recall", "f1", "correct", "gold", "pred"}},
             "counts": {"correct", "gold", "pred"}}  (chunk counts).
    ``per_type`` lists every type seen in gold or prediction. Raises ValueError naming the
    sentence index when the corpora differ in sentence count or a sentence in length.
    """
    if len(gold_sentences) != len(pred_sentences):
        raise ValueError(f"gold has {len(gold_sentences)} sentences but prediction has "
                         f"{len(pred_sentences)}; sentence index "
                         f"{min(len(gold_sentences), len(pred_sentences))} has no partner")
    gold_n, pred_n, correct_n = Counter(), Counter(), Counter()
    for n, (gold, pred) in enumerate(zip(gold_sentences, pred_sentences)):
        if len(gold) != len(pred):
            raise ValueError(f"sentence {n}: gold has {len(gold)} tags but prediction has "
                             f"{len(pred)}")
        try:
            gold_spans, pred_spans = extract_spans(gold, scheme), extract_spans(pred, scheme)
        except ValueError as err:
            raise ValueError(f"sentence {n}: {err}") from None
        gold_n.update(t for t, _, _ in gold_spans)
        pred_n.update(t for t, _, _ in pred_spans)
        correct_n.update(t for t, _, _ in gold_spans & pred_spans)
    per_type = {t: _scores(correct_n[t], gold_n[t], pred_n[t])
                for t in sorted(set(gold_n) | set(pred_n))}
    total = _scores(sum(correct_n.values()), sum(gold_n.values()), sum(pred_n.values()))
    return {"precision": total["precision"], "recall": total["recall"], "f1": total["f1"],
            "per_type": per_type,
            "counts": {k: total[k] for k in ("correct", "gold", "pred")}}


def _scores(correct: int, gold: int, pred: int) -> dict:
    precision = correct / pred if pred else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "correct": correct, "gold": gold, "pred": pred}


def _allowed_prefixes(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tagging scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _split_tag(tag: str, allowed: str, scheme: str, position: int) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, dash, type_ = tag.partition("-")
    if not dash or not type_ or len(prefix) != 1 or prefix not in allowed:
        raise ValueError(f"tag {tag!r} at position {position} is not valid in {scheme}; "
                         f"expected 'O' or one of {list(allowed)} followed by '-TYPE'")
    return prefix, type_
