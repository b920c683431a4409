"""Backpropagation through time with the weight gradients deferred until after the time loop.

``jax.grad`` of a ``lax.scan`` accumulates every weight gradient inside the reverse time loop:
at each step a [B, G]^T x [B, H] outer product (a matmul whose inner dimension is the batch)
is added into a [G, H] buffer that is read and written T times. This module runs BPTT the
way the cuDNN and oneDNN kernels do instead:

- forward: the cell's steps, storing each step's input carry and its recurrent products
  ``rec = cell.recurrent(params, carry)`` (the carry times the recurrent weights);
- backward time loop: only what the chain through time needs, on activations. Each step
  recomputes the cell's element-wise part from (carry, u, rec), differentiates it, and sends
  the gradient of rec back to the carry through the transposed recurrent weights. It writes
  out the gradients of u and of rec and the cotangent of the step's new carry;
- after the loop: the parameter gradients for all T steps at once, by differentiating
  ``recurrent`` and ``step`` over the T*B rows stacked as one batch: for a matmul that is
  dW = dRec^T . Carries, one large matmul.

Any cell works: ``recurrent`` (optional, see recur.cells.base) only decides what is stored and
so kept out of the backward loop. A cell with ``fused_backward`` (the plain LSTM with or without
layer norm, the reset-after GRU, the Elman RNN) supplies its own step derivative instead: the
forward loop stores what that needs (``step_saving``'s third output, e.g. the LSTM's gate tanh
and tanh(c_t)) instead of rec, the reverse loop calls ``step_backward`` and recomputes nothing,
no new-carry cotangent is written, and where d rec = d u (pre = u + rec: LSTM, Elman) only d u is
stored. A step with parameters of its own (the layer-norm LSTM's scales and biases) returns
per-row pieces of their cotangents as a fourth output, and ``cell.param_grads`` sums them over
all T*B rows after the loop. With ``project=True`` the input projection runs inside the forward
loop too (below). Steps must treat batch rows independently (every recur cell
does). Integer carry leaves (a step counter) are carried but not differentiated. Masked
(padded) steps, resets and reset carries are handled as in recur.scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recur.scan import tree_where


def _is_float(x):
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _cotangent(primal, ct):
    """ct for a float primal leaf; the float0 zeros JAX wants for an integer one (ct is None)."""
    return ct if _is_float(primal) else jnp.zeros(primal.shape, jax.dtypes.float0)


def _float_zeros(tree):
    """Zeros at the float leaves of tree, None at its integer leaves (a cotangent tree)."""
    return jax.tree.map(lambda x: jnp.zeros_like(x) if _is_float(x) else None, tree)


def _map(f, *trees):
    """jax.tree.map over cotangent trees whose integer-leaf positions hold None (kept None)."""
    return jax.tree.map(lambda x, *ys: None if x is None else f(x, *ys), *trees,
                        is_leaf=lambda x: x is None)


def _keep(mask_B, tree):
    """The cotangent rows where mask_B, zeros elsewhere."""
    return _map(lambda d: tree_where(mask_B, d, jnp.zeros_like(d)), tree)


def _drop(mask_B, tree):
    """Zeros in the rows where mask_B, the cotangent elsewhere."""
    return _map(lambda d: tree_where(mask_B, jnp.zeros_like(d), d), tree)


def _add(a, b):
    return jax.tree.map(lambda x, y: x if y is None else (y if x is None else x + y), a, b,
                        is_leaf=lambda x: x is None)


def _flat(tree, n):
    """Merge the two leading axes [T, B, ...] -> [T*B, ...] (None leaves stay None)."""
    return _map(lambda x: jnp.reshape(x, (n,) + x.shape[2:]), tree)


def _pull(fn, out_cts, carry, *args):
    """Cotangents of fn(carry, *args) w.r.t. the float leaves of carry and args.

    out_cts has None at the outputs' integer leaves; the result is (dcarry, *dargs) with None at
    carry's integer leaves.
    """
    leaves, treedef = jax.tree.flatten(carry)
    floats = [i for i, x in enumerate(leaves) if _is_float(x)]

    def f(float_leaves, *args):
        full = list(leaves)
        for i, x in zip(floats, float_leaves):
            full[i] = x
        return fn(jax.tree.unflatten(treedef, full), *args)

    out, pull = jax.vjp(f, [leaves[i] for i in floats], *args)
    grads = pull(_full_cotangent(out, out_cts))
    dcarry = [None] * len(leaves)
    for i, g in zip(floats, grads[0]):
        dcarry[i] = g
    return (jax.tree.unflatten(treedef, dcarry),) + tuple(grads[1:])


def _full_cotangent(out, cts):
    out_leaves, out_def = jax.tree.flatten(out)
    ct_leaves = jax.tree.leaves(cts, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(out_def, [_cotangent(o, c) for o, c in zip(out_leaves, ct_leaves)])


def scan_loop(unroll: int = 1):
    """The time loops as ``jax.lax.scan``: loop(body, consts, rows, carry0, xs, reverse)."""

    def loop(body, consts, rows, carry0, xs, reverse=False):
        return jax.lax.scan(lambda c, x: body(consts, rows, c, x), carry0, xs, reverse=reverse,
                            unroll=unroll)

    return loop


def deferred_scan(cell, unroll: int = 1, loop=None, project: bool = False, forward_fn=None,
                  backward_fn=None, infer=None):
    """f(params, carry0, us_T, mask_T, resets_T, reset_carry) -> (hs_T, final carry).

    Time-major inputs: us_T [T, B, ...], mask_T / resets_T [T, B] bools or None. Same values as
    the autodiff scan in recur.scan, with the custom backward pass described above.

    ``project=True`` (cells with ``fused_backward`` only, whose ``project`` works row by row)
    takes the raw inputs xs_T [T, B, I] instead of us_T and projects each step's inputs inside
    the forward loop, so the [T, B, G] projected inputs are never written out and read back;
    the backward pass gets d W_x and d xs from d us after the reverse loop, as large matmuls.

    ``loop`` runs the two time loops (default ``scan_loop(unroll)``); recur.kernels passes one
    that runs each loop as a single Pallas kernel. Its contract is ``lax.scan``'s with the
    closed-over values made explicit: ``loop(body, consts, rows, carry0, xs, reverse)`` where
    body(consts, rows, carry, x) -> (carry, y), consts are read whole and rows ([B, ...]
    leaves) row by row.

    ``forward_fn`` (no resets, ``project=False``) replaces the forward time loop:
    forward_fn(params, carry0, us_T, mask_T, keep) -> (final carry, hs), or with keep (final
    carry, (hs, the carry entering each step, the saved values)), stacked over time; the saved
    values are what this function's reverse loop reads: step_saving's for a cell with a fused
    backward step, else ``recurrent``'s output. ``backward_fn`` (with forward_fn) replaces the
    reverse time loop: backward_fn(params, carries, saved, us_T, dhs_T, mask_T, dcarry_T) ->
    (d carry0, d u, d rec or None where it is the cell's ``recurrent_cotangent`` of d u (both
    stacked over time), d params of the step itself or None where it has none), from forward_fn's
    stored carries and saved values. recur/kernels/persistent.py supplies both for the LSTM and
    its variants (layer norm, gate recurrence and projection included), the GRU (both forms), the MGU and the Elman RNN; the weight
    gradients stay as here, large matmuls after the loop.

    ``infer`` runs the forward pass when it is not differentiated (custom_vjp's primal: jax.grad
    and jax.vjp run the forward loop above, which stores what the reverse loop reads; the primal
    is traced too where a jitted, checkpointed or lax.scan-ned function is differentiated after
    it was traced, and then goes unused):
    infer(params, carry0, us_T, mask_T, resets_T, reset_carry) -> (final carry, hs) computing the
    same values another way, or None for the forward loop above. It is called while the primal
    is traced, so it may choose then (recur.scan's ``auto`` times inference apart from training).
    """
    # a cell's own backward step (step_saving / step_backward, see recur.cells.base) in the
    # lax.scan loops; the GPU kernels' loops keep the autodiff step (Triton has no concatenate)
    fused = loop is None and cell.fused_backward
    if project and not fused:
        raise ValueError(f"deferred_scan: project=True needs a cell with a fused backward step in the "
                         f"lax.scan loops; {cell.name} (loop={loop}) has none")
    if (forward_fn is not None or backward_fn is not None) and (project or loop is not None):
        raise ValueError(f"deferred_scan: forward_fn / backward_fn replace the lax.scan loops of projected "
                         f"inputs: they take project=False and no loop ({cell.name}, project={project})")
    if backward_fn is not None and forward_fn is None:
        raise ValueError("deferred_scan: backward_fn reads what forward_fn stores; give both")
    loop = scan_loop(unroll) if loop is None else loop

    def step_fn(params, carry, u, rec):
        return cell.step(params, carry, u, rec) if rec is not None else cell.step(params, carry, u)

    def forward(params, carry0, us, mask, resets, reset_carry, keep):
        if forward_fn is not None:
            if resets is not None:
                raise ValueError("deferred_scan: forward_fn takes no resets")
            return forward_fn(params, carry0, us, mask, keep)

        def body(params, reset_carry, carry, x):
            u, m, r = x
            if project:
                u = cell.project(params, u)
            if r is not None:
                carry = tree_where(r, reset_carry, carry)
            rec = cell.recurrent(params, carry)
            if keep and fused:  # store what the cell's own backward step reads instead of rec
                new, h, rec = cell.step_saving(params, carry, u, rec)
            else:
                new, h = step_fn(params, carry, u, rec)
            if m is not None:
                new = tree_where(m, new, carry)
            return new, ((h, carry, rec) if keep else h)

        return loop(body, params, reset_carry, carry0, (us, mask, resets))

    @jax.custom_vjp
    def run(params, carry0, us, mask, resets, reset_carry):
        got = None if infer is None else infer(params, carry0, us, mask, resets, reset_carry)
        carry, hs = forward(params, carry0, us, mask, resets, reset_carry, keep=False) if got is None else got
        return hs, carry

    def run_fwd(params, carry0, us, mask, resets, reset_carry):
        carry, (hs, carries, recs) = forward(params, carry0, us, mask, resets, reset_carry, keep=True)
        return (hs, carry), (params, carries, recs, us, mask, resets, reset_carry, carry0)

    def run_bwd(res, cts):
        params, carries, recs, us, mask, resets, reset_carry, carry0 = res
        dhs, dcarry_T = cts
        T, B = jax.tree.leaves(us)[0].shape[:2]
        dcarry_T = jax.tree.map(lambda x, c: c if _is_float(x) else None, carry0, dcarry_T)
        dreset0 = None if resets is None else _float_zeros(reset_carry)

        def body(params, _, state, x):
            dcarry, dreset = state
            carry, u, rec, dh, m, r = x
            dnew = dcarry
            if m is not None:  # a padded step passes the carry through
                dnew = _keep(m, dcarry)
            if fused:  # rec holds the step's saved activations
                dc, du, own_drec, *pieces = cell.step_backward(params, carry, rec, dnew, dh)
                # None: d rec is d u (pre = u + rec), stored once
                drec = cell.recurrent_cotangent(du) if own_drec is None else own_drec
            else:
                dc, du, drec = _pull(lambda c, u, rec: step_fn(params, c, u, rec), (dnew, dh), carry, u, rec)
            if rec is not None:
                dc = _add(dc, _pull(lambda c: cell.recurrent(params, c), drec, carry)[0])
            if m is not None:
                dc = _add(dc, _drop(m, dcarry))
            if r is not None:  # the carry before step t was the reset carry
                dreset = _add(dreset, _keep(r, dc))
                dc = _drop(r, dc)
            if fused:  # no d new carry to keep: the step's own parameters (if any) take pieces
                return (dc, dreset), (du, own_drec, pieces[0] if pieces else None)
            return (dc, dreset), (du, drec, dnew)

        step_dparams = None  # the step's own parameters' gradients, from backward_fn
        if backward_fn is not None:  # no resets: forward_fn took none
            dcarry0, dus, own_drecs, step_dparams = backward_fn(params, carries, recs, us, dhs, mask, dcarry_T)
            dreset, ys = None, (dus, own_drecs, None)
        else:
            (dcarry0, dreset), ys = loop(  # a fused step reads no u
                body, params, None, (dcarry_T, dreset0), (carries, None if fused else us, recs, dhs, mask, resets),
                reverse=True
            )

        # parameter gradients for all steps at once: the T*B rows as one batch
        n = T * B
        c_all = _flat(carries, n)
        if fused or backward_fn is not None:
            dus, own_drecs, pieces = ys
            drecs = cell.recurrent_cotangent(dus) if own_drecs is None else own_drecs
            if not project:  # a float32 d pre, for inputs given in half precision (projected=True)
                dus = jax.tree.map(lambda d, u: d.astype(u.dtype), dus, us)
            # a step with parameters of its own (the layer-norm LSTM's) sums its pieces here
            if step_dparams is not None:
                dparams = step_dparams
            elif pieces is not None:
                dparams = cell.param_grads(params, recs, pieces)
            else:
                dparams = jax.tree.map(jnp.zeros_like, params)
        else:
            dus, drecs, dnews = ys
            u_all, rec_all = _flat(us, n), _flat(recs, n)
            out, pull = jax.vjp(lambda p: step_fn(p, c_all, u_all, rec_all), params)
            (dparams,) = pull(_full_cotangent(out, (_flat(dnews, n), _flat(dhs, n))))
        if recs is not None:
            _, pull_rec = jax.vjp(lambda p: cell.recurrent(p, c_all), params)
            (dp_rec,) = pull_rec(_flat(drecs, n))
            dparams = jax.tree.map(jnp.add, dparams, dp_rec)
        if project:  # us holds the raw inputs: d W_x (and the rest of project) and d xs
            _, pull_proj = jax.vjp(lambda p, x: cell.project(p, x), params, us)
            dp_proj, dus = pull_proj(dus)
            dparams = jax.tree.map(jnp.add, dparams, dp_proj)

        dreset_out = None
        if reset_carry is not None:
            dreset = _float_zeros(reset_carry) if dreset is None else dreset
            dreset_out = jax.tree.map(_cotangent, reset_carry, dreset)
        float0_like = lambda a: None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)
        return (dparams, jax.tree.map(_cotangent, carry0, dcarry0), dus, float0_like(mask),
                float0_like(resets), dreset_out)

    run.defvjp(run_fwd, run_bwd)
    return run
