"""Recurrent time loops as persistent Pallas kernels, with W_h split across the GPU: the LSTM (plain
and Greff's variants), the reset-after GRU (cuDNN's and PyTorch's) and the Elman RNN; Cho's GRU and
the MGU in recur/kernels/persistent_reset.py, the layer-norm LSTM in persistent_ln.py, the LSTM with
gate recurrence in persistent_fgr.py, LSTMP in persistent_proj.py, on the same grid and barrier.

Why: on a GPU the sequential scan runs each time step as separate kernels (the recurrent
matmul, then the gates), and each reads all of W_h from L2. The loop kernel (loop.py) runs the
whole loop in one launch, but with one program per 16 batch rows: 4 programs at B = 64, each
streaming the whole W_h every step (measured 2-5x slower, docs/benchmarks.md). cuDNN's persistent
kernel instead splits W_h across the chip and meets at a grid-wide barrier each step. This is that
design in Pallas:

- the grid is (B / BB row blocks) x (H / U unit blocks), at most one program per SM so that all
  are resident at once. Program (ib, iu) owns batch rows [ib*BB, (ib+1)*BB) and hidden units
  [iu*U, (iu+1)*U): the gate columns of those units are a [H, gates*U] slice of W_h^T (128 KiB
  in bfloat16 for the LSTM at H = 1024, U = 16), read from L2 / L1 each step by that program only;
- step t: h_{t-1} (rows of it, all H columns, in the compute dtype) from a [T + 1, B, H] buffer
  in global memory, dots of K_BLOCK columns into [BB, gates*U] float32 accumulators (the GRU's
  3 blocks as 2 + 1: Triton's blocks are powers of 2), then the cell's step on its own units
  (a :class:`Rule`: the same formulas as the cell's fused step, in float32), the state kept in
  registers, h_t written to the buffer's row t + 1;
- then a grid barrier: ``debug_barrier`` (bar.sync, so every thread's stores come before),
  one acq_rel atomic add on a counter, a spin on the counter until every program has arrived,
  ``debug_barrier`` again. The spin is bounded (MAX_SPINS polls): a program that gives up (the
  grid was not resident, say) goes on instead of hanging, no longer arriving at barriers, and its
  reads of the other programs' values are NaN from then on (:func:`stale`), so that what it
  computes from them is NaN too.

With ``keep=True`` the forward kernel also writes what the cell's fused backward step reads (its
step_saving values); :func:`run_backward` runs the reverse loop on the same grid (d u and d rec for
its rows and units, then its units of d h_{t-1} = d rec_t W_h after the barrier). The training
step is the two kernels plus the deferred scan's large weight-gradient matmuls
(recur/backprop.py's ``forward_fn`` / ``backward_fn``).

A cell fits a :class:`Rule` when its step, given W_h h, is element-wise in the hidden units. Cho's
GRU and the MGU multiply a gate times h by W_n: a second barrier per step (persistent_reset.py).
Layer norm's statistics run over all units: partial sums across the programs, three barriers per
step (persistent_ln.py). A projection, h_t = W_p m_t, needs every unit's m_t: two barriers per step
(persistent_proj.py; four with layer norm, in persistent_ln.py). Gate recurrence, R_gates (i, f, o)_{t-1}, is a second recurrent source in
the one barrier's buffer (persistent_fgr.py).

In Pallas' interpret mode (CPU tests) the programs would run one after another and could not meet
at a barrier, so there one program runs every (row, unit) block in turn within each step: the
same kernel code, the same block slicing, a grid of one.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from recur.cells import base
from recur.cells.base import halved

UNITS = 16  # hidden units per program: its W_h slice is [H, gates * U] (Triton's dot needs N >= 16)
MIN_ROWS = 16  # Triton's dot needs M >= 16
K_BLOCK = 128  # columns of h (rows of W_h^T) per dot
MAX_SPINS = 1 << 22  # polls of the barrier's counter before a program gives up (a few seconds)
DEFAULT_SMS = 132  # an H100 SXM / H200; the device's own count is used when it reports one
# Triton's settings: compiled for sm_90 without spills at H = 1024, forward and backward, for every
# cell (the LSTM's bf16: 48 / 24 KiB of shared memory, fp32: 96 / 48; docs/kernels.md); not yet tuned on a GPU
# (experiments/gpu_explore.py --parts persistent)
NUM_WARPS = 8
NUM_STAGES = 3
# the dots' depth where a reverse loop recomputes the forward's products (remat="step") in the kernels
# with several products per step: at K_BLOCK's 128 the backward kernels of the FGR LSTM (216 bytes per
# thread in float32, 44 in bfloat16), the layer-norm LSTM (28 in bfloat16) and Cho's GRU (12 in
# bfloat16) spill at B = 64, H = 1024 on sm_90; at 64 only the FGR LSTM's does (116, 20)
RECOMPUTE_KB = 64
# three gate blocks (the GRU, lstm:cifg, the gate recurrence's R) as one dot window of 4U columns,
# the fourth zero, instead of two (2U + U: Triton's blocks are powers of 2). On an H200 the
# two-window GRU and lstm:cifg forward kernels ran 3.4x slower than the LSTM's one window in float32
# (19.9 against 6.7 ms, B=64 T=512 H=1024) and 1.4x in bfloat16; off until a GPU times it
# (experiments/gpu_explore.py --parts persistent --pad-three)
PAD_THREE = False
# how a program waiting at a grid barrier polls the counter: "atomic", an acq_rel atomic add of 0
# per poll (each an L2 read-modify-write on the one address every waiting program polls, queued
# with the arrivals), or "load", volatile loads until the count is reached and one acq_rel atomic
# add of 0 then (the acquire that orders the loads of the other programs' values after it). Both
# agree in interpret mode and compile for sm_90; "atomic", the form measured, until a GPU times
# "load" (experiments/gpu_explore.py --poll-load)
POLL = "atomic"


def _pow2_divisor(n, cap):
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or DEFAULT_SMS
    except Exception:  # pragma: no cover - no device query
        return DEFAULT_SMS


def layout(B: int, H: int, programs: int):
    """(BB rows, U units, K_BLOCK columns per dot) per program for at most ``programs`` programs,
    or a string saying why the kernel cannot split these shapes."""
    if B % MIN_ROWS or H % UNITS:
        return (f"the persistent kernel needs the batch a multiple of {MIN_ROWS} and the hidden size a "
                f"multiple of {UNITS} (got B={B}, H={H})")
    U, BB = UNITS, MIN_ROWS
    # rows first: each program reads its rows of h (BB x H) and its W_h slice (H x 4U) per step
    while (B // BB) * (H // U) > programs:
        if BB < B and B % (2 * BB) == 0:
            BB *= 2
        elif U < H and H % (2 * U) == 0:
            U *= 2
        else:
            return f"B={B}, H={H} need more than {programs} programs"
    if BB & (BB - 1) or U & (U - 1):
        return f"Triton's blocks are powers of 2: {BB} rows x {U} units from B={B}, H={H}"
    return BB, U, _pow2_divisor(H, K_BLOCK)


def problem(cell, B, *, resets=False, remat="none", backward="deferred"):
    """None if :func:`forward_fn` runs this scan, else why not."""
    rule = rule_for(cell)
    if isinstance(rule, str):
        return rule
    if resets:
        return "the persistent kernel takes no resets"
    if backward != "deferred" or remat not in ("none", "step"):
        return "the persistent kernel runs under the deferred backward pass, with remat 'none' or 'step'"
    why = layout(B, cell.hidden_size, sm_count())
    if isinstance(why, str):
        return why
    extra = getattr(rule, "layout_problem", None)  # the LSTMP's split of proj_size
    return extra(cell, B, cell.hidden_size // why[1]) if extra else None


class _Grid:
    """The (row block x unit block) grid of a persistent kernel, its block slicing and its launch.

    On a GPU each program runs one block; in interpret mode one program runs them all in turn
    (``blocks``), and the barrier counts that one program.
    """

    def __init__(self, B, H, dtype, programs, interpret):
        lay = layout(B, H, sm_count() if programs is None else programs)
        if isinstance(lay, str):
            raise ValueError(f"recur.kernels.persistent: {lay}")
        self.BB, self.U, self.KB = lay
        self.nb, self.nu, self.H, self.interpret = B // self.BB, H // self.U, H, interpret
        # the matmul operands' type, and the gates' and the state's (float64 stays float64)
        self.cdt = jnp.dtype(dtype)
        self.acc = jnp.promote_types(self.cdt, jnp.float32)

    def parts(self):
        """(BB, U, nu, rows, units, compute dtype, accumulation dtype)."""
        return self.BB, self.U, self.nu, self.rows, self.units, self.cdt, self.acc

    def blocks(self):
        if self.interpret:
            return [(ib, iu) for ib in range(self.nb) for iu in range(self.nu)]
        return [(pl.program_id(0), pl.program_id(1))]

    def rows(self, ib):
        return pl.ds(ib * self.BB, self.BB)

    def units(self, iu, g=0):
        """Columns of gate block g (of a [.., 4H] array; g = 0 for a [.., H] one) for unit block iu."""
        return pl.ds(g * self.H + iu * self.U, self.U)

    def by_program(self, W, gates, pad=True):
        """W [gates * H, D] (gate blocks of the H units) as W^T [D, gates * H] with each program's
        gates * U columns together, ordered (gate, unit): the forward's product reads one window.
        Three gates with PAD_THREE (and pad): a zero fourth block, as :meth:`gate_product` reads."""
        if pad and PAD_THREE and gates == 3:
            W, gates = jnp.concatenate([W, jnp.zeros((W.shape[0] // 3, W.shape[1]), W.dtype)]), 4
        D = W.shape[1]
        return jnp.transpose(W.astype(self.cdt)).reshape(D, gates, self.nu, self.U).transpose(0, 2, 1, 3).reshape(
            D, gates * self.H)

    def program_slices(self, W):
        """W [R, H] as each program's [R, U] column slice (its units), stacked: [nu * R, U], for the
        reverse loop's product d h_{t-1} = d rec W (program iu's slice at rows iu * R)."""
        R = W.shape[0]
        return W.astype(self.cdt).reshape(R, self.nu, self.U).transpose(1, 0, 2).reshape(self.nu * R, self.U)

    def gate_product(self, src_ref, t, ib, iu, w_ref, depth, gates, **kw):
        """The ``gates`` [BB, U] blocks of (src_ref[t]'s rows of block ib) @ (program iu's window of
        :meth:`by_program`'s layout), in power-of-2 windows (Triton's blocks: 3 gates as 2 + 1, or
        with PAD_THREE as one window of 4, the zero fourth block dropped)."""
        if PAD_THREE and gates == 3:
            (acc,) = self.product(src_ref, t, ib, w_ref, depth, [(iu * 4 * self.U, 4 * self.U)], **kw)
            return halved(acc, 4)[:3]
        accs = self.product(src_ref, t, ib, w_ref, depth,
                            [((iu * gates + g0) * self.U, size * self.U) for g0, size in _groups(gates)], **kw)
        return [block for acc, (_, size) in zip(accs, _groups(gates)) for block in halved(acc, size)]

    def step_inputs(self, us_ref, mask_ref, t, ib, iu, gates):
        """Step t's projected inputs (``gates`` blocks of block (ib, iu)'s units, float32) and mask
        (None without one), t clamped to the last step: loaded before the barrier that precedes
        the step, so that their latency overlaps the wait (t = T: nothing left; step T-1's again)."""
        t = jnp.minimum(t, us_ref.shape[0] - 1)
        u = tuple(us_ref[t, self.rows(ib), self.units(iu, g)].astype(self.acc) for g in range(gates))
        return u, (None if mask_ref is None else mask_ref[t, self.rows(ib)])

    def product(self, src_ref, t, ib, w_ref, depth, windows, *, gave_up=None, src_col=0, w_row=0, fresh=True,
                kb=None):
        """Block ib's rows of what the programs wrote to src_ref[t] (columns [src_col, src_col +
        depth), read fresh; ``fresh=False``: an input of the launch, read through the caches)
        times rows [w_row, w_row + depth) of w_ref, one [BB, width] float32 product per (column,
        width) window of w_ref, in K_BLOCK-deep dots that share each load of src (several
        windows: the GRU's 2U and U columns); kb: the dots' depth where depth is not a multiple of
        K_BLOCK's (the LSTMP's P). A fresh read takes the program's gave_up (see :func:`stale`)."""
        if fresh and gave_up is None:
            raise ValueError("a fresh read of the other programs' values takes this program's gave_up flag")
        KB, f32 = kb or self.KB, self.acc

        def dot(j, accs):
            src = src_ref.at[t, self.rows(ib), pl.ds(src_col + j * KB, KB)]
            x = _load_fresh(src, self.interpret) if fresh else src[...]
            return tuple(acc + jax.lax.dot(x, w_ref[pl.ds(w_row + j * KB, KB), pl.ds(col, width)],
                                           preferred_element_type=f32)
                         for acc, (col, width) in zip(accs, windows))

        zeros = tuple(jnp.zeros((self.BB, width), f32) for _, width in windows)
        accs = jax.lax.fori_loop(0, depth // KB, dot, zeros)
        return tuple(stale(gave_up, acc) for acc in accs) if fresh else accs

    def launch(self, kernel, inputs, out_shape, name, arrivals):
        """Run kernel(in_refs, out_refs, barrier) over the grid; returns (outputs, ok). barrier(arrivals,
        gave_up) is :func:`_grid_barrier` on a zeroed counter of this launch; ok says that the
        counter ended at programs x ``arrivals`` (the barriers the kernel passes), i.e. that it
        started at zero (a counter that XLA did not give a fresh buffer would let the barriers pass
        early) and that no program gave up (it stops arriving): the callers turn their outputs to
        NaN rather than return a race's results."""
        n_in, n_programs = len(inputs), 1 if self.interpret else self.nb * self.nu

        def body(*refs):  # inputs, the counter in, outputs, the counter out (the same buffer)
            outs = refs[n_in + 1:n_in + 1 + len(out_shape)]
            barrier = functools.partial(_grid_barrier, refs[-1], n_programs, gpu=not self.interpret)
            kernel(refs[:n_in], outs, barrier)

        kwargs = {}
        if not self.interpret:
            from jax.experimental.pallas import triton as pl_triton

            kwargs["compiler_params"] = pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        call = pl.pallas_call(
            body, out_shape=list(out_shape) + [jax.ShapeDtypeStruct((1,), jnp.int32)],
            grid=(1,) if self.interpret else (self.nb, self.nu), input_output_aliases={n_in: len(out_shape)},
            interpret=self.interpret, name=name, **kwargs,
        )
        outs = one_at_a_time(lambda *ins: call(*ins, jnp.zeros((1,), jnp.int32)), name)(*inputs)
        return outs[:-1], outs[-1][0] == n_programs * arrivals


def one_at_a_time(f, name="kernel"):
    """f, which under jax.vmap runs once per batch element (a lax.map over the batched arguments, as
    jax.custom_batching.sequential_vmap), with a PerformanceWarning, instead of being batched.
    jax.vmap batches a pallas_call by multiplying its grid by the batch: a persistent kernel's
    programs, which must all be resident at once, would then outnumber the SMs and its barriers
    would give up (NaN). recur.scan sees a vmap around it and takes the loop kernel
    (dispatch.choose(vmapped=)), but not jax.vmap of an already jitted function, whose scan was
    traced unbatched; this is what makes that case correct (each element at the kernel's own
    speed, one after another)."""
    f = jax.custom_batching.custom_vmap(f)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        if not any(in_batched):  # (only custom_vmap's jvp asks this; the kernels are not differentiated)
            out = f(*args)
            return out, jax.tree.map(lambda _: False, out)
        warnings.warn(f"recur: jax.vmap of a jitted function runs the persistent kernel {name} once per element "
                      f"({axis_size} in turn); jax.vmap inside jax.jit runs them all at once (the loop kernel)",
                      PerformanceWarning, stacklevel=2)

        def one(elements):
            it = iter(elements)
            return f(*[next(it) if b else a for a, b in zip(args, in_batched)])

        out = jax.lax.map(one, [a for a, b in zip(args, in_batched) if b])
        return out, jax.tree.map(lambda _: True, out)

    return f


class PerformanceWarning(UserWarning):
    """recur ran something correctly but slower than it could (the message says how to avoid it)."""


# --- the cells' steps, unit by unit ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """A cell's step as the persistent kernels run it: on lists of [rows, units] float32 blocks,
    one per gate block, so that each program applies it to its own rows and units only (a step
    that mixes units, such as layer norm's statistics, has none; Cho's GRU and the MGU, whose
    r * h precedes a product, run in persistent_reset.py).

    forward(u, rec, state, p) -> (new state, saved): u, rec: the projected inputs' and W_h h's
    (+ ``bias``) gate blocks; state / new state: {component: block}; p: {name: [blocks]} of the
    ``params`` vectors; saved: {name: [blocks]}, the values (float32) the backward step reads,
    written as [T, B, blocks * H] arrays.
    backward(saved, prev, d, u, p) -> (d u, d rec or None (= d u), pass, d p or None): prev: the
    state components in ``reads`` entering the step; d: the cotangent of the step's new state ("h"
    with the output's added); u: the step's projected inputs (with ``reads_u``, else None); pass:
    {component: the cotangent of the state entering the step, not through W_h h} (None: zero);
    d p: {name: [blocks]}, the step's cotangent of p summed over its rows. The hand-written rules
    are the cell's own step_saving / step_backward, blockwise (tests compare the two); the LSTM
    variants' rule traces the cell's own step and differentiates it.
    """

    name: str
    gates: int  # gate blocks in W_h [gates * H, H]
    state: tuple  # the carry's components, "h" first ("h" alone: the carry is an array)
    saved: tuple  # ((name, blocks), ...) in the order of the cell's step_saving value
    reads: tuple  # the state components entering a step that the backward step reads
    bias: str | None  # the recurrent bias parameter [gates * H], added to W_h h
    forward: Callable
    backward: Callable
    params: tuple = ()  # ((name, blocks), ...): per-unit parameter vectors [blocks * H] the step reads
    reads_u: bool = False  # the backward step reads the projected inputs (it recomputes the step)
    saved_as: str | None = None  # saved values handed on as {saved_as: the one saved array}
    own_drec: bool = False  # backward's d rec differs from d u (it returns it: not None)

    def pack(self, saved: dict):
        """{name: array} -> the cell's step_saving value (stacked over time), or {saved_as: it}."""
        values = tuple(saved[name] for name, _ in self.saved)
        value = values if len(values) > 1 else values[0]
        return {self.saved_as: value} if self.saved_as else value

    def unpack(self, value) -> dict:
        value = value[self.saved_as] if self.saved_as else value
        values = value if len(self.saved) > 1 else (value,)
        return {name: v for (name, _), v in zip(self.saved, values)}

    def parts(self, carry) -> dict:
        return dict(carry) if isinstance(carry, dict) else {"h": carry}

    def carry(self, parts: dict, like):
        """parts in the structure and dtypes of ``like`` (a carry)."""
        if isinstance(like, dict):
            return {k: parts[k].astype(like[k].dtype) for k in like}
        return parts["h"].astype(like.dtype)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A cell's kernels from a module of their own (no :class:`Rule`): forward_fn / backward_fn(cell,
    interpret, programs) -> recur.backprop.deferred_scan's forward_fn / backward_fn."""

    name: str
    forward_fn: Callable  # (cell, interpret, programs, remat)
    backward_fn: Callable
    layout_problem: Callable | None = None  # (cell, B, unit blocks) -> None or why the grid does not fit


def _sigmoid_of(t):  # sigmoid(x) = (1 + tanh(x / 2)) / 2, from t = tanh(x / 2)
    return 0.5 * t + 0.5


@dataclasses.dataclass(frozen=True)
class Gates:
    """The LSTM variant's gate switches (recur.cells.lstm.LSTM's), as the kernels apply them to each
    program's [rows, units] blocks: a sigmoid gate as (1 + tanh(z / 2)) / 2, whose tanh is what
    the reverse loop reads (one tanh per block, and σ' = (1 - t^2) / 4)."""

    blocks: tuple = ("i", "f", "g", "o")
    peepholes: bool = False
    coupled: bool = False
    input_activation: bool = True
    output_activation: bool = True

    @property
    def n(self):
        return len(self.blocks)

    @property
    def peephole_names(self):
        return tuple(f"p_{g}" for g in "ifo" if self.peepholes and g in self.blocks)

    @property
    def reads_c_t(self):
        """o's peephole reads c_t: its gradient needs the last c_T besides the c entering each step."""
        return "p_o" in self.peephole_names

    def peephole_grads(self, d_pre, c_prev, c_last):
        """{p_i, p_f, p_o: [H]} (those present): the gates' d z (d_pre [T, B, n H], the kernels' d u)
        against the cell state each peephole reads (c_{t-1} for i and f: c_prev [T, B, H], the c
        entering each step; c_t for o: c_prev one step on, then c_last [B, H]), summed over (t, b).
        At a padded step c_prev one step on is the carried c, not the step's own c_t; recur.scan
        zeroes the outputs of padded steps, so no cotangent reaches d z there and it is exact."""
        dz = dict(zip(self.blocks, jnp.split(d_pre, self.n, axis=-1)))
        c_t = jnp.concatenate([c_prev[1:], c_last[None].astype(c_prev.dtype)]) if self.reads_c_t else None
        state = {"i": c_prev, "f": c_prev, "o": c_t}
        return {name: jnp.sum(dz[name[2:]] * state[name[2:]], axis=(0, 1)) for name in self.peephole_names}

    def forward(self, pre, c_prev, p):
        """(c_t, o, t): pre: the n [rows, U] pre-activation blocks (without the peepholes); p:
        {p_i, p_f, p_o: [1, U]} (the peepholes present); t: per block tanh(z / 2) for a sigmoid
        gate, the candidate's tanh (or pre-activation with niaf)."""
        z, t = dict(zip(self.blocks, pre)), {}

        def sigmoid(g, state):
            t[g] = jnp.tanh(0.5 * (z[g] + p[f"p_{g}"] * state if self.peepholes else z[g]))
            return _sigmoid_of(t[g])

        i = sigmoid("i", c_prev) if "i" in z else 1.0
        f = 1.0 - i if self.coupled else sigmoid("f", c_prev) if "f" in z else 1.0
        t["g"] = jnp.tanh(z["g"]) if self.input_activation else z["g"]
        c = f * c_prev + i * t["g"]
        o = sigmoid("o", c) if "o" in z else 1.0
        return c, o, [t[g] for g in self.blocks]

    def output_gate(self, tg):
        return _sigmoid_of(tg[self.blocks.index("o")]) if "o" in self.blocks else 1.0

    def backward(self, tg, c_prev, dc, do, p, extra=None):
        """(d pre (n blocks), d c_{t-1}): dc the cotangent of c_t (not through o's peephole, added
        here), do that of o; extra: {"i", "f": [rows, U]}, cotangents of those gates' values from
        elsewhere (the FGR carry)."""
        t = dict(zip(self.blocks, tg))
        sig = lambda g: _sigmoid_of(t[g]) if g in t else 1.0
        dz = {}
        if "o" in t:
            dz["o"] = (0.25 * do) * (1.0 - t["o"] * t["o"])
            if self.peepholes:
                dc = dc + dz["o"] * p["p_o"]
        i = sig("i")
        f = 1.0 - i if self.coupled else sig("f")
        di, df = dc * t["g"], dc * c_prev
        if extra:
            di, df = di + extra["i"], df + extra["f"]
        if self.coupled:
            di = di - df
        if "i" in t:
            dz["i"] = (0.25 * di) * (1.0 - t["i"] * t["i"])
        if "f" in t:
            dz["f"] = (0.25 * df) * (1.0 - t["f"] * t["f"])
        dz["g"] = dc * i * (1.0 - t["g"] * t["g"]) if self.input_activation else dc * i
        d_prev = dc * f
        if self.peepholes:
            d_prev = d_prev + sum(dz[g] * p[f"p_{g}"] for g in "if" if g in dz)
        return [dz[g] for g in self.blocks], d_prev

    def act(self, x):
        return jnp.tanh(x) if self.output_activation else x

    def act_grad(self, a):
        """act'(x) from a = act(x)."""
        return 1.0 - a * a if self.output_activation else 1.0


def gates_of(cell):
    """The :class:`Gates` of a recur.cells.lstm.LSTM."""
    return Gates(tuple(cell.blocks), cell.peepholes, cell.coupled, cell.input_activation, cell.output_activation)


PLAIN = Gates()


def _lstm_forward(u, rec, s, p):
    pre = [a + b for a, b in zip(u, rec)]
    # recur.cells.lstm: tanh(s * pre), s = 1/2 on the sigmoid blocks
    tg = [jnp.tanh(p * (1.0 if g == 2 else 0.5)) for g, p in enumerate(pre)]
    i, f, o = _sigmoid_of(tg[0]), _sigmoid_of(tg[1]), _sigmoid_of(tg[3])
    c = f * s["c"] + i * tg[2]
    tc = jnp.tanh(c)
    return {"h": o * tc, "c": c}, {"tg": tg, "tc": [tc]}


def _lstm_backward(sv, prev, d, u, p):
    """recur.cells.lstm.LSTM.step_backward."""
    t_i, t_f, t_g, t_o = sv["tg"]
    (tcv,), cp = sv["tc"], prev["c"]
    i_, f_, o_ = _sigmoid_of(t_i), _sigmoid_of(t_f), _sigmoid_of(t_o)
    dh = d["h"]
    dc = d["c"] + dh * o_ * (1.0 - tcv * tcv)
    d_pre = [(0.25 * dc) * t_g * (1.0 - t_i * t_i), (0.25 * dc) * cp * (1.0 - t_f * t_f),
             dc * i_ * (1.0 - t_g * t_g), (0.25 * dh) * tcv * (1.0 - t_o * t_o)]
    return d_pre, None, {"h": None, "c": dc * f_}, None


def _gru_forward(u, rec, s, p):
    """recur.cells.gru.GRU.step_saving (reset after the product; rec includes b_h)."""
    t_r, t_z = jnp.tanh(0.5 * (u[0] + rec[0])), jnp.tanh(0.5 * (u[1] + rec[1]))
    r, z = _sigmoid_of(t_r), _sigmoid_of(t_z)
    n = jnp.tanh(u[2] + r * rec[2])
    return {"h": (1.0 - z) * n + z * s["h"]}, {"t": [t_r, t_z], "n": [n], "rec_n": [rec[2]]}


def _gru_backward(sv, prev, d, u, p):
    """recur.cells.gru.GRU.step_backward."""
    (t_r, t_z), (n,), (rec_n,) = sv["t"], sv["n"], sv["rec_n"]
    r, z = _sigmoid_of(t_r), _sigmoid_of(t_z)
    dd = d["h"]
    du_n = dd * (1.0 - z) * (1.0 - n * n)
    du_r = du_n * rec_n * (0.25 * (1.0 - t_r * t_r))
    du_z = dd * (prev["h"] - n) * (0.25 * (1.0 - t_z * t_z))
    return [du_r, du_z, du_n], [du_r, du_z, r * du_n], {"h": dd * z}, None


def _elman_rule(cell):
    act = base.activation(cell.activation, "elman")

    def forward(u, rec, s, p):
        h = act(u[0] + rec[0])
        return {"h": h}, {"h": [h]}

    def backward(sv, prev, d, u, p):  # the cell's own step_backward is element-wise already
        _, d_pre, _ = cell.step_backward(None, None, sv["h"][0], d["h"], 0.0)
        return [d_pre], None, {"h": None}, None

    return Rule("elman", 1, ("h",), (("h", 1),), (), None, forward, backward)


def _lstm_variant_rule(cell):
    """An LSTM variant of Greff et al.'s (peepholes, nig, nfg, nog, niaf, noaf, cifg, and their
    combinations) through the cell's own step, traced on each program's units: its gate blocks
    joined into [rows, m * U] (m: the blocks padded to a power of 2, as recur/kernels/pad.py does
    for the loop kernel), its peephole vectors sliced to the program's units. The forward saves
    W_h h; the backward recomputes the step from it, u and c_{t-1} and differentiates it (jax.vjp,
    traced into the kernel as the loop kernel's is): the issue's "gates recomputed" switch."""
    from recur.kernels.loop import _join

    n = len(cell.blocks)
    m = base.next_pow2(n)
    peepholes = tuple((f"p_{g}", 1) for g in "ifo" if cell.peepholes and g in cell.blocks)

    def step(c, u, rec, p):
        """The new state {h, c} from c_{t-1} and the joined u, rec [rows, m * U]."""
        U = c.shape[-1]
        unit = dataclasses.replace(cell, hidden_size=U)
        p = {k: v[0] for k, v in p.items()}  # one block each
        with base.kernel_trace(), base.padded_gates():
            new, _ = unit.step(p, {"h": jnp.zeros_like(c), "c": c}, u, {"h": rec})
        return new

    joined = lambda blocks: _join(list(blocks) + [jnp.zeros_like(blocks[0])] * (m - n))

    def forward(u, rec, s, p):
        return step(s["c"], joined(u), joined(rec), p), {"rec": list(rec)}

    def backward(sv, prev, d, u, p):
        _, pull = jax.vjp(step, prev["c"], joined(u), joined(sv["rec"]), p)
        dc, du, _, dp = pull({"h": d["h"], "c": d["c"]})  # d rec = d u: pre = u + rec
        return halved(du, m)[:n], None, {"h": None, "c": dc}, dp

    return Rule("lstm_variant", n, ("h", "c"), (("rec", n),), ("c",), None, forward, backward,
                params=peepholes, reads_u=True, saved_as="h")


LSTM_RULE = Rule("lstm", 4, ("h", "c"), (("tg", 4), ("tc", 1)), ("c",), None, _lstm_forward, _lstm_backward)
# the reset gate scales the n block of d rec: d rec_n = r d u_n
GRU_RULE = Rule("gru", 3, ("h",), (("t", 2), ("n", 1), ("rec_n", 1)), ("h",), "b_h", _gru_forward, _gru_backward,
                own_drec=True)


def rule_for(cell):
    """The cell's :class:`Rule`, or a string saying why the persistent kernels do not run it."""
    from recur.cells.elman import Elman
    from recur.cells.gru import GRU, MGU
    from recur.cells.lstm import LSTM
    from recur.kernels import persistent_fgr, persistent_ln, persistent_proj, persistent_reset

    if isinstance(cell, LSTM) and cell.plain:
        return LSTM_RULE
    if isinstance(cell, LSTM) and not (cell.layer_norm or cell.full_gate_recurrence or cell.proj_size):
        return _lstm_variant_rule(cell)
    if isinstance(cell, LSTM) and cell.layer_norm and not cell.full_gate_recurrence:
        return persistent_ln.LN_LSTM
    if isinstance(cell, LSTM) and cell.full_gate_recurrence and not (cell.layer_norm or cell.proj_size):
        return persistent_fgr.FGR_LSTM
    if isinstance(cell, LSTM) and cell.proj_size and not (cell.layer_norm or cell.full_gate_recurrence):
        return persistent_proj.LSTMP
    if isinstance(cell, GRU) and cell.reset_after:
        return GRU_RULE
    if isinstance(cell, GRU):
        return persistent_reset.CHO
    if isinstance(cell, MGU):
        return persistent_reset.MGU
    if isinstance(cell, Elman) and cell.fused_backward:
        return _elman_rule(cell)
    return (f"the persistent kernels run the LSTM (gate recurrence without layer norm or a projection), the "
            f"GRU (both forms), the MGU and the Elman RNN, not {cell.name}")


def _groups(n):
    """Gate blocks [0, n) as runs of power-of-2 length (Triton's blocks): 4 -> (0, 4); 3 -> (0, 2), (2, 1)."""
    out, g = [], 0
    for size in (4, 2, 1):
        if n - g >= size:
            out.append((g, size))
            g += size
    return out


def run_forward(rule, us_T, W_h, b_h, carry0, mask_T=None, *, dtype, keep=False, save=True, interpret=False,
                programs=None, params=None):
    """The rule's cell over time-major projected inputs us_T [T, B, gates * H] from carry0
    {component: [B, H]}; W_h [gates * H, H], b_h [gates * H] or None. The matmul in ``dtype`` with
    float32 accumulation, the gates and the state in float32. params: {name: [blocks * H]}, the
    rule's per-unit parameter vectors.

    Returns (hq [T + 1, B, H] in dtype: h0 then each step's h (a padded step keeps the carry),
    final {component: [B, H]}, saved, states): with keep, saved {name: [T, B, blocks * H]} (the
    rule's) and states {component: [T, B, H]}, each step's new value of the components in
    ``rule.reads`` (h only where hq is not exact: a half-precision dtype); else None, None. With
    keep and not save, saved is None: the reverse loop recomputes it (remat="step"). All but hq
    in float32 (float64 for a float64 dtype).
    """
    T, B, GH = us_T.shape
    n = rule.gates
    H = GH // n
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    # W_h [nH, H] -> W_h^T with each program's n*U columns together, ordered (gate, unit)
    w = grid.by_program(W_h, n)
    has_mask, has_bias = mask_T is not None, rule.bias is not None
    own = tuple(k for k in rule.reads if not (k == "h" and cdt == jnp.dtype(f32))) if keep else ()
    inputs = [us_T, w] + [carry0[k].astype(f32) for k in rule.state]
    inputs += ([b_h.astype(f32)] if has_bias else []) + ([mask_T.astype(jnp.int32)] if has_mask else [])
    inputs += [params[name].astype(f32) for name, _ in rule.params]
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, H), cdt)] + [jax.ShapeDtypeStruct((B, H), f32)] * len(rule.state)
    n_saved = len(rule.saved) if keep and save else 0
    out_shape += [jax.ShapeDtypeStruct((T, B, k * H), f32) for _, k in rule.saved[:n_saved]]
    out_shape += [jax.ShapeDtypeStruct((T, B, H), f32)] * len(own)
    ns = len(rule.state)

    def kernel(ins, outs, barrier):
        us_ref, w_ref = ins[:2]
        c0_refs = ins[2:2 + ns]
        b_ref = ins[2 + ns] if has_bias else None
        mask_ref = ins[2 + ns + has_bias] if has_mask else None
        p_refs = ins[2 + ns + has_bias + has_mask:]
        hq_ref, final_refs = outs[0], outs[1:1 + ns]
        saved_refs = outs[1 + ns:1 + ns + n_saved]
        own_refs = outs[1 + ns + n_saved:]
        blocks = grid.blocks()

        step_inputs = lambda t, ib, iu: grid.step_inputs(us_ref, mask_ref, t, ib, iu, n)

        states = []
        for ib, iu in blocks:
            s = {k: ref[rows(ib), units(iu)] for k, ref in zip(rule.state, c0_refs)}
            hq_ref[0, rows(ib), units(iu)] = s["h"].astype(cdt)
            bias = tuple(b_ref[units(iu, g)][None, :] for g in range(n)) if has_bias else None
            pv = {name: [ref[units(iu, j)] for j in range(k)] for ref, (name, k) in zip(p_refs, rule.params)}
            states.append((s, (bias, pv), step_inputs(0, ib, iu)))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            new_states = []
            for (ib, iu), (s, (bias, pv), (u, m)) in zip(blocks, states):
                rec = grid.gate_product(hq_ref, t, ib, iu, w_ref, H, n, gave_up=gave_up)
                if has_bias:
                    rec = [r + b for r, b in zip(rec, bias)]
                new, saved = rule.forward(list(u), rec, s, pv)
                if has_mask:
                    mm = m[:, None] != 0
                    new = {k: jnp.where(mm, new[k], s[k]) for k in rule.state}
                new["h"] = jnp.where(gave_up, jnp.nan, new["h"])
                hq_ref[t + 1, rows(ib), units(iu)] = new["h"].astype(cdt)
                for ref, (name, k) in zip(saved_refs, rule.saved):
                    for j in range(k):
                        ref[t, rows(ib), units(iu, j)] = saved[name][j]
                for ref, k in zip(own_refs, own):
                    ref[t, rows(ib), units(iu)] = new[k]
                new_states.append((new, (bias, pv), step_inputs(t + 1, ib, iu)))
            return new_states, barrier(t + 2, gave_up)

        # the final state NaN once given up (c_T too: a state computed from a step's stale reads)
        states, gave_up = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (s, _, _) in zip(blocks, states):
            for k, ref in zip(rule.state, final_refs):
                ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, s[k])

    outs, ok = grid.launch(kernel, inputs, out_shape, f"recur_{rule.name}_persistent", arrivals=T + 1)
    hq, *finals = (jnp.where(ok, x, jnp.nan).astype(x.dtype) for x in outs[:1 + ns])
    if not keep:
        return hq, dict(zip(rule.state, finals)), None, None
    saved = {name: x for (name, _), x in zip(rule.saved, outs[1 + ns:1 + ns + n_saved])} if save else None
    return hq, dict(zip(rule.state, finals)), saved, dict(zip(own, outs[1 + ns + n_saved:]))


