"""Run any cell over time: ``hs, carry = recur.scan(cell, params, xs_BxTxI, ...)``.

Inputs are batch-major [B, T, I]; the result is every step's output [B, T, O] and the final carry
(Keras' ``return_sequences`` and ``return_state`` at once).

Semantics, for batch row b:
- ``initial_carry``: the carry before step 0 (default ``cell.initial_carry(B)``, zeros). Pass the
  previous window's final carry (under ``jax.lax.stop_gradient``) for truncated BPTT. A carry
  (or ``reset_carry``) in a narrower dtype than the cell's state (say bfloat16 for a float32
  state) is widened to the state's dtype, in every mode.
- ``lengths`` [B] ints in [0, T]: a right-padded batch. Steps t >= lengths[b] leave the carry
  alone and output zeros, so the final carry is the carry after step lengths[b] - 1.
- ``resets`` [B, T] bools: a packed batch. Where resets[b, t] is true a new sequence begins at t:
  the carry is replaced by ``reset_carry`` (default ``cell.initial_carry(B)``) before step t.
- ``reverse=True``: each row's valid part (its first lengths[b] steps) is read from its last step
  to its first; outputs stay at their original positions and the final carry is the carry after
  reading step 0. With ``resets``, each packed sequence is read backwards on its own.
- ``mode="sequential"`` runs ``cell.step`` in ``jax.lax.scan``; ``mode="parallel"`` runs the
  (a, b) form of a :class:`~recur.cells.base.LinearCell` with ``jax.lax.associative_scan`` over
  all T steps at once; ``mode="chunked"`` cuts time into chunks of ``chunk`` steps (the last one
  padded), runs ``jax.lax.scan`` over the chunks carrying the state and, inside each chunk, the
  parallel scan, starting from the state s_in entering the chunk (the associative scan folds it
  into the first step: b <- a s_in + b, a <- 0). Coefficients and readout are computed chunk by
  chunk. Both need a
  linear cell and give the sequential scan's results up to float rounding
  (tests/test_parallel.py). They never divide by a product of gates: products of a_t that
  underflow to 0 do so where the sequential loop's would, so no log-space form is needed
  (docs/benchmarks.md has the measured errors at T = 16384). On the CPU, ``mode="parallel"``
  with real float32 coefficients runs a compiled chunked scan instead of the associative one
  (recur/kernels/cpu.py: each (batch row, time chunk) item walks its steps, chunks combined in
  three passes; for a float32 minGRU / minLSTM without resets the gates are computed inside it
  too), one pass over memory where the associative scan makes ~2 log2(T); docs/benchmarks.md has
  its speed against the sequential scan.
- ``mode="kernel"`` runs the time loop as one Pallas kernel (recur/kernels: any cell's step in
  a fused loop, forward and backward; a chunked kernel for linear cells, which for a minGRU,
  minLSTM or LRU computes the coefficients inside it too); where that cannot run
  (no GPU, a cell the GPU back end cannot lower, remat other than "step" with
  the persistent kernels of the LSTM, GRU and Elman RNN, which recompute the gates) it runs the plain scan
  with a one-line ``KernelFallback`` warning. ``mode="cudnn"`` runs the plain float32 LSTM
  through cuDNN (``jax.experimental.rnn``) on a GPU, falling back the same way for anything
  else. ``mode="auto"`` takes the fastest: on a GPU it times the plain scan, the kernel and
  cuDNN's LSTM (those that can run this scan) for one training step at the scan's shapes, once
  per cell and shape, and keeps the choice in ``$RECUR_CACHE_DIR/autotune.json``
  (recur/kernels/autotune.py; ``RECUR_AUTOTUNE=0`` takes the fixed table instead: in float32
  the sequential scan, which beat cuDNN's LSTM and the kernels on an H200, in half precision the
  persistent kernels where they run, and the chunked kernel for linear cells); on a CPU the sequential scan (the compiled chunked scan for a float32 minGRU /
  minLSTM). docs/kernels.md has the table per cell.
- ``chunk``: steps per chunk of ``mode="chunked"`` (a positive int; chunk >= T is one chunk).
- ``unroll``: steps per loop iteration of ``jax.lax.scan``; None (the default) is 8 on a GPU,
  where each loop iteration costs a few microseconds of launches (H200, LSTM B=64 T=512 H=256:
  training step 12.9 ms at unroll 1, 8.1 at 4, 7.1 at 8), and 1 elsewhere.
- ``remat``: what the backward pass recomputes instead of storing. "none" stores every step's
  residuals; "step" stores only the carries between steps; "sqrt" stores carries every
  ceil(sqrt(T)) steps and recomputes each chunk; an int sets that chunk length. With
  ``mode="chunked"`` any remat other than "none" stores only the states between chunks and
  recomputes each chunk (its length is ``chunk``); ``mode="parallel"`` ignores remat.
- ``projected=True``: xs is already ``cell.project(params, inputs)`` (an array or the pytree the
  cell's project returns, every leaf [B, T, ...]), so the scan skips the projection. The result
  and its gradients are the same as scanning the raw inputs, with the gradient reaching xs as
  the cotangent of the projected inputs. This lets a caller compute the projection more cheaply
  when it knows more: recur.models.lm.LanguageModel projects the V embedding rows once and
  gathers them, instead of projecting B*T embedded tokens.
- ``backward``: how the sequential scan is differentiated. "deferred" (the default with
  remat="none") runs the custom BPTT of recur/backprop.py: the reverse time loop on activations
  only and every weight gradient as one large matmul after it. On the CPU the plain float32
  LSTM and reset-after GRU without resets run both time loops as compiled C++ instead
  (recur/kernels/cpu.py; ``RECUR_CPU_KERNELS=0`` turns this off). "autodiff" is jax.grad of the
  scan (weight gradients accumulated inside the loop); remat other than "none" always uses it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from recur.cells.base import Cell
from recur.kernels import cpu as cpu_kernels

MODES = ("sequential", "parallel", "chunked", "kernel", "cudnn", "auto")
BACKWARDS = ("deferred", "autodiff")


def _concrete(x):
    """x as a NumPy array, or None while tracing (values unknown until run time)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _bcast(mask_B, leaf):
    """mask [B] reshaped to broadcast against leaf [B, ...] without rank promotion."""
    return jnp.reshape(mask_B, mask_B.shape + (1,) * (leaf.ndim - 1))


