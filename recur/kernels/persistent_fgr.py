"""Persistent kernels for the LSTM with full gate recurrence (Greff et al.'s FGR, ``lstm:fgr``, with
the other switches it allows: peepholes, niaf, noaf), as recur.cells.lstm defines it:

    pre = u + W_h h_{t-1} + [R_gates (i, f, o)_{t-1}] on the i, f and o blocks
    the gates, c_t and h_t as in the LSTM, and the carry keeps (i, f, o)_t for the next step

The gates of step t-1 are a second recurrent source beside h_{t-1}: every program's i, f and o
feed every program's pre-activations. So the programs (the grid, barrier and slicing of
recur/kernels/persistent.py) write h_t and their units' i, f, o to one [T + 1, B, 4H] buffer
(columns h | i | f | o), and after the step's one barrier each reads all of it: two products, W_h h
(depth H, the four gate blocks of its units) and R_gates (i, f, o) (depth 3H, the three blocks
that get it). The reverse loop likewise has one barrier: the program's d pre, then its units of
d h_{t-1} = d pre W_h and of d (i, f, o)_{t-1} = d pre_{i,f,o} R_gates, which flow into step t-1's
gate derivatives. The weight gradients stay the deferred scan's large matmuls after the loop (d
W_h from d pre, d R_gates from its i, f, o blocks); the peepholes' are sums after the kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recur.kernels.persistent import PLAIN, RECOMPUTE_KB, Kernels, _sigmoid_of, gates_of, lstm_results

SOURCES = 4  # the buffer's column blocks: h, i, f, o
IFO = (0, 1, 3)  # the i, f, o blocks among i, f, g, o


def run_forward(us_T, W_h, R, h0, c0, g0, mask_T=None, *, dtype, keep=False, save=True, interpret=False,
                programs=None, gates=PLAIN, peepholes=None):
    """The FGR LSTM over time-major projected inputs us_T [T, B, 4H] from h0, c0 [B, H] and the gates
    g0 [B, 3H] (i, f, o); R: R_gates [3H, 3H]; gates: its :class:`persistent.Gates`; peepholes:
    {p_i, p_f, p_o [H]} where it has them.

    Returns (zq [T + 1, B, 4H] in dtype: (h, i, f, o) entering step 0 then after each step, final
    {h, c [B, H], gates [B, 3H]}, saved): saved None, or with keep {"c": each step's c_t [T, B, H],
    "tg": the gate tanh [T, B, 4H] (Gates.forward's t), "tc": act(c_t) [T, B, H]}, float32 (float64
    for a float64 dtype); with keep and not save, "c" only (remat="step": the reverse loop
    recomputes the rest).
    """
    from recur.kernels.persistent import _Grid

    T, B, G = us_T.shape
    H = G // 4
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    names = gates.peephole_names
    has_mask = mask_T is not None
    inputs = [us_T, grid.by_program(W_h, 4), grid.by_program(R, 3), h0.astype(f32), c0.astype(f32), g0.astype(f32)]
    inputs += ([mask_T.astype(jnp.int32)] if has_mask else []) + [peepholes[k].astype(f32) for k in names]
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, SOURCES * H), cdt)] + [jax.ShapeDtypeStruct((B, H), f32)] * 2
    out_shape += [jax.ShapeDtypeStruct((B, 3 * H), f32)]
    kept = (("c", H), ("tg", G), ("tc", H))[:(3 if save else 1) if keep else 0]
    out_shape += [jax.ShapeDtypeStruct((T, B, width), f32) for _, width in kept]

    def kernel(ins, outs, barrier):
        us_ref, wh_ref, wr_ref, h0_ref, c0_ref, g0_ref = ins[:6]
        mask_ref = ins[6] if has_mask else None
        p_refs = ins[6 + has_mask:]
        zq_ref, hT_ref, cT_ref, gT_ref = outs[:4]
        c_ref, tg_ref, tc_ref = (list(outs[4:]) + [None] * 3)[:3]
        blocks = grid.blocks()

        def put(t, ib, iu, s):
            """h and the gates of block (ib, iu) into the buffer's row t."""
            for k, x in enumerate([s["h"]] + s["g"]):
                zq_ref[t, rows(ib), units(iu, k)] = x.astype(cdt)

        states = []
        for ib, iu in blocks:
            r = rows(ib)
            s = {"h": h0_ref[r, units(iu)], "c": c0_ref[r, units(iu)], "g": [g0_ref[r, units(iu, k)] for k in range(3)]}
            put(0, ib, iu, s)
            pv = {k: ref[units(iu)][None, :] for k, ref in zip(names, p_refs)}
            states.append((s, pv, grid.step_inputs(us_ref, mask_ref, 0, ib, iu, 4)))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            new_states = []
            for (ib, iu), (s, pv, (u, m)) in zip(blocks, states):
                c, tg, tc = _gates(grid, u, (zq_ref, 0, wh_ref), (zq_ref, H, wr_ref), t, ib, iu, s["c"], pv, gates,
                                   gave_up=gave_up)
                new = {"h": gates.output_gate(tg) * tc, "c": c, "g": [_sigmoid_of(tg[g]) for g in IFO]}
                if has_mask:
                    mm = m[:, None] != 0
                    new = jax.tree.map(lambda a, b: jnp.where(mm, a, b), new, s)
                new["h"] = jnp.where(gave_up, jnp.nan, new["h"])
                put(t + 1, ib, iu, new)
                r = rows(ib)
                if c_ref is not None:
                    c_ref[t, r, units(iu)] = new["c"]
                if tg_ref is not None:
                    tc_ref[t, r, units(iu)] = tc
                    for g in range(4):
                        tg_ref[t, r, units(iu, g)] = tg[g]
                new_states.append((new, pv, grid.step_inputs(us_ref, mask_ref, t + 1, ib, iu, 4)))
            return new_states, barrier(t + 2, gave_up)

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (s, _, _) in zip(blocks, states):  # NaN once given up, as the Rule kernels'
            r = rows(ib)
            hT_ref[r, units(iu)] = jnp.where(gave_up, jnp.nan, s["h"])
            cT_ref[r, units(iu)] = jnp.where(gave_up, jnp.nan, s["c"])
            for k in range(3):
                gT_ref[r, units(iu, k)] = jnp.where(gave_up, jnp.nan, s["g"][k])

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstm_fgr_persistent", arrivals=T + 1)
    zq, hT, cT, gT = (jnp.where(ok, x, jnp.nan).astype(x.dtype) for x in outs[:4])
    final = {"h": hT, "c": cT, "gates": gT}
    return zq, final, ({name: x for (name, _), x in zip(kept, outs[4:])} if keep else None)


def run_backward(dhs_T, saved, c_prev, W_h, R, dcarry_T, mask_T=None, *, dtype, interpret=False, programs=None,
                 gates=PLAIN, peepholes=None, recompute=None):
    """The reverse time loop, as a persistent kernel with one barrier per step.

    dhs_T [T, B, H]: the outputs' cotangent; saved: :func:`run_forward`'s; c_prev [T, B, H]: the c
    entering each step; dcarry_T: the final carry's cotangent {h, c [B, H], gates [B, 3H]};
    recompute (remat="step", saved without "tg" and "tc"): (us_T, h, gates), the projected inputs
    and the h [T, B, H] and gates [T, B, 3H] entering each step, from which each step's products,
    gates and act(c_t) are formed again (the forward's own values: the same products of the same
    operands, inputs of this launch, so no barrier). Returns
    (d pre [T, B, 4H] float32 (the gates' d z: d u, and d rec for both products), d carry0 {h, c,
    gates}). The products by W_h and R_gates run in ``dtype`` with float32 accumulation, from d pre
    rounded to dtype.
    """
    from recur.kernels.persistent import _Grid

    T, B, _ = dhs_T.shape
    H = W_h.shape[1]
    G = 4 * H
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    names = gates.peephole_names
    has_mask = mask_T is not None
    shared = cdt != jnp.dtype(f32)  # a copy of d pre in dtype for the other programs' products
    # W_h's [4H, U] column slice per program; R_gates with each program's 3U columns (i, f, o of its
    # units) together: row k of block b is pre row b * H + k's weights into the program's gates
    inputs = [dhs_T, c_prev, grid.program_slices(W_h), grid.by_program(R.T, 3, pad=False)]
    inputs += [dcarry_T["h"].astype(f32), dcarry_T["c"].astype(f32), dcarry_T["gates"].astype(f32)]
    inputs += ([mask_T.astype(jnp.int32)] if has_mask else []) + [peepholes[k].astype(f32) for k in names]
    n_fixed = len(inputs)
    if recompute is None:
        inputs += [saved["tg"], saved["tc"]]
    else:  # the forward's operands: W_h^T and R_gates^T by program, h and the gates in the compute dtype
        us_T, h_T, g_T = recompute
        inputs += [us_T, h_T.astype(cdt), g_T.astype(cdt), grid.by_program(W_h, 4), grid.by_program(R, 3)]
    out_shape = [jax.ShapeDtypeStruct((T, B, G), f32)] + [jax.ShapeDtypeStruct((B, H), f32)] * 2
    out_shape += [jax.ShapeDtypeStruct((B, 3 * H), f32)]
    out_shape += [jax.ShapeDtypeStruct((T, B, G), cdt)] if shared else []

    def kernel(ins, outs, barrier):
        dhs_ref, cp_ref, wh_ref, wr_ref, dhT_ref, dcT_ref, dgT_ref = ins[:7]
        mask_ref = ins[7] if has_mask else None
        p_refs = ins[7 + has_mask:n_fixed]
        more = ins[n_fixed:]
        du_ref, dh0_ref, dc0_ref, dg0_ref = outs[:4]
        comm_ref = outs[4] if shared else du_ref
        blocks = grid.blocks()

        late = recompute is not None

        def step_inputs(t, ib, iu, pv):
            """What step t's derivative reads, loaded (or recomputed) before the barrier that
            precedes it; t = -1: nothing left, step 0's again."""
            t = jnp.maximum(t, 0)
            r, u = rows(ib), units(iu)
            cp = cp_ref[t, r, u]
            if not late:
                tg_ref, tc_ref = more
                tg, tc = [tg_ref[t, r, units(iu, g)] for g in range(4)], tc_ref[t, r, u]
            else:
                us_ref, h_ref, g_ref, wfh_ref, wfr_ref = more
                _, tg, tc = _step(grid, us_ref, h_ref, g_ref, wfh_ref, wfr_ref, t, ib, iu, cp, pv, gates)
            return tg, tc, cp, dhs_ref[t, r, u].astype(f32), mask_ref[t, r] if has_mask else None

        states = []
        for ib, iu in blocks:
            r = rows(ib)
            d = {"h": dhT_ref[r, units(iu)], "c": dcT_ref[r, units(iu)],
                 "g": [dgT_ref[r, units(iu, k)] for k in range(3)]}
            pv = {k: ref[units(iu)][None, :] for k, ref in zip(names, p_refs)}
            # stored values are loaded a step ahead, before the barrier; recomputed ones at the step
            # itself (computed ahead they would be live across the products: spills)
            states.append((d, pv, None if late else step_inputs(T - 1, ib, iu, pv)))

        def step(i, carry):
            states, gave_up = carry
            t = T - 1 - i
            passing = []
            for (ib, iu), (d_in, pv, ahead) in zip(blocks, states):
                tg, tc, cp, dh_out, m = step_inputs(t, ib, iu, pv) if late else ahead
                d = d_in
                if has_mask:  # a padded step passes the carry's cotangent through
                    mm = m[:, None] != 0
                    d = jax.tree.map(lambda v: jnp.where(mm, v, 0.0), d)
                dh = d["h"] + dh_out
                o = gates.output_gate(tg)
                dc = d["c"] + dh * o * gates.act_grad(tc)
                dgi, dgf, dgo = d["g"]
                d_pre, d_prev = gates.backward(tg, cp, dc, dh * tc + dgo, pv, extra={"i": dgi, "f": dgf})
                for g in range(4):
                    du_ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, d_pre[g])
                    if shared:
                        comm_ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, d_pre[g]).astype(cdt)
                pas = {"h": jnp.zeros_like(dh), "c": d_prev, "g": [jnp.zeros_like(dh)] * 3}
                if has_mask:
                    pas = jax.tree.map(lambda a, b: a + jnp.where(mm, 0.0, b), pas, d_in)
                passing.append((pas, pv, None if late else step_inputs(t - 1, ib, iu, pv)))
            gave_up = barrier(i + 1, gave_up)
            new_states = []
            for (ib, iu), (pas, pv, next_inputs) in zip(blocks, passing):
                (dh_rec,) = grid.product(comm_ref, t, ib, wh_ref, G, [(0, U)], w_row=iu * G, gave_up=gave_up)
                dg = pas["g"]
                for k, g in enumerate(IFO):  # d (i, f, o)_{t-1} = d pre_{i,f,o} R_gates, one pre block at a time
                    part = grid.product(comm_ref, t, ib, wr_ref, H, [(iu * 3 * U + j * U, U) for j in range(3)],
                                        src_col=g * H, w_row=k * H, gave_up=gave_up)
                    dg = [a + b for a, b in zip(dg, part)]
                new_states.append(({"h": pas["h"] + dh_rec, "c": pas["c"], "g": dg}, pv, next_inputs))
            return new_states, gave_up

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, jnp.bool_(False)))
        for (ib, iu), (d, _, _) in zip(blocks, states):
            r = rows(ib)
            dh0_ref[r, units(iu)] = jnp.where(gave_up, jnp.nan, d["h"])
            dc0_ref[r, units(iu)] = jnp.where(gave_up, jnp.nan, d["c"])
            for k in range(3):
                dg0_ref[r, units(iu, k)] = jnp.where(gave_up, jnp.nan, d["g"][k])

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstm_fgr_persistent_backward", arrivals=T)
    dh0, dc0, dg0 = (jnp.where(ok, x, jnp.nan) for x in outs[1:4])
    return outs[0], {"h": dh0, "c": dc0, "gates": dg0}


