"""Persistent kernels for the LSTM with a projection (LSTMP, Sak et al. 2014; ``lstm:proj_size=P``
with any of the Greff variant switches, e.g. ``lstm:proj_size=P,peepholes``, Sak's own form): the
recurrence reads the projected h_t = W_p m_t, m_t = o_t ⊙ act(c_t), of P values per row; W_h is
[nH, P] (n gate blocks) and W_p [P, H]. The gate math is recur/kernels/persistent.py's
:class:`Gates`, applied to each program's units.

h_t needs every unit's m_t, so a step is two phases on the grid of recur/kernels/persistent.py
(programs (row block, unit block), each owning U of the H units), each ending in a barrier: the
gates' product from h_{t-1} (depth P), the program's c_t and m_t, m_t written to a [T, B, H]
buffer; then the projection's product, each program one UP-column block of h_t (UP: a power of 2
>= 16 with P / UP blocks at most the unit blocks; where there are fewer P blocks than programs in a
row block, program iu computes block iu mod (P / UP), so several write the same values). The
reverse loop likewise: d m = d h_t W_p for the program's units (every P column of d h_t: a
shared [T + 1, B, P] buffer), the gates' d pre; barrier; the program's P block of
d h_{t-1} = d pre W_h, with the next step's output cotangent and padding added; barrier. d W_h
stays the deferred scan's matmul from d pre, d W_p is one matmul after the loop from d h_t and the
saved m_t.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax.experimental import pallas as pl

MIN_UNITS = 16  # Triton's dot needs N >= 16


@dataclasses.dataclass(frozen=True)
class ProjectedLSTM:
    name: str = "lstmp"

    def layout_problem(self, cell, B, nu):
        return layout_problem(cell, B, nu)

    def forward_fn(self, cell, interpret=False, programs=None, remat="none"):
        return forward_fn(cell, interpret, programs, remat)

    def backward_fn(self, cell, interpret=False, programs=None, remat="none"):
        return backward_fn(cell, interpret, programs, remat)


LSTMP = ProjectedLSTM()


def proj_blocks(P, nu):
    """(UP, number of P blocks) for nu unit blocks per row block, or why P cannot be split."""
    UP = MIN_UNITS
    while P % UP == 0 and P // UP > nu:
        UP *= 2
    if P % UP or P // UP > nu:
        return (f"the persistent LSTMP kernel splits proj_size into at most {nu} blocks (the unit blocks of a "
                f"row block at this batch, hidden size and GPU) of a power-of-2 width >= {MIN_UNITS}; "
                f"{P} does not split")
    return UP, P // UP


def layout_problem(cell, B, nu):
    """None if the cell has no projection or its proj_size splits over nu unit blocks, else why not."""
    why = proj_blocks(cell.proj_size, nu) if cell.proj_size else None
    return why if isinstance(why, str) else None


class Projection:
    """proj_size P over a grid's unit blocks (recur/kernels/persistent.py's _Grid): program iu's
    block of h is P columns [cols(iu), cols(iu) + UP) (block iu mod P / UP), dots over P are KB deep."""

    def __init__(self, grid, P):
        from recur.kernels.persistent import K_BLOCK, _pow2_divisor

        lay = proj_blocks(P, grid.nu)
        if isinstance(lay, str):
            raise ValueError(f"recur.kernels.persistent_proj: {lay}")
        self.grid, self.P, (self.UP, self.nup), self.KB = grid, P, lay, _pow2_divisor(P, K_BLOCK)

    def cols(self, iu):
        return jax.lax.rem(iu, self.nup) * self.UP

    def block(self, iu):
        return pl.ds(self.cols(iu), self.UP)

    def put_dh(self, dhs_ref, dh_ref, dh_comm, m, t, ib, iu, dcarry, gave_up):
        """Step t's whole d h_t for program iu's P block into row t + 1 of dh_ref (and of its copy
        in the compute dtype dh_comm, if any): the outputs' cotangent dhs_ref[t] and the part of
        the cotangent of the carry after the step that a live step takes (m: the step's mask
        [BB, 1], or None); returns the part passed through (t = -1: the last pass, row 0, unread)."""
        g = self.grid
        d = dhs_ref[jnp.maximum(t, 0), g.rows(ib), self.block(iu)].astype(g.acc)
        d = d + (dcarry if m is None else jnp.where(m, dcarry, 0.0))
        at = (jnp.maximum(t, -1) + 1, g.rows(ib), self.block(iu))
        dh_ref[at] = jnp.where(gave_up, jnp.nan, d)
        if dh_comm is not None:
            dh_comm[at] = jnp.where(gave_up, jnp.nan, d).astype(g.cdt)
        return jnp.zeros_like(dcarry) if m is None else jnp.where(m, 0.0, dcarry)


def _grid_and_blocks(B, H, P, dtype, programs, interpret):
    from recur.kernels.persistent import _Grid

    grid = _Grid(B, H, dtype, programs, interpret)
    proj = Projection(grid, P)
    return grid, proj, proj.KB


def run_forward(us_T, W_h, W_p, h0, c0, mask_T=None, *, dtype, keep=False, save=True, interpret=False,
                programs=None, gates=None, peepholes=None):
    """The LSTMP (the variant ``gates``, n gate blocks; default the plain four) over time-major
    projected inputs us_T [T, B, nH] from h0 [B, P], c0 [B, H]; peepholes: {p_i, p_f, p_o [H]},
    those the variant has.

    Returns (hq [T + 1, B, P] in dtype: h0 then each step's h, h_T [B, P], c_T [B, H], m [T, B, H]
    in dtype, saved): saved None, or with keep {"c": c_t [T, B, H], "tg": the gate tanh
    [T, B, nH] (Gates.forward's t), "tc": act(c_t) [T, B, H]}, float32 (float64 for a float64
    dtype); with keep and not save (remat="step"), {"c"} only.
    """
    from recur.kernels.persistent import PLAIN

    gates = gates or PLAIN
    n = gates.n
    T, B, G = us_T.shape
    H, P = G // n, W_h.shape[1]
    grid, proj, KBP = _grid_and_blocks(B, H, P, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    # W_h^T [P, 4H] with each program's 4 U columns together; W_p^T [H, P]
    w = grid.by_program(W_h, n)
    wp = jnp.transpose(W_p.astype(cdt))
    has_mask = mask_T is not None
    inputs = [us_T, w, wp, h0.astype(f32), c0.astype(f32)] + ([mask_T.astype(jnp.int32)] if has_mask else [])
    inputs += [peepholes[k].astype(f32) for k in gates.peephole_names]
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, P), cdt), jax.ShapeDtypeStruct((B, P), f32),
                 jax.ShapeDtypeStruct((B, H), f32), jax.ShapeDtypeStruct((T, B, H), cdt)]
    kept = (("c", H), ("tg", G), ("tc", H))[:(3 if save else 1) if keep else 0]
    out_shape += [jax.ShapeDtypeStruct((T, B, width), f32) for _, width in kept]

    def kernel(ins, outs, barrier):
        us_ref, w_ref, wp_ref, h0_ref, c0_ref = ins[:5]
        mask_ref = ins[5] if has_mask else None
        p_refs = ins[5 + has_mask:]
        hq_ref, hT_ref, cT_ref, mq_ref = outs[:4]
        c_ref, tg_ref, tc_ref = (list(outs[4:]) + [None] * 3)[:3]
        blocks = grid.blocks()
        pcols, pblock = proj.cols, proj.block

        step_inputs = lambda t, ib, iu: grid.step_inputs(us_ref, mask_ref, t, ib, iu, n)
        peeps = lambda iu: {k: ref[units(iu)][None, :] for k, ref in zip(gates.peephole_names, p_refs)}

        states = []
        for ib, iu in blocks:
            h = h0_ref[rows(ib), pblock(iu)]
            hq_ref[0, rows(ib), pblock(iu)] = h.astype(cdt)
            states.append(((h, c0_ref[rows(ib), units(iu)]), step_inputs(0, ib, iu)))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            mids = []
            for (ib, iu), ((h, c), (u, m)) in zip(blocks, states):
                rec = grid.gate_product(hq_ref, t, ib, iu, w_ref, P, n, kb=KBP, gave_up=gave_up)
                c_t, o, tg = gates.forward([a + b for a, b in zip(u, rec)], c, peeps(iu))
                tc = gates.act(c_t)
                c_new = jnp.where(m[:, None] != 0, c_t, c) if has_mask else c_t
                # NaN once this program gave up: another that shares its P block of h could
                # overwrite its NaN h, but every program's next product reads m_t
                mq_ref[t, rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, o * tc).astype(cdt)
                if c_ref is not None:
                    c_ref[t, rows(ib), units(iu)] = c_new
                if tg_ref is not None:
                    for g in range(n):
                        tg_ref[t, rows(ib), units(iu, g)] = tg[g]
                    tc_ref[t, rows(ib), units(iu)] = tc
                mids.append(c_new)
            gave_up = barrier(2 * t + 2, gave_up)
            new_states = []
            for (ib, iu), ((h, _), (u, m)), c_new in zip(blocks, states, mids):
                (h_new,) = grid.product(mq_ref, t, ib, wp_ref, H, [(pcols(iu), proj.UP)], gave_up=gave_up)
                if has_mask:
                    h_new = jnp.where(m[:, None] != 0, h_new, h)
                h_new = jnp.where(gave_up, jnp.nan, h_new)
                hq_ref[t + 1, rows(ib), pblock(iu)] = h_new.astype(cdt)
                new_states.append(((h_new, c_new), step_inputs(t + 1, ib, iu)))
            return new_states, barrier(2 * t + 3, gave_up)

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), ((h, c), _) in zip(blocks, states):  # NaN once given up, as the Rule kernels'
            hT_ref[rows(ib), pblock(iu)] = jnp.where(gave_up, jnp.nan, h)
            cT_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, c)

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstmp_persistent", arrivals=2 * T + 1)
    hq, hT, cT = (jnp.where(ok, x, jnp.nan).astype(x.dtype) for x in outs[:3])
    saved = {name: x for (name, _), x in zip(kept, outs[4:])} if keep else None
    return hq, hT, cT, outs[3], saved


def run_backward(dhs_T, saved, c_prev, W_h, W_p, dh_T, dc_T, mask_T=None, *, dtype, interpret=False,
                 programs=None, recompute=None, gates=None, peepholes=None):
    """The reverse time loop, as a persistent kernel with two barriers per step.

    dhs_T [T, B, P]: the outputs' cotangent; saved: :func:`run_forward`'s (tg, tc); c_prev
    [T, B, H]: the c entering each step; dh_T [B, P], dc_T [B, H]: the final carry's cotangent;
    recompute (remat="step", saved without tg and tc): (us_T, the h [T, B, P] entering each step),
    from which each step's gates are formed again (the forward's product of the forward's
    operands, inputs of this launch: no extra barrier); gates, peepholes: as :func:`run_forward`'s.
    Returns (d pre [T, B, nH] (= d u; with peepholes the gates' d z, from which the peepholes'
    gradients are summed), d h_t [T, B, P] (the whole cotangent of each step's h_t, for d W_p),
    d h0 [B, P], d c0 [B, H]), float32. The products run in ``dtype`` with float32
    accumulation, their left operands rounded to dtype.
    """
    from recur.kernels.persistent import PLAIN, RECOMPUTE_KB

    gates = gates or PLAIN
    T, B, _ = dhs_T.shape
    P, H = W_p.shape
    n = gates.n
    G = n * H
    grid, proj, KBP = _grid_and_blocks(B, H, P, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    has_mask = mask_T is not None
    shared = cdt != jnp.dtype(f32)  # copies in dtype of d pre and d h for the other programs' products
    inputs = [dhs_T, c_prev, W_p.astype(cdt), W_h.astype(cdt), dh_T.astype(f32),
              dc_T.astype(f32)] + ([mask_T.astype(jnp.int32)] if has_mask else [])
    inputs += [peepholes[k].astype(f32) for k in gates.peephole_names]
    n_fixed = len(inputs)
    late = recompute is not None  # what a step reads is recomputed at the step, not loaded a step ahead
    if late:  # the forward's operands: the inputs, h in the compute dtype, W_h^T by program
        inputs += [recompute[0], recompute[1].astype(cdt), grid.by_program(W_h, n)]
    else:
        inputs += [saved["tg"], saved["tc"]]
    # d h_t, row t + 1 (row 0: what the last pass writes, unread)
    out_shape = [jax.ShapeDtypeStruct((T, B, G), f32), jax.ShapeDtypeStruct((T + 1, B, P), f32),
                 jax.ShapeDtypeStruct((B, P), f32), jax.ShapeDtypeStruct((B, H), f32)]
    out_shape += [jax.ShapeDtypeStruct((T, B, G), cdt), jax.ShapeDtypeStruct((T + 1, B, P), cdt)] if shared else []

    def kernel(ins, outs, barrier):
        dhs_ref, cp_ref, wp_ref, wh_ref, dhT_ref, dcT_ref = ins[:6]
        mask_ref = ins[6] if has_mask else None
        p_refs = ins[6 + has_mask:n_fixed]
        more = ins[n_fixed:]
        du_ref, dh_ref, dh0_ref, dc0_ref = outs[:4]
        du_comm, dh_comm = outs[4:] if shared else (du_ref, dh_ref)
        blocks = grid.blocks()
        pcols, pblock = proj.cols, proj.block

        def live(t, ib):
            return (mask_ref[jnp.maximum(t, 0), rows(ib)] != 0)[:, None] if has_mask else None

        def put_dh(t, ib, iu, dcarry, gave_up):
            return proj.put_dh(dhs_ref, dh_ref, dh_comm if shared else None, live(t, ib), t, ib, iu, dcarry, gave_up)

        def step_inputs(t, ib, iu, pv):
            """(gate tanh, act(c_t), c_{t-1}, the mask) of step t (t = -1: step 0's again), loaded or
            recomputed."""
            t = jnp.maximum(t, 0)
            r, u = rows(ib), units(iu)
            cp = cp_ref[t, r, u]
            if not late:
                tg_ref, tc_ref = more
                return [tg_ref[t, r, units(iu, g)] for g in range(n)], tc_ref[t, r, u], cp, live(t, ib)
            us_ref, hq_ref, wf_ref = more
            uv = [us_ref[t, r, units(iu, g)].astype(f32) for g in range(n)]
            rec = grid.gate_product(hq_ref, t, ib, iu, wf_ref, P, n, kb=min(KBP, RECOMPUTE_KB), fresh=False)
            c_t, _, tg = gates.forward([a + b for a, b in zip(uv, rec)], cp, pv)
            return tg, gates.act(c_t), cp, live(t, ib)

        peeps = lambda iu: {k: ref[units(iu)][None, :] for k, ref in zip(gates.peephole_names, p_refs)}
        states = []
        for ib, iu in blocks:
            passing = put_dh(T - 1, ib, iu, dhT_ref[rows(ib), pblock(iu)], jnp.bool_(False))
            states.append((passing, dcT_ref[rows(ib), units(iu)], None if late else step_inputs(T - 1, ib, iu, peeps(iu))))
        gave_up = barrier(1, jnp.bool_(False))

        def step(i, carry):  # carry: the states, gave_up and the last d carry of h (d h0 at the end)
            states, gave_up, _ = carry
            t = T - 1 - i
            firsts = []
            for (ib, iu), (passing, dc, ahead) in zip(blocks, states):
                pv = peeps(iu)
                tg, tc, cp, m = step_inputs(t, ib, iu, pv) if late else ahead
                # d m_t for this program's units: every P column of d h_t times W_p's columns of them
                (dm,) = grid.product(dh_comm, t + 1, ib, wp_ref, P, [(iu * U, U)], kb=KBP, gave_up=gave_up)
                d_c = jnp.where(m, dc, 0.0) if has_mask else dc
                d_c = d_c + dm * gates.output_gate(tg) * gates.act_grad(tc)
                d_pre, d_prev = gates.backward(tg, cp, d_c, dm * tc, pv)
                for g in range(n):
                    du_ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, d_pre[g])
                    if shared:
                        du_comm[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, d_pre[g]).astype(cdt)
                firsts.append(d_prev + (jnp.where(m, 0.0, dc) if has_mask else 0.0))
            gave_up = barrier(2 * i + 2, gave_up)
            new_states, dcarries = [], []
            for (ib, iu), (passing, _, _), dc_prev in zip(blocks, states, firsts):
                # this program's P block of d h_{t-1} = d pre_t W_h, then step t - 1's whole d h
                (dh,) = grid.product(du_comm, t, ib, wh_ref, G, [(pcols(iu), proj.UP)], gave_up=gave_up)
                dcarries.append(dh + passing)
                new_states.append((put_dh(t - 1, ib, iu, dcarries[-1], gave_up), dc_prev,
                                   None if late else step_inputs(t - 1, ib, iu, peeps(iu))))
            return new_states, barrier(2 * i + 3, gave_up), dcarries

        zeros = [jnp.zeros((BB, proj.UP), f32) for _ in blocks]
        states, gave_up, dh0 = jax.lax.fori_loop(0, T, step, (states, gave_up, zeros))
        for (ib, iu), (_, dc, _), d in zip(blocks, states, dh0):
            dh0_ref[rows(ib), pblock(iu)] = jnp.where(gave_up, jnp.nan, d)
            dc0_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, dc)

    outs, ok = grid.launch(kernel, inputs, out_shape, "recur_lstmp_persistent_backward", arrivals=2 * T + 1)
    dh0, dc0 = (jnp.where(ok, x, jnp.nan) for x in outs[2:4])
    return outs[0], outs[1][1:], dh0, dc0


def forward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``forward_fn``: the carries entering each step ({h, c}) and,
    saved for :func:`backward_fn`, the gates, act(c_t) and m_t (remat="step": m_t only), and c_T
    for o's peephole."""

    from recur.kernels.persistent import gates_of, lstm_results

    gates = gates_of(cell)

    def forward(params, carry0, us_T, mask_T, keep):
        hq, hT, cT, mq, saved = run_forward(us_T, params["W_h"], params["W_p"], carry0["h"], carry0["c"], mask_T,
                                            dtype=cell.dtype, keep=keep, save=remat == "none", interpret=interpret,
                                            programs=programs, gates=gates, peepholes=params)
        c_states = saved.pop("c") if keep else None
        final, hs, carries = lstm_results(hq, hT, cT, c_states, carry0, cell.dtype)
        if keep and gates.reads_c_t:  # o's peephole reads c_t: the carries' c one step on, then c_T
            saved["c_last"] = final["c"]
        return (final, (hs, carries, dict(saved, mq=mq))) if keep else (final, hs)

    return forward


def backward_fn(cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``backward_fn``: d u (= d rec: the deferred scan takes d W_h
    from it), d W_p = sum over (t, b) of d h_t^T m_t, one matmul, and the peepholes' gradients (d z
    against the cell state each reads, summed). With remat="step" the reverse loop recomputes the
    gates."""
    from recur.kernels.persistent import gates_of

    gates = gates_of(cell)

    def backward(params, carries, saved, us_T, dhs_T, mask_T, dcarry_T):
        again = None if remat == "none" else (us_T, carries["h"])  # h: the forward buffer's values, exactly
        du, dh, dh0, dc0 = run_backward(dhs_T, saved, carries["c"], params["W_h"], params["W_p"], dcarry_T["h"],
                                        dcarry_T["c"], mask_T, dtype=cell.dtype, interpret=interpret,
                                        programs=programs, recompute=again, gates=gates, peepholes=params)
        acc = jnp.promote_types(du.dtype, jnp.float32)
        dparams = {k: jnp.zeros_like(v) for k, v in params.items()}
        dparams["W_p"] = jnp.einsum("tbp,tbh->ph", dh, saved["mq"].astype(acc))
        dparams.update(gates.peephole_grads(du, carries["c"], saved.get("c_last")))
        dparams = {k: v.astype(params[k].dtype) for k, v in dparams.items()}
        d0 = {"h": dh0.astype(carries["h"].dtype), "c": dc0.astype(carries["c"].dtype)}
        return d0, du, None, dparams

    return backward
