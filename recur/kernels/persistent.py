"""The plain LSTM's forward time loop as one persistent Pallas kernel, with W_h split across the GPU.

Why: on a GPU the sequential scan runs each time step as separate kernels (the recurrent
matmul, then the gates), and each reads all of W_h from L2. The loop kernel (loop.py) runs the
whole loop in one launch, but with one program per 16 batch rows: 4 programs at B = 64, each
streaming the whole W_h every step (measured 2-5x slower, docs/benchmarks.md). cuDNN's persistent
kernel instead splits W_h across the chip and meets at a grid-wide barrier each step. This is that
design in Pallas:

- the grid is (B / BB row blocks) x (H / U unit blocks), at most one program per SM so that all
  are resident at once. Program (ib, iu) owns batch rows [ib*BB, (ib+1)*BB) and hidden units
  [iu*U, (iu+1)*U): the four gate columns of those units are a [H, 4U] slice of W_h^T (64 KiB in
  bfloat16 at H = 1024, U = 16), read from L2 / L1 each step by that program only;
- step t: h_{t-1} (rows of it, all H columns, in the compute dtype) from a [T + 1, B, H] buffer
  in global memory, one dot per K_BLOCK columns into [BB, 4U] float32 accumulators, the gates
  in float32 (the same formulas as recur.cells.lstm's fused step), c_t kept in registers, h_t
  written to the buffer's row t + 1;
- then a grid barrier: ``debug_barrier`` (bar.sync, so every thread's stores come before),
  one acq_rel atomic add on a counter, a spin on the counter until every program has arrived,
  ``debug_barrier`` again. The spin is bounded (MAX_SPINS polls): a program that gives up (the
  grid was not resident, say) writes NaN from then on instead of hanging.

With ``keep=True`` it also writes what recur.backprop's fused backward step reads (c_t, the gate
tanh, tanh(c_t)), so the training step is this forward kernel plus the deferred scan's reverse
loop and its large weight-gradient matmuls (``forward_fn``).

In Pallas' interpret mode (CPU tests) the programs would run one after another and could not meet
at a barrier, so there one program runs every (row, unit) block in turn within each step: the
same kernel code, the same block slicing, a grid of one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from recur.cells.base import halved

UNITS = 16  # hidden units per program: its W_h slice is [H, 4U] (Triton's dot needs N = 4U >= 16)
MIN_ROWS = 16  # Triton's dot needs M >= 16
K_BLOCK = 128  # columns of h (rows of W_h^T) per dot
MAX_SPINS = 1 << 22  # polls of the barrier's counter before a program gives up (about a second)
DEFAULT_SMS = 132  # an H100 SXM / H200; the device's own count is used when it reports one
# Triton's settings, compiled for sm_90 here without spills at H = 1024 (bf16: 48 KiB of shared
# memory, fp32: 96 KiB); not yet tuned on a GPU (experiments/gpu_explore.py --parts persistent)
NUM_WARPS = 4
NUM_STAGES = 3


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
    from recur.cells.lstm import LSTM

    if not (isinstance(cell, LSTM) and cell.plain):
        return f"the persistent kernel runs the plain LSTM only, not {cell.name}"
    if resets:
        return "the persistent kernel takes no resets"
    if remat != "none" or backward != "deferred":
        return "the persistent kernel runs under the deferred backward pass without remat"
    why = layout(B, cell.hidden_size, sm_count())
    return why if isinstance(why, str) else None


def lstm_forward(us_T, W_h, h0, c0, mask_T=None, *, dtype, keep=False, interpret=False, programs=None):
    """The plain LSTM over time-major projected inputs us_T [T, B, 4H] (gate blocks i, f, g, o,
    bias included) from carry (h0, c0) [B, H]; the matmul in ``dtype`` with float32 accumulation,
    the gates and the state in float32.

    Returns (hq [T + 1, B, H] in dtype: h0 then each step's h (a padded step keeps the carry),
    h_T, c_T [B, H], saved): saved is None, or with keep (cs, tg, tc): c_t [T, B, H], the gate tanh
    [T, B, 4H] and tanh(c_t) [T, B, H] (recur.cells.lstm.LSTM.step_saving's); all but hq in float32
    (float64 for a float64 dtype).
    """
    T, B, G = us_T.shape
    H = G // 4
    programs = sm_count() if programs is None else programs
    lay = layout(B, H, programs)
    if isinstance(lay, str):
        raise ValueError(f"recur.kernels.persistent: {lay}")
    BB, U, KB = lay
    nb, nu = B // BB, H // U
    cdt = jnp.dtype(dtype)
    f32 = jnp.promote_types(cdt, jnp.float32)  # the gates' and the state's type (float64 stays)
    # W_h [4H, H] -> W_h^T with each program's 4U columns together, ordered (gate, unit)
    w = jnp.transpose(W_h.astype(cdt)).reshape(H, 4, nu, U).transpose(0, 2, 1, 3).reshape(H, 4 * H)
    has_mask = mask_T is not None
    inputs = [us_T, w, h0.astype(f32), c0.astype(f32)]
    if has_mask:
        inputs.append(mask_T.astype(jnp.int32))
    inputs.append(jnp.zeros((1,), jnp.int32))  # the barrier's counter, aliased to an output
    counter_in = len(inputs) - 1
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, H), cdt), jax.ShapeDtypeStruct((B, H), f32),
                 jax.ShapeDtypeStruct((B, H), f32), jax.ShapeDtypeStruct((1,), jnp.int32)]
    if keep:
        out_shape += [jax.ShapeDtypeStruct((T, B, H), f32), jax.ShapeDtypeStruct((T, B, G), f32),
                      jax.ShapeDtypeStruct((T, B, H), f32)]
    n_programs = 1 if interpret else nb * nu

    def kernel(*refs):
        us_ref, w_ref, h0_ref, c0_ref = refs[:4]
        mask_ref = refs[4] if has_mask else None
        at = 5 if has_mask else 4
        hq_ref, hT_ref, cT_ref, counter_ref = refs[at + 1:at + 5]
        saved_refs = refs[at + 5:]
        if interpret:
            blocks = [(ib, iu) for ib in range(nb) for iu in range(nu)]
        else:
            blocks = [(pl.program_id(0), pl.program_id(1))]
        rows = lambda ib: pl.ds(ib * BB, BB)
        units = lambda iu, g=0: pl.ds(g * H + iu * U, U)
        barrier = functools.partial(_grid_barrier, counter_ref, n_programs, gpu=not interpret)

        states = []
        for ib, iu in blocks:
            h = h0_ref[rows(ib), units(iu)]
            hq_ref[0, rows(ib), units(iu)] = h.astype(cdt)
            states.append((h, c0_ref[rows(ib), units(iu)]))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            new_states = []
            for (ib, iu), (h, c) in zip(blocks, states):
                def dot(k, acc, ib=ib, iu=iu):
                    hk = _load_fresh(hq_ref.at[t, rows(ib), pl.ds(k * KB, KB)], interpret)
                    wk = w_ref[pl.ds(k * KB, KB), pl.ds(iu * 4 * U, 4 * U)]
                    return acc + jax.lax.dot(hk, wk, preferred_element_type=f32)

                acc = jax.lax.fori_loop(0, H // KB, dot, jnp.zeros((BB, 4 * U), f32))
                pre = [p + us_ref[t, rows(ib), units(iu, g)].astype(f32) for g, p in enumerate(halved(acc, 4))]
                # recur.cells.lstm: tanh(s * pre), s = 1/2 on the sigmoid blocks; sigmoid = (1 + t) / 2
                tg = [jnp.tanh(p * (1.0 if g == 2 else 0.5)) for g, p in enumerate(pre)]
                i, f, o = (0.5 * tg[0] + 0.5), (0.5 * tg[1] + 0.5), (0.5 * tg[3] + 0.5)
                c_new = f * c + i * tg[2]
                tc = jnp.tanh(c_new)
                h_new = o * tc
                if has_mask:
                    m = mask_ref[t, rows(ib)][:, None] != 0
                    c_new, h_new = jnp.where(m, c_new, c), jnp.where(m, h_new, h)
                h_new = jnp.where(gave_up, jnp.nan, h_new)
                hq_ref[t + 1, rows(ib), units(iu)] = h_new.astype(cdt)
                if keep:
                    cs_ref, tg_ref, tc_ref = saved_refs
                    cs_ref[t, rows(ib), units(iu)] = c_new
                    for g in range(4):
                        tg_ref[t, rows(ib), units(iu, g)] = tg[g]
                    tc_ref[t, rows(ib), units(iu)] = tc
                new_states.append((h_new, c_new))
            return new_states, barrier(t + 2, gave_up)

        states, _ = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (h, c) in zip(blocks, states):
            hT_ref[rows(ib), units(iu)] = h
            cT_ref[rows(ib), units(iu)] = c

    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        kwargs["compiler_params"] = pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(1,) if interpret else (nb, nu),
        input_output_aliases={counter_in: 3}, interpret=interpret, name="recur_lstm_persistent", **kwargs,
    )(*inputs)
    hq, hT, cT = outs[:3]
    return hq, hT, cT, (tuple(outs[4:]) if keep else None)


def _load_fresh(ref, interpret):
    """A load of what other programs wrote before the last barrier, as a volatile load: never
    served from a copy this SM cached before. (The barrier's acquire already orders it; this
    jax's cache_modifier=".cg" does not lower: its table is keyed "cg".)"""
    if interpret:
        return ref[...]
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.load(ref, volatile=True)


def _grid_barrier(counter_ref, n_programs, arrivals, gave_up, *, gpu):
    """Wait until the counter reaches n_programs * arrivals (this program's arrival included);
    returns gave_up, which becomes true when MAX_SPINS polls pass first (then no later barrier
    waits either)."""
    from jax.experimental.pallas import triton as pl_triton

    if gpu:
        pl_triton.debug_barrier()  # every thread's stores of this step precede the arrival
    target = n_programs * arrivals
    seen = pl_triton.atomic_add(counter_ref, jnp.int32(0), jnp.int32(1)) + 1

    def waiting(state):
        seen, spins = state
        return jnp.logical_and(seen < jnp.int32(target), spins < jnp.int32(MAX_SPINS))

    def poll(state):
        seen, spins = state
        if gpu:  # an acq_rel read; interpret mode's while loop cannot hold an atomic (its
            # discharge adds constants there), and its single program never waits anyway
            return pl_triton.atomic_add(counter_ref, jnp.int32(0), jnp.int32(0)), spins + 1
        return counter_ref[0], spins + 1

    # a program that gave up before starts with its polls spent: it does not wait again
    spins = gave_up.astype(jnp.int32) * jnp.int32(MAX_SPINS)
    seen, _ = jax.lax.while_loop(waiting, poll, (seen, spins))
    if gpu:
        pl_triton.debug_barrier()  # thread 0's acquire precedes every thread's loads
    return gave_up | (seen < target)


def forward_fn(cell, interpret=False, programs=None):
    """recur.backprop.deferred_scan's ``forward_fn`` for the plain LSTM: the forward time loop as
    :func:`lstm_forward`, with the carries and the saved activations its fused backward step reads."""

    def forward(params, carry0, us_T, mask_T, keep):
        hq, hT, cT, saved = lstm_forward(us_T, params["W_h"], carry0["h"], carry0["c"], mask_T,
                                         dtype=cell.dtype, keep=keep, interpret=interpret, programs=programs)
        final = {"h": hT.astype(carry0["h"].dtype), "c": cT.astype(carry0["c"].dtype)}
        hs = hq[1:].astype(cell.dtype)
        if not keep:
            return final, hs
        cs, tg, tc = saved
        # the carry entering each step; only W_h h reads h, and it reads it in the compute dtype,
        # so the buffer's rounded copy serves
        carries = {"h": hq[:-1].astype(carry0["h"].dtype),
                   "c": jnp.concatenate([carry0["c"][None].astype(cs.dtype), cs[:-1]], axis=0)}
        return final, (hs, carries, (tg, tc))

    return forward
