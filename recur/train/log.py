"""Metrics to the console, to ``metrics.jsonl`` and to TensorBoard event files in the workdir."""
from __future__ import annotations

import json
import math
import pathlib
import time


class MetricWriter:
    def __init__(self, workdir):
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter  # event files that TensorBoard reads

        self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: dict, split: str):
        row = {"step": int(step), "split": split, "time": time.time()}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            self.tb.add_scalar(f"{split}/{k}", v, int(step))
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def close(self):
        self.jsonl.close()
        self.tb.close()


def read_metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
