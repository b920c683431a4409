"""Persistent kernels for the cells that gate the state before the recurrent product: Cho et al.'s
GRU (``gru:cho``, reset before) and the MGU (Zhou et al. 2016).

Both have the form (k gate blocks g from W_g h, then a candidate from the gated state):

    gates = σ(u_g + W_g h_{t-1} (+ b_g))       Cho: r, z (k = 2)        MGU: f (k = 1)
    m_t   = ρ ⊙ h_{t-1}                        ρ = r                    ρ = f
    n_t   = tanh(u_n + W_n m_t (+ b_n))
    h_t   = (1 - z) ⊙ n_t + z ⊙ h_{t-1}                                  z = 1 - f

W_n m_t needs every unit's m_t, so a step is two phases with a grid barrier after each (the
grid, barrier and slicing of recur/kernels/persistent.py): the gate product and m_t, written to
a [T, B, H] buffer; then the candidate's product and h_t. The reverse loop has the same two
barriers: d pre_n (every unit's) before d m = d pre_n W_n, then the gates' d pre before
d h_{t-1} = d pre_g W_g. The weight gradients stay large matmuls after the loops: W_g's (and
b_g's) through the deferred scan's product with ``cell.recurrent`` (it is the gates' product),
W_n's (and b_n's) here, from d pre_n and the saved m_t.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ResetBefore:
    name: str  # "gru_cho" or "mgu"
    k: int  # gate blocks before the candidate's
    bias: str | None  # the recurrent bias [(k + 1) H] (Cho's b_h), if any

    @property
    def mgu(self) -> bool:
        return self.name == "mgu"

    def forward_fn(self, cell, interpret=False, programs=None, remat="none"):
        return forward_fn(self, cell, interpret, programs, remat)

    def backward_fn(self, cell, interpret=False, programs=None, remat="none"):
        return backward_fn(self, cell, interpret, programs, remat)


CHO = ResetBefore("gru_cho", 2, "b_h")
MGU = ResetBefore("mgu", 1, None)


def _gates(spec, pre):
    """(ρ, z, saved gate values) from the gate blocks' pre-activations (as the cells compute them)."""
    if spec.mgu:
        f = jax.nn.sigmoid(pre[0])
        return f, 1.0 - f, [f]
    r, z = (0.5 * jnp.tanh(0.5 * p) + 0.5 for p in pre)  # recur.cells.gru: sigmoid via tanh
    return r, z, [r, z]