def run_backward(rule, dhs_T, saved, prev, W_h, dcarry_T, mask_T=None, *, dtype, interpret=False,
                 programs=None, us_T=None, params=None, hq=None, b_h=None):
    """The reverse time loop of the rule's cell in a training step, as a persistent kernel: the
    rule's step derivative for each program's (rows, units), then d h_{t-1} = d rec_t . W_h with
    W_h's [gates * H, U] column slice per program, meeting at a barrier each step as
    :func:`run_forward` does.

    dhs_T [T, B, H]: the outputs' cotangent; saved {name: [T, B, blocks * H]}: run_forward's, or
    None to recompute them (remat="step": each step's W_h h again from hq [T + 1, B, H], run_forward's,
    with W_h^T's [H, gates * U] slice too, then the rule's forward step; b_h: the rule's bias);
    prev {component: [T, B, H]}: the components in ``rule.reads`` entering each step; dcarry_T
    {component: [B, H]}: the final carry's cotangent; us_T: the projected inputs (a rule with
    ``reads_u``, or recomputing); params: the rule's per-unit parameter vectors. Returns (d u
    [T, B, gates * H] float32, d rec (the same shape) or None where it is d u, d carry0
    {component: [B, H]}, d params {name: [blocks * H]} float32). The product by W_h runs in
    ``dtype`` with float32 accumulation, its d rec rounded to dtype.
    """
    T, B, _ = dhs_T.shape
    n, H = rule.gates, W_h.shape[1]
    G = n * H
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    recompute = saved is None
    reads_u = rule.reads_u or recompute
    has_mask, has_bias = mask_T is not None, recompute and rule.bias is not None
    own_drec = rule.own_drec
    shared = cdt != jnp.dtype(f32)  # a separate d rec copy in dtype for the other programs' products
    ns, npar = len(rule.state), len(rule.params)
    # W_h [nH, H] -> each program's [nH, U] column slice, stacked: [nu * nH, U]
    ins = {"dhs": dhs_T, "w": grid.program_slices(W_h)}
    ins.update({f"saved_{name}": saved[name] for name, _ in rule.saved} if not recompute else {})
    if recompute:  # run_forward's hq and W_h^T layout
        ins["hq"] = hq
        ins["wf"] = grid.by_program(W_h, n)
    if has_bias:
        ins["bias"] = b_h.astype(f32)
    ins.update({f"prev_{k}": prev[k] for k in rule.reads})
    ins.update({f"dT_{k}": dcarry_T[k].astype(f32) for k in rule.state})
    ins.update({"mask": mask_T.astype(jnp.int32)} if has_mask else {})
    ins.update({"us": us_T} if reads_u else {})
    ins.update({f"p_{name}": params[name].astype(f32) for name, _ in rule.params})
    names = list(ins)
    out_shape = [jax.ShapeDtypeStruct((T, B, G), f32)] * (1 + own_drec) + [jax.ShapeDtypeStruct((B, H), f32)] * ns
    # each row block's sums of the parameter vectors' cotangents, added up after the kernel
    out_shape += [jax.ShapeDtypeStruct((grid.nb, k * H), f32) for _, k in rule.params]
    out_shape += [jax.ShapeDtypeStruct((T, B, G), cdt)] if shared else []

    def kernel(in_refs, outs, barrier):
        ref = dict(zip(names, in_refs))
        du_ref = outs[0]
        drec_ref = outs[1] if own_drec else du_ref
        d0_refs = outs[1 + own_drec:1 + own_drec + ns]
        dp_refs = outs[1 + own_drec + ns:1 + own_drec + ns + npar]
        comm_ref = outs[-1] if shared else drec_ref
        blocks = grid.blocks()

        def params_of(iu):
            return {name: [ref[f"p_{name}"][units(iu, j)] for j in range(k)] for name, k in rule.params}

        def step_inputs(t, ib, iu):
            """What step t's derivative reads, loaded before the barrier that precedes it (as the
            forward kernel's inputs; t = -1: nothing left, step 0's again); recomputing, the
            saved values from the rule's forward step on W_h h again (which reads no other
            program's values of this launch)."""
            t = jnp.maximum(t, 0)
            r, u = rows(ib), units(iu)
            pv = {k: ref[f"prev_{k}"][t, r, u] for k in rule.reads}
            uv = [ref["us"][t, r, units(iu, g)].astype(f32) for g in range(n)] if reads_u else None
            if recompute:
                rec = grid.gate_product(ref["hq"], t, ib, iu, ref["wf"], H, n, fresh=False)
                if has_bias:
                    rec = [x + ref["bias"][units(iu, g)][None, :] for g, x in enumerate(rec)]
                _, sv = rule.forward(list(uv), rec, pv, params_of(iu))
            else:
                sv = {name: [ref[f"saved_{name}"][t, r, units(iu, j)] for j in range(k)] for name, k in rule.saved}
            return sv, pv, uv, ref["dhs"][t, r, u].astype(f32), (ref["mask"][t, r] if has_mask else None)

        states = [({k: ref[f"dT_{k}"][rows(ib), units(iu)] for k in rule.state},
                   {name: [jnp.zeros((U,), f32)] * k for name, k in rule.params}, step_inputs(T - 1, ib, iu))
                  for ib, iu in blocks]

        def step(i, carry):
            states, gave_up = carry
            t = T - 1 - i
            passing = []
            for (ib, iu), (dc_, dp_sum, (sv, pv, uv, dh_out, m)) in zip(blocks, states):
                r = rows(ib)
                d = dict(dc_)
                if has_mask:  # a padded step passes the carry's cotangent through
                    mm = m[:, None] != 0
                    d = {k: jnp.where(mm, v, 0.0) for k, v in d.items()}
                d["h"] = d["h"] + dh_out
                du, drec, pas, dp = rule.backward(sv, pv, d, uv, params_of(iu))
                drec = du if drec is None else drec
                if npar:
                    dp_sum = jax.tree.map(jnp.add, dp_sum, dp)
                for g in range(n):
                    du_ref[t, r, units(iu, g)] = jnp.where(gave_up, jnp.nan, du[g])
                    if own_drec:
                        drec_ref[t, r, units(iu, g)] = jnp.where(gave_up, jnp.nan, drec[g])
                    if shared:
                        comm_ref[t, r, units(iu, g)] = jnp.where(gave_up, jnp.nan, drec[g]).astype(cdt)
                pas = {k: jnp.zeros_like(d[k]) if pas.get(k) is None else pas[k] for k in rule.state}
                if has_mask:
                    pas = {k: pas[k] + jnp.where(mm, 0.0, dc_[k]) for k in rule.state}
                passing.append((pas, dp_sum, step_inputs(t - 1, ib, iu)))
            gave_up = barrier(i + 1, gave_up)
            new_states = []
            for (ib, iu), (pas, dp_sum, next_inputs) in zip(blocks, passing):
                (dh_rec,) = grid.product(comm_ref, t, ib, ref["w"], G, [(0, U)], w_row=iu * G, gave_up=gave_up)
                new_states.append((dict(pas, h=pas["h"] + dh_rec), dp_sum, next_inputs))
            return new_states, gave_up

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, jnp.bool_(False)))
        for (ib, iu), (dc_, dp_sum, _) in zip(blocks, states):
            for k, r0 in zip(rule.state, d0_refs):
                r0[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, dc_[k])
            for r0, (name, k) in zip(dp_refs, rule.params):
                for j in range(k):
                    r0[ib, units(iu, j)] = jnp.where(gave_up, jnp.nan, dp_sum[name][j])

    outs, ok = grid.launch(kernel, [ins[k] for k in names], out_shape, f"recur_{rule.name}_persistent_backward",
                           arrivals=T)
    # d u / d rec are left as they are (a pass over [T, B, gates H] for a check that the forward's hq
    # already makes)
    d0 = {k: jnp.where(ok, x, jnp.nan) for k, x in zip(rule.state, outs[1 + own_drec:1 + own_drec + ns])}
    dp = {name: jnp.where(ok, jnp.sum(x, axis=0), jnp.nan)
          for (name, _), x in zip(rule.params, outs[1 + own_drec + ns:1 + own_drec + ns + npar])}
    return outs[0], (outs[1] if own_drec else None), d0, dp


