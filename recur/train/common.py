"""Pieces every training loop shares: the optimiser and schedule from a config, the update,
and resuming a run from its checkpoint."""
from __future__ import annotations

import jax

from recur.train.optim import Schedule, make_optimizer, with_learning_rate


def optimizer_from(c_opt):
    return make_optimizer(c_opt.name, c_opt.lr, momentum=c_opt.momentum, weight_decay=c_opt.weight_decay,
                          clip_norm=c_opt.clip_norm)


def schedule_from(c_opt, total_steps: int) -> Schedule:
    return Schedule(c_opt.schedule, c_opt.lr, total_steps=total_steps, warmup_steps=c_opt.warmup_steps,
                    decay=c_opt.decay, decay_after=c_opt.decay_after, patience=c_opt.patience,
                    min_lr=c_opt.min_lr)


def apply_gradients(tx, state, grads, lr):
    """The state's params and optimiser state after one update at learning rate ``lr``."""
    opt_state = with_learning_rate(state["opt_state"], lr)
    updates, opt_state = tx.update(grads, opt_state, state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    return params, opt_state


def resume(ckpt, state, batches, schedule):
    """(state, meta) from the latest checkpoint, with the batch iterator and schedule moved to
    where it stopped; the fresh state and empty meta when there is none. The RNG key is returned
    wrapped (checkpoints hold its raw data)."""
    restored = ckpt.restore(state)
    meta = {"elapsed": 0.0}
    if restored is not None:
        state, meta = restored
        batches.load_state_dict(meta["data"])
        schedule.load_state_dict(meta["schedule"])
        print(f"resumed from step {int(state['step'])} (epoch {batches.epoch}, batch {batches.position})")
    return dict(state, key=jax.random.wrap_key_data(state["key"])), meta
