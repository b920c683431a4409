"""The linear recurrence s_t = a_t ⊙ s_{t-1} + b_t as a chunked Pallas kernel, forward and backward.

``lax.associative_scan`` reads and writes the whole [B, T, S] sequence about 2 log2(T) times.
Here each program owns a block of state units of one batch row and one chunk of L steps and
runs its chunk sequentially, keeping the state in registers:

1. (only when T > L) every chunk, in parallel, folds its L steps into one affine map
   s_out = P ⊙ s_in + Q (P the product of its a_t, Q its state from s_in = 0);
2. the n = T / L chunk maps are combined in order (an exclusive ``lax.associative_scan`` over
   [B, n, S], L times smaller than the sequence);
3. every chunk, in parallel, reruns its steps from its true entering state, writing s_t.

Inputs are read twice and the states written once: the memory traffic of a copy, not of
log2(T) copies. The backward pass is the same recurrence run in reverse on the cotangents g:
e_t = g_t + a_{t+1} ⊙ e_{t+1}, then db_t = e_t and da_t = e_t ⊙ s_{t-1}; the backward kernel
produces both in its final pass, reading a, g and s once more.

The initial state is 0: recur.scan folds the carry (and resets, and padding) into (a, b)
before calling this, as its associative scan does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

CHUNKS = (512, 256, 128, 64, 32)  # steps per chunk: the longest that divides T and leaves enough programs
#: programs wanted per pass: a program's steps run one after another, each waiting on its loads,
#: so short chunks over many programs hide that latency (the chunks' maps combine in log2 passes)
PROGRAMS = 2048
#: a fixed chunk length (a power of 2 in CHUNKS) instead of the rule above, for measurements
CHUNK = None


def _chunk(T, rows=1):
    """Steps per chunk for T steps and ``rows`` programs per chunk (batch x state blocks)."""
    fits = [L for L in CHUNKS if T > L and T % L == 0 and (CHUNK is None or L == CHUNK)]
    for L in fits:
        if rows * (T // L) >= PROGRAMS:
            return L
    return fits[-1] if fits else T


def _block_s(S):
    for s in (128, 64, 32, 16):
        if S % s == 0:
            return s
    return S


def _call(kernel, outs, grid, in_specs, out_specs, interpret, args):
    kw = {}
    if not interpret:
        from recur.kernels.loop import _triton_params

        kw["compiler_params"] = _triton_params(4)
    return pl.pallas_call(kernel, out_shape=outs, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          interpret=interpret, **kw)(*args)


def _seq_spec(T, Sb):
    """Program (b, j, c) sees row b, all T steps, state units [j*Sb, (j+1)*Sb)."""
    return pl.BlockSpec((1, T, Sb), lambda b, j, c: (b, 0, j))


def _chunk_spec(Sb):
    """Program (b, j, c) sees entry [b, c, j-block] of a [B, n, S] per-chunk array."""
    return pl.BlockSpec((1, 1, Sb), lambda b, j, c: (b, c, j))


def _step_t(c, i, L, reverse):
    """The time index of step i of chunk c (chunks of L steps), read backwards with reverse."""
    return c * L + (L - 1 - i if reverse else i)


def _entering(a, x, coef, reverse, acc, interpret):
    """Each chunk's entering value [B, n, S] of v_t = coef(a_ref, t) * v_{t-/+1} + x_t, v = 0 outside.

    Passes 1 and 2 of the module docstring: every chunk folded into an affine map (P, Q), in
    parallel, then the maps combined in time order (reverse: from the last chunk back).
    """
    B, T, S = x.shape
    Sb = _block_s(S)
    L = _chunk(T, B * (S // Sb))
    n = T // L
    if n == 1:
        return jnp.zeros((B, 1, S), acc)

    def summary(a_ref, x_ref, p_ref, q_ref):
        c = pl.program_id(2)

        def body(i, pq):
            p, q = pq
            t = _step_t(c, i, L, reverse)
            k = coef(a_ref, t)
            return p * k, k * q + x_ref[0, t, :].astype(acc)

        p, q = jax.lax.fori_loop(0, L, body, (jnp.ones((Sb,), acc), jnp.zeros((Sb,), acc)))
        p_ref[0, 0, :] = p
        q_ref[0, 0, :] = q

    chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
    P, Q = _call(summary, [chunk_shape, chunk_shape], (B, S // Sb, n), [_seq_spec(T, Sb)] * 2,
                 [_chunk_spec(Sb)] * 2, interpret, (a, x))
    return _combine(P, Q, reverse)


def _forward(a, b, interpret):
    B, T, S = b.shape
    acc = jnp.promote_types(b.dtype, jnp.float32)
    Sb = _block_s(S)
    L = _chunk(T, B * (S // Sb))
    coef = lambda a_ref, t: a_ref[0, t, :].astype(acc)
    s_in = _entering(a, b, coef, False, acc, interpret)

    def final(a_ref, b_ref, s_in_ref, out_ref):
        c = pl.program_id(2)

        def body(i, s):
            t = _step_t(c, i, L, False)
            s = coef(a_ref, t) * s + b_ref[0, t, :].astype(acc)
            out_ref[0, t, :] = s.astype(out_ref.dtype)
            return s

        jax.lax.fori_loop(0, L, body, s_in_ref[0, 0, :])

    spec = _seq_spec(T, Sb)
    return _call(final, jax.ShapeDtypeStruct((B, T, S), acc), (B, S // Sb, T // L),
                 [spec, spec, _chunk_spec(Sb)], spec, interpret, (a, b, s_in))


def _combine(P, Q, reverse):
    """Entering state of each chunk from the chunks' affine maps, [B, n, S] -> [B, n, S]: an
    exclusive associative scan over the chunks (log2(n) passes over arrays L times smaller than
    the sequence), in time order, or from the last chunk back with reverse."""
    def compose(first, then):
        (p1, q1), (p2, q2) = first, then
        return p2 * p1, p2 * q1 + q2

    if reverse:  # the scan runs from the last chunk; then "first" is the later chunk
        _, out = jax.lax.associative_scan(compose, (P, Q), reverse=True, axis=1)
        return jnp.concatenate([out[:, 1:], jnp.zeros_like(out[:, :1])], axis=1)
    _, out = jax.lax.associative_scan(compose, (P, Q), axis=1)
    return jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)


def _backward(a, s, g, interpret):
    """(da, db) for the cotangent g of the states s of the forward recurrence."""
    B, T, S = g.shape
    acc = s.dtype
    Sb = _block_s(S)
    L = _chunk(T, B * (S // Sb))

    def a_next(a_ref, t):
        # the coefficient that carries e_{t+1} back to step t; none after the last step
        at = a_ref[0, jnp.minimum(t + 1, T - 1), :].astype(acc)
        return jnp.where(t + 1 < T, at, jnp.zeros_like(at))

    e_in = _entering(a, g, a_next, True, acc, interpret)

    def final(a_ref, g_ref, s_ref, e_in_ref, da_ref, db_ref):
        c = pl.program_id(2)

        def body(i, e):
            t = _step_t(c, i, L, True)
            e = a_next(a_ref, t) * e + g_ref[0, t, :].astype(acc)
            prev = s_ref[0, jnp.maximum(t - 1, 0), :]
            prev = jnp.where(t > 0, prev, jnp.zeros_like(prev))
            db_ref[0, t, :] = e.astype(db_ref.dtype)
            da_ref[0, t, :] = (e * prev).astype(da_ref.dtype)
            return e

        jax.lax.fori_loop(0, L, body, e_in_ref[0, 0, :])

    spec = _seq_spec(T, Sb)
    return _call(final, [jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(g.shape, acc)],
                 (B, S // Sb, T // L), [spec, spec, spec, _chunk_spec(Sb)], [spec, spec], interpret,
                 (a, g, s, e_in))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_recurrence(a, b, interpret=True):
    """States s [B, T, S] of s_t = a_t ⊙ s_{t-1} + b_t, s_{-1} = 0 (a, b: [B, T, S]).

    s has dtype promote(b.dtype, float32). ``interpret=False`` compiles for the GPU.
    """
    return _forward(a, b, interpret)


def _fwd(a, b, interpret):
    s = _forward(a, b, interpret)
    return s, (a, s, jnp.zeros((), b.dtype))


def _bwd(interpret, res, g):
    a, s, b0 = res
    da, db = _backward(a, s, g.astype(s.dtype), interpret)
    return da, db.astype(b0.dtype)


linear_recurrence.defvjp(_fwd, _bwd)