def lstm_forward(us_T, W_h, h0, c0, mask_T=None, *, dtype, keep=False, interpret=False, programs=None):
    """The plain LSTM through :func:`run_forward`: (hq [T + 1, B, H], h_T, c_T, saved), saved None
    or with keep (c_t [T, B, H], the gate tanh [T, B, 4H], tanh(c_t) [T, B, H])."""
    hq, final, saved, states = run_forward(LSTM_RULE, us_T, W_h, None, {"h": h0, "c": c0}, mask_T, dtype=dtype,
                                           keep=keep, interpret=interpret, programs=programs)
    return hq, final["h"], final["c"], ((states["c"], saved["tg"], saved["tc"]) if keep else None)


def lstm_backward(dhs_T, tg, tc, c_prev, W_h, dh_T, dc_T, mask_T=None, *, dtype, interpret=False,
                  programs=None):
    """The plain LSTM through :func:`run_backward`: (d pre [T, B, 4H], d h0, d c0)."""
    dpre, _, d0, _ = run_backward(LSTM_RULE, dhs_T, {"tg": tg, "tc": tc}, {"c": c_prev}, W_h,
                               {"h": dh_T, "c": dc_T}, mask_T, dtype=dtype, interpret=interpret, programs=programs)
    return dpre, d0["h"], d0["c"]


