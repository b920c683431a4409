"""Which implementation ``recur.scan(mode="kernel" | "auto")`` runs, and the notices when it falls back.

Implementations (see docs/kernels.md for the table per cell):

- ``loop``: recur/kernels/loop.py, the whole time loop of any cell's ``step`` in one Pallas
  kernel, forward and backward (the backward is recur/backprop.py's deferred BPTT with both its
  time loops as kernels; the weight gradients stay one large matmul after the loop).
- ``persistent``: recur/kernels/persistent.py (and persistent_reset.py, persistent_ln.py,
  persistent_fgr.py, persistent_proj.py), the forward and reverse time loops of the LSTM (plain,
  Greff's variants, with layer norm, with gate recurrence, with a projection), the GRU (both
  forms), the MGU and the Elman RNN, W_h split across a grid of programs that meet at a
  barrier each step (B and H multiples of 16, no resets, remat "none" or "step" (the reverse
  loop recomputes the gates); the weight gradients stay the deferred scan's large matmuls).
  Measured on an H200: faster than the sequential scan in half precision, slower in float32
  but for two cells; ``auto`` takes it where its own measurement finds it faster.
- ``linear``: recur/kernels/linear.py, the chunked kernel for cells linear in their state (for
  a minGRU, minLSTM or LRU recur.scan runs recur/kernels/gated.py, the same
  kernel with the coefficients computed inside it).
- ``cudnn``: recur/kernels/cudnn.py, cuDNN's LSTM through ``jax.experimental.rnn`` for the plain
  float32 LSTM on a GPU (``mode="cudnn"`` only).
- the plain scans: ``sequential`` (lax.scan), ``parallel`` (lax.associative_scan).

``mode="kernel"`` asks for the kernel; where it cannot run (no GPU, a combination the kernels
do not support, or a kernel that the GPU back end cannot lower for this cell and shape) the
scan falls back to ``sequential`` (``parallel`` for linear cells on a GPU) with a one-line
:class:`KernelFallback` warning, never an error. ``mode="auto"`` picks the fastest, silently. On
a GPU it measures (recur/kernels/autotune.py): the plain scan, the kernel ``mode="kernel"`` would
run and cuDNN's LSTM, where each can take the scan, timed once per cell and shape on this GPU and
kept in a cache file. With ``RECUR_AUTOTUNE=0`` (or several processes) it takes the fixed table measured on
an H200 (B=64, T=512, H=256 and 1024; docs/benchmarks.md): for a cell that is not linear in its
state, in float32 the sequential scan (recur/backprop.py's deferred scan with the input
projection hoisted and 8 steps per loop iteration, ``unroll=None``, ran 1.5-2.7x faster than
cuDNN's LSTM and 2-5x faster than the loop kernel, whose programs each stream the whole W_h
every step), in half precision the persistent kernels where they run (their training step took
0.66-0.93x the sequential scan's time for the seven cells measured), else the sequential scan; and
the chunked kernel for linear cells (1.15-1.2x the associative scan) where it lowers, else the
associative scan. On CPU the sequential
scan (measured faster than the associative one on CPU, docs/benchmarks.md), except for a float32
minGRU / minLSTM, whose parallel mode runs recur/kernels/cpu.py's compiled chunked scan there
(both ``kernel`` and ``auto`` take it, without a notice).

Setting ``RECUR_PALLAS_INTERPRET=1`` runs the kernels in Pallas' interpret mode on any backend;
that is how the tests check them on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import jax
import jax.numpy as jnp

GPU_BLOCK_B = 16  # batch rows per program of the loop kernel on a GPU (Triton's dot needs >= 16)


class KernelFallback(UserWarning):
    """mode="kernel" ran a plain scan instead; the message says why."""


def interpret_forced() -> bool:
    return os.environ.get("RECUR_PALLAS_INTERPRET", "").lower() in ("1", "true", "yes")


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _complex(tree) -> bool:
    return any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in jax.tree.leaves(tree))


def block_rows(B: int, gpu: bool) -> int:
    """Batch rows per program: GPU_BLOCK_B on a GPU, else the largest power of 2 <= 16 dividing B."""
    if gpu:
        return GPU_BLOCK_B if B % GPU_BLOCK_B == 0 else B
    b = 16
    while B % b:
        b //= 2
    return b


def choose(cell, mode, B, T, I, remat, *, resets=False, projected=False, backward="deferred", masked=False,
           unroll=1, vmapped=False):
    """(implementation, interpret, reason): implementation in persistent / loop / linear / cudnn /
    sequential / parallel.

    reason is None when nothing was given up; else the notice's text. resets / projected: the
    scan has resets / takes projected inputs (cuDNN's LSTM can do neither). masked: the scan has
    lengths (the kernels then read a mask: on a GPU the probe lowers that form). unroll: the
    scan's steps per loop iteration (``auto`` times the sequential scan with it). vmapped: the
    scan runs under jax.vmap, which multiplies a Pallas kernel's grid by the batch (so the
    persistent kernels, whose programs must all be resident at once, are not taken).
    """
    interpret = interpret_forced()
    gpu = _on_gpu()
    plain = "parallel" if (cell.linear and gpu) else "sequential"
    wanted = "linear" if cell.linear else "loop"
    if mode == "auto" and (gpu or interpret):
        from recur.kernels import autotune

        if T > 0 and _in_shard_map():
            # the Pallas kernels do not lower inside shard_map (pallas_call's outputs carry no
            # varying-axes type): the plain scan, without measuring
            return plain, False, None
        if T > 0 and not probing() and autotune.enabled(gpu):
            return _fastest(cell, B, T, I, remat, interpret, vmapped, resets=resets, projected=projected,
                            backward=backward, masked=masked, unroll=unroll)
        if not cell.linear:
            # the fixed table, measured on an H200 (docs/benchmarks.md, calls 3-4): in float32 the
            # deferred scan (input projection hoisted, 8 steps unrolled) beats cuDNN's LSTM, the
            # loop kernel and (but for two cells, by under 11%) the persistent kernels; in half
            # precision the persistent kernels' training step beats it for every cell measured
            if gpu and not interpret and jnp.dtype(cell.dtype).itemsize < 4:
                from recur.kernels import persistent

                # (asked only where the persistent kernels take the scan: else choose would probe,
                # and compile, the loop kernel, to be thrown away)
                if not vmapped and persistent.problem(cell, B, resets=resets, remat=remat, backward=backward) is None:
                    impl, interp, _ = choose(cell, "kernel", B, T, I, remat, resets=resets, projected=projected,
                                             backward=backward, masked=masked, unroll=unroll)
                    if impl == "persistent":
                        return impl, interp, None
            return "sequential", False, None
    if mode == "cudnn" and (gpu or interpret) and T > 0:
        from recur.kernels import cudnn

        why = cudnn.problem(cell, resets=resets, projected=projected, remat=remat)
        if why is None and not (interpret or cudnn.available()):
            why = "this jax has no cuDNN RNN bindings"
        if why is None:  # the plain float32 LSTM
            return "cudnn", interpret, None
        return "sequential", False, why
    elif mode == "cudnn":
        return "sequential", False, (f"mode='cudnn' needs a GPU (backend is {jax.default_backend()})"
                                     if T > 0 else None)
    if T == 0:  # no steps: nothing for a kernel to run (the plain scans return the carry as it came)
        return plain, False, None
    if not (gpu or interpret):
        from recur.kernels import cpu

        if cpu.gated_cell(cell):  # a float32 minGRU / minLSTM: the parallel scan is a compiled kernel here
            return "parallel", False, None
        return "sequential", False, (None if mode == "auto" else
                                     f"mode={mode!r} needs a GPU (backend is {jax.default_backend()})")
    carry = jax.eval_shape(lambda: cell.initial_carry(B))
    if wanted != "linear" and (_complex(carry) or jnp.issubdtype(cell.dtype, jnp.complexfloating)):
        # (the linear kernel takes complex numbers as their two parts: the LRU)
        return plain, False, f"the recurrent kernels take real numbers; {cell.name} has a complex state"
    if wanted == "loop":
        from recur.kernels import persistent

        why_not = persistent.problem(cell, B, resets=resets, remat=remat, backward=backward)
        if why_not is None and vmapped:
            why_not = ("the persistent kernels' programs must all be resident at once, and jax.vmap multiplies "
                       "their grid by the batch")
        if why_not is None:
            wanted = "persistent"  # LSTM, GRU, MGU, Elman: W_h split across the GPU's programs
        elif remat != "none" and persistent.problem(cell, B, resets=resets, backward=backward) is None:
            return plain, False, why_not  # the persistent kernel's own reason: only its remat is missing
    if wanted == "loop" and remat != "none":
        return plain, False, f"the loop kernel stores every step (remat={remat!r} asks not to)"
    if gpu and not interpret and not probing():
        problem = _gpu_problem(cell, wanted, B, T, I, remat, masked, resets)
        if problem:
            return plain, False, problem
    return wanted, interpret, None


def _fastest(cell, B, T, I, remat, interpret, vmapped, **options):
    """``auto`` on a GPU: the fastest of the plain scan, the kernel and cuDNN's LSTM that can run
    this scan, measured once per cell and shape (recur/kernels/autotune.py)."""
    plain = "parallel" if cell.linear else "sequential"  # first: the reference and the fallback
    candidates = {plain: (plain, False)}
    with _probing():  # no probe: the measurement compiles the kernel, and a failure there drops it
        for mode in ("kernel", "cudnn"):
            impl, interp, why = choose(cell, mode, B, T, I, remat, vmapped=vmapped, **options)
            if why is None and impl not in ("sequential", "parallel"):
                candidates[mode] = (impl, interp)
    # (under vmap "kernel" is the loop kernel where it is otherwise the persistent one: keyed apart)
    return (*_measured(cell, candidates, B, T, I, remat, interpret, options, True,
                       **(dict(vmapped=True) if vmapped else {})), None)


def _measured(cell, candidates, B, T, I, remat, interpret, options, train, **keyed):
    """The (impl, interpret) of the fastest of ``candidates`` ({name: (impl, interpret)}, the plain
    scan first) as autotune.pick finds it: measured for a training step, or with train=False the
    forward pass alone, keyed by the cell, the shapes, the options and ``keyed``."""
    from recur.kernels import autotune

    k = autotune.key(cell, B, T, I, tuple(candidates), remat=remat, interpret=interpret, **keyed, **options)
    label = f"{cell.name} B={B} T={T} I={I} {jnp.dtype(cell.dtype).name}" + ("" if train else ", forward pass alone")
    name = autotune.pick(candidates, k, lambda names, errors: autotune.measure(
        cell, names, B, T, I, remat=remat, errors=errors, train=train, **options), label)
    return candidates[name]


def inference_choice(cell, training, B, T, I, remat, **options):
    """``auto``'s implementation for a forward pass that is not differentiated, as (impl,
    interpret), where it differs from ``training`` (the training step's: sequential or
    persistent), else None. Measured like the training step (recur/kernels/autotune.py), on the
    forward pass alone, between the sequential scan and the persistent kernels, so that inference
    does not pay the training step's choice (on an H200 in bfloat16 the GRU's kernel won its
    training step and lost its inference by 36%). Only where ``auto`` measures."""
    from recur.kernels import autotune

    gpu, interpret = _on_gpu(), interpret_forced()
    if cell.linear or T == 0 or not (gpu or interpret) or _in_shard_map() or probing() or not autotune.enabled(gpu):
        return None
    candidates = {"sequential": ("sequential", False)}
    with _probing():  # no probe: the measurement compiles the kernel, and a failure there drops it
        impl, interp, why = choose(cell, "kernel", B, T, I, remat, **options)
    if why is None and impl == "persistent":
        candidates["kernel"] = (impl, interp)
    if len(candidates) == 1:
        return None
    chosen = _measured(cell, candidates, B, T, I, remat, interpret, options, False, task="infer")
    return None if chosen[0] == training else chosen


def _in_shard_map() -> bool:
    """Whether the scan is being traced inside shard_map (manual mesh axes)."""
    return bool(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


@functools.lru_cache(maxsize=256)
def _gpu_problem(cell, wanted, B, T, I, remat="none", masked=False, resets=False):
    """None if the kernel lowers for this GPU at these shapes (and remat: the persistent kernels'
    "step" backward recomputes the gates; masked / resets: the scan has lengths / resets, which
    the kernels read), else why not (cached)."""
    import recur

    params = jax.eval_shape(lambda: cell.init(jax.random.key(0), I))
    xs = jax.ShapeDtypeStruct((B, T, I), cell.dtype)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32) if masked else None
    flags = jax.ShapeDtypeStruct((B, T), jnp.bool_) if resets else None

    def loss(p, x, n, r):
        hs, _ = recur.scan(cell, p, x, mode="kernel", remat=remat, lengths=n, resets=r)
        return jnp.sum(hs.astype(jnp.float32))

    try:
        with _probing():
            lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, xs, lengths, flags).lower()
            if _on_gpu():  # Triton compiles the kernels here: a failure there falls back too
                lowered.compile()
    except Exception as e:  # a lowering or compilation the Triton back end does not support
        return f"the {wanted} kernel does not lower for {cell.name} at B={B}, T={T}: {first_line(e)}"
    return None


def first_line(e: Exception) -> str:
    """An exception's first line of text (at most 200 characters), or its type's name if it has none."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


_PROBING = []


@contextlib.contextmanager
def _probing():
    """While probing, scan(mode='kernel') must not probe again (it would recurse)."""
    _PROBING.append(True)
    try:
        yield
    finally:
        _PROBING.pop()


def probing() -> bool:
    return bool(_PROBING)


def notice(reason: str):
    warnings.warn(f"recur.scan: {reason}; running the plain scan instead", KernelFallback, stacklevel=3)


def loop_fn(B: int, interpret: bool):
    """The ``loop`` argument of recur.backprop.deferred_scan that runs each time loop as a kernel."""
    from recur.kernels.loop import kernel_loop

    block_b = block_rows(B, gpu=not interpret)

    def loop(body, consts, rows, carry0, xs, reverse=False):
        return kernel_loop(body, consts, rows, carry0, xs, reverse=reverse, block_b=block_b,
                           interpret=interpret)

    return loop
