"""Word-level language model on the Penn Treebank (Mikolov's 10k-word version).

    recur train --config configs/word_lm.py:small --workdir runs/ptb_small     # Zaremba et al. small
    recur train --config configs/word_lm.py:medium --workdir runs/ptb_medium   # Zaremba et al. medium
    recur train --config configs/word_lm.py:smoke --workdir /tmp/smoke

Zaremba, Sutskever & Vinyals 2014, "Recurrent Neural Network Regularization": small is 2x200
LSTM, no dropout, SGD lr 1 halved every epoch after the 4th, 13 epochs, clip 5, batch 20, 20 steps,
weights uniform in [-0.1, 0.1] (test perplexity 114.5); medium is 2x650, dropout 0.5, lr decay
1.2 after epoch 6, 39 epochs, 35 steps, init 0.05 (82.7).
"""
import ml_collections

from recur.config import apply_variant

PRESETS = {
    "small": dict(hidden=200, embed_dim=200, layers=2, embed_dropout=0.0, dropout=0.0, output_dropout=0.0,
                  init_scale=0.1, batch_size=20, seq_len=20, epochs=13, lr=1.0, decay=0.5, decay_after=4,
                  loss_reduction="sum_over_time"),
    "medium": dict(hidden=650, embed_dim=650, layers=2, embed_dropout=0.5, dropout=0.5, output_dropout=0.5,
                   init_scale=0.05, batch_size=20, seq_len=35, epochs=39, lr=1.0, decay=1 / 1.2,
                   decay_after=6, loss_reduction="sum_over_time"),
    "smoke": dict(hidden=32, embed_dim=32, batch_size=8, seq_len=16, max_steps=30, eval_every=15, log_every=5,
                  max_train_tokens=20_000, max_eval_tokens=3_000, eval_batch_size=4),
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.data = ml_collections.ConfigDict(dict(
        name="ptb",  # ptb.{train,valid,test}.txt, one <eos> per line
        batch_size=20,  # B parallel streams
        seq_len=20,  # T steps per truncated-BPTT window
        eval_batch_size=1,  # Zaremba et al. evaluate one stream
        max_train_tokens=0,  # 0 = all
        max_eval_tokens=0,  # 0 = all
    ))
    c.model = ml_collections.ConfigDict(dict(
        scan_mode="sequential",  # recur.scan's time loop: sequential | auto (GPU: the fastest, timed per shape; CPU: the
        #   compiled minGRU/minLSTM scan) | kernel | cudnn | parallel, chunked (linear cells); docs/kernels.md
        cell="lstm",  # the recipes use the plain LSTM; any registry name works
        embed_dim=200,
        hidden=200,
        layers=2,
        tie_weights=False,
        embed_dropout=0.0,
        dropout=0.0,  # between layers
        output_dropout=0.0,
        locked_dropout=False,
        init_scale=0.1,  # every weight uniform in [-0.1, 0.1]
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd",
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        clip_norm=5.0,
        loss_reduction="sum_over_time",  # mean over tokens | sum_over_time (Zaremba et al.'s: sum over T, mean over B)
        schedule="epoch_decay",  # lr * decay ** max(0, epoch + 1 - decay_after), epochs from 0
        warmup_steps=0,
        decay=0.5,
        decay_after=4,  # epochs at the full rate (Zaremba small: max_epoch = 4)
        patience=0,
        min_lr=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        seed=0,
        epochs=13,
        max_steps=0,  # 0 = epochs * batches per epoch
        max_minutes=0.0,  # no wall-clock budget
        eval_every=2323,  # about once per epoch at batch 20 x 20 steps
        log_every=100,
        keep_checkpoints=2,
        eval_test=True,
    ))
    c.sample = ml_collections.ConfigDict(dict(length=50, temperature=1.0, top_k=0, prompt="the"))
    return apply_variant(c, arg, PRESETS, "word_lm")
