"""recur.train.ensemble: the mean of several classifiers' class probabilities, and `recur eval`
with several workdirs."""
import json

import numpy as np
import pytest

from recur import config as config_lib
from recur.cli import main as cli
from recur.data import DataNotFoundError
from recur.train import ensemble, supervised


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two sentiment smoke runs that differ in their seed (so in their predictions)."""
    workdirs = []
    for seed in (0, 1):
        workdir = tmp_path_factory.mktemp(f"member{seed}")
        config = config_lib.load("configs/sentiment.py:smoke", [("max_steps", "30"), ("seed", str(seed)),
                                                                ("lr", "0.01")])
        try:
            supervised.train(config, workdir)
        except DataNotFoundError as e:
            pytest.skip(f"dataset not available: {e}")
        workdirs.append(str(workdir))
    return workdirs


def test_probabilities_agree_with_the_member_evaluation(members):
    probs, task = ensemble.class_probabilities(members[0])
    single = supervised.evaluate_workdir(members[0])
    for split in ("dev", "test"):
        p_NxC = probs[split]
        assert p_NxC.shape == (len(task.splits[split][1]), 2)
        np.testing.assert_allclose(p_NxC.sum(-1), 1.0, rtol=1e-5)
        accuracy = np.mean(p_NxC.argmax(-1) == task.splits[split][1])
        assert accuracy == pytest.approx(single[split]["accuracy"])


def test_ensemble_accuracy_is_that_of_the_mean_probabilities(members):
    result = ensemble.evaluate_ensemble(members)
    (p0, task), (p1, _) = ensemble.class_probabilities(members[0]), ensemble.class_probabilities(members[1])
    for split in ("dev", "test"):
        labels = task.splits[split][1]
        assert not np.array_equal(p0[split], p1[split])  # the seeds give different members
        want = np.mean(((p0[split] + p1[split]) / 2).argmax(-1) == labels)
        assert result[split]["accuracy"] == pytest.approx(want)
        assert [m[split]["accuracy"] for m in result["members"]] == pytest.approx(
            [np.mean(p0[split].argmax(-1) == labels), np.mean(p1[split].argmax(-1) == labels)])
    # one member is the member itself
    alone = ensemble.evaluate_ensemble(members[:1])
    assert alone["test"] == pytest.approx(supervised.evaluate_workdir(members[0])["test"])


def test_eval_command_with_several_workdirs(members, capsys):
    assert cli(["eval", "--workdir", *members]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"]["accuracy"] == pytest.approx(ensemble.evaluate_ensemble(members)["test"]["accuracy"])
    assert len(out["members"]) == 2


def test_members_must_be_classifiers_on_the_same_data(members, tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"task": "tag"}))
    with pytest.raises(ValueError, match="needs classification runs"):
        ensemble.evaluate_ensemble([members[0], tmp_path])
    assert cli(["eval", "--workdir", members[0], str(tmp_path)]) == 2
    assert "needs classification runs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one"):
        ensemble.evaluate_ensemble([])

    probabilities = ensemble.class_probabilities

    def other_labels(workdir, which="best"):
        probs, task = probabilities(workdir, which)
        if workdir == members[1]:
            sentences, labels = task.splits["test"]
            task.splits["test"] = (sentences, 1 - labels)
        return probs, task

    monkeypatch.setattr(ensemble, "class_probabilities", other_labels)
    with pytest.raises(ValueError, match="'test' split differs"):
        ensemble.evaluate_ensemble(members)
