"""Orbax checkpoints of a training run: the last N, and the best by a chosen metric.

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters, optimiser state, the
recurrent carries of truncated BPTT, the RNG key, the step) and ``meta`` (JSON: the data
iterator's position, the learning-rate schedule, the epoch, metrics). Two managers write to
``workdir/checkpoints`` (the latest ``keep``) and ``workdir/best`` (one, by ``best_metric``).
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir, *, keep: int = 3, best_metric: str = "loss", best_mode: str = "min"):
        root = pathlib.Path(workdir).absolute()
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(root / "checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))
        self.best = ocp.CheckpointManager(root / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode=best_mode))

    def save(self, step: int, state, meta: dict, metrics: dict | None = None):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        if metrics is not None and self.best_metric in metrics:
            self.best.save(step, args=args, metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def latest_step(self, which: str = "latest"):
        manager = self.best if which == "best" else self.latest
        return manager.best_step() if which == "best" else manager.latest_step()

    def restore(self, abstract_state, which: str = "latest", step: int | None = None):
        """(state, meta) of the given or the latest / best step; None when there is none."""
        manager = self.best if which == "best" else self.latest
        step = self.latest_step(which) if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def close(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.close()
        self.best.close()