def _gates(grid, u, h_src, g_src, t, ib, iu, c_prev, pv, gates, fresh=True, kb=None, gave_up=None):
    """(c_t, the gate tanh (4 blocks), act(c_t)) of block (ib, iu) at step t: u its projected
    inputs; h_src, g_src: (ref, first column, W by program) of h and of the gates (i, f, o)
    entering the step, for the products W_h h (depth H) and R_gates (i, f, o) (depth 3H); gave_up:
    the program's flag, for fresh reads."""
    H = grid.H
    (h_ref, h_col, wh_ref), (g_ref, g_col, wr_ref) = h_src, g_src
    kw = dict(fresh=fresh, kb=kb, gave_up=gave_up)
    rec = grid.gate_product(h_ref, t, ib, iu, wh_ref, H, 4, src_col=h_col, **kw)
    rec_g = grid.gate_product(g_ref, t, ib, iu, wr_ref, 3 * H, 3, src_col=g_col, **kw)
    pre = [u[g] + rec[g] for g in range(4)]
    for k, g in enumerate(IFO):
        pre[g] = pre[g] + rec_g[k]
    c, _, tg = gates.forward(pre, c_prev, pv)
    return c, tg, gates.act(c)


def _step(grid, us_ref, h_ref, g_ref, wh_ref, wr_ref, t, ib, iu, c_prev, pv, gates):
    """:func:`_gates` from the launch's inputs (the reverse loop recomputing step t: read through
    the caches, in dots of at most RECOMPUTE_KB columns)."""
    u = [us_ref[t, grid.rows(ib), grid.units(iu, g)].astype(grid.acc) for g in range(4)]
    return _gates(grid, u, (h_ref, 0, wh_ref), (g_ref, 0, wr_ref), t, ib, iu, c_prev, pv, gates, fresh=False,
                  kb=min(grid.KB, RECOMPUTE_KB))


