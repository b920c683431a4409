"""Dispatch a config to its task's training loop, and evaluate a finished workdir."""
from __future__ import annotations

import json
import pathlib

TASKS = ("lm", "classify", "tag")


def train(config, workdir):
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    if config.task == "lm":
        from recur.train import lm

        return lm.train(config, workdir)
    from recur.train import supervised

    return supervised.train(config, workdir)


def evaluate_workdir(workdir, which: str = "best") -> dict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} holds no training run (no config.json); train first")
    task = json.loads(path.read_text())["task"]
    if task not in TASKS:
        raise ValueError(f"{path}: unknown task {task!r}")
    if task == "lm":
        from recur.train import lm

        return lm.evaluate_workdir(workdir, which)
    from recur.train import supervised

    return supervised.evaluate_workdir(workdir, which)