def run_forward(spec, us_T, W_h, b_h, h0, mask_T=None, *, dtype, keep=False, save=True, interpret=False,
                programs=None):
    """The cell over time-major projected inputs us_T [T, B, (k + 1) H] from h0 [B, H].

    Returns (hq [T + 1, B, H] in dtype: h0 then each step's h, h_T [B, H], saved): saved None, or
    with keep {"mq": m_t [T, B, H] in dtype, "gates": [T, B, k H], "n": [T, B, H], and "h" (the h
    entering each step, float32) where hq is rounded}; float32 (float64 for a float64 dtype). With
    keep and not save (remat="step") no "gates" and "n": the reverse loop recomputes them.
    """
    from recur.kernels.persistent import _Grid

    T, B, GH = us_T.shape
    k = spec.k
    H = GH // (k + 1)
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    W = W_h.astype(cdt)
    # the gates' W_g^T [H, k H] with each program's k U columns together, ordered (gate, unit);
    # the candidate's W_n^T [H, H] (a program's columns are its units)
    wg = grid.by_program(W[:k * H], k)
    wn = jnp.transpose(W[k * H:])
    has_mask, has_bias = mask_T is not None, spec.bias is not None
    own_h = keep and cdt != jnp.dtype(f32)
    inputs = [us_T, wg, wn, h0.astype(f32)] + ([b_h.astype(f32)] if has_bias else [])
    inputs += [mask_T.astype(jnp.int32)] if has_mask else []
    out_shape = [jax.ShapeDtypeStruct((T + 1, B, H), cdt), jax.ShapeDtypeStruct((B, H), f32),
                 jax.ShapeDtypeStruct((T, B, H), cdt)]
    kept = ((("gates", k * H), ("n", H)) if save else ()) + ((("h", H),) if own_h else ()) if keep else ()
    out_shape += [jax.ShapeDtypeStruct((T, B, width), f32) for _, width in kept]

    def kernel(ins, outs, barrier):
        us_ref, wg_ref, wn_ref, h0_ref = ins[:4]
        b_ref = ins[4] if has_bias else None
        mask_ref = ins[4 + has_bias] if has_mask else None
        hq_ref, hT_ref, mq_ref = outs[:3]
        blocks = grid.blocks()

        step_inputs = lambda t, ib, iu: grid.step_inputs(us_ref, mask_ref, t, ib, iu, k + 1)

        states = []
        for ib, iu in blocks:
            h = h0_ref[rows(ib), units(iu)]
            hq_ref[0, rows(ib), units(iu)] = h.astype(cdt)
            bias = tuple(b_ref[units(iu, g)][None, :] for g in range(k + 1)) if has_bias else None
            states.append((h, bias, step_inputs(0, ib, iu)))
        gave_up = barrier(1, jnp.bool_(False))

        def step(t, carry):
            states, gave_up = carry
            mids = []
            for (ib, iu), (h, bias, (u, m)) in zip(blocks, states):
                pre = grid.gate_product(hq_ref, t, ib, iu, wg_ref, H, k, gave_up=gave_up)
                pre = [u[g] + p + (bias[g] if has_bias else 0.0) for g, p in enumerate(pre)]
                rho, z, gate_values = _gates(spec, pre)
                mq_ref[t, rows(ib), units(iu)] = (rho * h).astype(cdt)
                mids.append((z, gate_values))
            gave_up = barrier(2 * t + 2, gave_up)
            new_states = []
            for (ib, iu), (h, bias, (u, m)), (z, gate_values) in zip(blocks, states, mids):
                (rec_n,) = grid.product(mq_ref, t, ib, wn_ref, H, [(iu * U, U)], gave_up=gave_up)
                rec_n = rec_n + (bias[k] if has_bias else 0.0)
                n = jnp.tanh(u[k] + rec_n)
                h_new = (1.0 - z) * n + z * h
                if has_mask:
                    h_new = jnp.where(m[:, None] != 0, h_new, h)
                h_new = jnp.where(gave_up, jnp.nan, h_new)
                hq_ref[t + 1, rows(ib), units(iu)] = h_new.astype(cdt)
                out = dict(zip((name for name, _ in kept), outs[3:]))
                values = {"gates": gate_values, "n": [n], "h": [h]}
                for name in out:
                    for g, v in enumerate(values[name]):
                        out[name][t, rows(ib), units(iu, g)] = v
                new_states.append((h_new, bias, step_inputs(t + 1, ib, iu)))
            return new_states, barrier(2 * t + 3, gave_up)

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, gave_up))
        for (ib, iu), (h, _, _) in zip(blocks, states):
            hT_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, h)

    outs, ok = grid.launch(kernel, inputs, out_shape, f"recur_{spec.name}_persistent", arrivals=2 * T + 1)
    hq, hT = (jnp.where(ok, x, jnp.nan).astype(x.dtype) for x in outs[:2])
    if not keep:
        return hq, hT, None
    return hq, hT, dict(mq=outs[2], **{name: x for (name, _), x in zip(kept, outs[3:])})


