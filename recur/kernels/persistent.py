"""The plain LSTM's time loops as persistent Pallas kernels, with W_h split across the GPU.

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

With ``keep=True`` the forward kernel also writes what the LSTM's fused backward step reads (c_t,
the gate tanh, tanh(c_t)); :func:`lstm_backward` runs the reverse loop on the same grid (d pre
for its rows and units, then its units of d h_{t-1} = d pre_t W_h after the barrier). The
training step is the two kernels plus the deferred scan's large weight-gradient matmuls
(recur/backprop.py's ``forward_fn`` / ``backward_fn``).

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
MAX_SPINS = 1 << 22  # polls of the barrier's counter before a program gives up (a few seconds)
DEFAULT_SMS = 132  # an H100 SXM / H200; the device's own count is used when it reports one
# Triton's settings: compiled for sm_90 without spills at H = 1024, forward and backward (bf16:
# 48 / 24 KiB of shared memory, fp32: 96 / 48; docs/kernels.md); not yet tuned on a GPU
# (experiments/gpu_explore.py --parts persistent)
NUM_WARPS = 8
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
        """(BB, U, KB, nu, rows, units, compute dtype, accumulation dtype)."""
        return self.BB, self.U, self.KB, self.nu, self.rows, self.units, self.cdt, self.acc

    def blocks(self):
        if self.interpret:
            return [(ib, iu) for ib in range(self.nb) for iu in range(self.nu)]
        return [(pl.program_id(0), pl.program_id(1))]

    def rows(self, ib):
        return pl.ds(ib * self.BB, self.BB)

    def units(self, iu, g=0):
        """Columns of gate block g (of a [.., 4H] array; g = 0 for a [.., H] one) for unit block iu."""
        return pl.ds(g * self.H + iu * self.U, self.U)

    def launch(self, kernel, inputs, out_shape, name, arrivals):
        """Run kernel(in_refs, out_refs, barrier) over the grid; returns (outputs, ok). barrier(arrivals,
        gave_up) is :func:`_grid_barrier` on a zeroed counter of this launch; ok says that the
        counter ended at programs x ``arrivals`` (the barriers the kernel passes), i.e. that it
        started at zero: a counter that XLA did not give a fresh buffer would let the barriers pass
        early, and the callers turn their outputs to NaN rather than return a race's results."""
        n_in, n_programs = len(inputs), 1 if self.interpret else self.nb * self.nu

        def body(*refs):  # inputs, the counter in, outputs, the counter out (the same buffer)
            outs = refs[n_in + 1:n_in + 1 + len(out_shape)]
            barrier = functools.partial(_grid_barrier, refs[-1], n_programs, gpu=not self.interpret)
            kernel(refs[:n_in], outs, barrier)

        kwargs = {}
        if not self.interpret:
            from jax.experimental.pallas import triton as pl_triton

            kwargs["compiler_params"] = pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        outs = pl.pallas_call(
            body, out_shape=list(out_shape) + [jax.ShapeDtypeStruct((1,), jnp.int32)],
            grid=(1,) if self.interpret else (self.nb, self.nu), input_output_aliases={n_in: len(out_shape)},
            interpret=self.interpret, name=name, **kwargs,
        )(*inputs, jnp.zeros((1,), jnp.int32))
        return outs[:-1], outs[-1][0] == n_programs * arrivals


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
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, KB, nu, rows, units, cdt, f32 = grid.parts()
    # W_h [4H, H] -> W_h^T with each program's 4U columns together, ordered (gate, unit)
    w = jnp.transpose(W_h.astype(cdt)).reshape(H, 4, nu, U).transpose(0, 2, 1, 3).reshape(H, 4 * H)
    has_mask = mask_T is not None
    inputs = [us_T, w, h0.astype(f32), c0.astype(f32)] + ([mask_T.astype(jnp.int32)] if has_mask else [])
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, H), cdt), jax.ShapeDtypeStruct((B, H), f32),
                 jax.ShapeDtypeStruct((B, H), f32)]
    if keep:
        out_shape += [jax.ShapeDtypeStruct((T, B, H), f32), jax.ShapeDtypeStruct((T, B, G), f32),
                      jax.ShapeDtypeStruct((T, B, H), f32)]

    def kernel(ins, outs, barrier):
        us_ref, w_ref, h0_ref, c0_ref = ins[:4]
        mask_ref = ins[4] if has_mask else None
        hq_ref, hT_ref, cT_ref = outs[:3]
        blocks = grid.blocks()

        def step_inputs(t, ib, iu):
            """Step t's projected inputs (and mask): loaded before the barrier that precedes the
            step, so that their latency overlaps the wait (t = T: nothing left; step T-1's again)."""
            t = jnp.minimum(t, T - 1)
            u = tuple(us_ref[t, rows(ib), units(iu, g)].astype(f32) for g in range(4))
            return u, (mask_ref[t, rows(ib)] if has_mask else None)

        states = []
        for ib, iu in blocks:
            h = h0_ref[rows(ib), units(iu)]
            hq_ref[0, rows(ib), units(iu)] = h.astype(cdt)
            states.append((h, c0_ref[rows(ib), units(iu)], step_inputs(0, ib, iu)))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            new_states = []
            for (ib, iu), (h, c, (u, m)) in zip(blocks, states):
                def dot(k, acc, ib=ib, iu=iu):
                    hk = _load_fresh(hq_ref.at[t, rows(ib), pl.ds(k * KB, KB)], interpret)
                    wk = w_ref[pl.ds(k * KB, KB), pl.ds(iu * 4 * U, 4 * U)]
                    return acc + jax.lax.dot(hk, wk, preferred_element_type=f32)

                acc = jax.lax.fori_loop(0, H // KB, dot, jnp.zeros((BB, 4 * U), f32))
                pre = [p + u[g] for g, p in enumerate(halved(acc, 4))]
                # recur.cells.lstm: tanh(s * pre), s = 1/2 on the sigmoid blocks; sigmoid = (1 + t) / 2
                tg = [jnp.tanh(p * (1.0 if g == 2 else 0.5)) for g, p in enumerate(pre)]
                i, f, o = (0.5 * tg[0] + 0.5), (0.5 * tg[1] + 0.5), (0.5 * tg[3] + 0.5)
                c_new = f * c + i * tg[2]
                tc = jnp.tanh(c_new)
                h_new = o * tc
                if has_mask:
                    m = m[:, None] != 0
                    c_new, h_new = jnp.where(m, c_new, c), jnp.where(m, h_new, h)
                h_new = jnp.where(gave_up, jnp.nan, h_new)
                hq_ref[t + 1, rows(ib), units(iu)] = h_new.astype(cdt)
                if keep:
                    cs_ref, tg_ref, tc_ref = outs[3:]
                    cs_ref[t, rows(ib), units(iu)] = c_new
                    for g in range(4):
                        tg_ref[t, rows(ib), units(iu, g)] = tg[g]
                    tc_ref[t, rows(ib), units(iu)] = tc
                new_states.append((h_new, c_new, step_inputs(t + 1, ib, iu)))
            return new_states, barrier(t + 2, gave_up)

        states, _ = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (h, c, _) in zip(blocks, states):
            hT_ref[rows(ib), units(iu)] = h
            cT_ref[rows(ib), units(iu)] = c

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstm_persistent", arrivals=T + 1)
    hq, hT, cT = (jnp.where(ok, x, jnp.nan).astype(x.dtype) for x in outs[:3])
    return hq, hT, cT, (tuple(outs[3:]) if keep else None)


def lstm_backward(dhs_T, tg, tc, c_prev, W_h, dh_T, dc_T, mask_T=None, *, dtype, interpret=False,
                  programs=None):
    """The reverse time loop of the plain LSTM's training step, as a persistent kernel: the fused
    step derivative of recur.cells.lstm.LSTM.step_backward for each program's (rows, units), and
    d h_{t-1} = d pre_t . W_h with W_h's [4H, U] column slice per program, meeting at a barrier
    each step as :func:`lstm_forward` does.

    dhs_T [T, B, H]: the outputs' cotangent; tg [T, B, 4H], tc [T, B, H]: :func:`lstm_forward`'s
    saved gate tanh and tanh(c_t); c_prev [T, B, H]: the c entering each step; dh_T, dc_T [B, H]:
    the final carry's cotangent. Returns (d pre [T, B, 4H] float32, d h0, d c0 [B, H]). The
    product by W_h runs in ``dtype`` with float32 accumulation, its d pre rounded to dtype.
    """
    T, B, G = tg.shape
    H = G // 4
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, KB, nu, rows, units, cdt, f32 = grid.parts()
    # W_h [4H, H] -> each program's [4H, U] column slice, stacked: [nu * 4H, U]
    w = W_h.astype(cdt).reshape(G, nu, U).transpose(1, 0, 2).reshape(nu * G, U)
    has_mask = mask_T is not None
    shared = cdt != jnp.dtype(f32)  # a separate d pre copy in dtype for the other programs' products
    inputs = [dhs_T, tg, tc, c_prev, w, dh_T.astype(f32), dc_T.astype(f32)]
    inputs += [mask_T.astype(jnp.int32)] if has_mask else []
    out_shape = [jax.ShapeDtypeStruct((T, B, G), f32), jax.ShapeDtypeStruct((B, H), f32),
                 jax.ShapeDtypeStruct((B, H), f32)]
    out_shape += [jax.ShapeDtypeStruct((T, B, G), cdt)] if shared else []

    def kernel(ins, outs, barrier):
        dhs_ref, tg_ref, tc_ref, cp_ref, w_ref, dhT_ref, dcT_ref = ins[:7]
        mask_ref = ins[7] if has_mask else None
        dpre_ref, dh0_ref, dc0_ref = outs[:3]
        comm_ref = outs[3] if shared else dpre_ref
        blocks = grid.blocks()

        def step_inputs(t, ib, iu):
            """What step t's derivative reads, loaded before the barrier that precedes it (as the
            forward kernel's inputs; t = -1: nothing left, step 0's again)."""
            t = jnp.maximum(t, 0)
            r, u = rows(ib), units(iu)
            saved = tuple(tg_ref[t, r, units(iu, g)] for g in range(4)) + (tc_ref[t, r, u], cp_ref[t, r, u])
            return saved, dhs_ref[t, r, u].astype(f32), (mask_ref[t, r] if has_mask else None)

        states = [(dhT_ref[rows(ib), units(iu)], dcT_ref[rows(ib), units(iu)], step_inputs(T - 1, ib, iu))
                  for ib, iu in blocks]

        def step(i, carry):
            states, gave_up = carry
            t = T - 1 - i
            passing = []
            for (ib, iu), (dh_c, dc_c, ((t_i, t_f, t_g, t_o, tcv, cp), dh_out, m)) in zip(blocks, states):
                r = rows(ib)
                dnh, dnc = dh_c, dc_c
                if has_mask:  # a padded step passes the carry's cotangent through
                    m = m[:, None] != 0
                    dnh, dnc = jnp.where(m, dh_c, 0.0), jnp.where(m, dc_c, 0.0)
                i_, f_, o_ = 0.5 * t_i + 0.5, 0.5 * t_f + 0.5, 0.5 * t_o + 0.5
                # recur.cells.lstm.LSTM.step_backward
                dh = dnh + dh_out
                dc = dnc + dh * o_ * (1.0 - tcv * tcv)
                d_pre = [(0.25 * dc) * t_g * (1.0 - t_i * t_i), (0.25 * dc) * cp * (1.0 - t_f * t_f),
                         dc * i_ * (1.0 - t_g * t_g), (0.25 * dh) * tcv * (1.0 - t_o * t_o)]
                for g in range(4):
                    d = jnp.where(gave_up, jnp.nan, d_pre[g])
                    dpre_ref[t, r, units(iu, g)] = d
                    if shared:
                        comm_ref[t, r, units(iu, g)] = d.astype(cdt)
                dc_next, dh_pass = dc * f_, jnp.zeros_like(dh)
                if has_mask:
                    dc_next = dc_next + jnp.where(m, 0.0, dc_c)
                    dh_pass = jnp.where(m, 0.0, dh_c)
                passing.append((dh_pass, dc_next, step_inputs(t - 1, ib, iu)))
            gave_up = barrier(i + 1, gave_up)
            new_states = []
            for (ib, iu), (dh_pass, dc_next, next_inputs) in zip(blocks, passing):
                def dot(k, acc, ib=ib, iu=iu):
                    dk = _load_fresh(comm_ref.at[t, rows(ib), pl.ds(k * KB, KB)], interpret)
                    wk = w_ref[pl.ds(iu * G + k * KB, KB), :]
                    return acc + jax.lax.dot(dk, wk, preferred_element_type=f32)

                dh_rec = jax.lax.fori_loop(0, G // KB, dot, jnp.zeros((BB, U), f32))
                new_states.append((dh_rec + dh_pass, dc_next, next_inputs))
            return new_states, gave_up

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, jnp.bool_(False)))
        for (ib, iu), (dh_c, dc_c, _) in zip(blocks, states):
            dh0_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, dh_c)
            dc0_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, dc_c)

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstm_persistent_backward", arrivals=T)
    # d pre is left as it is (a pass over [T, B, 4H] for a check that the forward's hq already makes)
    dpre, dh0, dc0 = outs[0], jnp.where(ok, outs[1], jnp.nan), jnp.where(ok, outs[2], jnp.nan)
    return dpre, dh0, dc0


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


BACKWARD = True  # the reverse loop as lstm_backward too (False: the deferred scan's lax.scan loop)


def backward_fn(cell, interpret=False, programs=None):
    """recur.backprop.deferred_scan's ``backward_fn`` for the plain LSTM: :func:`lstm_backward`
    over what :func:`forward_fn` stored."""

    def backward(params, carries, saved, dhs_T, mask_T, dcarry_T):
        tg, tc = saved
        dpre, dh0, dc0 = lstm_backward(dhs_T, tg, tc, carries["c"], params["W_h"], dcarry_T["h"], dcarry_T["c"],
                                       mask_T, dtype=cell.dtype, interpret=interpret, programs=programs)
        return {"h": dh0.astype(carries["h"].dtype), "c": dc0.astype(carries["c"].dtype)}, dpre

    return backward
