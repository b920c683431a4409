"""The data side of the supervised tasks: splits, vocabularies, batches, models and scores.

classify: SST-2 sentences -> one label each (accuracy).
tag:      UD English EWT (UPOS, token accuracy), CoNLL-2000 (chunks, span F1), or any CoNLL
          column files named in the config (word and tag columns chosen there).
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from recur import metrics
from recur.data import (SequenceBatches, Vocab, load_conll2000, load_sst2, load_ud_english_ewt,
                        read_conll)


def build(config):
    if config.task == "classify":
        return ClassifyTask(config.data)
    if config.task == "tag":
        return TagTask(config.data)
    raise ValueError(f"task must be lm, classify or tag; got {config.task!r}")


def _head(split, n: int):
    """The first n sentences of a split (a list, or a (sentences, labels) pair); all when n = 0."""
    if not n:
        return split
    return (split[0][:n], split[1][:n]) if isinstance(split, tuple) else split[:n]


def clip_word(word: str, n: int) -> list[str]:
    """The characters of ``word``, or its first and last n // 2 when it is longer than n (0: all).

    Prefixes and suffixes carry what character features are for (capitals, -ing, -ly, digits);
    a bound on the word length bounds the shapes the tagger is compiled for (URLs run to 80+).
    """
    if not n or len(word) <= n:
        return list(word)
    return list(word[: n // 2] + word[len(word) - (n - n // 2):])


def _char_ids(chars: Vocab, sentences, max_word_chars: int):
    """Per sentence, per word, the character ids of ``clip_word(word, max_word_chars)``."""
    return [[chars.encode(clip_word(w, max_word_chars)) for w in words] for words in sentences]


def _norm(word: str, lowercase: bool) -> str:
    return word.lower() if lowercase else word


class ClassifyTask:
    metric = "accuracy"
    valid_split = "dev"

    def __init__(self, d):
        if d.name != "sst2":
            raise ValueError(f"data.name must be 'sst2' for classification, got {d.name!r}")
        self.splits = {k: _head(v, d.max_sentences) for k, v in load_sst2().items()}
        self.lowercase = d.lowercase
        self.use_chars, self.max_word_chars = d.get("chars", False), d.get("max_word_chars", 0)
        train = self.splits["train"][0]
        self.vocab = Vocab.build((_norm(w, d.lowercase) for s in train for w in s), min_freq=d.min_freq)
        # characters as written (the word vocabulary may be lowercased; capitals can carry emphasis)
        self.chars = Vocab.build(c for s in train for w in s for c in w)
        self.num_classes = int(max(self.splits["train"][1])) + 1

    def describe(self):
        sizes = ", ".join(f"{k} {len(v[0]):,}" for k, v in self.splits.items())
        return f"sst2 ({sizes} sentences), {len(self.vocab):,} words"

    def vocabs_dict(self):
        return {"words": self.vocab.to_dict(), "chars": self.chars.to_dict()}

    def batches(self, split, batch_size, *, order, seed=0, pad_multiple=8):
        sentences, labels = self.splits[split]
        tokens = [self.vocab.encode([_norm(w, self.lowercase) for w in s]) for s in sentences]
        chars = _char_ids(self.chars, sentences, self.max_word_chars) if self.use_chars else None
        return SequenceBatches(tokens, labels=labels, chars=chars, batch_size=batch_size, order=order, seed=seed,
                               pad_multiple=pad_multiple)

    def model(self, m, seed):
        from recur.models.classifier import Classifier

        return Classifier(len(self.vocab), self.num_classes, embed_dim=m.embed_dim, hidden_size=m.hidden,
                          cell=m.cell, num_layers=m.layers, bidirectional=m.bidirectional, pooling=m.pooling,
                          mlp_hidden=m.mlp_hidden, embed_dropout=m.embed_dropout, dropout=m.dropout,
                          locked_dropout=m.locked_dropout, lm_vocab=min(m.get("lm_vocab", 0), len(self.vocab)),
                          lm_weight=m.get("lm_weight", 0.0), unk_id=self.vocab.unk_id,
                          word_dropout_to=m.get("word_dropout_to", "zero"),
                          char_vocab_size=len(self.chars) if self.use_chars else 0,
                          char_embed_dim=m.get("char_embed_dim", 25), char_hidden=m.get("char_hidden", 25),
                          adv_eps=m.get("adv_eps", 0.0), weight_dropout=m.get("weight_dropout", 0.0),
                          scan_mode=m.get("scan_mode", "sequential"), rngs=nnx.Rngs(seed))

    def score(self, preds, data):
        labels = np.asarray(data[1])
        return {"accuracy": float(np.mean(np.asarray(preds) == labels))}


class TagTask:
    valid_split = "dev"

    def __init__(self, d):
        if d.name == "ud_english_ewt":
            self.splits = load_ud_english_ewt(tag=d.tag_field)
        elif d.name == "conll2000":
            train = load_conll2000(tag=d.tag_field)
            # CoNLL-2000 has no development set: hold out the last dev_sentences of train
            self.splits = {"train": train["train"][: -d.dev_sentences], "dev": train["train"][-d.dev_sentences:],
                           "test": train["test"]}
        elif d.name == "conll":
            self.splits = {s: read_conll(getattr(d, f"{s}_file"), word_column=d.word_column, tag_column=d.tag_column)
                           for s in ("train", "dev", "test")}
        else:
            raise ValueError(f"data.name must be ud_english_ewt, conll2000 or conll for tagging, got {d.name!r}")
        self.splits = {k: _head(v, d.max_sentences) for k, v in self.splits.items()}
        self.metric = "f1" if d.scheme else "accuracy"
        self.scheme, self.lowercase, self.use_chars = d.scheme, d.lowercase, d.chars
        self.max_word_chars = d.max_word_chars
        train = self.splits["train"]
        self.vocab = Vocab.build((_norm(w, d.lowercase) for words, _ in train for w in words), min_freq=d.min_freq)
        # the label inventory comes from every split: a tag absent from train (CoNLL-2000's I-LST)
        # must still be scored as a gold tag the model misses, not be an error
        self.tags = Vocab.build((t for split in self.splits.values() for _, tags in split for t in tags),
                                pad=None, unk=None)
        self.chars = Vocab.build((c for words, _ in train for w in words for c in w))

    def describe(self):
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        return f"tagging ({sizes} sentences), {len(self.vocab):,} words, {len(self.tags)} tags"

    def vocabs_dict(self):
        return {"words": self.vocab.to_dict(), "tags": self.tags.to_dict(), "chars": self.chars.to_dict()}

    def batches(self, split, batch_size, *, order, seed=0, pad_multiple=8):
        data = self.splits[split]
        tokens = [self.vocab.encode([_norm(w, self.lowercase) for w in words]) for words, _ in data]
        tags = [self.tags.encode(t) for _, t in data]
        chars = _char_ids(self.chars, [words for words, _ in data], self.max_word_chars) if self.use_chars else None
        return SequenceBatches(tokens, tags=tags, chars=chars, batch_size=batch_size, order=order, seed=seed,
                               pad_multiple=pad_multiple)

    def model(self, m, seed):
        from recur.models.tagger import Tagger

        return Tagger(len(self.vocab), len(self.tags), embed_dim=m.embed_dim, hidden_size=m.hidden, cell=m.cell,
                      num_layers=m.layers, char_vocab_size=len(self.chars) if self.use_chars else 0,
                      char_embed_dim=m.char_embed_dim, char_hidden=m.char_hidden, crf=m.crf,
                      embed_dropout=m.embed_dropout, dropout=m.dropout,
                      scan_mode=m.get("scan_mode", "sequential"), rngs=nnx.Rngs(seed))

    def score(self, preds, data):
        gold = [tags for _, tags in data]
        pred = [self.tags.decode(p.tolist()) for p in preds]
        correct = sum(int(g == p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps))
        out = {"accuracy": correct / sum(len(g) for g in gold)}
        if self.scheme:
            f = metrics.span_f1(gold, pred, self.scheme)
            out.update(f1=f["f1"], precision=f["precision"], recall=f["recall"])
        return out