def run_backward(spec, dhs_T, saved, h_prev, W_h, dh_T, mask_T=None, *, dtype, interpret=False, programs=None,
                 recompute=None):
    """The reverse time loop, as a persistent kernel with two barriers per step.

    dhs_T [T, B, H]: the outputs' cotangent; saved: :func:`run_forward`'s (gates, n, and m_t); h_prev
    [T, B, H]: the h entering each step (float32); dh_T [B, H]: the final carry's cotangent;
    recompute (remat="step", saved without gates and n): (us_T, b_h or None), from which, with
    h_prev and m_t, each step's gates and n_t are formed again (the forward's products of the
    forward's operands, inputs of this launch: no extra barrier).
    Returns (d u [T, B, (k + 1) H] float32: the gates' d pre, then the candidate's, d h0 [B, H]).
    """
    from recur.kernels.persistent import RECOMPUTE_KB, _Grid

    T, B, _ = dhs_T.shape
    k, H = spec.k, W_h.shape[1]
    G = (k + 1) * H
    grid = _Grid(B, H, dtype, programs, interpret)
    BB, U, nu, rows, units, cdt, f32 = grid.parts()
    W = W_h.astype(cdt)
    # each program's column slices: of W_n [H, H] (rows: the candidate's units) and of W_g [k H, H]
    wn = W[k * H:]
    wg = grid.program_slices(W[:k * H])
    has_mask = mask_T is not None
    shared = cdt != jnp.dtype(f32)  # a copy of d u in dtype for the other programs' products
    inputs = [dhs_T, h_prev.astype(f32), wn, wg, dh_T.astype(f32)]
    inputs += [mask_T.astype(jnp.int32)] if has_mask else []
    n_fixed = len(inputs)
    late = recompute is not None  # what a step reads is recomputed at the step, not loaded a step ahead
    if late:  # the forward's operands and layouts: h in the compute dtype, m_t, W_g^T by program, W_n^T
        us_T, b_h = recompute
        inputs += [us_T, h_prev.astype(cdt), saved["mq"], grid.by_program(W[:k * H], k), jnp.transpose(wn)]
        inputs += [b_h.astype(f32)] if b_h is not None else []
    else:
        inputs += [saved["gates"], saved["n"]]
    out_shape = [jax.ShapeDtypeStruct((T, B, G), f32), jax.ShapeDtypeStruct((B, H), f32)]
    out_shape += [jax.ShapeDtypeStruct((T, B, G), cdt)] if shared else []

    def kernel(ins, outs, barrier):
        dhs_ref, hp_ref, wn_ref, wg_ref, dhT_ref = ins[:5]
        mask_ref = ins[5] if has_mask else None
        more = ins[n_fixed:]
        du_ref, dh0_ref = outs[:2]
        comm_ref = outs[2] if shared else du_ref
        blocks = grid.blocks()

        def step_inputs(t, ib, iu):
            """(gate values, n_t, h_{t-1}, the output's cotangent, the mask) of step t (t = -1: step
            0's again), loaded, or recomputed from the forward's operands."""
            t = jnp.maximum(t, 0)
            r, u = rows(ib), units(iu)
            if not late:
                gates_ref, n_ref = more
                gates, n = [gates_ref[t, r, units(iu, g)] for g in range(k)], n_ref[t, r, u]
            else:
                us_ref, hq_ref, mq_ref, wgf_ref, wnf_ref = more[:5]
                bias = (lambda g: more[5][units(iu, g)][None, :]) if len(more) > 5 else (lambda g: 0.0)
                uv = [us_ref[t, r, units(iu, g)].astype(f32) for g in range(k + 1)]
                kb = min(grid.KB, RECOMPUTE_KB)
                pre = grid.gate_product(hq_ref, t, ib, iu, wgf_ref, H, k, fresh=False, kb=kb)
                _, _, gates = _gates(spec, [uv[g] + p + bias(g) for g, p in enumerate(pre)])
                (rec_n,) = grid.product(mq_ref, t, ib, wnf_ref, H, [(iu * U, U)], fresh=False, kb=kb)
                n = jnp.tanh(uv[k] + (rec_n + bias(k)))  # the forward's order
            return gates, n, hp_ref[t, r, u], dhs_ref[t, r, u].astype(f32), mask_ref[t, r] if has_mask else None

        def write(t, ib, iu, g, value, gave_up):
            du_ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, value)
            if shared:
                comm_ref[t, rows(ib), units(iu, g)] = jnp.where(gave_up, jnp.nan, value).astype(cdt)

        states = [(dhT_ref[rows(ib), units(iu)], None if late else step_inputs(T - 1, ib, iu)) for ib, iu in blocks]

        def step(i, carry):
            states, gave_up = carry
            t = T - 1 - i
            firsts = []
            for (ib, iu), (dc, ahead) in zip(blocks, states):
                gates, n, h, dh_out, m = step_inputs(t, ib, iu) if late else ahead
                d = dc
                if has_mask:  # a padded step passes the carry's cotangent through
                    d = jnp.where(m[:, None] != 0, dc, 0.0)
                d = d + dh_out
                z = 1.0 - gates[0] if spec.mgu else gates[1]
                write(t, ib, iu, k, d * (1.0 - z) * (1.0 - n * n), gave_up)  # d pre_n
                passing = d * z + (jnp.where(m[:, None] != 0, 0.0, dc) if has_mask else 0.0)
                firsts.append((d * (h - n), passing, (gates, h)))
            gave_up = barrier(2 * i + 1, gave_up)
            seconds = []
            for (ib, iu), (dz, passing, (gates, h)) in zip(blocks, firsts):
                # d m for this program's units: every unit's d pre_n times W_n's columns of them
                (dm,) = grid.product(comm_ref, t, ib, wn_ref, H, [(iu * U, U)], src_col=k * H, gave_up=gave_up)
                if spec.mgu:  # f is the reset gate and 1 - z
                    f = gates[0]
                    write(t, ib, iu, 0, (dm * h - dz) * f * (1.0 - f), gave_up)
                else:
                    r, z = gates
                    write(t, ib, iu, 0, dm * h * r * (1.0 - r), gave_up)
                    write(t, ib, iu, 1, dz * z * (1.0 - z), gave_up)
                seconds.append(passing + dm * gates[0])
            gave_up = barrier(2 * i + 2, gave_up)
            new_states = []
            for (ib, iu), passing in zip(blocks, seconds):
                (dh_rec,) = grid.product(comm_ref, t, ib, wg_ref, k * H, [(0, U)], w_row=iu * k * H,
                                         gave_up=gave_up)
                new_states.append((passing + dh_rec, None if late else step_inputs(t - 1, ib, iu)))
            return new_states, gave_up

        states, gave_up = jax.lax.fori_loop(0, T, step, (states, jnp.bool_(False)))
        for (ib, iu), (dc, _) in zip(blocks, states):
            dh0_ref[rows(ib), units(iu)] = jnp.where(gave_up, jnp.nan, dc)

    outs, ok = grid.launch(kernel, inputs, out_shape, f"recur_{spec.name}_persistent_backward", arrivals=2 * T)
    return outs[0], jnp.where(ok, outs[1], jnp.nan)


