"""Sentence sentiment on SST-2 (binary, sentence level; no pretrained word vectors).

    recur train --config configs/sentiment.py --workdir runs/sst2
    recur train --config configs/sentiment.py:cell=gru,pooling=mean --workdir runs/sst2_gru
    recur train --config configs/sentiment.py:smoke --workdir /tmp/smoke
"""
import ml_collections

from recur.config import apply_variant

PRESETS = {
    "smoke": dict(embed_dim=16, hidden=16, batch_size=16, max_steps=30, log_every=5, max_sentences=400,
                  max_minutes=0.0, embed_dropout=0.0, dropout=0.0),
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.data = ml_collections.ConfigDict(dict(
        name="sst2",  # stsa.binary.{train,dev,test}
        lowercase=True,
        min_freq=1,  # rarer training words map to <unk>
        max_sentences=0,  # 0 = all; else the first N of each split (smoke runs)
        batch_size=32,
        eval_batch_size=128,
    ))
    c.model = ml_collections.ConfigDict(dict(
        cell="lstm",
        embed_dim=300,
        hidden=150,
        layers=1,
        bidirectional=True,
        pooling="max",  # last | mean | max over the valid steps
        mlp_hidden=0,  # 0: one linear layer on the pooled features
        embed_dropout=0.5,
        dropout=0.5,  # between layers and before the classifier
        locked_dropout=False,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, clip_norm=5.0, schedule="constant",
        warmup_steps=0, decay=0.5, decay_after=0, patience=0, min_lr=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        seed=0, epochs=10, max_steps=0, max_minutes=0.0, log_every=50, keep_checkpoints=2,
    ))
    return apply_variant(c, arg, PRESETS, "sentiment")