def lstm_results(hq, hT, cT, c_states, carry0, dtype):
    """(final carry, hs, the carries entering each step or None) of an LSTM kernel's hq (h0 then
    each step's h, in the compute dtype), final h and c, and each step's c_t (None: not kept).
    The carries' h comes from hq: the product (and so d W_h) reads that rounding."""
    final = {"h": hT.astype(carry0["h"].dtype), "c": cT.astype(carry0["c"].dtype)}
    hs = hq[1:].astype(dtype)
    if c_states is None:
        return final, hs, None
    c_prev = jnp.concatenate([carry0["c"][None].astype(c_states.dtype), c_states[:-1]], axis=0)
    return final, hs, {"h": hq[:-1].astype(carry0["h"].dtype), "c": c_prev.astype(carry0["c"].dtype)}


def _load_fresh(ref, interpret):
    """A load of what other programs wrote before the last barrier, as a volatile load: never
    served from a copy this SM cached before. (The barrier's acquire already orders it; this
    jax's cache_modifier=".cg" does not lower: its table is keyed "cg".)"""
    if interpret:
        return ref[...]
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.load(ref, volatile=True)


def stale(gave_up, value):
    """value, or NaN once this program gave up: a barrier it no longer waits at does not order the
    other programs' stores before its loads, so what it reads of their values may be stale. Every
    fresh read goes through here, so that all it computes from then on is NaN (a program's own
    values, such as a padded row's carried state, stay right) and no result is finite but wrong.
    A scalar added, not a select per element: that spilled 8 bytes in the MGU's bf16 forward."""
    return value + jnp.where(gave_up, jnp.float32(jnp.nan), jnp.float32(0.0)).astype(value.dtype)


