"""Persistent kernels for the layer-norm LSTM (Ba et al. 2016; ``lstm:ln`` and Greff's variants with
layer norm, ``lstm:cifg,ln``, ``lstm:peepholes,ln``, ...: layer norm on W_h h and on c_t, as
recur.cells.lstm defines it):

    r_hat = LN(W_h h_{t-1})      over all n H gate columns of a row (n: the gate blocks present)
    pre   = u + γ_h r_hat + β_h  (u: the projected inputs, with their own norm and bias)
    c_t   = f c_{t-1} + i g      (i, f, g, o from pre as in the LSTM, with the variant's switches:
                                  peepholes on c_{t-1} (i, f) and c_t (o), a gate removed (= 1),
                                  f = 1 - i (cifg), g without tanh (niaf))
    h_t   = o act(γ_c LN(c_t) + β_c)   (act = tanh, or none with noaf)

The statistics of each row mix every unit's values, and each program holds only its own units
(the grid, barrier and slicing of recur/kernels/persistent.py). So each step reduces across the
programs: every program writes its rows' partial sums to a small [programs, B] buffer, meets the
others at a barrier and adds up the whole row's. A forward step is three phases, each ending in a
barrier: W_h h's partial statistics (sum and squared deviation from the program's own mean,
combined as Chan et al.'s parallel variance, so no E[x^2] - E[x]^2 cancellation); the gates and
c_t's partial statistics; LN(c_t) and h_t. The reverse loop likewise: LN(c_t)'s backward sums
(mean of d x_hat and of d x_hat * x_hat); the gates' d pre and LN(W_h h)'s sums; d rec, then
d h_{t-1} = d rec W_h after the barrier. The weight gradients stay large matmuls after the loops
(the deferred scan's d W_h from d rec), the norms' scales and biases are sums over (t, b) in the
reverse loop. With remat="step" the forward keeps only the rows' statistics, and the reverse
loop recomputes W_h h, the gates and LN(c_t) from them. With a projection (``lstm:ln,proj_size=P``,
LSTMP's h_t = W_p m_t) each step has a fourth phase, as recur/kernels/persistent_proj.py's: m_t
to a buffer, barrier, each program's P block of h_t; the reverse loop reads d m_t = d h_t W_p
from a shared buffer of d h_t, which its last phase writes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from recur.cells import base
from recur.kernels.persistent import PLAIN, RECOMPUTE_KB, Kernels, gates_of, stale
from recur.kernels.persistent_proj import layout_problem

EPS = 1e-5  # recur.cells.base.normalised's
SAVED = ("tg", "tc", "r_hat", "c_hat", "r_inv", "c_inv")  # what the reverse loop reads, besides c_{t-1}
STATS = ("r_mean", "r_inv", "c_mean", "c_inv")  # what it reads instead with remat="step" (it recomputes the rest)


class _Sums:
    """The [programs (padded to a power of 2), B] buffers of per-row partial sums: each program
    writes its rows' at row iu; a row's total is one load of the whole column block."""

    def __init__(self, grid):
        self.grid, self.NP = grid, base.next_pow2(grid.nu)

    def shape(self, B):
        return jax.ShapeDtypeStruct((self.NP, B), self.grid.acc)

    def clear_padding(self, refs, ib, iu):
        """Zero the padding rows [nu, NP), before the first barrier: program iu zeroes row
        min(nu + iu, NP - 1), so every padding row and no program's own row."""
        g = self.grid
        if self.NP == g.nu:
            return
        row = jnp.minimum(g.nu + iu, self.NP - 1)
        for ref in refs:
            ref[row, g.rows(ib)] = jnp.zeros((g.BB,), g.acc)

    def put(self, ref, ib, iu, value):
        ref[iu, self.grid.rows(ib)] = value

    def get(self, ref, ib, gave_up):
        """[NP, BB]: every program's partial sums for row block ib, read fresh (NaN once this
        program gave up: persistent.stale)."""
        from recur.kernels.persistent import _load_fresh

        return stale(gave_up, _load_fresh(ref.at[pl.ds(0, self.NP), self.grid.rows(ib)], self.grid.interpret))

    def total(self, ref, ib, gave_up):
        return jnp.sum(self.get(ref, ib, gave_up), axis=0)[:, None]

    def mean_inv(self, s_ref, q_ref, ib, width, gave_up):
        """Row mean and 1 / std [BB, 1] of the rows' values whose programs each wrote the sum and
        the squared deviation from their own mean of ``width`` columns."""
        s, q = self.get(s_ref, ib, gave_up), self.get(q_ref, ib, gave_up)
        n = width * self.grid.nu
        mean = jnp.sum(s, axis=0) / n
        dev = s / width - mean[None, :]
        valid = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) < self.grid.nu
        m2 = jnp.sum(q, axis=0) + width * jnp.sum(jnp.where(valid, dev * dev, 0.0), axis=0)
        return mean[:, None], jax.lax.rsqrt(m2 / n + EPS)[:, None]


