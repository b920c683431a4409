"""An ensemble of trained sentence classifiers: the mean of their predicted class distributions.

    recur eval --workdir runs/sst2_s0 runs/sst2_s1 runs/sst2_s2

Each member is a classification workdir (its own config, vocabulary and best checkpoint); the
ensemble predicts argmax_c (1 / K) sum_k p_k(c | sentence) over the K members (Hansen & Salamon
1990; seeds alone make members differ enough to help). Members may differ in any setting except
the data: every member must have read the same sentences with the same labels.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from recur.train import supervised


def class_probabilities(workdir, which: str = "best") -> tuple[dict[str, np.ndarray], object]:
    """({split: float [N, C]} in each split's sentence order, the task) of a classifier workdir,
    for every split but "train"."""
    task_name = supervised.load_config(workdir).task
    if task_name != "classify":
        raise ValueError(f"{workdir}: an ensemble needs classification runs (task 'classify'), "
                         f"this one is task {task_name!r}")
    config, task, graphdef, params = supervised.restore_workdir(workdir, which)
    probabilities = jax.jit(lambda params, batch: nnx.merge(graphdef, params).probabilities(batch))
    out = {}
    for split in task.splits:
        if split == "train":
            continue
        batches = supervised.eval_batches_of(task, split, config.data.eval_batch_size)
        rows = {}
        for batch in batches:
            p_BxC = np.asarray(probabilities(params, supervised._device(batch)))
            rows.update(zip(batch["index"].tolist(), p_BxC))
        out[split] = np.stack([rows[i] for i in range(len(rows))])
    return out, task


def evaluate_ensemble(workdirs, which: str = "best") -> dict:
    """{split: the ensemble's metrics, "members": [{split: metrics} per workdir]}.

    Raises:
      ValueError: for fewer than one workdir, a workdir that is not a classifier, or members
        whose splits hold different labels (trained on different data).
    """
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("an ensemble needs at least one workdir")
    total, members, task = None, [], None
    for workdir in workdirs:
        probs, member_task = class_probabilities(workdir, which)
        if task is None:
            task, total = member_task, {k: np.zeros_like(v) for k, v in probs.items()}
        for split, p_NxC in probs.items():
            labels, first = np.asarray(member_task.splits[split][1]), np.asarray(task.splits[split][1])
            if split not in total or not np.array_equal(labels, first):
                raise ValueError(f"{workdir}: its {split!r} split differs from {workdirs[0]}'s "
                                 "(members must be trained on the same data)")
            total[split] += p_NxC
        members.append({split: member_task.score(p.argmax(-1), member_task.splits[split])
                        for split, p in probs.items()})
    result = {split: task.score(p.argmax(-1), task.splits[split]) for split, p in total.items()}
    return dict(result, members=members)
