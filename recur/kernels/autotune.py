"""``recur.scan(mode="auto")`` on a GPU: time the implementations that can run, keep the fastest.

Which time loop is fastest depends on the cell, the shapes, the precision and the GPU: on an H200
recur's unrolled sequential scan beat cuDNN's LSTM and the loop kernel at B=64, T=512 (H=256 and
1024), the persistent kernels are not measured yet, and the chunked linear kernel beat the
associative scan by 1.15-1.3x (docs/benchmarks.md). A fixed table cannot cover every GPU and
shape, so on a GPU ``auto`` measures, as XLA's GEMM autotuner and cuDNN's algorithm search do:

- the candidates are the plain scan (``sequential``; ``parallel`` for a cell linear in its
  state), the kernel that ``mode="kernel"`` would run where it runs (persistent, loop or linear:
  ``dispatch.choose`` decides, after compiling it for this GPU), and cuDNN's LSTM where
  ``mode="cudnn"`` takes the cell;
- each is compiled and timed on random inputs of the scan's shapes (B, T, I, with lengths or
  resets when the scan has them, the same unroll, remat and backward) for one training step:
  the gradient of sum(hs) for the parameters and the inputs, which is what training runs
  (inference pays the same choice). The candidates run in turns, ``ROUNDS`` rounds, side by side
  (a noisy machine slows them alike), and the median decides. A candidate whose gradients differ
  from the plain scan's (:data:`AGREE`; NaN included) is dropped: a kernel that went wrong on
  this GPU must not win by being fast;
- the choice is kept per (GPU kind, jax version, cell, shapes, options) in memory and in
  ``$RECUR_CACHE_DIR/autotune.json`` (default ``~/.cache/recur``), so a shape is measured once per
  machine; a candidate that fails to compile or run is dropped.

In a multi-process run (``jax.process_count() > 1``) it does not measure unless
``RECUR_AUTOTUNE=1``: processes timing apart could choose apart and compile different programs
for one step. It runs while the caller's function is being traced (inputs made under
``jax.ensure_compile_time_eval``, each candidate compiled ahead of time and called), once per new shape: a few compilations, seconds. ``RECUR_AUTOTUNE=0`` turns it off (``auto`` then takes
the fixed table: the sequential scan, or the linear kernel for linear cells); ``RECUR_AUTOTUNE=1``
turns it on also in Pallas' interpret mode (``RECUR_PALLAS_INTERPRET=1``), which is how the tests
run it on a CPU. :data:`RESULTS` holds the timings measured in this process.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

ROUNDS = 5  # turns per candidate (at most; fewer when one step of the slowest takes over BUDGET_S / ROUNDS)
BUDGET_S = 2.0  # seconds of timed steps per candidate, roughly
# a candidate whose gradients differ from the plain scan's (the first candidate) by more than this
# (the largest ||got - want|| / ||want|| over the leaves) is dropped: a kernel that ran but went
# wrong on this GPU (a grid that was not resident ends in NaN) must not win by being fast
AGREE = {"float32": 2e-2, "float64": 1e-6}  # other (half) precisions: 0.1
RESULTS: dict[str, dict[str, float | None]] = {}  # key -> {candidate: seconds per step, None if it failed}
DECISIONS: list[str] = []  # a line per choice this process made (measured, or read from the cache file)
_CHOSEN: dict[str, str] = {}
_log = logging.getLogger("recur")


def enabled(gpu: bool) -> bool:
    """Whether ``auto`` measures: on a GPU unless RECUR_AUTOTUNE=0, and only in a single-process
    run (processes that measured apart could choose apart and compile different programs for one
    multi-host step); elsewhere, or with several processes, only with RECUR_AUTOTUNE=1."""
    flag = os.environ.get("RECUR_AUTOTUNE", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return (gpu and jax.process_count() == 1) or flag in ("1", "true", "yes", "on")


def cache_path() -> pathlib.Path:
    base = os.environ.get("RECUR_CACHE_DIR") or pathlib.Path.home() / ".cache" / "recur"
    return pathlib.Path(base) / "autotune.json"


def key(cell, B, T, I, **options) -> str:
    """The cache key: this machine's accelerator kind and jax version, the cell (its repr holds every
    field, dtypes included), the shapes and the scan's options."""
    device = jax.devices()[0]
    opts = ",".join(f"{k}={options[k]!r}" for k in sorted(options))
    return f"{device.platform}:{device.device_kind}|jax {jax.__version__}|{cell!r}|B={B},T={T},I={I}|{opts}"