def _partial_moments(blocks):
    """(sum, squared deviation from the blocks' own mean) per row [BB] over the [BB, U] blocks."""
    s = sum(jnp.sum(b, axis=1) for b in blocks)
    mean = s / (len(blocks) * blocks[0].shape[1])
    return s, sum(jnp.sum(jnp.square(b - mean[:, None]), axis=1) for b in blocks)


def run_forward(us_T, W_h, ln, h0, c0, mask_T=None, *, dtype, keep=False, save=True, interpret=False,
                programs=None, gates=PLAIN, W_p=None):
    """The layer-norm LSTM (the variant ``gates``, n gate blocks) over time-major projected inputs
    us_T [T, B, nH] from h0 [B, P], c0 [B, H]; ln: {ln_h_scale, ln_h_bias [nH], ln_c_scale,
    ln_c_bias [H]} and the peepholes {p_i, p_f, p_o [H]} the variant has. W_p [P, H]: a projection
    (LSTMP with layer norm), h_t = W_p m_t, m_t = o act(LN(c_t)), a fourth phase per step (each
    program one block of h_t, as recur/kernels/persistent_proj.py's); without, P = H and h_t = m_t.

    Returns (hq [T + 1, B, P] in dtype: h0 then each step's h, h_T [B, P], c_T [B, H], saved): saved None,
    or with keep {"c": each step's c_t [T, B, H], "tg": the gate tanh [T, B, nH] (Gates.forward's t),
    "tc": act(LN(c_t)) [T, B, H], "r_hat": LN(W_h h)'s normalised values [T, B, nH], "c_hat":
    LN(c_t)'s [T, B, H], "r_inv", "c_inv": their 1 / std [T, B]} in float32 (float64 for a float64
    dtype); with keep and not save (remat="step"), {"c", and the rows' statistics "r_mean",
    "r_inv", "c_mean", "c_inv" [T, B]}: the reverse loop recomputes the rest; with W_p and keep,
    also "mq": m_t [T, B, H] in dtype (d W_p reads it).
    """
    from recur.kernels.persistent import _Grid
    from recur.kernels.persistent_proj import Projection

    T, B, G = us_T.shape
    n = gates.n
    H = G // n
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    proj = None if W_p is None else Projection(grid, W_p.shape[0])
    P, KBP = (H, None) if proj is None else (proj.P, proj.KB)
    hcols = units if proj is None else proj.block  # the program's columns of h
    per = 3 if proj is None else 4  # barriers per step
    sums = _Sums(grid)
    w = grid.by_program(W_h, n)
    has_mask = mask_T is not None
    norms = [ln[k].astype(f32) for k in ("ln_h_scale", "ln_h_bias", "ln_c_scale", "ln_c_bias")]
    peeps = [ln[k].astype(f32) for k in gates.peephole_names]
    inputs = [us_T, w, h0.astype(f32), c0.astype(f32)] + norms + ([mask_T.astype(jnp.int32)] if has_mask else [])
    inputs += peeps + ([jnp.transpose(W_p.astype(cdt))] if proj else [])
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, P), cdt), jax.ShapeDtypeStruct((B, P), f32),
                 jax.ShapeDtypeStruct((B, H), f32)]
    out_shape += [sums.shape(B)] * 4  # W_h h's and c_t's sums and squared deviations
    kept = (("c",) + SAVED if save else ("c",) + STATS) if keep else ()
    width = {"tg": (G,), "r_hat": (G,), "c": (H,), "tc": (H,), "c_hat": (H,)}
    out_shape += [jax.ShapeDtypeStruct((T, B) + width.get(k, ()), f32) for k in kept]
    out_shape += [jax.ShapeDtypeStruct((T, B, H), cdt)] if proj else []  # m_t, the projection's operand

    def kernel(ins, outs, barrier):
        us_ref, w_ref, h0_ref, c0_ref, gh_ref, bh_ref, gc_ref, bc_ref = ins[:8]
        mask_ref = ins[8] if has_mask else None
        p_refs = ins[8 + has_mask:8 + has_mask + len(peeps)]
        wp_ref = ins[-1] if proj else None
        hq_ref, hT_ref, cT_ref, rs_ref, rq_ref, cs_ref, cq_ref = outs[:7]
        out = dict(zip(kept, outs[7:7 + len(kept)]))
        mq_ref = outs[-1] if proj else None
        blocks = grid.blocks()

        step_inputs = lambda t, ib, iu: grid.step_inputs(us_ref, mask_ref, t, ib, iu, n)

        states = []
        for ib, iu in blocks:
            s = {"h": h0_ref[rows(ib), hcols(iu)], "c": c0_ref[rows(ib), units(iu)]}
            hq_ref[0, rows(ib), hcols(iu)] = s["h"].astype(cdt)
            sums.clear_padding((rs_ref, rq_ref, cs_ref, cq_ref), ib, iu)
            p = ([gh_ref[units(iu, g)][None, :] for g in range(n)], [bh_ref[units(iu, g)][None, :] for g in range(n)],
                 gc_ref[units(iu)][None, :], bc_ref[units(iu)][None, :],
                 {k: ref[units(iu)][None, :] for k, ref in zip(gates.peephole_names, p_refs)})
            states.append((s, p, step_inputs(0, ib, iu)))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            recs = []
            for (ib, iu), _ in zip(blocks, states):  # W_h h for this program's units, its partial moments
                rec = grid.gate_product(hq_ref, t, ib, iu, w_ref, P, n, kb=KBP, gave_up=gave_up)
                s_r, q_r = _partial_moments(rec)
                sums.put(rs_ref, ib, iu, s_r)
                sums.put(rq_ref, ib, iu, q_r)
                recs.append(rec)
            gave_up = barrier(per * t + 2, gave_up)
            mids = []
            for (ib, iu), (s, (gh, bh, _, _, pv), (u, _)), rec in zip(blocks, states, recs):
                mean_r, inv_r = sums.mean_inv(rs_ref, rq_ref, ib, n * U, gave_up)
                r_hat = [(r - mean_r) * inv_r for r in rec]
                c, o, tg = gates.forward([u[g] + r_hat[g] * gh[g] + bh[g] for g in range(n)], s["c"], pv)
                s_c, q_c = _partial_moments([c])
                sums.put(cs_ref, ib, iu, s_c)
                sums.put(cq_ref, ib, iu, q_c)
                mids.append((tg, c, o, r_hat, (mean_r, inv_r)))
            gave_up = barrier(per * t + 3, gave_up)
            new_states = []
            for (ib, iu), (s, p, (u, m)), (tg, c, o, r_hat, (mean_r, inv_r)) in zip(blocks, states, mids):
                _, _, gc, bc, _ = p
                mean_c, inv_c = sums.mean_inv(cs_ref, cq_ref, ib, U, gave_up)
                c_hat = (c - mean_c) * inv_c
                tc = gates.act(c_hat * gc + bc)
                new = {"h": o * tc if proj is None else s["h"], "c": c}  # with W_p, h_t after the next barrier
                if has_mask:
                    new = {k: jnp.where(m[:, None] != 0, new[k], s[k]) for k in new}
                new["h"] = jnp.where(gave_up, jnp.nan, new["h"])
                r = rows(ib)
                if proj:  # m_t (NaN once given up, as persistent_proj's: programs share h's blocks)
                    mq_ref[t, r, units(iu)] = jnp.where(gave_up, jnp.nan, o * tc).astype(cdt)
                else:
                    hq_ref[t + 1, r, units(iu)] = new["h"].astype(cdt)
                values = {"c": [new["c"]], "tg": tg, "r_hat": r_hat, "tc": [tc], "c_hat": [c_hat]}
                for k in kept:
                    if k in values:
                        for g, v in enumerate(values[k]):
                            out[k][t, r, units(iu, g)] = v
                    else:  # a row's statistics: every program of the row block writes the same values
                        out[k][t, r] = {"r_mean": mean_r, "r_inv": inv_r, "c_mean": mean_c, "c_inv": inv_c}[k][:, 0]
                new_states.append((new, p, step_inputs(t + 1, ib, iu)))
            if proj:  # each program's block of h_t = W_p m_t
                gave_up = barrier(4 * t + 4, gave_up)
                for (ib, iu), (s, _, (_, m)), (new, _, _) in zip(blocks, states, new_states):
                    (h_new,) = grid.product(mq_ref, t, ib, wp_ref, H, [(proj.cols(iu), proj.UP)], gave_up=gave_up)
                    if has_mask:
                        h_new = jnp.where(m[:, None] != 0, h_new, s["h"])
                    new["h"] = jnp.where(gave_up, jnp.nan, h_new)
                    hq_ref[t + 1, rows(ib), hcols(iu)] = new["h"].astype(cdt)
            return new_states, barrier(per * t + per + 1, gave_up)

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (s, _, _) in zip(blocks, states):  # NaN once given up, as the Rule kernels'
            hT_ref[rows(ib), hcols(iu)] = jnp.where(gave_up, jnp.nan, s["h"])
            cT_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, s["c"])

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstm_ln_persistent", arrivals=per * T + 1)
    hq, hT, cT = (jnp.where(ok, x, jnp.nan).astype(x.dtype) for x in outs[:3])
    if not keep:
        return hq, hT, cT, None
    return hq, hT, cT, dict(zip(kept, outs[7:7 + len(kept)]), **({"mq": outs[-1]} if proj else {}))


