"""Language modelling: truncated BPTT training, evaluation, and sampling.

Training reads the token stream as B parallel streams in windows of T steps
(:class:`recur.data.LMBatches`); the final carry of one window is the initial carry of the next,
with its gradient stopped (truncated BPTT), and carries restart from zero when an epoch begins.
The carries are part of the checkpointed state, with the data position, so a resumed run reads
the same batches with the same state as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recur import metrics
from recur.data import LMBatches, Vocab, load_ptb, load_tinyshakespeare
from recur.models.lm import LanguageModel
from recur.train.checkpoint import Checkpoints
from recur.train.log import MetricWriter
from recur.train.common import apply_gradients, optimizer_from, resume, schedule_from

DATASETS = {"tinyshakespeare": load_tinyshakespeare, "ptb": load_ptb}


def load_data(name: str):
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {sorted(DATASETS)} for a language model, got {name!r}")
    return DATASETS[name]()


def build_model(m, vocab_size: int, seed: int) -> LanguageModel:
    return LanguageModel(vocab_size, embed_dim=m.embed_dim, hidden_size=m.hidden, cell=m.cell,
                         num_layers=m.layers, tie_weights=m.tie_weights, embed_dropout=m.embed_dropout,
                         dropout=m.dropout, output_dropout=m.output_dropout,
                         locked_dropout=m.locked_dropout, init_scale=m.init_scale,
                         scan_mode=m.get("scan_mode", "sequential"), rngs=nnx.Rngs(seed))


def make_steps(graphdef, tx, loss_reduction: str = "mean"):
    """The jit-compiled train and eval steps over (params, opt_state, carries).

    ``loss_reduction``: "mean" trains on the mean loss per token; "sum_over_time" on its sum over
    the T steps of a window, averaged over the batch, as Zaremba et al.'s code does (so their
    learning rate and clipping threshold apply unchanged). Reported losses are per token.
    """
    if loss_reduction not in ("mean", "sum_over_time"):
        raise ValueError(f"optim.loss_reduction must be 'mean' or 'sum_over_time', got {loss_reduction!r}")

    def loss_fn(params, carries, inputs, targets, key):
        model = nnx.merge(graphdef, params)
        logits, carries = model(inputs, carries, dropout_key=key)
        total, count = metrics.cross_entropy(logits, targets)
        scale = inputs.shape[1] if loss_reduction == "sum_over_time" else 1
        return scale * total / count, (carries, total / count)

    def train_step(state, inputs, targets, lr):
        key, sub = jax.random.split(state["key"])
        (_, (carries, loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["carries"], inputs, targets, sub)
        params, opt_state = apply_gradients(tx, state, grads, lr)
        new = {"params": params, "opt_state": opt_state, "carries": jax.lax.stop_gradient(carries),
               "key": key, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


    @jax.jit
    def eval_step(params, carries, inputs, targets):
        model = nnx.merge(graphdef, params)
        logits, carries = model(inputs, carries)
        total, count = metrics.cross_entropy(logits, targets)
        return carries, total, count

    return jax.jit(train_step, donate_argnums=0), eval_step


def evaluate(eval_step, params, model, ids, batch_size: int, seq_len: int) -> float:
    """Mean nats per token of ``ids``, read as ``batch_size`` streams with carried state."""
    batches = LMBatches(ids, batch_size, seq_len)
    carries = model.initial_carries(batch_size)
    total, count = 0.0, 0
    for inputs, targets in batches:
        carries, t, c = eval_step(params, carries, inputs, targets)
        total, count = total + float(t), count + int(c)
    return total / count


def init_state(config, model):
    """(graphdef, the training state pytree, the optax transformation) of a fresh run."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optimizer_from(config.optim)
    state = {"params": params, "opt_state": tx.init(params),
             "carries": model.initial_carries(config.data.batch_size),
             "key": jax.random.key_data(jax.random.key(config.train.seed)), "step": jnp.zeros((), jnp.int32)}
    return graphdef, state, tx