def tree_where(mask_B, on_true, on_false):
    """Per batch row: the leaves of on_true where mask, of on_false elsewhere."""
    return jax.tree.map(lambda a, b: jnp.where(_bcast(mask_B, a), a, b), on_true, on_false)


def _check_projected(cell, params, us, where):
    """us must have the structure and shapes of cell.project's output for [B, T, input_size] inputs."""
    leaves = jax.tree.leaves(us)
    if not leaves or any(getattr(x, "ndim", 0) < 2 for x in leaves):
        raise ValueError(f"{where}: projected xs must be [batch, time, ...] arrays, got {us!r:.200}")
    B, T = leaves[0].shape[:2]
    want = jax.eval_shape(lambda: cell.project(params, jnp.zeros((B, T, cell.input_size(params)), cell.dtype)))
    got_def, want_def = jax.tree.structure(us), jax.tree.structure(want)
    if got_def != want_def:
        raise ValueError(f"{where}: projected xs must have the structure of {cell.name}.project's output "
                         f"{want_def}, got {got_def}")
    for g, w in zip(leaves, jax.tree.leaves(want)):
        if g.shape != w.shape:
            raise ValueError(f"{where}: projected xs leaf has shape {g.shape}, expected {w.shape} "
                             f"(what {cell.name}.project gives for batch {B}, {T} steps)")
    return B, T


