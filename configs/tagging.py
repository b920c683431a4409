"""Sequence tagging: UPOS on UD English EWT (default), chunking on CoNLL-2000, or any CoNLL file.

    recur train --config configs/tagging.py --workdir runs/ewt_upos
    recur train --config configs/tagging.py:conll2000 --workdir runs/conll2000     # BiLSTM-CRF, span F1
    recur train --config configs/tagging.py:data.name=conll,train_file=a.txt,dev_file=b.txt,test_file=c.txt,tag_column=3,scheme=IOB1
    recur train --config configs/tagging.py:smoke --workdir /tmp/smoke
"""
import ml_collections

from recur.config import apply_variant

PRESETS = {
    "conll2000": {"data.name": "conll2000", "tag_field": "chunk", "scheme": "IOB2", "crf": True},
    "smoke": dict(embed_dim=16, hidden=16, char_embed_dim=8, char_hidden=8, batch_size=16, max_steps=30,
                  log_every=5, max_sentences=400, max_minutes=0.0, warmup_steps=0),
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "tag"
    c.data = ml_collections.ConfigDict(dict(
        name="ud_english_ewt",  # ud_english_ewt | conll2000 | conll (files below)
        tag_field="upos",  # CoNLL-U field (ud_english_ewt) or "chunk" / "pos" (conll2000)
        scheme="",  # "" scores token accuracy; IOB1 | IOB2 | BIOES scores span F1 (conlleval)
        dev_sentences=1000,  # conll2000 has no dev set: the last N training sentences
        train_file="", dev_file="", test_file="",  # data=conll: CoNLL column files
        word_column=0, tag_column=-1,  # data=conll: 0-based columns (negative from the end)
        lowercase=True,  # word embeddings read lowercased words; characters keep their case
        chars=True,  # character-level BiLSTM features per word
        max_word_chars=16,  # longer words keep their first and last 8 characters (0 = all)
        min_freq=1,
        max_sentences=0,  # 0 = all; else the first N of each split (smoke runs)
        batch_size=32,
        eval_batch_size=128,
    ))
    c.model = ml_collections.ConfigDict(dict(
        scan_mode="sequential",  # recur.scan's time loop: sequential | auto (GPU: the fastest, timed per shape; CPU: the
        #   compiled minGRU/minLSTM scan) | kernel | cudnn | parallel, chunked (linear cells); docs/kernels.md
        cell="lstm",
        embed_dim=100,
        hidden=200,
        layers=1,
        char_embed_dim=30,
        char_hidden=50,
        crf=False,  # linear-chain CRF output layer (Huang et al. 2015)
        embed_dropout=0.33,
        dropout=0.33,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adam", lr=2e-3, momentum=0.0, weight_decay=0.0, clip_norm=5.0, schedule="cosine",
        warmup_steps=100, decay=0.5, decay_after=0, patience=0, min_lr=1e-4,
    ))
    c.train = ml_collections.ConfigDict(dict(
        seed=0, epochs=12, max_steps=0, max_minutes=0.0, log_every=50, keep_checkpoints=2,
        ema=0.0,  # > 0: evaluate (and keep as best) a moving average of the parameters with this decay
    ))
    return apply_variant(c, arg, PRESETS, "tagging")
