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

Complex a and b (the LRU's diagonal recurrence): Triton has no complex numbers, so each complex
array enters and leaves the kernels as its real and imaginary parts, and the kernels' code runs
unchanged on :class:`_Cx` values, whose + and * are the complex ones (one load per part and
step: STEP_BLOCK is 1 for them). The backward formulas are the same: JAX's cotangents transpose
the products, without conjugation.
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


@jax.tree_util.register_pytree_node_class
class _Cx:
    """A complex value in a kernel as its real and imaginary float arrays; + and * are complex."""

    def __init__(self, re, im):
        self.re, self.im = re, im

    def __add__(self, other):
        return _Cx(self.re + other.re, self.im + other.im)

    def __mul__(self, other):
        return _Cx(self.re * other.re - self.im * other.im, self.re * other.im + self.im * other.re)

    def astype(self, dtype):
        return _Cx(self.re.astype(dtype), self.im.astype(dtype))

    def tree_flatten(self):
        return (self.re, self.im), None

    @classmethod
    def tree_unflatten(cls, _, parts):
        return cls(*parts)


class _CxRef:
    """The refs of a complex array's two parts, read and written as :class:`_Cx` values."""

    def __init__(self, re, im):
        self.re, self.im = re, im

    @property
    def dtype(self):
        return self.re.dtype

    @property
    def shape(self):
        return self.re.shape

    def __getitem__(self, idx):
        return _Cx(self.re[idx], self.im[idx])

    def __setitem__(self, idx, value):
        self.re[idx] = value.re
        self.im[idx] = value.im


def _is_complex(dtype):
    return jnp.issubdtype(dtype, jnp.complexfloating)


def _part(dtype):
    """The dtype a kernel computes in: a complex dtype's parts' (float32 for complex64)."""
    return jnp.finfo(dtype).dtype if _is_complex(dtype) else jnp.dtype(dtype)


def _full(value, n, dtype):
    """[n] of value in dtype (a complex dtype: a :class:`_Cx` of real value and 0)."""
    x = jnp.full((n,), value, _part(dtype))
    return _Cx(x, jnp.zeros_like(x)) if _is_complex(dtype) else x


def _where(cond, x):
    """x where cond, else 0 (x an array or a :class:`_Cx`)."""
    return jax.tree.map(lambda v: jnp.where(cond, v, jnp.zeros_like(v)), x)


def _call(kernel, outs, grid, in_specs, out_specs, interpret, args):
    """pallas_call with complex arrays among args and outs passed as their two parts: kernel sees
    a :class:`_CxRef` for each."""
    single = not isinstance(outs, (list, tuple))
    outs, out_specs = ([outs], [out_specs]) if single else (list(outs), list(out_specs))
    cx_in = [_is_complex(a.dtype) for a in args]
    cx_out = [_is_complex(o.dtype) for o in outs]
    twice = lambda items, flags: [x for x, c in zip(items, flags) for x in ((x, x) if c else (x,))]
    flat_args = [x for a, c in zip(args, cx_in) for x in ((jnp.real(a), jnp.imag(a)) if c else (a,))]
    flat_outs = twice([jax.ShapeDtypeStruct(o.shape, _part(o.dtype)) for o in outs], cx_out)

    def body(*refs):
        it = iter(refs)
        group = lambda flags: [_CxRef(next(it), next(it)) if c else next(it) for c in flags]
        ins = group(cx_in)
        kernel(*ins, *group(cx_out))

    kw = {}
    if not interpret:
        from recur.kernels.loop import _triton_params

        kw["compiler_params"] = _triton_params(4)
    res = iter(pl.pallas_call(body, out_shape=flat_outs, grid=grid, in_specs=twice(in_specs, cx_in),
                              out_specs=twice(out_specs, cx_out), interpret=interpret, **kw)(*flat_args))
    res = [jax.lax.complex(next(res), next(res)) if c else next(res) for c in cx_out]
    return res[0] if single else res


def _seq_spec(T, Sb):
    """Program (b, j, c) sees row b, all T steps, state units [j*Sb, (j+1)*Sb)."""
    return pl.BlockSpec((1, T, Sb), lambda b, j, c: (b, 0, j))


def _chunk_spec(Sb):
    """Program (b, j, c) sees entry [b, c, j-block] of a [B, n, S] per-chunk array."""
    return pl.BlockSpec((1, 1, Sb), lambda b, j, c: (b, c, j))


def _tiling(B, T, S, dtype):
    """(Sb, L, K) for [B, T, S] sequences: state units per program, steps per chunk, and steps a
    program loads at once (STEP_BLOCK where it divides the chunk, else 1; complex: 1)."""
    Sb = _block_s(S)
    L = _chunk(T, B * (S // Sb))
    return Sb, L, (STEP_BLOCK if STEP_BLOCK > 1 and L % STEP_BLOCK == 0 and not _is_complex(dtype) else 1)


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
    return _where(t < T, a_ref[0, jnp.minimum(t, T - 1), :].astype(acc))


def _entering(a, x, reverse, acc, interpret):
    """Each chunk's entering value [B, n, S] of v_t = a_t * v_{t-1} + x_t (forward) or
    v_t = a_{t+1} * v_{t+1} + x_t (reverse; a_T = 0), v = 0 outside the sequence.

    Passes 1 and 2 of the module docstring: every chunk folded into an affine map (P, Q), in
    parallel, then the maps combined in time order (reverse: from the last chunk back).
    """
    B, T, S = x.shape
    Sb, L, K = _tiling(B, T, S, acc)
    n = T // L
    if n == 1:
        return jnp.zeros((B, 1, S), acc)

    def summary(a_ref, x_ref, p_ref, q_ref):
        c = pl.program_id(2)
        one, zero = _full(1.0, Sb, acc), _full(0.0, Sb, acc)
        acc_ = _part(acc)
        if not reverse:
            def body(j, pq):
                p, q = pq
                t0 = c * L + j * K
                for a_t, x_t in zip(_load_rows(a_ref, t0, K, acc_), _load_rows(x_ref, t0, K, acc_)):
                    p, q = p * a_t, a_t * q + x_t
                return p, q

            p, q = jax.lax.fori_loop(0, L // K, body, (one, zero))
        else:
            def body(j, pqa):
                p, q, after = pqa  # after: a_{t+1} for the step t about to run
                t0 = c * L + L - (j + 1) * K
                a_rows, x_rows = _load_rows(a_ref, t0, K, acc_), _load_rows(x_ref, t0, K, acc_)
                for i in reversed(range(K)):
                    p, q, after = p * after, after * q + x_rows[i], a_rows[i]
                return p, q, after

            p, q, _ = jax.lax.fori_loop(0, L // K, body, (one, zero, _after(a_ref, c * L + L, T, acc_)))
        p_ref[0, 0, :] = p
        q_ref[0, 0, :] = q

    chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
    P, Q = _call(summary, [chunk_shape, chunk_shape], (B, S // Sb, n), [_seq_spec(T, Sb)] * 2,
                 [_chunk_spec(Sb)] * 2, interpret, (a, x))
    return _combine(P, Q, reverse)


def _forward(a, b, interpret):
    B, T, S = b.shape
    acc = jnp.promote_types(b.dtype, jnp.float32)
    Sb, L, K = _tiling(B, T, S, acc)
    s_in = _entering(a, b, False, acc, interpret)
    acc_ = _part(acc)

    def final(a_ref, b_ref, s_in_ref, out_ref):
        c = pl.program_id(2)

        def body(j, s):
            t0 = c * L + j * K
            outs = []
            for a_t, b_t in zip(_load_rows(a_ref, t0, K, acc_), _load_rows(b_ref, t0, K, acc_)):
                s = a_t * s + b_t
                outs.append(s)
            _store_rows(out_ref, t0, outs)
            return s

        jax.lax.fori_loop(0, L // K, body, s_in_ref[0, 0, :])

    spec = _seq_spec(T, Sb)
    return _call(final, jax.ShapeDtypeStruct((B, T, S), acc), (B, S // Sb, T // L),
                 [spec, spec, _chunk_spec(Sb)], spec, interpret, (a, b, s_in))


def _combine(P, Q, reverse, start=None):
    """Entering state of each chunk from the chunks' affine maps, [B, n, S] -> [B, n, S]: an
    exclusive associative scan over the chunks (log2(n) passes over arrays L times smaller than
    the sequence), in time order, or from the last chunk back with reverse. start [B, S]: the
    state entering the first chunk (forward only; None: 0)."""
    def compose(first, then):
        (p1, q1), (p2, q2) = first, then
        return p2 * p1, p2 * q1 + q2

    if reverse:  # the scan runs from the last chunk; then "first" is the later chunk
        _, out = jax.lax.associative_scan(compose, (P, Q), reverse=True, axis=1)
        return jnp.concatenate([out[:, 1:], jnp.zeros_like(out[:, :1])], axis=1)
    maps, out = jax.lax.associative_scan(compose, (P, Q), axis=1)
    if start is None:
        return jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
    # the maps of chunks 0..c composed, applied to start: the state after chunk c
    return jnp.concatenate([start[:, None], maps[:, :-1] * start[:, None] + out[:, :-1]], axis=1)


def _backward(a, s, g, interpret):
    """(da, db) for the cotangent g of the states s of the forward recurrence."""
    B, T, S = g.shape
    acc = s.dtype
    Sb, L, K = _tiling(B, T, S, acc)
    e_in = _entering(a, g, True, acc, interpret)
    acc_ = _part(acc)

    def final(a_ref, g_ref, s_ref, e_in_ref, da_ref, db_ref):
        c = pl.program_id(2)

        def body(j, ea):
            e, after = ea  # after: a_{t+1}, which carries e_{t+1} back to step t
            t0 = c * L + L - (j + 1) * K
            a_rows, g_rows = _load_rows(a_ref, t0, K, acc_), _load_rows(g_ref, t0, K, acc_)
            s_rows = _load_rows(s_ref, t0, K, acc_) if K > 1 else []
            before = s_ref[0, jnp.maximum(t0 - 1, 0), :].astype(acc_)  # s_{t0 - 1}; 0 before the start
            prev = [_where(t0 > 0, before)] + s_rows[:-1]
            das, dbs = [None] * K, [None] * K
            for i in reversed(range(K)):
                e = after * e + g_rows[i]
                dbs[i], das[i], after = e, e * prev[i], a_rows[i]
            _store_rows(db_ref, t0, dbs)
            _store_rows(da_ref, t0, das)
            return e, after

        jax.lax.fori_loop(0, L // K, body, (e_in_ref[0, 0, :], _after(a_ref, c * L + L, T, acc_)))

    spec = _seq_spec(T, Sb)
    return _call(final, [jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(g.shape, acc)],
                 (B, S // Sb, T // L), [spec, spec, spec, _chunk_spec(Sb)], [spec, spec], interpret,
                 (a, g, s, e_in))


def linear_recurrence(a, b, interpret=True):
    """States s [B, T, S] of s_t = a_t ⊙ s_{t-1} + b_t, s_{-1} = 0 (a, b: [B, T, S]).

    s has dtype promote(b.dtype, float32), complex where a or b is (both then enter the kernels
    complex; JAX takes the real part of a real input's cotangent). ``interpret=False`` compiles
    for the GPU.
    """
    if _is_complex(a.dtype) != _is_complex(b.dtype):
        cx = jnp.result_type(a.dtype, b.dtype, jnp.complex64)
        a, b = a.astype(cx), b.astype(cx)
    return _recurrence(a, b, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _recurrence(a, b, interpret):
    return _forward(a, b, interpret)


def _fwd(a, b, interpret):
    s = _forward(a, b, interpret)
    return s, (a, s, jnp.zeros((), b.dtype))


def _bwd(interpret, res, g):
    a, s, b0 = res
    da, db = _backward(a, s, g.astype(s.dtype), interpret)
    return da, db.astype(b0.dtype)


_recurrence.defvjp(_fwd, _bwd)
