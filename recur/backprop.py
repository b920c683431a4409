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
so kept out of the backward loop. Steps must treat batch rows independently (every recur cell
does). Integer carry leaves (a step counter) are carried but not differentiated. Masked
(padded) steps, resets and reset carries are handled as in recur.scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _where(mask_B, a, b):
    return jnp.where(jnp.reshape(mask_B, mask_B.shape + (1,) * (a.ndim - 1)), a, b)


def _is_float(x):
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _zeros_like_float(tree):
    return jax.tree.map(lambda x: jnp.zeros_like(x) if _is_float(x) else None, tree)


def _add(a, b):
    return jax.tree.map(lambda x, y: x if y is None else (y if x is None else x + y), a, b,
                        is_leaf=lambda x: x is None)


def _flat(tree, n):
    """Merge the two leading axes [T, B, ...] -> [T*B, ...]."""
    return jax.tree.map(lambda x: jnp.reshape(x, (n,) + x.shape[2:]), tree)


def _diff_vjp(fn, carry, *args):
    """jax.vjp of fn(carry, *args) with respect to the float leaves of carry and args.

    Returns (outputs, pullback); the pullback takes cotangents for the outputs' float leaves
    (None for integer leaves) and returns (dcarry, *dargs) with None at integer leaves.
    """
    leaves, treedef = jax.tree.flatten(carry)
    floats = [i for i, x in enumerate(leaves) if _is_float(x)]

    def f(float_leaves, *args):
        full = list(leaves)
        for i, x in zip(floats, float_leaves):
            full[i] = x
        return fn(jax.tree.unflatten(treedef, full), *args)

    out, pull = jax.vjp(f, [leaves[i] for i in floats], *args)
    out_leaves, out_def = jax.tree.flatten(out)

    def pullback(ct):
        ct_leaves = jax.tree.leaves(ct, is_leaf=lambda x: x is None)
        full_ct = [
            c if _is_float(o) else jnp.zeros(o.shape, jax.dtypes.float0)
            for o, c in zip(out_leaves, ct_leaves)
        ]
        grads = pull(jax.tree.unflatten(out_def, full_ct))
        dfloat, dargs = grads[0], grads[1:]
        dcarry = [None] * len(leaves)
        for i, g in zip(floats, dfloat):
            dcarry[i] = g
        return (jax.tree.unflatten(treedef, dcarry),) + tuple(dargs)

    return out, pullback