def forward_fn(spec, cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``forward_fn``: the carries entering each step (h, float32)
    and, saved for :func:`backward_fn`, m_t, the gates and n_t (remat="step": m_t only)."""

    def forward(params, carry0, us_T, mask_T, keep):
        hq, hT, saved = run_forward(spec, us_T, params["W_h"], params[spec.bias] if spec.bias else None, carry0,
                                    mask_T, dtype=cell.dtype, keep=keep, save=remat == "none", interpret=interpret,
                                    programs=programs)
        final, hs = hT.astype(carry0.dtype), hq[1:].astype(cell.dtype)
        if not keep:
            return final, hs
        h_prev = saved.pop("h") if "h" in saved else hq[:-1]
        return final, (hs, h_prev.astype(carry0.dtype), saved)

    return forward


def backward_fn(spec, cell, interpret=False, programs=None, remat="none"):
    """recur.backprop.deferred_scan's ``backward_fn``: d u, d rec (the gates' d pre: the cotangent
    of ``cell.recurrent``'s output) and the candidate's weight gradients, d W_n = sum_t,b d pre_n^T
    m_t (and Cho's d b_hn), as one matmul over the T * B rows. With remat="step" the reverse loop
    recomputes the gates and n_t."""

    def backward(params, carries, saved, us_T, dhs_T, mask_T, dcarry_T):
        W_h = params["W_h"]
        kH = spec.k * W_h.shape[1]
        again = None if remat == "none" else (us_T, params[spec.bias] if spec.bias else None)
        du, dh0 = run_backward(spec, dhs_T, saved, carries, W_h, dcarry_T, mask_T, dtype=cell.dtype,
                               interpret=interpret, programs=programs, recompute=again)
        d_pre_n = du[..., kH:]
        acc = jnp.promote_types(du.dtype, jnp.float32)
        dW_n = jnp.einsum("tbi,tbj->ij", d_pre_n, saved["mq"].astype(acc))
        dparams = {name: jnp.zeros_like(v) for name, v in params.items()}
        dparams["W_h"] = dparams["W_h"].at[kH:].set(dW_n.astype(W_h.dtype))
        if spec.bias:
            b = params[spec.bias]
            dparams[spec.bias] = dparams[spec.bias].at[kH:].set(jnp.sum(d_pre_n, axis=(0, 1)).astype(b.dtype))
        return dh0.astype(carries.dtype), du, du[..., :kH], dparams

    return backward
