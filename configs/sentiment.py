"""Sentence sentiment on SST-2 (binary, sentence level; no pretrained word vectors).

    recur train --config configs/sentiment.py --workdir runs/sst2
    recur train --config configs/sentiment.py:seed=1 --workdir runs/sst2_s1     # ... more seeds, then
    recur eval --workdir runs/sst2 runs/sst2_s1 ...                             # their ensemble
    recur train --config configs/sentiment.py:adv_eps=0,seed=1 --workdir runs/sst2_p1   # without adversarial training
    recur train --config configs/sentiment.py:lm --workdir runs/sst2_lm         # LM pretraining first
    recur train --config configs/sentiment.py:cell=gru,pooling=mean --workdir runs/sst2_gru
    recur train --config configs/sentiment.py:chars=True,word_dropout_to=unk --workdir runs/sst2_x
    recur train --config configs/sentiment.py:smoke --workdir /tmp/smoke

The default is the best single recipe of the sweeps in docs/results.md (chosen on dev): a small
BiLSTM (128-dim embeddings, 2 x 128 units) with max pooling, words seen once mapped to <unk>,
word dropout 0.5, dropout 0.5 and AdamW (decoupled weight decay 0.05), 8 epochs, adversarial
training on the encoder inputs (step 0.02 of their norm, Miyato et al. 2017; about twice the
time of a step without it), evaluating a moving average of the parameters (decay 0.998) and
keeping the epoch with the best dev accuracy. The best SST-2 result (docs/results.md) is the
ensemble of 10 runs of this default and 10 with ``adv_eps=0``. ``:lm`` first trains the
embeddings and the BiLSTM for 3 epochs as forward and backward language models over the 2,000
most frequent words (Dai & Le 2015; training sentences only), then classifies with a
0.1-weighted LM loss kept on. ``chars=True`` adds character-BiLSTM word features and
``word_dropout_to=unk`` reads dropped words as <unk> (neither moved accuracy beyond seed noise);
``weight_dropout`` drops out the recurrent matrices (untested on SST-2); ``ema=0`` turns the
parameter average off.
"""
import ml_collections

from recur.config import apply_variant

PRESETS = {
    "smoke": dict(embed_dim=16, hidden=16, batch_size=16, max_steps=30, log_every=5, max_sentences=400,
                  max_minutes=0.0, embed_dropout=0.0, dropout=0.0, ema=0.0, adv_eps=0.0),
    "lm": dict(lm_vocab=2000, lm_weight=0.1, pretrain_epochs=3, epochs=6),
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.data = ml_collections.ConfigDict(dict(
        name="sst2",  # stsa.binary.{train,dev,test}
        lowercase=True,
        min_freq=2,  # rarer training words map to <unk> (which then learns from the singletons)
        max_sentences=0,  # 0 = all; else the first N of each split (smoke runs)
        chars=False,  # character-level BiRNN features per word (model.char_embed_dim, char_hidden)
        max_word_chars=16,  # longer words keep their first and last 8 characters (0 = all)
        batch_size=32,
        eval_batch_size=128,
    ))
    c.model = ml_collections.ConfigDict(dict(
        scan_mode="sequential",  # recur.scan's time loop: sequential | auto (GPU: the fastest, timed per shape; CPU: the
        #   compiled minGRU/minLSTM scan) | kernel | cudnn | parallel, chunked (linear cells); docs/kernels.md
        cell="lstm",
        embed_dim=128,
        hidden=128,
        layers=1,
        bidirectional=True,
        pooling="max",  # last | mean | max | mean_max over the valid steps
        mlp_hidden=0,  # 0: one linear layer on the pooled features
        embed_dropout=0.5,  # word dropout: whole embedding vectors zeroed
        word_dropout_to="zero",  # "zero": a dropped word's vector is zeroed; "unk": it is read as <unk>
        dropout=0.5,  # between layers and before the classifier
        locked_dropout=False,
        char_embed_dim=25,
        char_hidden=25,
        lm_vocab=0,  # > 0: language-model heads predicting the lm_vocab most frequent ids (rarer: <unk>)
        lm_weight=0.0,  # the language-model loss's weight in the training loss
        adv_eps=0.02,  # > 0: adversarial training on the encoder inputs, step relative to their norm
        weight_dropout=0.0,  # DropConnect on the recurrent matrices W_h (AWD-LSTM)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, momentum=0.0, weight_decay=0.05, clip_norm=5.0, schedule="constant",
        warmup_steps=0, decay=0.5, decay_after=0, patience=0, min_lr=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        seed=0, epochs=8, max_steps=0, max_minutes=0.0, log_every=50, keep_checkpoints=2,
        ema=0.998,  # > 0: evaluate (and keep as best) a moving average of the parameters with this decay
        pretrain_epochs=0,  # first this many epochs on the language-model loss alone (needs lm_vocab)
    ))
    return apply_variant(c, arg, PRESETS, "sentiment")