def _grid_barrier(counter_ref, n_programs, arrivals, gave_up, *, gpu):
    """Wait until the counter reaches n_programs * arrivals (this program's arrival included);
    returns gave_up, which becomes true when MAX_SPINS polls pass first (then no later barrier
    waits either). A program that gave up no longer arrives (it adds 0): its arrivals would run
    ahead of the barriers they count for and could let another program pass a barrier before a
    third arrived. The others then wait their MAX_SPINS at the next barrier and give up too, and
    the launch's ``ok`` (the counter's final value) is false."""
    from jax.experimental.pallas import triton as pl_triton

    if gpu:
        pl_triton.debug_barrier()  # every thread's stores of this step precede the arrival
    target = n_programs * arrivals
    seen = pl_triton.atomic_add(counter_ref, jnp.int32(0), jnp.where(gave_up, jnp.int32(0), jnp.int32(1))) + 1

    def waiting(state):
        seen, spins = state
        return jnp.logical_and(seen < jnp.int32(target), spins < jnp.int32(MAX_SPINS))

    if POLL not in ("atomic", "load"):
        raise ValueError(f"recur.kernels.persistent.POLL must be 'atomic' or 'load', got {POLL!r}")
    by_load = POLL == "load"

    def poll(state):
        seen, spins = state
        if gpu and not by_load:  # an acq_rel read; interpret mode's while loop cannot hold an atomic
            # (its discharge adds constants there), and its single program never waits anyway
            return pl_triton.atomic_add(counter_ref, jnp.int32(0), jnp.int32(0)), spins + 1
        return _load_fresh(counter_ref, not gpu)[0], spins + 1

    # a program that gave up before starts with its polls spent: it does not wait again
    spins = gave_up.astype(jnp.int32) * jnp.int32(MAX_SPINS)
    seen, _ = jax.lax.while_loop(waiting, poll, (seen, spins))
    if gpu and by_load:  # the acquire the volatile polls lack (a count only grows: the max is the latest)
        seen = jnp.maximum(seen, pl_triton.atomic_add(counter_ref, jnp.int32(0), jnp.int32(0)))
    if gpu:
        pl_triton.debug_barrier()  # thread 0's acquire precedes every thread's loads
    return gave_up | (seen < target)


