"""Sentence classification (many-to-one) and sequence tagging (many-to-many) training.

Both read padded, length-bucketed batches (:class:`recur.data.SequenceBatches`), train a model
that has ``loss(batch, dropout_key=...)`` and ``predict(batch)`` with one jit-compiled step
(state donated), evaluate on the validation split every epoch (accuracy, token accuracy or span
F1), keep the last checkpoints and the best by the validation metric, and report the test
metric of the best checkpoint.

``train.pretrain_epochs`` (classifiers with a language-model head) first trains for that many
epochs on the model's ``lm_loss`` alone, with the labels unused, then ``train.epochs`` on its
``loss`` with a fresh optimiser state; the logged training loss is the one being lowered.

``train.ema`` = d > 0 keeps an exponential moving average of the parameters (Polyak & Juditsky
1992), ema <- d * ema + (1 - d) * params after every update, in the training state (so in the
checkpoints): evaluation, the choice of the best checkpoint, ``recur eval`` and ensembles then
use the averaged parameters, which on a small dataset are less tied to the last few batches.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recur.data import SequenceBatches
from recur.train import tasks
from recur.train.checkpoint import Checkpoints
from recur.train.log import MetricWriter
from recur.train.common import apply_gradients, optimizer_from, resume, schedule_from


def make_steps(graphdef, tx, loss: str = "loss", ema: float = 0.0):
    """(train_step, predict), jitted; ``loss`` names the model's loss method that train_step
    lowers (``"lm_loss"`` for a classifier's language-model pretraining). With ``ema`` > 0 the
    state holds ``"ema"``, the moving average of the parameters, updated after each step."""
    def loss_fn(params, batch, key):
        return getattr(nnx.merge(graphdef, params), loss)(batch, dropout_key=key)

    def train_step(state, batch, lr):
        key, sub = jax.random.split(state["key"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, sub)
        params, opt_state = apply_gradients(tx, state, grads, lr)
        new = {"params": params, "opt_state": opt_state, "key": key, "step": state["step"] + 1}
        if ema:
            new["ema"] = jax.tree.map(lambda a, p: ema * a + (1.0 - ema) * p, state["ema"], params)
        return new, loss

    @jax.jit
    def predict(params, batch):
        return nnx.merge(graphdef, params).predict(batch)

    return jax.jit(train_step, donate_argnums=0), predict


def eval_batches_of(task, split: str, batch_size: int) -> SequenceBatches:
    """Every sentence of ``split`` once, in batches of similar lengths (few shapes to compile);
    :func:`evaluate` puts the predictions back in order by each sentence's index."""
    return task.batches(split, batch_size, order="bucket", pad_multiple=16)


def evaluate(predict, params, batches: SequenceBatches, task, data) -> dict:
    """The task's metrics over every sentence of ``batches`` (each exactly once)."""
    batches.epoch, batches.position = 0, 0
    preds = {}
    for batch in batches:
        out = np.asarray(predict(params, _device(batch)))
        for row, i in enumerate(batch["index"]):
            n = int(batch["lengths"][row])
            preds[int(i)] = out[row] if out.ndim == 1 else out[row, :n]
    return task.score([preds[i] for i in range(len(preds))], data)


def _device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}


def init_state(config, task):
    """(graphdef, the training state pytree, the optax transformation) of a fresh run."""
    model = task.model(config.model, config.train.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optimizer_from(config.optim)
    state = {"params": params, "opt_state": tx.init(params),
             "key": jax.random.key_data(jax.random.key(config.train.seed)), "step": jnp.zeros((), jnp.int32)}
    if config.train.get("ema", 0.0):
        if not 0.0 < config.train.ema < 1.0:
            raise ValueError(f"train.ema must be a decay in (0, 1) (0 = off), got {config.train.ema}")
        state["ema"] = jax.tree.map(jnp.copy, params)
    return graphdef, state, tx


def eval_params(state):
    """The parameters to evaluate: the moving average when the run keeps one."""
    return state.get("ema", state["params"])


def load_config(workdir):
    """The config a workdir was trained with (its config.json)."""
    import ml_collections

    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} holds no training run (no config.json); train first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_workdir(workdir, which: str = "best"):
    """(config, task, graphdef, params) of a trained workdir's best (or latest) checkpoint."""
    config = load_config(workdir)
    task = tasks.build(config)
    graphdef, state, _ = init_state(config, task)
    ckpt = Checkpoints(workdir, keep=config.train.keep_checkpoints, best_metric=task.metric, best_mode="max")
    restored = ckpt.restore(state, which) or ckpt.restore(state, "latest")
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint to restore")
    return config, task, graphdef, eval_params(restored[0])