def run_backward(dhs_T, saved, c_prev, W_h, ln, dh_T, dc_T, mask_T=None, *, dtype, interpret=False,
                 programs=None, gates=PLAIN, recompute=None, W_p=None):
    """The reverse time loop, as a persistent kernel with three barriers per step (four with a
    projection W_p: d m_t = d h_t W_p for the program's units needs every P column of d h_t).

    dhs_T [T, B, P]: the outputs' cotangent; saved: :func:`run_forward`'s; c_prev [T, B, H]: the c
    entering each step; dh_T [B, P], dc_T [B, H]: the final carry's cotangent; ln: the norms' scales and
    biases and the peepholes; recompute (remat="step", saved holding the rows' statistics only):
    (us_T, hq_T), the projected inputs and the h [T, B, P] entering each step in the compute dtype,
    from which each step's W_h h, gates and LN(c_t) are formed again with the forward's statistics
    (operands of this launch: no barrier). Returns (d pre [T, B, nH] (= d u; with peepholes the
    gates' d z, from which :func:`backward_fn` sums their gradients), d rec [T, B, nH] (W_h h's
    cotangent), the norms' gradients {ln_h_scale, ln_h_bias [nH], ln_c_scale, ln_c_bias [H]} (sums
    over the rows and steps, each program's in registers), d h0 [B, P], d c0 [B, H]; with W_p also
    d h_t [T, B, P], the whole cotangent of each step's h_t, for d W_p), float32. The products run
    in ``dtype`` with float32 accumulation, their left operands rounded to dtype.
    """
    from recur.kernels.persistent import _Grid
    from recur.kernels.persistent_proj import Projection

    T, B, _ = dhs_T.shape
    n = gates.n
    H = c_prev.shape[-1]
    G = n * H
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    proj = None if W_p is None else Projection(grid, W_p.shape[0])
    P, KBP = (H, grid.KB) if proj is None else (proj.P, proj.KB)
    hcols = units if proj is None else proj.block  # the program's columns of h
    per, off = (3, 0) if proj is None else (4, 1)  # barriers per step, and before the first
    sums = _Sums(grid)
    has_mask = mask_T is not None
    shared = cdt != jnp.dtype(f32)  # a copy of d rec (and d h) in dtype for the other programs' products
    late = recompute is not None  # what a step reads is recomputed at the step, not loaded a step ahead
    norms = [ln[k].astype(f32) for k in ("ln_h_scale", "ln_h_bias", "ln_c_scale", "ln_c_bias")]
    # d h_{t-1} = d rec W_h: program iu's units (columns of W_h's slices), or its P block of W_h [nH, P]
    wh = grid.program_slices(W_h) if proj is None else W_h.astype(cdt)
    inputs = [dhs_T, c_prev, wh, dh_T.astype(f32), dc_T.astype(f32)] + norms
    inputs += [mask_T.astype(jnp.int32)] if has_mask else []
    inputs += [ln[k].astype(f32) for k in gates.peephole_names]
    inputs += [W_p.astype(cdt)] if proj else []
    n_fixed = len(inputs)
    if late:  # the forward's operands: the inputs, h in the compute dtype, W_h^T by program
        inputs += [recompute[0], recompute[1].astype(cdt), grid.by_program(W_h, n)] + [saved[k] for k in STATS]
    else:
        inputs += [saved[k] for k in SAVED]
    out_shape = [jax.ShapeDtypeStruct((T, B, G), f32)] * 2 + [jax.ShapeDtypeStruct((B, P), f32),
                                                             jax.ShapeDtypeStruct((B, H), f32)]
    out_shape += [sums.shape(B)] * 4
    # each row block's sums of the norms' cotangents (γ_h, β_h, γ_c, β_c), added up after the kernel
    out_shape += [jax.ShapeDtypeStruct((grid.nb, G), f32)] * 2 + [jax.ShapeDtypeStruct((grid.nb, H), f32)] * 2
    out_shape += [jax.ShapeDtypeStruct((T, B, G), cdt)] if shared else []
    # with W_p: d h_t, row t + 1 (row 0: what the last pass writes, unread), and its copy in dtype
    out_shape += ([jax.ShapeDtypeStruct((T + 1, B, P), f32)] + ([jax.ShapeDtypeStruct((T + 1, B, P), cdt)]
                                                               if shared else [])) if proj else []

    def kernel(ins, outs, barrier):
        dhs_ref, cp_ref, w_ref, dhT_ref, dcT_ref, gh_ref, bh_ref, gc_ref, bc_ref = ins[:9]
        mask_ref = ins[9] if has_mask else None
        p_refs = ins[9 + has_mask:9 + has_mask + len(gates.peephole_names)]
        wp_ref = ins[n_fixed - 1] if proj else None
        more = ins[n_fixed:]
        du_ref, drec_ref, dh0_ref, dc0_ref, a1_ref, a2_ref, b1_ref, b2_ref = outs[:8]
        norm_refs = outs[8:12]
        comm_ref = outs[12] if shared else drec_ref
        dh_ref = outs[12 + shared] if proj else None
        dh_comm = (outs[13 + shared] if shared else dh_ref) if proj else None
        blocks = grid.blocks()

        def put_dh(t, ib, iu, dcarry, gave_up):  # with W_p: step t's d h_t into dh_ref's row t + 1
            m = (mask_ref[jnp.maximum(t, 0), rows(ib)] != 0)[:, None] if has_mask else None
            return proj.put_dh(dhs_ref, dh_ref, dh_comm if shared else None, m, t, ib, iu, dcarry, gave_up)

        def step_inputs(t, ib, iu, p):
            """(gate tanh, act(LN(c_t)), r_hat, c_hat, 1 / std of W_h h and of c_t, c_{t-1}, the
            outputs' cotangent, the mask) of step t (t = -1: step 0's again), loaded, or recomputed
            from the forward's operands and statistics."""
            t = jnp.maximum(t, 0)
            r, u = rows(ib), units(iu)
            cp = cp_ref[t, r, u]
            dh_out = dhs_ref[t, r, u].astype(f32) if proj is None else None  # with W_p, in d h_t's buffer
            m = mask_ref[t, r] if has_mask else None
            row = lambda ref: ref[t, r][:, None]
            if not late:
                tg_ref, tc_ref, rhat_ref, chat_ref, rinv_ref, cinv_ref = more
                blocks_of = lambda ref: [ref[t, r, units(iu, g)] for g in range(n)]
                return (blocks_of(tg_ref), tc_ref[t, r, u], blocks_of(rhat_ref), chat_ref[t, r, u], row(rinv_ref),
                        row(cinv_ref), cp, dh_out, m)
            us_ref, hq_ref, wf_ref, rmean_ref, rinv_ref, cmean_ref, cinv_ref = more
            gh, bh, gc, bc, pv = p
            rec = grid.gate_product(hq_ref, t, ib, iu, wf_ref, P, n, fresh=False, kb=min(KBP, RECOMPUTE_KB))
            r_inv, c_inv = row(rinv_ref), row(cinv_ref)
            r_hat = [(x - row(rmean_ref)) * r_inv for x in rec]
            uv = [us_ref[t, r, units(iu, g)].astype(f32) for g in range(n)]
            c, _, tg = gates.forward([uv[g] + r_hat[g] * gh[g] + bh[g] for g in range(n)], cp, pv)
            c_hat = (c - row(cmean_ref)) * c_inv
            return tg, gates.act(c_hat * gc + bc), r_hat, c_hat, r_inv, c_inv, cp, dh_out, m

        def write(ref, t, ib, iu, g, value, gave_up):
            ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, value)

        colsum = lambda x: jnp.sum(x, axis=0)
        states = []
        for ib, iu in blocks:
            sums.clear_padding((a1_ref, a2_ref, b1_ref, b2_ref), ib, iu)
            vec = lambda ref, g=0: ref[units(iu, g)][None, :]
            p = ([vec(gh_ref, g) for g in range(n)], [vec(bh_ref, g) for g in range(n)], vec(gc_ref), vec(bc_ref),
                 {k: vec(ref) for k, ref in zip(gates.peephole_names, p_refs)})
            d = {"h": dhT_ref[rows(ib), hcols(iu)], "c": dcT_ref[rows(ib), units(iu)]}
            if proj:  # h: the part of the carry's cotangent a padded step passes through; last: d h_{t-1}
                d = {"h": put_dh(T - 1, ib, iu, d["h"], jnp.bool_(False)), "c": d["c"], "last": jnp.zeros_like(d["h"])}
            zeros = jnp.zeros((U,), f32)
            acc = ([zeros] * n, [zeros] * n, zeros, zeros)  # d γ_h, d β_h (per block), d γ_c, d β_c
            states.append((d, p, acc, None if late else step_inputs(T - 1, ib, iu, p)))
        # (the padding rows' zeros come before the first step's first barrier, and are read after it)
        gave_up = barrier(1, jnp.bool_(False)) if proj else jnp.bool_(False)

        def step(i, carry):
            states, gave_up = carry
            t = T - 1 - i
            firsts = []
            for (ib, iu), (d, p, _, ahead) in zip(blocks, states):
                inputs_t = step_inputs(t, ib, iu, p) if late else ahead
                tg, tc, _, c_hat, _, _, _, dh_out, m = inputs_t
                if proj:  # d m_t for this program's units: every P column of d h_t times W_p's columns of them
                    (dm,) = grid.product(dh_comm, t + 1, ib, wp_ref, P, [(iu * U, U)], kb=KBP, gave_up=gave_up)
                    d = {"h": dm, "c": d["c"]}
                if has_mask:  # a padded step passes the carry's cotangent through (with W_p, d m_t
                    # holds only the live part of h's already, and the outputs' cotangent: not masked)
                    d = {k: v if proj and k == "h" else jnp.where(m[:, None] != 0, v, 0.0) for k, v in d.items()}
                dh = d["h"] if dh_out is None else d["h"] + dh_out
                d_tc = dh * gates.output_gate(tg) * gates.act_grad(tc)
                dx = d_tc * p[2]  # LN(c_t)'s d x_hat
                sums.put(a1_ref, ib, iu, jnp.sum(dx, axis=1))
                sums.put(a2_ref, ib, iu, jnp.sum(dx * c_hat, axis=1))
                firsts.append((inputs_t, d, dh, dx, d_tc))
            gave_up = barrier(per * i + off + 1, gave_up)
            seconds = []
            for (ib, iu), (_, (gh, _, _, _, pv), acc, _), (inputs_t, d, dh, dx, d_tc) in zip(blocks, states, firsts):
                tg, tc, r_hat, c_hat, _, c_inv, cp, _, _ = inputs_t
                m1, m2 = sums.total(a1_ref, ib, gave_up) / H, sums.total(a2_ref, ib, gave_up) / H
                dc = d["c"] + c_inv * (dx - m1 - c_hat * m2)
                d_pre, d_prev = gates.backward(tg, cp, dc, dh * tc, pv)
                dxr = [dp * g for dp, g in zip(d_pre, gh)]  # LN(W_h h)'s d x_hat
                for g in range(n):
                    write(du_ref, t, ib, iu, g, d_pre[g], gave_up)
                sums.put(b1_ref, ib, iu, sum(jnp.sum(x, axis=1) for x in dxr))
                sums.put(b2_ref, ib, iu, sum(jnp.sum(x * r, axis=1) for x, r in zip(dxr, r_hat)))
                d_gh, d_bh, d_gc, d_bc = acc
                acc = ([a + colsum(dp * r) for a, dp, r in zip(d_gh, d_pre, r_hat)],
                       [a + colsum(dp) for a, dp in zip(d_bh, d_pre)], d_gc + colsum(d_tc * c_hat), d_bc + colsum(d_tc))
                seconds.append((d_prev, dxr, acc))
            gave_up = barrier(per * i + off + 2, gave_up)
            passing = []
            for (ib, iu), (d_in, p, _, _), (inputs_t, *_), (d_prev, dxr, acc) in zip(blocks, states, firsts, seconds):
                _, _, r_hat, _, r_inv, _, _, _, m = inputs_t
                m1, m2 = sums.total(b1_ref, ib, gave_up) / G, sums.total(b2_ref, ib, gave_up) / G
                for g in range(n):
                    drec = r_inv * (dxr[g] - m1 - r_hat[g] * m2)
                    write(drec_ref, t, ib, iu, g, drec, gave_up)
                    if shared:
                        comm_ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, drec).astype(cdt)
                pas = {"h": jnp.zeros_like(d_in["h"]), "c": d_prev}
                if has_mask:  # (with W_p, d_in's h is what put_dh passed through: 0 at a live step already)
                    pas = {k: pas[k] + jnp.where(m[:, None] != 0, 0.0, d_in[k]) for k in pas}
                passing.append((pas, None if late else step_inputs(t - 1, ib, iu, p)))
            gave_up = barrier(per * i + off + 3, gave_up)
            new_states = []
            for (ib, iu), (_, p, _, _), (pas, ahead), (_, _, acc) in zip(blocks, states, passing, seconds):
                if proj is None:
                    (dh_rec,) = grid.product(comm_ref, t, ib, w_ref, G, [(0, U)], w_row=iu * G, gave_up=gave_up)
                    new_states.append((dict(pas, h=pas["h"] + dh_rec), p, acc, ahead))
                    continue
                # this program's P block of d h_{t-1} = d rec_t W_h, then step t - 1's whole d h
                (dh_rec,) = grid.product(comm_ref, t, ib, w_ref, G, [(proj.cols(iu), proj.UP)], gave_up=gave_up)
                last = dh_rec + pas["h"]
                d = {"h": put_dh(t - 1, ib, iu, last, gave_up), "c": pas["c"], "last": last}
                new_states.append((d, p, acc, ahead))
            if proj:
                gave_up = barrier(4 * i + 5, gave_up)
            return new_states, gave_up

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (d, _, acc, _) in zip(blocks, states):
            dh0_ref[rows(ib), hcols(iu)] = jnp.where(gave_up, jnp.nan, d["last"] if proj else d["h"])
            dc0_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, d["c"])
            d_gh, d_bh, d_gc, d_bc = acc
            for ref, blocks_ in zip(norm_refs, (d_gh, d_bh, [d_gc], [d_bc])):
                for g, v in enumerate(blocks_):
                    ref[ib, units(iu, g)] = jnp.where(gave_up, jnp.nan, v)

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstm_ln_persistent_backward", arrivals=per * T + off)
    dh0, dc0 = (jnp.where(ok, x, jnp.nan) for x in outs[2:4])
    d_norms = {k: jnp.where(ok, jnp.sum(x, axis=0), jnp.nan)
               for k, x in zip(("ln_h_scale", "ln_h_bias", "ln_c_scale", "ln_c_bias"), outs[8:12])}
    if proj:
        return outs[0], outs[1], d_norms, dh0, dc0, outs[12 + shared][1:]
    return outs[0], outs[1], d_norms, dh0, dc0


