"""``recur.scan(mode="auto")`` on a GPU: time the implementations that can run, keep the fastest.

Which time loop is fastest depends on the cell, the shapes, the precision and the GPU: on an H200
at B=64, T=512 (H=256 and 1024) recur's unrolled sequential scan beat cuDNN's LSTM, the loop
kernel and, for most cells, the persistent kernels in float32, the persistent kernels beat it in
bfloat16, and the chunked linear kernel beat the associative scan by 1.15-1.3x
(docs/benchmarks.md). A fixed table cannot cover every GPU and
shape, so on a GPU ``auto`` measures, as XLA's GEMM autotuner and cuDNN's algorithm search do:

- the candidates are the plain scan (``sequential``; ``parallel`` for a cell linear in its
  state), the kernel that ``mode="kernel"`` would run where it runs (persistent, loop or linear:
  ``dispatch.choose`` decides, without its probe: the measurement compiles it), and cuDNN's LSTM where
  ``mode="cudnn"`` takes the cell;
- each is compiled and timed on random inputs of the scan's shapes (B, T, I, with lengths or
  resets when the scan has them, the same unroll, remat and backward) for one training step:
  the gradient of sum(hs) for the parameters and the inputs, which is what training runs. A
  forward pass that is not differentiated is timed apart (``train=False``: the sequential scan
  against the persistent kernel, ``dispatch.inference_choice``). The candidates run in turns (a noisy machine slows them
  alike): up to ``ROUNDS`` samples each, a sample being enough steps to last ``SAMPLE_S``,
  within about ``BUDGET_S`` per candidate; the median decides, and another candidate must beat
  the plain scan by ``MARGIN`` to be taken. A candidate that fails to compile or run, or whose
  gradients differ from the plain scan's (:data:`AGREE`; NaN included), is dropped: a kernel
  that went wrong on this GPU must not win by being fast; its outputs hs are compared alike.
  Where the plain scan's own gradients (or outputs) move by more than that when its weights move
  by one rounding unit (:func:`nudge`; a long layer-norm LSTM's gradients do, ~100% at T = 512),
  their tolerance is :data:`JITTER_FACTOR` times that move: there no two correct implementations
  agree better;
- the choice is kept in memory and, when every candidate ran, in
  ``$RECUR_CACHE_DIR/autotune.json`` (default ``~/.cache/recur``), keyed by the GPU kind, the jax
  version, a hash of recur's source, the cell, the shapes, the options and the candidates, so a
  shape is measured once per machine and code version (writers take turns under a lock file).

It runs while the caller's function is being traced (inputs made under
``jax.ensure_compile_time_eval``, each candidate compiled ahead of time and called), once per new
key: a few compilations, seconds; ``jax.eval_shape`` or ``jax.make_jaxpr`` of a function with such
a scan measures too, and a function already traced keeps its choice. Not measured: inside
shard_map (the kernels do not lower there; ``auto`` takes the plain scan) and in a multi-process
run (``jax.process_count() > 1``) unless ``RECUR_AUTOTUNE=1``: processes timing apart could
choose apart and compile different programs for one step. ``RECUR_AUTOTUNE=0`` turns it off
(``auto`` then takes the fixed table: the sequential scan in float32, the persistent kernels in
half precision where they run, the linear kernel for linear cells); ``RECUR_AUTOTUNE=1`` turns it on also in Pallas' interpret mode
(``RECUR_PALLAS_INTERPRET=1``), which is how the tests run it on a CPU. :data:`RESULTS` and
:data:`ERRORS` hold the timings and disagreements measured in this process.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
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

ROUNDS = 5  # samples per candidate (at most; fewer when the slowest's samples would exceed BUDGET_S)
BUDGET_S = 2.0  # seconds of timed steps per candidate, roughly
SAMPLE_S = 2e-3  # a sample runs the step enough times to last this long (a 0.2 ms step: 10 calls)
MARGIN = 0.03  # another candidate must beat the plain scan (the first) by this fraction to be taken
# a candidate whose gradients differ from the plain scan's (the first candidate) by more than this
# (the largest ||got - want|| / ||want|| over the leaves) is dropped: a kernel that ran but went
# wrong on this GPU (a grid that was not resident ends in NaN) must not win by being fast
AGREE = {"float32": 2e-2, "float64": 1e-6}  # other (half) precisions: 0.1
# ... unless the plain scan's own gradients move by more than AGREE / JITTER_FACTOR when its weights
# move by one rounding unit of the matmuls' precision (:func:`nudge`): a long layer-norm LSTM's
# gradient of sum(hs) at T = 512 changes by ~100% under a 2^-11 nudge, so any two correct
# implementations disagree that much; there the tolerance is JITTER_FACTOR times that change (a
# kernel's NaN still fails)
JITTER_FACTOR = 4.0
# the relative size of a rounding-sized change of a weight, by the cell's dtype: float32 matmuls run
# in TF32 on a GPU (Triton's and XLA's default), a 10-bit mantissa
ROUNDING = {"float32": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float64": 2.0 ** -53}
RESULTS: dict[str, dict[str, float | None]] = {}  # key -> {candidate: seconds per step, None if it failed}
ERRORS: dict[str, dict[str, float]] = {}  # key -> {candidate: its gradients' disagreement with the plain scan's}
DECISIONS: list[str] = []  # a line per scan that chose (measured, from the cache file, or earlier here)
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


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of recur's source: a choice measured with other kernels or cells is not reused."""
    digest = hashlib.sha1()
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    except OSError:  # source not readable (a zipped install): the per-process choice still holds
        return f"unreadable-{os.getpid()}"
    return digest.hexdigest()[:12]