def evaluate_workdir(workdir, which: str = "best") -> dict:
    """The task's metrics of a trained workdir's best (or latest) checkpoint on dev and test."""
    config, task, graphdef, params = restore_workdir(workdir, which)
    _, predict = make_steps(graphdef, optimizer_from(config.optim))
    return {split: evaluate(predict, params, eval_batches_of(task, split, config.data.eval_batch_size), task, data)
            for split, data in task.splits.items() if split != "train"}


def train(config, workdir) -> dict:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    c_data, c_opt, c_train = config.data, config.optim, config.train
    task = tasks.build(config)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "vocab.json").write_text(json.dumps(task.vocabs_dict()))
    graphdef, state, tx = init_state(config, task)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    # lengths padded to multiples of 16: fewer distinct shapes, so fewer compilations
    train_batches = task.batches("train", c_data.batch_size, order="bucket", seed=c_train.seed, pad_multiple=16)
    eval_batches = {s: eval_batches_of(task, s, c_data.eval_batch_size) for s in task.splits if s != "train"}
    # language-model pretraining (Dai & Le 2015): the first pretrain_epochs lower model.lm_loss
    pretrain_steps = c_train.get("pretrain_epochs", 0) * train_batches.num_batches
    total_steps = c_train.max_steps or pretrain_steps + c_train.epochs * train_batches.num_batches
    schedule = schedule_from(c_opt, total_steps)
    metric = task.metric
    ckpt = Checkpoints(workdir, keep=c_train.keep_checkpoints, best_metric=metric, best_mode="max")
    state, meta = resume(ckpt, state, train_batches, schedule)
    ema = c_train.get("ema", 0.0)
    train_step, predict = make_steps(graphdef, tx, ema=ema)
    pretrain_step = make_steps(graphdef, tx, "lm_loss", ema=ema)[0] if pretrain_steps else None
    writer = MetricWriter(workdir)
    print(f"{task.describe()}; model {config.model.cell} {n_params:,} parameters")
    start = time.time() - float(meta.get("elapsed", 0.0))
    elapsed = lambda: time.time() - start
    budget = 60.0 * c_train.max_minutes if c_train.max_minutes else math.inf
    step = int(state["step"])
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    valid = None
    while step < total_steps and elapsed() < budget:
        epoch, losses = train_batches.epoch, []
        for batch in train_batches:
            lr = schedule(step, epoch)
            if pretrain_steps and step == pretrain_steps:
                # a fresh optimiser for the classifier: Adam's second moments of the (larger)
                # language-model gradients would otherwise shrink its steps for hundreds of steps
                state = dict(state, opt_state=tx.init(state["params"]))
                if ema:  # and an average of the classifier's own steps only
                    state["ema"] = jax.tree.map(jnp.copy, state["params"])
            step_fn = pretrain_step if step < pretrain_steps else train_step
            state, loss = step_fn(state, _device(batch), jnp.asarray(lr, jnp.float32))
            losses.append(loss)
            step += 1
            bar.update(1)
            if step % c_train.log_every == 0:
                mean = float(np.mean(jax.device_get(losses[-c_train.log_every:])))
                writer.write(step, {"loss": mean, "lr": lr}, "train")
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2g}")
            if step >= total_steps or elapsed() >= budget:
                break
        if train_batches.position >= train_batches.num_batches:
            train_batches.epoch, train_batches.position = train_batches.epoch + 1, 0
        valid = evaluate(predict, eval_params(state), eval_batches[task.valid_split], task, task.splits[task.valid_split])
        writer.write(step, valid, "valid")
        bar.write(f"epoch {epoch + 1} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items())
                  + f", {elapsed() / 60:.1f} min")
        schedule.observe(-valid[metric])
        s = dict(state, key=jax.random.key_data(state["key"]))
        ckpt.save(step, s, {"data": train_batches.state_dict(), "schedule": schedule.state_dict(),
                            "elapsed": elapsed(), "valid": valid}, valid)
    bar.close()
    result = {"step": step, "valid": valid, "elapsed_s": elapsed()}
    best = ckpt.restore(dict(state, key=jax.random.key_data(state["key"])), which="best")
    best_params = eval_params(best[0] if best is not None else state)
    for split, batches in eval_batches.items():
        result[f"best_{split}"] = evaluate(predict, best_params, batches, task, task.splits[split])
        writer.write(step, result[f"best_{split}"], f"best_{split}")
    ckpt.close()
    writer.close()
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result
