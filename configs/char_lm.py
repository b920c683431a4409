"""Character-level language model on tiny Shakespeare (Karpathy's char-rnn task).

    recur train --config configs/char_lm.py --workdir runs/char_lm
    recur train --config configs/char_lm.py:cell=gru,layers=2 --workdir runs/char_gru
    recur train --config configs/char_lm.py:smoke --workdir /tmp/smoke      # seconds
"""
import ml_collections

from recur.config import apply_variant

PRESETS = {
    # trains a few steps on a slice of the data: for tests and a first look
    "smoke": dict(hidden=32, embed_dim=16, batch_size=8, seq_len=32, max_steps=30, eval_every=15,
                  log_every=5, max_train_tokens=20_000, max_eval_tokens=4_000, max_minutes=0.0,
                  warmup_steps=5, lr=0.01),
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "lm"  # lm | classify | tag
    c.data = ml_collections.ConfigDict(dict(
        name="tinyshakespeare",  # first 90% of the characters train, last 10% validate
        batch_size=64,  # B parallel streams
        seq_len=64,  # T steps per truncated-BPTT window
        eval_batch_size=32,  # streams when evaluating
        max_train_tokens=0,  # 0 = all; else a prefix (smoke runs)
        max_eval_tokens=0,  # 0 = all
    ))
    c.model = ml_collections.ConfigDict(dict(
        scan_mode="sequential",  # recur.scan's time loop: sequential | auto (GPU: the fastest, timed per shape; CPU: the
        #   compiled minGRU/minLSTM scan) | kernel | cudnn | parallel, chunked (linear cells); docs/kernels.md
        cell="lstm",  # any name from recur.list_cells(), e.g. "gru", "lstm:cifg"
        embed_dim=64,  # character embedding size
        hidden=512,  # units per layer
        layers=1,  # stacked layers
        tie_weights=False,  # share the embedding with the softmax (needs embed_dim == hidden)
        embed_dropout=0.0,  # dropout on embeddings
        dropout=0.0,  # dropout between layers
        output_dropout=0.2,  # dropout on the top layer's outputs
        locked_dropout=False,  # one mask per sequence for every step (Gal & Ghahramani 2016)
        init_scale=0.0,  # > 0: all weights uniform in [-s, s] (Zaremba et al.); 0: cell defaults
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adam",  # sgd | adam | adamw
        lr=3e-3,  # peak learning rate
        momentum=0.0,  # sgd only
        weight_decay=0.0,
        clip_norm=1.0,  # clip gradients by global norm (0 = off)
        loss_reduction="mean",  # mean over tokens | sum_over_time (Zaremba et al.'s: sum over T, mean over B)
        schedule="cosine",  # constant | cosine | epoch_decay | plateau
        warmup_steps=50,
        decay=0.5,  # epoch_decay / plateau factor
        decay_after=0,  # epoch_decay: epochs at the full rate before decaying
        patience=0,  # plateau: evaluations without improvement before decaying
        min_lr=1e-4,
    ))
    c.train = ml_collections.ConfigDict(dict(
        seed=0,
        epochs=10,  # upper bound
        max_steps=2200,  # 0 = epochs * batches per epoch; 2200 steps take ~13 min on 2 CPU cores
        max_minutes=14.5,  # wall-clock budget (0 = none)
        eval_every=250,  # steps between evaluations and checkpoints
        log_every=25,
        keep_checkpoints=3,
        eval_test=True,  # evaluate the best checkpoint on the test split when there is one
    ))
    c.sample = ml_collections.ConfigDict(dict(length=500, temperature=0.8, top_k=0, prompt="ROMEO:"))
    return apply_variant(c, arg, PRESETS, "char_lm")
