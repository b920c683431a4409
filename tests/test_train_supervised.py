"""Sentiment classification and tagging end to end on slices of the real datasets."""
import json

import jax
import numpy as np
import pytest

from recur import config as config_lib
from recur.cli import main as cli
from recur.data import DataNotFoundError
from recur.train import supervised, tasks
from recur.train.checkpoint import Checkpoints
from recur.train.log import read_metrics

SMOKES = {
    "sst2": "configs/sentiment.py:smoke",
    "ewt": "configs/tagging.py:smoke",
    "conll2000": "configs/tagging.py:conll2000,smoke",
}


def _load(spec, **overrides):
    return config_lib.load(spec, [(k, str(v)) for k, v in overrides.items()])


def _train(spec, workdir, **overrides):
    try:
        return supervised.train(_load(spec, **overrides), workdir)
    except DataNotFoundError as e:
        pytest.skip(f"dataset not available: {e}")


@pytest.mark.parametrize("name", list(SMOKES))
def test_smoke_training_lowers_the_loss(name, tmp_path):
    # sentiment needs a few epochs of its 400-sentence slice before the training loss moves
    steps = 100 if name == "sst2" else 40
    result = _train(SMOKES[name], tmp_path, max_steps=steps, log_every=5, lr=0.01)
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert len(losses) == steps // 5 and np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    metric = "f1" if name == "conll2000" else "accuracy"
    assert 0.0 <= result["best_test"][metric] <= 1.0
    assert json.loads((tmp_path / "result.json").read_text())["step"] == steps


def test_resume_matches_an_uninterrupted_run(tmp_path):
    spec = SMOKES["sst2"]
    common = dict(max_steps=50, log_every=1, lr=0.01, dropout=0.3, max_sentences=200)
    _train(spec, tmp_path / "straight", **common)
    # batch size 16 over 200 sentences: 13 batches per epoch, so a checkpoint at the first epoch's end
    _train(spec, tmp_path / "resumed", **dict(common, max_steps=13))
    _train(spec, tmp_path / "resumed", **common)
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if r["split"] == "train"}
    straight, resumed = loss(tmp_path / "straight"), loss(tmp_path / "resumed")
    for step in range(14, 51):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_eval_command_restores_the_best_checkpoint(tmp_path, capsys):
    result = _train(SMOKES["ewt"], tmp_path, max_steps=10)
    capsys.readouterr()
    assert cli(["eval", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"]["accuracy"] == pytest.approx(result["best_test"]["accuracy"])


def test_clip_word_keeps_prefix_and_suffix():
    from recur.train.tasks import clip_word

    assert clip_word("running", 16) == list("running")
    assert clip_word("https://example.com/index.html", 16) == list("https://" + ".com/index.html"[-8:])
    assert len(clip_word("x" * 17, 16)) == 16 and clip_word("abcdefghij", 0) == list("abcdefghij")


def test_language_model_pretraining_then_classification(tmp_path):
    # smoke: 400 sentences in batches of 16, 25 steps an epoch; two epochs of pretraining, one of classification
    result = _train(SMOKES["sst2"], tmp_path, max_steps=0, pretrain_epochs=2, epochs=1, lm_vocab=200,
                    lm_weight=0.1, log_every=1, lr=0.01)
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert result["step"] == len(losses) == 75
    pretrain, classify = losses[:50], losses[50:]
    # the language-model loss starts near log(200) = 5.3 and falls; classification near log(2) = 0.69
    assert np.mean(pretrain[:3]) > 4.5 and np.mean(pretrain[-3:]) < 0.9 * np.mean(pretrain[:3]), pretrain
    assert max(classify[:3]) < 2.0, classify
    # the classifier starts with a fresh optimiser: Adam has counted only its 25 steps
    config = supervised.load_config(tmp_path)
    _, state, _ = supervised.init_state(config, tasks.build(config))
    ckpt = Checkpoints(tmp_path, keep=2, best_metric="accuracy", best_mode="max")
    restored, _ = ckpt.restore(state, "latest")
    ckpt.close()
    leaves = jax.tree_util.tree_flatten_with_path(restored["opt_state"])[0]
    counts = [int(leaf) for path, leaf in leaves if "count" in jax.tree_util.keystr(path)]
    assert counts and all(c == 25 for c in counts), counts


def test_sentiment_with_character_features_trains_and_evaluates(tmp_path, capsys):
    # the batches carry each word's characters, the model reads them, `recur eval` restores it
    result = _train(SMOKES["sst2"], tmp_path, max_steps=6, log_every=3, chars=True, word_dropout_to="unk",
                    max_sentences=64)
    task = tasks.build(supervised.load_config(tmp_path))
    batch = next(iter(task.batches("dev", 8, order="keep")))
    assert batch["chars"].shape[:2] == batch["tokens"].shape
    words = task.splits["dev"][0][0]
    assert batch["word_lengths"][0, :len(words)].tolist() == [len(w) for w in words]
    assert task.chars.decode(batch["chars"][0, 0, :len(words[0])].tolist()) == list(words[0])
    capsys.readouterr()
    assert cli(["eval", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"]["accuracy"] == pytest.approx(result["best_test"]["accuracy"])


def test_parameter_moving_average_is_kept_evaluated_and_restored(tmp_path):
    config = _load(SMOKES["sst2"], ema=0.5, max_sentences=64)
    try:
        task = tasks.build(config)
    except DataNotFoundError as e:
        pytest.skip(f"dataset not available: {e}")
    graphdef, state, tx = supervised.init_state(config, task)
    train_step, _ = supervised.make_steps(graphdef, tx, ema=0.5)
    batch = supervised._device(next(iter(task.batches("train", 8, order="keep"))))
    before = jax.tree.map(np.asarray, state["params"])
    state = dict(state, key=jax.random.wrap_key_data(state["key"]))
    state, _ = train_step(state, batch, np.float32(0.01))
    jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p1, rtol=1e-6, atol=1e-7),
                 state["ema"], before, state["params"])
    assert supervised.eval_params(state) is state["ema"]
    # a run with ema: its best checkpoint's evaluation uses the averaged parameters
    result = _train(SMOKES["sst2"], tmp_path, ema=0.9, max_steps=8, log_every=4, max_sentences=64)
    _, _, _, restored = supervised.restore_workdir(tmp_path)
    ckpt = Checkpoints(tmp_path, keep=2, best_metric="accuracy", best_mode="max")
    raw, _ = ckpt.restore(supervised.init_state(supervised.load_config(tmp_path), task)[1], "best")
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, restored, raw["ema"])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw["ema"]), jax.tree.leaves(raw["params"])))
    assert result["step"] == 8
    with pytest.raises(ValueError, match="train.ema must be a decay"):
        supervised.init_state(_load(SMOKES["sst2"], ema=1.5), task)