def forward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``forward_fn`` for a cell with a :class:`Rule`: the forward
    time loop as :func:`run_forward`, with the carries and the saved values its fused backward step
    reads (the cell's step_saving value, stacked over time; W_h h for the LSTM variants). With
    remat="step" only the carries: :func:`backward_fn` recomputes the rest (saved is {})."""
    rule = _rule(cell)
    if not isinstance(rule, Rule):  # Cho's GRU, the MGU, the layer-norm LSTM, ...: kernels of their own
        return rule.forward_fn(cell, interpret, programs, _check_remat(remat))
    save = _check_remat(remat) == "none"

    def forward(params, carry0, us_T, mask_T, keep):
        parts = rule.parts(carry0)
        hq, final, saved, states = run_forward(rule, us_T, params["W_h"], params.get(rule.bias) if rule.bias else None,
                                               parts, mask_T, dtype=cell.dtype, keep=keep, save=save,
                                               interpret=interpret, programs=programs, params=params)
        final, hs = rule.carry(final, carry0), hq[1:].astype(cell.dtype)
        if not keep:
            return final, hs
        # the carry entering each step: h from the buffer where it is exact or only W_h h reads it
        # (in the compute dtype, so the buffer's rounded copy serves), else the kernel's own copies
        prev = {k: hq[:-1] for k in rule.state}
        prev.update({k: jnp.concatenate([parts[k][None].astype(x.dtype), x[:-1]], axis=0) for k, x in states.items()})
        # not None where nothing is saved: the deferred scan still takes d W_h from d rec
        return final, (hs, rule.carry(prev, carry0), rule.pack(saved) if save else {})

    return forward


def _check_remat(remat):
    if remat not in ("none", "step"):
        raise ValueError(f"recur.kernels.persistent: remat must be 'none' or 'step', got {remat!r}")
    return remat


BACKWARD = True  # the reverse loop as run_backward too (False: the deferred scan's lax.scan loop,
# for the cells with a Rule; the two-phase cells of persistent_reset.py always take their kernel)


def backward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``backward_fn`` for a cell with a :class:`Rule`:
    :func:`run_backward` over what :func:`forward_fn` stored; with remat="step", recomputing the
    saved values from the carries (each step's W_h h again: a second product per step, and no
    [T, B, gates * H] arrays kept between the passes). The step's own parameter vectors' gradients
    (the peepholes') come back as a params-shaped tree, zero elsewhere. None where BACKWARD is
    False (and remat "none") and the lax.scan reverse loop can read what forward_fn saves (every
    cell with a Rule)."""
    rule = _rule(cell)
    if not isinstance(rule, Rule):
        return rule.backward_fn(cell, interpret, programs, _check_remat(remat))
    recompute = _check_remat(remat) == "step"
    if not (BACKWARD or recompute):
        return None

    def backward(params, carries, saved, us_T, dhs_T, mask_T, dcarry_T):
        parts = rule.parts(carries)
        extra = {}
        if recompute:  # the h entering each step in the compute dtype: run_forward's hq[:-1], exactly
            extra = {"hq": parts["h"].astype(cell.dtype), "b_h": params.get(rule.bias) if rule.bias else None}
        du, drec, d0, dp = run_backward(rule, dhs_T, None if recompute else rule.unpack(saved),
                                        {k: parts[k] for k in rule.reads}, params["W_h"], rule.parts(dcarry_T),
                                        mask_T, dtype=cell.dtype, interpret=interpret, programs=programs, us_T=us_T,
                                        params=params, **extra)
        dparams = None
        if dp:
            dparams = {k: (dp[k] if k in dp else jnp.zeros_like(v)).astype(v.dtype) for k, v in params.items()}
        return rule.carry(d0, carries), du, drec, dparams

    return backward


def _rule(cell):
    rule = rule_for(cell)
    if isinstance(rule, str):
        raise ValueError(f"recur.kernels.persistent: {rule}")
    return rule