def _load() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(k: str, choice: str, timings: dict):
    path = cache_path()
    data = _load()
    data[k] = {"choice": choice, "ms": {m: None if s is None else round(s * 1e3, 4) for m, s in timings.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # the choice still holds for this process
        warnings.warn(f"recur autotune: could not write {path} ({e}); set RECUR_CACHE_DIR to a writable folder",
                      RuntimeWarning, stacklevel=2)


def pick(candidates: dict, k: str, measure) -> str:
    """The fastest of ``candidates`` (names; the first is the fallback) for key ``k``: from this
    process's choices, else the cache file, else ``measure(names) -> {name: seconds or None}``."""
    names = list(candidates)
    if len(names) == 1:
        return names[0]
    if _CHOSEN.get(k) in candidates:
        return _CHOSEN[k]
    stored = _load().get(k)
    if isinstance(stored, dict) and stored.get("choice") in candidates:
        _CHOSEN[k] = stored["choice"]
        DECISIONS.append(f"auto took {_CHOSEN[k]} as measured before ({cache_path()})")
        return _CHOSEN[k]
    timings = measure(names)
    RESULTS[k] = timings
    ran = {m: s for m, s in timings.items() if s is not None}
    choice = min(ran, key=ran.get) if ran else names[0]
    _CHOSEN[k] = choice
    summary = ", ".join(f"{m} {'failed' if s is None else f'{s * 1e3:.3f} ms'}" for m, s in timings.items())
    DECISIONS.append(f"auto measured {summary}: took {choice}")
    _log.info("recur.scan(mode='auto'): %s -> %s (%s)", k, choice, summary)
    _store(k, choice, timings)
    return choice


def measure(cell, modes, B, T, I, *, remat, resets, projected, backward, masked, unroll,
            rounds=None, budget_s=None) -> dict:
    """Seconds per training step (the gradient of sum(hs) for params and xs) of ``recur.scan`` in
    each mode, timed in turns on random inputs of these shapes; None for a mode that failed or
    whose gradients disagree with the first mode's (see AGREE)."""
    import recur

    rounds = ROUNDS if rounds is None else rounds
    budget_s = BUDGET_S if budget_s is None else budget_s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a candidate's own notices: it was chosen as able to run
        with jax.ensure_compile_time_eval():  # concrete inputs, also while the caller is being traced
            k0, k1 = jax.random.split(jax.random.key(0))
            params = cell.init(k0, I)
            xs = jax.random.normal(k1, (B, T, I), jnp.float32).astype(cell.dtype)
            if projected:
                xs = cell.project(params, xs)
            lengths = jnp.full((B,), T, jnp.int32) if masked else None
            flags = jnp.zeros((B, T), bool).at[:, T // 2].set(True) if resets else None
        args = (params, xs, lengths, flags)
        steps, times, want = {}, {m: None for m in modes}, None
        tol = AGREE.get(jnp.dtype(cell.dtype).name, 0.1)
        for m in modes:
            def loss(p, x, n, r, m=m):
                hs, _ = recur.scan(cell, p, x, mode=m, lengths=n, resets=r, remat=remat, unroll=unroll,
                                   backward=backward, projected=projected)
                return jnp.sum(hs.astype(jnp.float32))

            try:
                # compiled ahead of time: a compiled call runs now even inside the caller's trace
                # (kernel bodies must not be traced under ensure_compile_time_eval)
                t0 = time.perf_counter()
                step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
                got = jax.block_until_ready(step(*args))  # warm up
                t1 = time.perf_counter()
                jax.block_until_ready(step(*args))
                elapsed = time.perf_counter() - t1
                want = got if want is None else want
                err = _disagreement(got, want)
                if not err <= tol:  # NaN too
                    raise ValueError(f"its gradients differ from {modes[0]}'s by {err:.2g} (tolerance {tol:g})")
                steps[m], times[m] = step, [elapsed]
                _log.debug("recur autotune: %s compiled and ran in %.2f s", m, t1 - t0)
            except Exception as e:  # a candidate that does not compile or run here is dropped
                _log.info("recur autotune: %s failed for %s: %s", m, cell.name, str(e).splitlines()[0][:200])
            if want is None:  # the reference failed: nothing to check the others against, drop them
                break
        slowest = max((t[0] for t in times.values() if t), default=0.0)
        turns = max(1, min(rounds, int(budget_s / max(slowest, 1e-9))))
        for _ in range(turns - 1):
            for m, step in steps.items():
                t0 = time.perf_counter()
                jax.block_until_ready(step(*args))
                times[m].append(time.perf_counter() - t0)
    return {m: None if t is None else statistics.median(t) for m, t in times.items()}


def _disagreement(got, want) -> float:
    """max over the leaves of ||got - want|| / ||want|| (NaN if got has a non-finite value); in NumPy,
    since the caller's trace may be open."""
    wide = lambda x: np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64).ravel()
    errs = [float(np.linalg.norm(wide(a) - wide(b)) / (np.linalg.norm(wide(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    return max(errs, default=0.0)