def _ifo(x):
    """The i, f, o blocks of a [..., 4H] array, joined: [..., 3H]."""
    i, f, _, o = jnp.split(x, 4, axis=-1)
    return jnp.concatenate([i, f, o], axis=-1)


def forward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``forward_fn``: the carries entering each step ({h, c, gates}:
    h and the gates from the buffer, in the compute dtype the products read) and :func:`run_forward`'s
    saved values (with remat="step" none but c_t for o's peephole)."""
    gates = gates_of(cell)
    save = remat == "none"

    def forward(params, carry0, us_T, mask_T, keep):
        zq, final, saved = run_forward(us_T, params["W_h"], params["R_gates"], carry0["h"], carry0["c"],
                                       carry0["gates"], mask_T, dtype=cell.dtype, keep=keep, save=save,
                                       interpret=interpret, programs=programs, gates=gates, peepholes=params)
        H = cell.hidden_size
        c_states = saved.pop("c") if keep else None
        final_hc, hs, carries = lstm_results(zq[:, :, :H], final["h"], final["c"], c_states, carry0, cell.dtype)
        final = dict(final_hc, gates=final["gates"].astype(carry0["gates"].dtype))
        if not keep:
            return final, hs
        carries["gates"] = zq[:-1, :, H:].astype(carry0["gates"].dtype)
        if gates.reads_c_t:  # o's peephole reads c_t: the carries' c one step on, then c_T
            saved["c_last"] = final["c"]
        return final, (hs, carries, saved)

    return forward


def backward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``backward_fn``: d carry0, d u, d rec ({"h": d pre, "gates":
    its i, f, o blocks}, from which the deferred scan takes d W_h and d R_gates) and the peepholes'
    gradients (d z_i * c_{t-1}, d z_f * c_{t-1}, d z_o * c_t summed over the T * B rows). With
    remat="step" the reverse loop recomputes each step's gates from the carries."""
    gates = gates_of(cell)

    def backward(params, carries, saved, us_T, dhs_T, mask_T, dcarry_T):
        again = None if remat == "none" else (us_T, carries["h"], carries["gates"])
        du, d0 = run_backward(dhs_T, saved, carries["c"], params["W_h"], params["R_gates"], dcarry_T, mask_T,
                              dtype=cell.dtype, interpret=interpret, programs=programs, gates=gates, peepholes=params,
                              recompute=again)
        dparams = None
        if gates.peepholes:
            dparams = {k: jnp.zeros_like(v) for k, v in params.items()}
            dparams.update({k: v.astype(params[k].dtype)
                            for k, v in gates.peephole_grads(du, carries["c"], saved.get("c_last")).items()})
        d0 = {k: v.astype(carries[k].dtype) for k, v in d0.items()}
        return d0, du, {"h": du, "gates": _ifo(du)}, dparams

    return backward


FGR_LSTM = Kernels("lstm_fgr", forward_fn, backward_fn)
