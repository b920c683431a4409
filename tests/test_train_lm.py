"""The language-model pipeline end to end: config -> training -> checkpoints -> eval -> sampling."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recur import config as config_lib
from recur.cli import main as cli
from recur.train import lm
from recur.train.log import read_metrics

CONFIG = "configs/char_lm.py"


def smoke(**overrides):
    return config_lib.load(f"{CONFIG}:smoke", [(k, str(v)) for k, v in overrides.items()])


def test_smoke_training_lowers_the_validation_loss(tmp_path):
    result = lm.train(smoke(max_steps=40, eval_every=20, lr=0.01, warmup_steps=1), tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r["split"] == "valid"]
    assert len(rows) == 2 and rows[1]["loss"] < rows[0]["loss"] < np.log(65) + 0.1
    assert result["valid_loss"] == pytest.approx(rows[1]["loss"])
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())


def test_word_lm_smoke_trains_on_a_slice_of_ptb(tmp_path):
    from recur.data.files import DataNotFoundError

    try:
        cfg = config_lib.load("configs/word_lm.py:smoke", [("max_steps", "20"), ("eval_every", "10"), ("lr", "1.0")])
        lm.load_data("ptb")
    except DataNotFoundError as e:
        pytest.skip(f"PTB is not available: {e}")
    lm.train(cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r["split"] == "valid"]
    assert rows[1]["loss"] < rows[0]["loss"] < np.log(10_000)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["test_perplexity"] == pytest.approx(np.exp(result["test_loss"]))


def test_lm_learns_a_synthetic_sequence_to_near_zero_loss():
    # a fixed cycle of 7 symbols: each next symbol is determined by the current one
    cfg = smoke(hidden=32, lr=0.02, output_dropout=0.0, warmup_steps=1)
    model = lm.build_model(cfg.model, 7, 0)
    graphdef, state, tx = lm.init_state(cfg, model)
    train_step, _ = lm.make_steps(graphdef, tx)
    stream = np.tile(np.arange(7, dtype=np.int32), 8 * 40)
    x = stream[: 8 * 32].reshape(8, 32)
    y = stream[1 : 8 * 32 + 1].reshape(8, 32)
    state = dict(state, key=jax.random.key(0))
    for _ in range(150):
        state["carries"] = model.initial_carries(8)
        state, out = train_step(state, x, y, jnp.float32(0.02))
    assert float(out["loss"]) < 0.02


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path):
    # a constant learning rate, so that the first run's smaller max_steps changes nothing but where it stops
    common = dict(max_steps=8, eval_every=4, log_every=1, lr=0.01, schedule="constant", output_dropout=0.2)
    lm.train(smoke(**common), tmp_path / "straight")
    lm.train(smoke(**dict(common, max_steps=4)), tmp_path / "resumed")  # stops after 4 steps
    lm.train(smoke(**common), tmp_path / "resumed")  # picks up at step 4
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if r["split"] == "train"}
    straight, resumed = loss(tmp_path / "straight"), loss(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_sampling_is_reproducible_with_a_seed(tmp_path, capsys):
    lm.train(smoke(max_steps=4, eval_every=4), tmp_path)
    capsys.readouterr()
    outs = []
    for seed in (1, 1, 2):
        assert cli(["sample", "--workdir", str(tmp_path), "--length", "40", "--seed", str(seed)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]
    assert outs[0].startswith("ROMEO:") and len(outs[0].rstrip("\n")) == len("ROMEO:") + 40
    assert cli(["eval", "--workdir", str(tmp_path)]) == 0
    assert "perplexity" in json.loads(capsys.readouterr().out)["valid"]


def test_top_k_one_is_greedy(tmp_path):
    lm.train(smoke(max_steps=2, eval_every=2), tmp_path)
    model, vocab, _ = lm.load_for_inference(tmp_path)
    a = lm.generate(model, vocab.encode(list("the ")), 20, key=jax.random.key(0), top_k=1)
    b = lm.generate(model, vocab.encode(list("the ")), 20, key=jax.random.key(5), top_k=1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (f"{CONFIG}:smok", [], r"unknown variant 'smok'; did you mean smoke\?"),
        (f"{CONFIG}:hiden=3", [], r"unknown config key 'hiden'; did you mean hidden"),
        (CONFIG, [("model.hiden", "3")], r"unknown config key 'model.hiden'; did you mean model.hidden"),
        (CONFIG, [("model.hidden", "big")], r"model.hidden is a int \(now 512\); cannot set it to 'big'"),
        ("configs/nope.py", [], "config file 'configs/nope.py' not found"),
    ],
)
def test_config_errors_name_the_key_and_the_nearest_valid_ones(spec, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        config_lib.load(spec, overrides)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    assert cli(["train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.model.hiden=3"]) == 2
    assert "did you mean model.hidden" in capsys.readouterr().err


def test_cli_shows_recurs_notices_on_stderr(tmp_path, monkeypatch, capsys):
    """`recur ...` prints recur's INFO messages (what scan_mode="auto" measured and took) on stderr,
    keeping stdout for results."""
    import logging

    log = logging.getLogger("recur")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "level", logging.NOTSET)
    from recur.train import run

    monkeypatch.setattr(run, "evaluate_workdir", lambda *a: log.info("auto took kernel") or {"loss": 1.0})
    assert cli(["eval", "--workdir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "auto took kernel" in err and "auto took kernel" not in out and '"loss": 1.0' in out
