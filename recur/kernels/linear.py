"""The linear recurrence s_t = a_t ⊙ s_{t-1} + b_t as a chunked Pallas kernel, forward and backward.

``lax.associative_scan`` reads and writes the whole [B, T, S] sequence about 2 log2(T) times.
Here each program owns a block of state units of one batch row and one chunk of L steps and
runs its chunk sequentially, keeping the state in registers:

1. (only when T > L) every chunk, in parallel, folds its L steps into one affine map
   s_out = P ⊙ s_in + Q (P the product of its a_t, Q its state from s_in = 0);
2. the n = T / L chunk maps are combined in order (an exclusive ``lax.associative_scan`` over
   [B, n, S], L times smaller than the sequence);
3. every chunk, in parallel, reruns its steps from its true entering state, writing s_t.

Each program walks its chunk one step after another; ``STEP_BLOCK`` > 1 makes it load (and
store) that many steps at once as one [STEP_BLOCK, Sb] block, split into rows in registers, so
fewer loads wait in turn (not yet measured on a GPU; 1 is the measured form).

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
#: steps each program loads (and stores) at once, as one [STEP_BLOCK, Sb] block split in
#: registers; 1 loads a row per step (the form measured on a GPU so far, docs/benchmarks.md)
STEP_BLOCK = 1


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


def _tiling(B, T, S):
    """(Sb, L, K) for [B, T, S] sequences: state units per program, steps per chunk, and steps a
    program loads at once (STEP_BLOCK where it divides the chunk, else 1)."""
    Sb = _block_s(S)
    L = _chunk(T, B * (S // Sb))
    return Sb, L, (STEP_BLOCK if STEP_BLOCK > 1 and L % STEP_BLOCK == 0 else 1)


def _load_rows(ref, t0, K, acc):
    """Rows t0 .. t0+K-1 of a [1, T, Sb] block as K arrays [Sb]: one load of [K, Sb], split in
    registers by transpose and halving (what Triton lowers; recur.cells.base.split)."""
    if K == 1:
        return [ref[0, t0, :].astype(acc)]
    from recur.cells.base import halved

    block = jnp.transpose(ref[0, pl.ds(t0, K), :].astype(acc))  # [Sb, K]
    return [jnp.reshape(part, part.shape[:-1]) for part in halved(block, K)]


def _store_rows(ref, t0, rows):
    """Write K arrays [Sb] as rows t0 .. t0+K-1 of a [1, T, Sb] block, in one store."""
    if len(rows) == 1:
        ref[0, t0, :] = rows[0].astype(ref.dtype)
        return
    from recur.kernels.loop import _join

    block = _join([jnp.reshape(r, r.shape + (1,)) for r in rows])  # [Sb, K]
    ref[0, pl.ds(t0, len(rows)), :] = jnp.transpose(block).astype(ref.dtype)


def _after(a_ref, t, T, acc):
    """a_t, the coefficient that carries step t's value back to step t - 1; 0 for t = T."""
    at = a_ref[0, jnp.minimum(t, T - 1), :].astype(acc)
    return jnp.where(t < T, at, jnp.zeros_like(at))


def _entering(a, x, reverse, acc, interpret):
    """Each chunk's entering value [B, n, S] of v_t = a_t * v_{t-1} + x_t (forward) or
    v_t = a_{t+1} * v_{t+1} + x_t (reverse; a_T = 0), v = 0 outside the sequence.

    Passes 1 and 2 of the module docstring: every chunk folded into an affine map (P, Q), in
    parallel, then the maps combined in time order (reverse: from the last chunk back).
    """
    B, T, S = x.shape
    Sb, L, K = _tiling(B, T, S)
    n = T // L
    if n == 1:
        return jnp.zeros((B, 1, S), acc)

    def summary(a_ref, x_ref, p_ref, q_ref):
        c = pl.program_id(2)
        one, zero = jnp.ones((Sb,), acc), jnp.zeros((Sb,), acc)
        if not reverse:
            def body(j, pq):
                p, q = pq
                t0 = c * L + j * K
                for a_t, x_t in zip(_load_rows(a_ref, t0, K, acc), _load_rows(x_ref, t0, K, acc)):
                    p, q = p * a_t, a_t * q + x_t
                return p, q

            p, q = jax.lax.fori_loop(0, L // K, body, (one, zero))
        else:
            def body(j, pqa):
                p, q, after = pqa  # after: a_{t+1} for the step t about to run
                t0 = c * L + L - (j + 1) * K
                a_rows, x_rows = _load_rows(a_ref, t0, K, acc), _load_rows(x_ref, t0, K, acc)
                for i in reversed(range(K)):
                    p, q, after = p * after, after * q + x_rows[i], a_rows[i]
                return p, q, after

            p, q, _ = jax.lax.fori_loop(0, L // K, body, (one, zero, _after(a_ref, c * L + L, T, acc)))
        p_ref[0, 0, :] = p
        q_ref[0, 0, :] = q

    chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
    P, Q = _call(summary, [chunk_shape, chunk_shape], (B, S // Sb, n), [_seq_spec(T, Sb)] * 2,
                 [_chunk_spec(Sb)] * 2, interpret, (a, x))
    return _combine(P, Q, reverse)


def _forward(a, b, interpret):
    B, T, S = b.shape
    acc = jnp.promote_types(b.dtype, jnp.float32)
    Sb, L, K = _tiling(B, T, S)
    s_in = _entering(a, b, False, acc, interpret)

    def final(a_ref, b_ref, s_in_ref, out_ref):
        c = pl.program_id(2)

        def body(j, s):
            t0 = c * L + j * K
            outs = []
            for a_t, b_t in zip(_load_rows(a_ref, t0, K, acc), _load_rows(b_ref, t0, K, acc)):
                s = a_t * s + b_t
                outs.append(s)
            _store_rows(out_ref, t0, outs)
            return s

        jax.lax.fori_loop(0, L // K, body, s_in_ref[0, 0, :])

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
    Sb, L, K = _tiling(B, T, S)
    e_in = _entering(a, g, True, acc, interpret)

    def final(a_ref, g_ref, s_ref, e_in_ref, da_ref, db_ref):
        c = pl.program_id(2)

        def body(j, ea):
            e, after = ea  # after: a_{t+1}, which carries e_{t+1} back to step t
            t0 = c * L + L - (j + 1) * K
            a_rows, g_rows = _load_rows(a_ref, t0, K, acc), _load_rows(g_ref, t0, K, acc)
            s_rows = _load_rows(s_ref, t0, K, acc) if K > 1 else []
            before = s_ref[0, jnp.maximum(t0 - 1, 0), :].astype(acc)  # s_{t0 - 1}; 0 before the start
            prev = [jnp.where(t0 > 0, before, jnp.zeros_like(before))] + s_rows[:-1]
            das, dbs = [None] * K, [None] * K
            for i in reversed(range(K)):
                e = after * e + g_rows[i]
                dbs[i], das[i], after = e, e * prev[i], a_rows[i]
            _store_rows(db_ref, t0, dbs)
            _store_rows(da_ref, t0, das)
            return e, after

        jax.lax.fori_loop(0, L // K, body, (e_in_ref[0, 0, :], _after(a_ref, c * L + L, T, acc)))

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