def _check_inputs(cell, params, xs, lengths, resets, initial_carry, mode, remat, where="recur.scan",
                  backward="deferred", chunk=256, projected=False, reset_carry=None):
    """Raise a ValueError (TypeError for a non-cell) naming what is wrong; return the carry's
    shapes and dtypes (``jax.eval_shape`` of ``cell.initial_carry(B)``)."""
    if not isinstance(cell, Cell):
        raise TypeError(f"{where}: cell must be a recur cell, got {type(cell).__name__}")
    if projected:
        B, T = _check_projected(cell, params, xs, where)
    else:
        if getattr(xs, "ndim", None) != 3:
            raise ValueError(
                f"{where}: xs must have shape [batch, time, features], got shape {getattr(xs, 'shape', None)}"
            )
        B, T, I = xs.shape
        expected = cell.input_size(params)
        if I != expected:
            raise ValueError(
                f"{where}: xs has {I} features per step but the {cell.name} params were made for "
                f"input_size={expected}"
            )
    if lengths is not None:
        if getattr(lengths, "shape", None) != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"{where}: lengths must be an int array of shape [batch]=({B},), got "
                f"{getattr(lengths, 'dtype', type(lengths).__name__)} {getattr(lengths, 'shape', '')}"
            )
        values = _concrete(lengths)
        if values is not None and ((values < 0) | (values > T)).any():
            bad = int(np.flatnonzero((values < 0) | (values > T))[0])
            raise ValueError(
                f"{where}: lengths must lie in [0, T={T}]; lengths[{bad}] = {int(values[bad])}"
            )
    if resets is not None and getattr(resets, "shape", None) != (B, T):
        raise ValueError(
            f"{where}: resets must have shape [batch, time]=({B}, {T}), got {getattr(resets, 'shape', None)}"
        )
    want = jax.eval_shape(lambda: cell.initial_carry(B))
    for name, given in (("initial_carry", initial_carry), ("reset_carry", reset_carry)):
        if given is None:
            continue
        got_def, want_def = jax.tree.structure(given), jax.tree.structure(want)
        if got_def != want_def:
            raise ValueError(f"{where}: {name} must have the structure {want_def}, got {got_def}")
        for g, w in zip(jax.tree.leaves(given), jax.tree.leaves(want)):
            if getattr(g, "shape", None) != w.shape:
                raise ValueError(f"{where}: {name} leaf has shape {getattr(g, 'shape', None)}, expected {w.shape}")
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    if mode in ("parallel", "chunked") and not cell.linear:
        from recur.cells import linear_cells

        raise ValueError(
            f"{where}: mode={mode!r} needs a cell that is linear in its state; {cell.name} is not. "
            f"Linear cells: {', '.join(linear_cells())}"
        )
    if isinstance(chunk, (bool, np.bool_)) or not isinstance(chunk, (int, np.integer)) or chunk <= 0:
        raise ValueError(f"{where}: chunk must be a positive int (steps per chunk), got {chunk!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"{where}: backward must be one of {BACKWARDS}, got {backward!r}")
    if not (remat in ("none", "step", "sqrt") or (isinstance(remat, int) and remat > 0)):
        raise ValueError(f"{where}: remat must be 'none', 'step', 'sqrt' or a positive int, got {remat!r}")
    return want


def reverse_index(lengths_B, T: int):
    """[B, T] gather index that reverses each row's first lengths[b] steps, leaving padding."""
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    n = lengths_B.astype(jnp.int32)[:, None]
    return jnp.where(t < n, n - 1 - t, t)


def _gather_time(x, idx_BxT):
    return jax.tree.map(
        lambda x: jnp.take_along_axis(x, jnp.reshape(idx_BxT, idx_BxT.shape + (1,) * (x.ndim - 2)), axis=1), x)


def scan(cell, params, xs, *, initial_carry=None, lengths=None, resets=None, reset_carry=None,
         reverse=False, mode="sequential", unroll=None, remat="none", backward="deferred", chunk=256,
         projected=False):
    """Run ``cell`` over xs [B, T, I]; returns (hs [B, T, O] in cell.dtype, final carry)."""
    # state: the shapes and dtypes of the cell's carry
    state = _check_inputs(cell, params, xs, lengths, resets, initial_carry, mode, remat, backward=backward,
                  chunk=chunk, projected=projected, reset_carry=reset_carry)
    B, T = jax.tree.leaves(xs)[0].shape[:2]
    unroll = default_unroll() if unroll is None else unroll
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"recur.scan: unroll must be None or a positive int (steps per loop iteration), got {unroll!r}")
    project = (lambda x: x) if projected else functools.partial(cell.project, params)
    mask = None if lengths is None else jnp.arange(T)[None, :] < lengths[:, None]
    if resets is not None:
        resets = resets.astype(bool)
        if mask is not None:
            resets = resets & mask
    if reverse:
        idx = reverse_index(lengths if lengths is not None else jnp.full((B,), T, jnp.int32), T)
        xs = _gather_time(xs, idx)
        if resets is not None:
            # reading backwards, a sequence that begins at t + 1 ends at t: restart there
            ends = jnp.concatenate([resets[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
            resets = _gather_time(ends if mask is None else ends & mask, idx)
    # a given carry in a narrower dtype than the cell's state is widened to it (the state dtype is
    # what each step returns), so every mode runs in the state dtype at least
    widen = lambda tree: jax.tree.map(lambda c, w: c.astype(jnp.promote_types(c.dtype, w.dtype)), tree, state)
    carry0 = cell.initial_carry(B) if initial_carry is None else widen(initial_carry)
    if resets is None:
        reset_carry = None  # no step restarts: nothing reads it
    elif reset_carry is None:
        reset_carry = cell.initial_carry(B)
    else:
        reset_carry = widen(reset_carry)
    impl, interpret, vmapped = mode, False, False
    if mode in ("kernel", "cudnn", "auto"):
        from recur.kernels import dispatch

        vmapped = _vmapped((params, xs, carry0, mask, resets))
        impl, interpret, reason = dispatch.choose(cell, mode, B, T, cell.input_size(params), remat,
                                                  resets=resets is not None, projected=projected,
                                                  backward=backward, masked=mask is not None, unroll=unroll,
                                                  vmapped=vmapped)
        if reason:
            dispatch.notice(reason)
    if impl == "cudnn":
        from recur.kernels import cudnn

        hs, carry = cudnn.lstm(cell, params, xs, carry0, lengths, reference=interpret)
    elif impl == "loop":
        from recur.backprop import deferred_scan
        from recur.kernels.dispatch import loop_fn
        from recur.kernels.pad import padded

        # 3 gate blocks (GRU, cifg, ...) padded to 4: Triton's arrays are powers of 2 in size
        cell_k, params_k, us_T = padded(cell, params, project(_time_major(xs)))
        hs, carry = deferred_scan(cell_k, unroll, loop_fn(B, interpret))(
            params_k, carry0, us_T, None if mask is None else mask.T, None if resets is None else resets.T,
            reset_carry)
        hs = jnp.swapaxes(hs, 0, 1)
    elif impl == "persistent":
        from recur.backprop import deferred_scan
        from recur.kernels import persistent

        # remat="step": the reverse loop recomputes the gates from the carries
        bwd = persistent.backward_fn(cell, interpret, remat=remat)  # None: the lax.scan reverse loop (BACKWARD)
        fwd = persistent.forward_fn(cell, interpret, remat=remat)
        infer = _inference(cell, mode, impl, B, T, remat, unroll, projected, backward, mask, resets, False, vmapped)
        hs, carry = deferred_scan(cell, unroll, forward_fn=fwd, backward_fn=bwd, infer=infer)(
            params, carry0, project(_time_major(xs)), None if mask is None else mask.T, None, None)
        hs = jnp.swapaxes(hs, 0, 1)
    elif impl == "linear":
        from recur.kernels import gated
        from recur.kernels.linear import linear_recurrence

        us = project(xs)
        ops = gated.operands(cell, params, us, carry0)
        if ops is not None:
            # minGRU, minLSTM, LRU: the coefficients, the mask, the resets and the initial state
            # inside the kernels
            states = gated.gated_recurrence(ops[0], carry0, mask, ops[1], cell, interpret, resets=resets,
                                            reset_carry=reset_carry)
            hs, carry = cell.readout(params, states, us), states[:, -1]
        else:
            recurrence = functools.partial(linear_recurrence, interpret=interpret)
            hs, carry = _linear_scan(cell, params, us, carry0, mask, resets, reset_carry, recurrence)
    elif impl == "sequential" and backward == "deferred" and remat == "none" and T > 0 and cpu_kernels.applies(
            cell, params, carry0, mask, resets):
        # the plain LSTM / reset-after GRU in float32 on the CPU: both time loops as compiled C++
        hs, carry = cpu_kernels.run(cell, params, carry0, project(xs), mask)
    elif impl == "sequential" and backward == "deferred" and remat == "none":
        from recur.backprop import deferred_scan

        # project time-major inputs: transposing xs [B, T, I] is cheaper than us [B, T, G]; cells
        # with a fused backward step project each step's inputs inside the loop on a CPU
        xs_T = _time_major(xs)
        inside = projects_in_loop(cell, projected)
        infer = _inference(cell, mode, impl, B, T, remat, unroll, projected, backward, mask, resets, inside, vmapped)
        hs, carry = deferred_scan(cell, unroll, project=inside, infer=infer)(
            params, carry0, xs_T if inside else project(xs_T), None if mask is None else mask.T,
            None if resets is None else resets.T, reset_carry)
        hs = jnp.swapaxes(hs, 0, 1)
    elif impl == "parallel":
        hs, carry = _parallel(cell, params, project(xs), carry0, mask, resets, reset_carry,
                              unroll, remat, T)
    elif impl == "chunked":
        hs, carry = _chunked_parallel(cell, params, project(xs), carry0, mask, resets,
                                      reset_carry, remat, T, int(chunk))
    else:
        hs, carry = _sequential(cell, params, project(xs), carry0, mask, resets, reset_carry,
                                unroll, remat, T)
    if mask is not None:
        hs = jnp.where(mask[:, :, None], hs, jnp.zeros((), hs.dtype))
    if reverse:
        hs = _gather_time(hs, idx)
    return hs, carry


def _inference(cell, mode, training, B, T, remat, unroll, projected, backward, mask, resets, inside, vmapped):
    """deferred_scan's ``infer`` for mode="auto": when the forward pass is not differentiated,
    the implementation ``auto`` measures fastest for it (dispatch.inference_choice), if not the
    training step's (``training``). inside: the deferred scan's inputs are the raw xs (projected
    in its loop), not us. None under jax.vmap (the persistent kernels are not taken there)."""
    from recur.kernels import autotune, dispatch

    gpu = dispatch._on_gpu()
    if mode != "auto" or vmapped or not ((gpu or dispatch.interpret_forced()) and autotune.enabled(gpu)):
        return None  # auto does not measure here (a CPU, or RECUR_AUTOTUNE=0): training's choice

    def infer(params, carry0, us_T, mask_T, resets_T, reset_carry):
        from recur.backprop import deferred_scan

        got = dispatch.inference_choice(cell, training, B, T, cell.input_size(params), remat,
                                        resets=resets is not None, projected=projected, backward=backward,
                                        masked=mask is not None, unroll=unroll)
        if got is None:
            return None
        impl, interpret = got
        if impl == "persistent":  # (no resets: the kernels take none)
            from recur.kernels import persistent

            us_T = cell.project(params, us_T) if inside else us_T
            return persistent.forward_fn(cell, interpret)(params, carry0, us_T, mask_T, False)
        hs, carry = deferred_scan(cell, unroll, project=inside)(params, carry0, us_T, mask_T, resets_T, reset_carry)
        return carry, hs

    return infer


def _vmapped(tree) -> bool:
    """Whether any leaf is being batched by jax.vmap (outside it a Pallas kernel's grid is the
    kernel's own; inside, vmap multiplies it by the batch)."""
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - another jax: assume not
        return False
    return any(isinstance(x, BatchTracer) for x in jax.tree.leaves(tree))


def _time_major(tree):
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


def default_unroll() -> int:
    """``unroll=None``: 8 steps per loop iteration on a GPU, 1 elsewhere (see :func:`scan`)."""
    return 8 if jax.default_backend() == "gpu" else 1


def projects_in_loop(cell, projected, backend=None) -> bool:
    """Whether the deferred scan multiplies each step's inputs by W_x inside its loop. On a CPU
    that saves writing the projected inputs [T, B, G] and reading them back (LSTM inference 43 ->
    34 ms at B=32, T=128, H=256); on a GPU one large matmul before the loop beats T small ones in
    it (H200, B=64, T=512, H=256: see docs/benchmarks.md). backend: jax's default backend, or the
    one to decide for."""
    return (not projected and cell.fused_backward and cell.project_in_loop
            and (backend or jax.default_backend()) == "cpu")


def _sequential(cell, params, us, carry0, mask, resets, reset_carry, unroll, remat, T):
    def body(carry, inputs):
        u_t, m_t, r_t = inputs
        if r_t is not None:
            carry = tree_where(r_t, reset_carry, carry)
        new, h = cell.step(params, carry, u_t)
        if m_t is not None:
            new = tree_where(m_t, new, carry)
        return new, h

    xs = (_time_major(us), None if mask is None else mask.T, None if resets is None else resets.T)
    if remat == "none":
        carry, hs = jax.lax.scan(body, carry0, xs, unroll=unroll)
    elif remat == "step":
        carry, hs = jax.lax.scan(jax.checkpoint(body), carry0, xs, unroll=unroll)
    else:
        chunk = math.isqrt(T - 1) + 1 if remat == "sqrt" else remat
        carry, hs = _chunked(body, carry0, xs, T, min(chunk, T), unroll)
    return jnp.swapaxes(hs, 0, 1), carry


def _chunked(body, carry0, xs, T, chunk, unroll):
    """Scan over chunks of ``chunk`` steps, each recomputed in the backward pass."""
    n = -(-T // chunk)
    pad = n * chunk - T
    u, m, r = xs
    B = jax.tree.leaves(u)[0].shape[1]
    if pad:
        # padded steps are masked out: they leave the carry alone
        u = jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]), u)
        m = jnp.ones((T, B), bool) if m is None else m
        m = jnp.concatenate([m, jnp.zeros((pad, B), bool)])
        r = None if r is None else jnp.concatenate([r, jnp.zeros((pad, B), bool)])
    split = lambda x: None if x is None else jnp.reshape(x, (n, chunk) + x.shape[1:])
    xs_chunks = (jax.tree.map(split, u), split(m), split(r))

    @jax.checkpoint
    def run_chunk(carry, chunk_xs):
        return jax.lax.scan(body, carry, chunk_xs, unroll=unroll)

    carry, hs = jax.lax.scan(run_chunk, carry0, xs_chunks)
    hs = jnp.reshape(hs, (n * chunk,) + hs.shape[2:])[:T]
    return carry, hs


def _parallel(cell, params, us, carry0, mask, resets, reset_carry, unroll, remat, T):
    """s_t = a_t s_{t-1} + b_t for all t with an associative scan over (a, b) pairs.

    Resets and the initial carry are folded into the coefficients: where the carry restarts from
    c (the initial carry at t = 0, the reset carry at a reset), b_t <- a_t c + b_t and a_t <- 0.
    Padded steps get a = 1, b = 0 so the state passes through unchanged. On the CPU, real
    float32 coefficients go through the compiled chunked scan of recur/kernels/cpu.py instead
    of lax.associative_scan (same states up to float rounding, one pass over memory instead of
    ~2 log2(T)); for a float32 minGRU / minLSTM without resets that scan also computes the gates.
    """
    if T == 0:  # no steps: no outputs, and the carry as it came
        states = jnp.zeros(carry0.shape[:1] + (0,) + carry0.shape[1:], carry0.dtype)
        return cell.readout(params, states, us), carry0
    kind = cpu_kernels.gated_kind(cell, carry0, us) if resets is None else 0
    if kind:
        # minGRU / minLSTM: the gates are computed inside the compiled scan as well
        states = cpu_kernels.gated(us, carry0, cpu_kernels.float_mask(mask, carry0.shape[0], T), kind)
        return cell.readout(params, states, us), states[:, -1]
    return _linear_scan(cell, params, us, carry0, mask, resets, reset_carry, _parallel_recurrence)


def _parallel_recurrence(a, b):
    if cpu_kernels.linear_applies(a, b):
        return cpu_kernels.linear_recurrence(a, b)
    return _associative(a, b)


def _associative(a, b):
    """States of s_t = a_t s_{t-1} + b_t (s_{-1} = 0) along axis 1, by lax.associative_scan."""

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    return jax.lax.associative_scan(combine, (a, b), axis=1)[1]


def _linear_scan(cell, params, us, carry0, mask, resets, reset_carry, recurrence=_associative):
    """_parallel's computation on us [B, T', ...]: (outputs [B, T', O], state after step T'-1).

    recurrence(a, b) -> states is the associative scan, or recur.kernels.linear's kernel.
    """
    a, b = cell.coefficients(params, us)  # [B, T, S]
    expand = lambda m: m[:, :, None]
    if mask is not None:
        a = jnp.where(expand(mask), a, jnp.ones((), a.dtype))
        b = jnp.where(expand(mask), b, jnp.zeros((), b.dtype))
    restart = jnp.zeros(a.shape[:2], bool).at[:, 0].set(True)
    start = jnp.broadcast_to(carry0[:, None, :], a.shape).astype(b.dtype)
    if resets is not None:
        restart = restart | resets
        rc = jnp.broadcast_to(reset_carry[:, None, :], a.shape).astype(b.dtype)
        start = jnp.where(expand(resets), rc, start)
    b = jnp.where(expand(restart), a * start + b, b)
    a = jnp.where(expand(restart), jnp.zeros((), a.dtype), a)
    states = recurrence(a, b)
    return cell.readout(params, states, us), states[:, -1]


def _chunked_parallel(cell, params, us, carry0, mask, resets, reset_carry, remat, T, chunk):
    """``lax.scan`` over chunks of ``chunk`` steps carrying the state; ``_parallel`` inside.

    Each chunk is one parallel scan starting from the state entering it (``_parallel``, which
    treats it as that chunk's initial carry). T is padded up to
    a multiple of ``chunk`` with masked steps (a = 1, b = 0), which leave the state alone.
    """
    B = carry0.shape[0]
    chunk = max(1, min(chunk, T))
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        us = jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)), us)
        mask = jnp.ones((B, T), bool) if mask is None else mask
        mask = jnp.pad(mask, [(0, 0), (0, pad)])
        resets = None if resets is None else jnp.pad(resets, [(0, 0), (0, pad)])
    # [B, n*chunk, ...] -> [n, B, chunk, ...]: lax.scan runs over the leading (chunk) axis
    split = lambda x: None if x is None else jnp.swapaxes(jnp.reshape(x, (B, n, chunk) + x.shape[2:]), 0, 1)
    xs = (jax.tree.map(split, us), split(mask), split(resets))

    def body(state, chunk_xs):
        u_c, m_c, r_c = chunk_xs
        # the parallel scan of one chunk (on the CPU, the compiled scan where it applies)
        hs_c, last = _parallel(cell, params, u_c, state, m_c, r_c, reset_carry, 1, "none", chunk)
        return last.astype(state.dtype), hs_c

    if remat != "none":
        body = jax.checkpoint(body)
    carry, hs = jax.lax.scan(body, carry0, xs)
    hs = jnp.reshape(jnp.swapaxes(hs, 0, 1), (B, n * chunk) + hs.shape[3:])[:, :T]
    return hs, carry