def deferred_scan(cell, unroll: int = 1, backward_unroll: int | None = None):
    """f(params, carry0, us_T, mask_T, resets_T, reset_carry) -> (hs_T, final carry).

    Time-major inputs: us_T [T, B, ...], mask_T / resets_T [T, B] bools or None. Same values as
    the autodiff scan in recur.scan, with the custom backward pass described above.
    """

    def step_fn(params, carry, u, rec):
        return cell.step(params, carry, u, rec) if rec is not None else cell.step(params, carry, u)

    def forward(params, carry0, us, mask, resets, reset_carry, keep):
        def body(carry, x):
            u, m, r = x
            if r is not None:
                carry = jax.tree.map(lambda a, b: _where(r, a, b), reset_carry, carry)
            rec = cell.recurrent(params, carry)
            new, h = step_fn(params, carry, u, rec)
            if m is not None:
                new = jax.tree.map(lambda a, b: _where(m, a, b), new, carry)
            return new, ((h, carry, rec) if keep else h)

        return jax.lax.scan(body, carry0, (us, mask, resets), unroll=unroll)

    @jax.custom_vjp
    def run(params, carry0, us, mask, resets, reset_carry):
        carry, hs = forward(params, carry0, us, mask, resets, reset_carry, keep=False)
        return hs, carry

    def run_fwd(params, carry0, us, mask, resets, reset_carry):
        carry, (hs, carries, recs) = forward(params, carry0, us, mask, resets, reset_carry, keep=True)
        return (hs, carry), (params, carries, recs, us, mask, resets, reset_carry, carry0)

    def run_bwd(res, cts):
        params, carries, recs, us, mask, resets, reset_carry, carry0 = res
        dhs, dcarry_T = cts
        T, B = jax.tree.leaves(us)[0].shape[:2]
        dcarry_T = jax.tree.map(lambda x, c: c if _is_float(x) else None, carry0, dcarry_T)
        dreset0 = None if resets is None else _zeros_like_float(reset_carry)

        def body(state, x):
            dcarry, dreset = state
            carry, u, rec, dh, m, r = x
            if m is not None:  # a padded step passes the carry through
                dnew = jax.tree.map(lambda d: None if d is None else _where(m, d, jnp.zeros_like(d)),
                                    dcarry, is_leaf=lambda d: d is None)
                dpass = jax.tree.map(lambda d: None if d is None else _where(m, jnp.zeros_like(d), d),
                                     dcarry, is_leaf=lambda d: d is None)
            else:
                dnew, dpass = dcarry, None
            _, pull = _diff_vjp(lambda c, u, rec: step_fn(params, c, u, rec), carry, u, rec)
            dc, du, drec = pull((dnew, dh))
            if rec is not None:
                _, pull_rec = _diff_vjp(lambda c: cell.recurrent(params, c), carry)
                (dc_rec,) = pull_rec(drec)
                dc = _add(dc, dc_rec)
            if dpass is not None:
                dc = _add(dc, dpass)
            if r is not None:  # the carry before step t was the reset carry
                keep = lambda d: None if d is None else _where(r, d, jnp.zeros_like(d))
                drop = lambda d: None if d is None else _where(r, jnp.zeros_like(d), d)
                dreset = _add(dreset, jax.tree.map(keep, dc, is_leaf=lambda d: d is None))
                dc = jax.tree.map(drop, dc, is_leaf=lambda d: d is None)
            return (dc, dreset), (du, drec, dnew)

        (dcarry0, dreset), (dus, drecs, dnews) = jax.lax.scan(
            body, (dcarry_T, dreset0), (carries, us, recs, dhs, mask, resets), reverse=True,
            unroll=unroll if backward_unroll is None else backward_unroll
        )

        # parameter gradients for all steps at once: the T*B rows as one batch
        n = T * B
        c_all, u_all, rec_all = _flat(carries, n), _flat(us, n), _flat(recs, n)
        dnew_all = jax.tree.map(lambda d: None if d is None else jnp.reshape(d, (n,) + d.shape[2:]),
                                dnews, is_leaf=lambda d: d is None)
        dh_all = jnp.reshape(dhs, (n,) + dhs.shape[2:])

        def step_params(p):
            return step_fn(p, c_all, u_all, rec_all)

        out, pull = jax.vjp(step_params, params)
        out_leaves, out_def = jax.tree.flatten(out)
        ct_leaves = jax.tree.leaves((dnew_all, dh_all), is_leaf=lambda x: x is None)
        ct = [c if _is_float(o) else jnp.zeros(o.shape, jax.dtypes.float0) for o, c in zip(out_leaves, ct_leaves)]
        (dparams,) = pull(jax.tree.unflatten(out_def, ct))
        if recs is not None:
            _, pull_rec = jax.vjp(lambda p: cell.recurrent(p, c_all), params)
            (dp_rec,) = pull_rec(_flat(drecs, n))
            dparams = jax.tree.map(jnp.add, dparams, dp_rec)

        def fill(x, d):  # integer carry leaves get float0 cotangents
            return d if _is_float(x) else jnp.zeros(x.shape, jax.dtypes.float0)

        dcarry0 = jax.tree.map(fill, carry0, dcarry0)
        dreset_out = None
        if reset_carry is not None:
            dreset_out = (jax.tree.map(fill, reset_carry, dreset, is_leaf=lambda d: d is None)
                          if dreset is not None else jax.tree.map(
                              lambda x: fill(x, jnp.zeros_like(x) if _is_float(x) else None), reset_carry))
        none_like = lambda a: None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)
        return dparams, dcarry0, dus, none_like(mask), none_like(resets), dreset_out

    run.defvjp(run_fwd, run_bwd)
    return run