def train(config, workdir) -> dict:
    """Trains the LM ``config`` describes in ``workdir`` (resuming from its checkpoints)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    c_data, c_opt, c_train = config.data, config.optim, config.train
    splits, vocab = load_data(c_data.name)
    if c_data.max_train_tokens:
        splits["train"] = splits["train"][: c_data.max_train_tokens]
    if c_data.max_eval_tokens:
        splits = {k: (v if k == "train" else v[: c_data.max_eval_tokens]) for k, v in splits.items()}
    (workdir / "vocab.json").write_text(vocab.to_json())
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    model = build_model(config.model, len(vocab), c_train.seed)
    graphdef, state, tx = init_state(config, model)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    # drop_last: a last window of a few steps makes a noisy full-size Adam step
    batches = LMBatches(splits["train"], c_data.batch_size, c_data.seq_len, drop_last=True)
    total_steps = c_train.max_steps or c_train.epochs * batches.num_batches
    schedule = schedule_from(c_opt, total_steps)
    ckpt = Checkpoints(workdir, keep=c_train.keep_checkpoints, best_metric="valid_loss")
    state, meta = resume(ckpt, state, batches, schedule)
    train_step, eval_step = make_steps(graphdef, tx, c_opt.loss_reduction)
    writer = MetricWriter(workdir)
    print(f"{c_data.name}: {len(vocab)} symbols, {len(splits['train']):,} training tokens; "
          f"model {config.model.cell} {config.model.layers}x{config.model.hidden}, {n_params:,} parameters")

    def save(valid=None):
        s = dict(state, key=jax.random.key_data(state["key"]))
        m = {"data": batches.state_dict(), "schedule": schedule.state_dict(),
             "elapsed": elapsed(), "valid_loss": valid}
        ckpt.save(int(state["step"]), s, m, None if valid is None else {"valid_loss": valid})

    start = time.time() - float(meta.get("elapsed", 0.0))
    elapsed = lambda: time.time() - start
    budget = 60.0 * c_train.max_minutes if c_train.max_minutes else math.inf
    step = int(state["step"])
    last_eval = None
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    window_loss, window_tokens, window_start = [], 0, time.time()
    while step < total_steps and elapsed() < budget:
        if batches.position == 0:
            state["carries"] = model.initial_carries(c_data.batch_size)  # a new epoch: fresh state
        epoch = batches.epoch
        for inputs, targets in batches:
            lr = schedule(step, epoch)
            state, out = train_step(state, inputs, targets, jnp.asarray(lr, jnp.float32))
            step += 1
            bar.update(1)
            window_loss.append(out["loss"])
            window_tokens += inputs.size
            if step % c_train.log_every == 0:
                loss = float(np.mean(jax.device_get(window_loss)))
                rate = window_tokens / (time.time() - window_start)
                writer.write(step, {"loss": loss, "lr": lr, "tokens_per_s": rate,
                                    "grad_norm": float(out["grad_norm"])}, "train")
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}", tok_s=f"{rate:,.0f}")
                window_loss, window_tokens, window_start = [], 0, time.time()
            if step % c_train.eval_every == 0 or step >= total_steps or elapsed() >= budget:
                break
        if batches.position >= batches.num_batches:
            batches.epoch, batches.position = batches.epoch + 1, 0
        last_eval = _eval_and_log(eval_step, state, model, splits, c_data, writer, step, elapsed(), bar)
        schedule.observe(last_eval)
        save(last_eval)
    bar.close()
    result = {"step": step, "valid_loss": last_eval, "elapsed_s": elapsed()}
    if "test" in splits and c_train.eval_test:
        best = ckpt.restore(dict(state, key=jax.random.key_data(state["key"])), which="best")
        params = best[0]["params"] if best is not None else state["params"]
        test = evaluate(eval_step, params, model, splits["test"], c_data.eval_batch_size, c_data.seq_len)
        result.update(test_loss=test, test_perplexity=math.exp(test))
        writer.write(step, {"loss": test, "perplexity": math.exp(test)}, "test")
    ckpt.close()
    writer.close()
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


def _eval_and_log(eval_step, state, model, splits, c_data, writer, step, elapsed, bar):
    valid = evaluate(eval_step, state["params"], model, splits["valid"], c_data.eval_batch_size, c_data.seq_len)
    row = {"loss": valid, "perplexity": math.exp(valid), "bits_per_char": metrics.bits_per_char(valid),
           "elapsed_s": elapsed}
    writer.write(step, row, "valid")
    bar.write(f"step {step}: valid loss {valid:.4f} nats, perplexity {math.exp(valid):.2f}, "
              f"{metrics.bits_per_char(valid):.3f} bits/token, {elapsed / 60:.1f} min")
    return valid


def load_for_inference(workdir, which: str = "best"):
    """(model with restored parameters, vocab, config dict) from a training workdir."""
    import ml_collections

    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} holds no training run (no config.json); train first")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    vocab = Vocab.from_json((workdir / "vocab.json").read_text())
    model = build_model(config.model, len(vocab), config.train.seed)
    _, state, _ = init_state(config, model)
    ckpt = Checkpoints(workdir, keep=config.train.keep_checkpoints, best_metric="valid_loss")
    if ckpt.latest_step(which) is None:
        which = "latest"
    restored = ckpt.restore(state, which)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint to restore")
    nnx.update(model, restored[0]["params"])
    return model, vocab, config


def generate(model: LanguageModel, prompt_ids, length: int, *, key, temperature: float = 1.0,
             top_k: int = 0):
    """Samples ``length`` tokens after ``prompt_ids`` (int [P], P >= 1); returns int [length]."""
    graphdef, params = nnx.split(model)
    prompt = jnp.asarray(prompt_ids, jnp.int32)[None, :]

    @jax.jit
    def run(params, key):
        m = nnx.merge(graphdef, params)
        logits, carries = m(prompt, m.initial_carries(1))

        def body(state, k):
            logits_V, carries = state
            logits_V = logits_V / max(temperature, 1e-6)
            if top_k:
                kth = jax.lax.top_k(logits_V, top_k)[0][-1]
                logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
            token = jax.random.categorical(k, logits_V)
            nxt, carries = nnx.merge(graphdef, params)(token[None, None], carries)
            return (nxt[0, -1], carries), token

        _, tokens = jax.lax.scan(body, (logits[0, -1], carries), jax.random.split(key, length))
        return tokens

    return np.asarray(run(params, key))


def evaluate_workdir(workdir, which: str = "best") -> dict:
    """Loss, perplexity and bits per token of a trained LM on its validation and test splits."""
    model, vocab, config = load_for_inference(workdir, which)
    splits, _ = load_data(config.data.name)
    graphdef, params = nnx.split(model, nnx.Param)
    _, eval_step = make_steps(graphdef, None)
    out = {}
    for split in ("valid", "test"):
        if split in splits:
            ids = splits[split][: config.data.max_eval_tokens or None]
            loss = evaluate(eval_step, params, model, ids, config.data.eval_batch_size, config.data.seq_len)
            out[split] = {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": metrics.bits_per_char(loss)}
    return out