def key(cell, B, T, I, candidates=(), **options) -> str:
    """The cache key: this machine's accelerator kind, the jax version and a hash of recur's code,
    the cell (its repr holds every field, dtypes included), the shapes, the scan's options and the
    candidates. B is the batch the scan sees (per example under vmap, per shard under pjit)."""
    device = jax.devices()[0]
    opts = ",".join(f"{k}={options[k]!r}" for k in sorted(options))
    return (f"{device.platform}:{device.device_kind}|jax {jax.__version__}|recur {_code_version()}|{cell!r}"
            f"|B={B},T={T},I={I}|{opts}|{'/'.join(candidates)}")


def _load() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(k: str, entry: dict):
    """Adds k to the cache file: read, update and replace under an exclusive lock on a file beside
    it, so that processes measuring at once (data-parallel workers, a sweep) keep each other's keys."""
    path = cache_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = _load()
            data[k] = entry
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
    except OSError as e:  # the choice still holds for this process
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        warnings.warn(f"recur autotune: could not write {path} ({e}); set RECUR_CACHE_DIR to a writable folder",
                      RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive lock on path + ".lock" while the block runs (POSIX flock on a descriptor opened
    read-only, so that another user's lock file in a shared folder serves too). Where there is no
    flock (Windows; a file system without locks: ENOLCK, ENOSYS) the block runs unlocked, as before
    the lock: the last of two simultaneous writers' files wins, and the other's keys are measured
    again later."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def pick(candidates: dict, k: str, measure, label: str | None = None) -> str:
    """The fastest of ``candidates`` (names; the first, the plain scan, is the fallback and wins
    ties within MARGIN) for key ``k``: from this process's choices, else the cache file, else
    ``measure(names, errors) -> {name: seconds or None}`` (filling ``errors`` with each
    candidate's disagreement with the plain scan). A choice with a failed candidate is kept in
    memory only (the failure may pass: memory held by the caller at the time, say). label: what
    the log line calls the scan (default: the key)."""
    names = list(candidates)
    if len(names) == 1:
        return names[0]
    if _CHOSEN.get(k) in candidates:
        DECISIONS.append(f"auto took {_CHOSEN[k]} (measured earlier in this process)")
        return _CHOSEN[k]
    stored = _load().get(k)
    choice = stored.get("choice") if isinstance(stored, dict) else None
    if isinstance(choice, str) and choice in candidates:  # an entry of another form: measured again
        _CHOSEN[k] = choice
        DECISIONS.append(f"auto took {choice} as measured before ({cache_path()})")
        return choice
    errors = {}
    timings = measure(names, errors)
    RESULTS[k], ERRORS[k] = timings, errors
    ran = {m: s for m, s in timings.items() if s is not None}
    choice = min(ran, key=ran.get) if ran else names[0]
    if names[0] in ran and ran[choice] > ran[names[0]] * (1 - MARGIN):
        choice = names[0]
    _CHOSEN[k] = choice
    summary = ", ".join(f"{m} {'failed' if s is None else f'{s * 1e3:.3f} ms'}" for m, s in timings.items())
    DECISIONS.append(f"auto measured {summary}: took {choice}")
    _log.info("recur.scan(mode='auto'), %s: %s; took %s (disagreement with %s: %s; %s's own with "
              "its weights moved by one rounding: %s)", label or k, summary, choice, names[0],
              ", ".join(f"{m} {e:.2g}" for m, e in ERRORS[k].items() if m != names[0]), names[0],
              f"{ERRORS[k][names[0]]:.2g}" if names[0] in ERRORS[k] else "not measured")
    if len(ran) == len(names):
        _store(k, {"choice": choice, "ms": {m: round(s * 1e3, 4) for m, s in timings.items()},
                   "disagreement": {m: float(f"{e:.3g}") for m, e in ERRORS[k].items()}})
    return choice


def measure(cell, modes, B, T, I, *, remat, resets, projected, backward, masked, unroll,
            rounds=None, budget_s=None, errors=None, train=True) -> dict:
    """Seconds per training step (the gradient of sum(hs) for params and xs) of ``recur.scan`` in
    each mode, timed in turns on random inputs of these shapes; None for a mode that failed or
    whose gradients disagree with the first mode's (see AGREE and JITTER_FACTOR). errors: a dict to
    receive each mode's disagreement, and for the first mode its own under :func:`nudge`.
    train=False: the forward pass alone (its outputs hs compared)."""
    import recur
    from recur.kernels import dispatch

    rounds = ROUNDS if rounds is None else rounds
    budget_s = BUDGET_S if budget_s is None else budget_s
    errors = {} if errors is None else errors
    steps, times = {}, {m: None for m in modes}  # mode -> (compiled step, calls per sample); samples

    def drop(m, e):  # a candidate that does not compile or run here
        _log.info("recur autotune: %s failed for %s: %s", m, cell.name, dispatch.first_line(e))
        steps.pop(m, None)
        times[m] = None

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
        want = None
        # what is compared: a training step's gradients and its outputs hs, each against the plain
        # scan's (a chaotic recurrence's gradients carry little at rounding level, its outputs more);
        # a forward pass's outputs
        parts = ("gradients", "outputs") if train else ("outputs",)
        tols = [AGREE.get(jnp.dtype(cell.dtype).name, 0.1)] * len(parts)
        for m in modes:
            def outputs(p, x, n, r, m=m):
                hs, _ = recur.scan(cell, p, x, mode=m, lengths=n, resets=r, remat=remat, unroll=unroll,
                                   backward=backward, projected=projected)
                return hs.astype(jnp.float32)

            def loss(p, x, n, r, f=outputs):
                hs = f(p, x, n, r)
                return jnp.sum(hs), hs

            fn = jax.grad(loss, argnums=(0, 1), has_aux=True) if train else (lambda *a, f=outputs: (f(*a),))

            try:
                # compiled ahead of time: a compiled call runs now even inside the caller's trace
                # (kernel bodies must not be traced under ensure_compile_time_eval)
                t0 = time.perf_counter()
                with dispatch._probing():  # compiled once, here: mode="kernel" does not probe it first
                    lowered = jax.jit(fn).lower(*args)
                step = lowered.compile()
                got = jax.block_until_ready(step(*args))  # warm up
                t1 = time.perf_counter()
                jax.block_until_ready(step(*args))
                elapsed = time.perf_counter() - t1
                want = got if want is None else want
                errs = [_disagreement(g, w) for g, w in zip(got, want)]
                errors[m] = _worst(errs)
                bad = [f"{what} differ from {modes[0]}'s by {e:.2g} (tolerance {t:g})"
                       for what, e, t in zip(parts, errs, tols) if not e <= t]  # NaN too
                if bad:
                    raise ValueError("its " + "; its ".join(bad))
                if m == modes[0]:  # the reference: how much does it move itself with rounding?
                    tols = _widened(tols, step, params, args, want, cell.dtype, errors, m)
                steps[m], times[m] = (step, max(1, int(SAMPLE_S / max(elapsed, 1e-9)))), []
                _log.debug("recur autotune: %s compiled and ran in %.2f s", m, t1 - t0)
            except Exception as e:
                drop(m, e)
            if want is None:  # the reference failed: nothing to check the others against, drop them
                break
        # up to `rounds` samples of `calls` steps each, the candidates in turns, within the budget
        for _ in range(rounds):
            for m, (step, calls) in list(steps.items()):
                try:
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        out = step(*args)
                    jax.block_until_ready(out)
                    times[m].append((time.perf_counter() - t0) / calls)
                except Exception as e:  # failed after its warm-up: dropped like one that failed then
                    drop(m, e)
            spent = sum(sum(t) * steps[m][1] for m, t in times.items() if t and m in steps)
            if spent > budget_s * max(len(steps), 1):
                break
    return {m: statistics.median(t) if t else None for m, t in times.items()}


def nudge(params, dtype):
    """params with every floating-point weight w moved to w (1 +- u), u = ROUNDING[dtype] (the
    signs random, fixed): the change rounding makes, to see how much a result depends on it."""
    u = ROUNDING.get(jnp.dtype(dtype).name, 2.0 ** -11)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(11), max(len(leaves), 1))
    moved = [w * (1 + u * jax.random.rademacher(k, w.shape, jnp.float32)).astype(w.dtype)
             if jnp.issubdtype(w.dtype, jnp.inexact) else w for w, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, moved)


def _widened(tols, step, params, args, want, dtype, errors, m):
    """tols, each raised to JITTER_FACTOR times the reference's own move (errors[m]) when its
    weights move by one rounding unit (:func:`nudge`) where that is larger; unchanged where the
    move is not finite or could not be measured."""
    try:
        with jax.ensure_compile_time_eval():
            nudged = nudge(params, dtype)
        moved = jax.block_until_ready(step(nudged, *args[1:]))
        jitters = [_disagreement(g, w) for g, w in zip(moved, want)]
    except Exception as e:  # the reference stays; its tolerance is AGREE's
        _log.info("recur autotune: %s with its weights nudged failed: %s", m, e)
        return tols
    errors[m] = _worst(jitters)
    return [max(t, JITTER_FACTOR * j) if np.isfinite(j) else t for t, j in zip(tols, jitters)]


def _worst(errs) -> float:
    """The largest of errs, or NaN if any is not finite."""
    return float("nan") if not np.all(np.isfinite(errs)) else max(errs, default=0.0)


def _disagreement(got, want) -> float:
    """max over the leaves of ||got - want|| / ||want|| (NaN if got has a non-finite value); a leaf
    whose reference is 0 is measured against the largest leaf's norm instead. In NumPy, since the
    caller's trace may be open."""
    wide = lambda x: np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64).ravel()
    pairs = [(wide(a), wide(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    scale = max((float(np.linalg.norm(b)) for _, b in pairs), default=0.0) + 1e-30
    return _worst([float(np.linalg.norm(a - b)) / (float(np.linalg.norm(b)) or scale) for a, b in pairs])