def forward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``forward_fn``: the carries entering each step ({h, c}) and,
    saved for :func:`backward_fn`, :func:`run_forward`'s values (with remat="step" the rows'
    statistics only; c_T for o's peephole, whose c_t are the carries' c one step on)."""

    from recur.kernels.persistent import lstm_results

    gates = gates_of(cell)

    def forward(params, carry0, us_T, mask_T, keep):
        hq, hT, cT, saved = run_forward(us_T, params["W_h"], params, carry0["h"], carry0["c"], mask_T,
                                        dtype=cell.dtype, keep=keep, save=remat == "none", interpret=interpret,
                                        programs=programs, gates=gates, W_p=params.get("W_p"))
        c_states = saved.pop("c") if keep else None
        final, hs, carries = lstm_results(hq, hT, cT, c_states, carry0, cell.dtype)
        if keep and gates.reads_c_t:  # o's peephole reads c_t: the carries' c one step on, then c_T
            saved["c_last"] = final["c"]
        return (final, (hs, carries, saved)) if keep else (final, hs)

    return forward


def backward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``backward_fn``: d u, d rec ({"h": W_h h's cotangent}, from
    which the deferred scan takes d W_h) and the step's own parameters' gradients: the norms'
    scales and biases (the kernel's sums of d pre * r_hat, d pre, d tc * c_hat and d tc), the
    peepholes (d z_i * c_{t-1}, d z_f * c_{t-1}, d z_o * c_t summed over the T * B rows here). With
    remat="step" the reverse loop recomputes each step's W_h h, gates and LN(c_t)."""
    gates = gates_of(cell)

    def backward(params, carries, saved, us_T, dhs_T, mask_T, dcarry_T):
        # h entering each step in the compute dtype: the forward buffer's values, exactly
        again = None if remat == "none" else (us_T, carries["h"].astype(cell.dtype))
        du, drec, d_norms, dh0, dc0, *dh = run_backward(
            dhs_T, saved, carries["c"], params["W_h"], params, dcarry_T["h"], dcarry_T["c"], mask_T, dtype=cell.dtype,
            interpret=interpret, programs=programs, gates=gates, recompute=again, W_p=params.get("W_p"))
        dparams = {k: jnp.zeros_like(v) for k, v in params.items()}
        dparams.update(d_norms)
        if dh:  # d W_p = sum over (t, b) of d h_t^T m_t, one matmul
            dparams["W_p"] = jnp.einsum("tbp,tbh->ph", dh[0], saved["mq"].astype(dh[0].dtype))
        dparams.update(gates.peephole_grads(du, carries["c"], saved.get("c_last")))
        dparams = {k: v.astype(params[k].dtype) for k, v in dparams.items()}
        d0 = {"h": dh0.astype(carries["h"].dtype), "c": dc0.astype(carries["c"].dtype)}
        return d0, du, {"h": drec}, dparams

    return backward


LN_LSTM = Kernels("lstm_ln", forward_fn, backward_fn, layout_problem)  # the projection's split of proj_size
