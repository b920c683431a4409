"""Optimisers and learning-rate schedules from plain arguments.

The learning rate is a hyper-parameter injected into the optax state (``optax.inject_hyperparams``)
and set from the host before every step, so one mechanism serves per-step schedules (cosine,
warmup), per-epoch ones (Zaremba et al.'s decay after epoch k) and decay on a plateau of the
validation loss (Merity et al.'s recipes), whose state is checkpointed as plain numbers.
"""
from __future__ import annotations

import dataclasses
import math

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "epoch_decay", "plateau")


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.0, weight_decay: float = 0.0,
                   clip_norm: float = 0.0, b2: float = 0.999) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) (Pascanu et al. 2013; 0 = off) followed by the optimiser."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")

    def build(learning_rate):
        if name == "sgd":
            opt = optax.sgd(learning_rate, momentum=momentum or None)
        elif name == "adam":
            opt = optax.adam(learning_rate, b2=b2)
        else:
            opt = optax.adamw(learning_rate, b2=b2, weight_decay=weight_decay)
        if name != "adamw" and weight_decay:
            opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
        return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def with_learning_rate(opt_state, lr):
    """The optax state with its injected learning rate replaced."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


@dataclasses.dataclass
class Schedule:
    """The learning rate as a function of step and epoch, plus decay-on-plateau state.

    constant: lr.  cosine: linear warmup then cosine decay to min_lr over total_steps.
    epoch_decay: lr * decay ** max(0, epoch + 1 - decay_after), epoch counted from 0: the first
    ``decay_after`` epochs run at lr (Zaremba et al. 2014's max_epoch).
    plateau: lr is multiplied by ``decay`` whenever the validation loss fails to improve on the
    best by ``1e-4`` relative ``patience`` times in a row; never below min_lr.
    """

    kind: str
    lr: float
    total_steps: int = 0
    warmup_steps: int = 0
    decay: float = 0.5
    decay_after: int = 0
    patience: int = 0
    min_lr: float = 0.0
    # plateau state
    current: float = -1.0
    best: float = math.inf
    bad: int = 0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.current < 0:
            self.current = self.lr

    def __call__(self, step: int, epoch: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "epoch_decay":
            return max(self.min_lr, self.lr * self.decay ** max(0, epoch + 1 - self.decay_after))
        if self.kind == "plateau":
            return self.current
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))

    def observe(self, valid_loss: float):
        """Feeds a validation loss to the plateau rule (other kinds ignore it)."""
        if self.kind != "plateau":
            return
        if valid_loss < self.best * (1 - 1e-4):
            self.best, self.bad = valid_loss, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.current, self.bad = max(self.min_lr, self.current * self.decay), 0

    def state_dict(self) -> dict:
        return {"current": self.current, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict):
        self.current, self.best, self.bad = float(state["current"]), float(state["best"]), int(state["bad"])
