"""Linear cells with element-wise coefficients on a GPU: the chunked linear kernel with the cell's
coefficients computed inside it (the minGRU, the minLSTM and the LRU).

recur/kernels/linear.py scans s_t = a_t ⊙ s_{t-1} + b_t over coefficients (a, b) that XLA
computes beforehand, as [B, T, S] arrays, from the projected inputs. Here the kernels read the
projected inputs themselves, k gate blocks of S units per step (``cell.gate_operands``: us
[B, T, k S] for the minGRU, k = 2, and the minLSTM, k = 3; the LRU's γ ⊙ B x_t, k = 1, complex),
plus [S] vectors constant in time (the LRU's λ), and compute (a_t, b_t) one step at a time in
registers (``cell.block_coefficients(*consts, *blocks)``), so a and b never reach memory. The
backward kernel recomputes them and writes d us directly (their derivative by ``jax.vjp``,
traced into the kernel; for complex values, whose parts it runs on, conjugated in and out so
that the cotangents follow JAX's convention) and each chunk's sum of the consts' cotangents. The
padding mask, the resets and the initial state enter the kernels too (a padded step passes the
state through: a = 1, b = 0), instead of being folded into (a, b) by XLA.

Memory traffic of a training step in [B, T, S] arrays, for the minGRU (us counts 2):

==============================  =====================================  ==========================
pass                            linear.py on (a, b)                    here, on us
==============================  =====================================  ==========================
gates                           read us 2, write a, b 2                (inside the kernels)
forward summary, final pass     read a, b 2 + 2, write s 1             read us 2 + 2, write s 1
backward summary, final pass    read a, g 2, read a, g, s 3,           read us's z block, g 2,
                                write da, db 2                         read us, g, s 4, write d us 2
gates' backward                 read us, da, db 4, write d us 2        (inside the kernels)
total                           22                                     13
==============================  =====================================  ==========================

For the LRU (complex arrays) linear.py moves 12 plus XLA's broadcast of λ to [B, T, S] and its
sum of d a; here 7 (a is λ: nothing to read for it).

(the summaries run only when T is longer than one chunk; the backward summary reads only the
blocks that a depends on: the compiler drops the other loads). The chunking is linear.py's:
every chunk folds its steps into an affine map, the maps are combined in order by an
associative scan over [B, n, S], and every chunk reruns from its true entering state; the
initial state enters that combination, and the backward kernel returns the cotangent of each
chunk's entering state (the first chunk's is d s0).

Applies (:func:`operands`) to cells whose ``gate_operands`` is not None, with floating-point
inputs and state; recur.scan takes it for ``impl == "linear"``. Resets enter as flags too: at a
reset step the state restarts from the reset carry (a' = 0, b' = a rc + b, computed in the step,
so the chunking is unchanged), and the backward kernel sums the reset carry's cotangent per
chunk.
``ENABLED = False`` runs linear.py instead, for side-by-side measurements.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from recur.kernels import linear as lin

#: False: recur.scan runs linear.py on XLA's (a, b) even where this kernel applies (benchmarks)
ENABLED = True


def operands(cell, params, us, carry0):
    """(blocks [B, T, k S], consts) for :func:`gated_recurrence` when recur.scan's linear kernel
    path can run this scan here, else None: the cell computes its coefficients element-wise
    (``cell.gate_operands`` not None: the minGRU, the minLSTM, the LRU) and its inputs and state
    are floating-point (real or complex)."""
    ops = cell.gate_operands(params, us) if ENABLED else None
    inexact = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    if ops is None or not inexact(carry0) or not all(inexact(x) for x in (ops[0], *ops[1])):
        return None
    return ops


def gated_recurrence(us, s0, mask, consts, cell, interpret=True, resets=None, reset_carry=None):
    """States s [B, T, S] of s_t = a_t ⊙ s_{t-1} + b_t with s_{-1} = s0 [B, S], where
    (a_t, b_t) = cell.block_coefficients(*consts, *gate blocks of us_t), us [B, T, k S] holding
    k gate blocks of S units and consts a tuple of [S] vectors constant in time (the LRU's λ);
    mask [B, T] (bool or float; None: every step is real) marks the real steps, across the others
    the state passes through; resets [B, T] (None: none) marks the steps where the state restarts
    from reset_carry [B, S] (s_t = a_t ⊙ reset_carry + b_t; a padded step stays padded). s is
    in promote(s0.dtype, float32) (complex for complex inputs). ``interpret=False`` compiles for
    the GPU."""
    B, T, G = us.shape
    S = s0.shape[-1]
    if T == 0 or G % S or s0.shape != (B, S):
        raise ValueError(f"gated_recurrence: us {us.shape} must be [B, T > 0, k * S] for s0 {s0.shape} [B, S]")
    acc = _acc(s0)
    part = lin._part(acc)
    for name, flags in (("mask", mask), ("resets", resets)):
        if flags is not None and flags.shape != (B, T):
            raise ValueError(f"gated_recurrence: {name} has shape {flags.shape}, not [B, T] = {(B, T)}")
    if (resets is None) != (reset_carry is None) or (reset_carry is not None and reset_carry.shape != (B, S)):
        raise ValueError(f"gated_recurrence: resets need a reset_carry [B, S] = {(B, S)} and the reverse; got "
                         f"resets {None if resets is None else resets.shape}, reset_carry "
                         f"{None if reset_carry is None else reset_carry.shape}")
    for i, c in enumerate(consts):
        if c.shape != (S,):
            raise ValueError(f"gated_recurrence: consts[{i}] has shape {c.shape}, not [S] = {(S,)}")
    opt = _Optional(None if mask is None else mask.astype(part),
                    jnp.stack([c.astype(acc) for c in consts]) if consts else None,
                    None if resets is None else resets.astype(part),
                    None if reset_carry is None else reset_carry.astype(acc))
    return _gated(us, s0, opt, cell, interpret)


@jax.tree_util.register_pytree_node_class
class _Optional:
    """The kernels' optional inputs, each None or an array: the mask [B, T], the consts [c, S]
    (stacked), the resets [B, T] and the reset carry [B, S]."""

    FIELDS = ("mask", "consts", "resets", "reset_carry")

    def __init__(self, mask, consts, resets, reset_carry):
        self.mask, self.consts, self.resets, self.reset_carry = mask, consts, resets, reset_carry

    def present(self):
        return [f for f in self.FIELDS if getattr(self, f) is not None]

    def tree_flatten(self):
        return tuple(getattr(self, f) for f in self.FIELDS), None

    @classmethod
    def tree_unflatten(cls, _, leaves):
        return cls(*leaves)


def _acc(s0):
    return jnp.promote_types(s0.dtype, jnp.float32)


def _conj(x):
    """The conjugate of a kernel value (a :class:`linear._Cx`); a real array as it is."""
    return lin._Cx(x.re, -x.im) if isinstance(x, lin._Cx) else x


def _pick(cond, x, y):
    """x where cond, else y (arrays or :class:`linear._Cx` values)."""
    return jax.tree.map(lambda u, v: jnp.where(cond, u, v), x, y)


class _Gate:
    """Gate block i of a [1, T, k, Sb] ref, read and written as a [1, T, Sb] ref would be (what
    linear._load_rows and linear._store_rows take)."""

    def __init__(self, ref, i):
        self.ref, self.i = ref, i

    @property
    def dtype(self):
        return self.ref.dtype

    def __getitem__(self, idx):
        n, t, s = idx
        return self.ref[n, t, self.i, s]

    def __setitem__(self, idx, value):
        n, t, s = idx
        self.ref[n, t, self.i, s] = value


class _Steps:
    """Reads steps of us (with the mask and resets) in one program of the kernels below and turns
    them into coefficients; the consts' rows and the reset carry's are read once."""

    def __init__(self, cell, k, refs, T, acc, Sb):
        self.cell, self.k, self.T, self.acc, self.Sb = cell, k, T, acc, Sb
        self.us_ref, self.m_ref, c_ref, self.r_ref, rc_ref = refs
        self.part = lin._part(acc)
        self.consts = () if c_ref is None else tuple(c_ref[i, :].astype(self.part) for i in range(c_ref.shape[0]))
        self.rc = None if rc_ref is None else rc_ref[0, :].astype(self.part)

    def full(self, value):
        return lin._full(value, self.Sb, self.acc)

    def rows(self, t0, K):
        """Steps t0 .. t0+K-1: K pairs (the k gate blocks' rows [Sb], (the mask value, the reset
        value), each None where there is none)."""
        blocks = [lin._load_rows(_Gate(self.us_ref, i), t0, K, self.part) for i in range(self.k)]
        flag = lambda ref, i: None if ref is None else ref[0, t0 + i]
        return [(tuple(b[i] for b in blocks), (flag(self.m_ref, i), flag(self.r_ref, i))) for i in range(K)]

    def coefficients(self, blocks, flags, consts=None, rc=None):
        """(a_t, b_t) of a step from its blocks and flags; consts and the reset carry's row as
        given (to differentiate by them), else as read."""
        a, b = self.cell.block_coefficients(*(self.consts if consts is None else consts), *blocks)
        m, r = flags
        if r is not None:  # a restart from the reset carry: a = 0, b = a rc + b
            restart, rc = r > 0, (self.rc if rc is None else rc)
            a, b = _pick(restart, self.full(0.0), a), _pick(restart, a * rc + b, b)
        if m is not None:  # a padded step: a = 1, b = 0
            real = m > 0
            a, b = _pick(real, a, self.full(1.0)), _pick(real, b, self.full(0.0))
        return a, b

    def a_at(self, t):
        """a_t, which carries step t's cotangent back to step t - 1; 0 for t = T."""
        (step,) = self.rows(jnp.minimum(t, self.T - 1), 1)
        return lin._where(t < self.T, self.coefficients(*step)[0])

    def cotangents(self, blocks, flags, da, db):
        """(a_t, cotangents of the consts, of the reset carry's row (None without resets), of
        the blocks) for the cotangents (da, db) of (a_t, b_t). jax.vjp runs on real numbers (a
        complex value is a pair of parts), whose transpose conjugates where JAX's complex
        cotangents do not: conjugating in and out gives JAX's."""
        (a_t, _), vjp = jax.vjp(lambda cs, rc, bl: self.coefficients(bl, flags, cs, rc), self.consts, self.rc,
                                blocks)
        d_consts, d_rc, d_blocks = jax.tree.map(_conj, vjp((_conj(da), _conj(db))),
                                                is_leaf=lambda x: isinstance(x, lin._Cx))
        return a_t, d_consts, d_rc, d_blocks


def _layout(us, s0, opt):
    """Shapes, tiling, the grid, the inputs every kernel reads first (us as [B, T, k, S], then
    those of the optional inputs that are present) and their specs."""
    B, T, G = us.shape
    S = s0.shape[-1]
    k = G // S
    acc = _acc(s0)
    Sb, L, K = lin._tiling(B, T, S, acc)
    specs = [pl.BlockSpec((1, T, k, Sb), lambda b, j, c: (b, 0, 0, j))]
    ins = [jnp.reshape(us, (B, T, k, S))]
    spec = {"mask": pl.BlockSpec((1, T), lambda b, j, c: (b, 0)),
            "consts": opt.consts is not None and pl.BlockSpec((opt.consts.shape[0], Sb), lambda b, j, c: (0, j)),
            "resets": pl.BlockSpec((1, T), lambda b, j, c: (b, 0)),
            "reset_carry": pl.BlockSpec((1, Sb), lambda b, j, c: (b, j))}
    for name in opt.present():
        specs.append(spec[name])
        ins.append(getattr(opt, name))
    return B, T, S, k, acc, Sb, L, K, T // L, (B, S // Sb, T // L), ins, specs


def _split_refs(refs, opt):
    """((us_ref, then the ref of each optional input or None), the rest) of a kernel's refs."""
    refs = list(refs)
    first = [refs.pop(0)] + [refs.pop(0) if getattr(opt, f) is not None else None for f in opt.FIELDS]
    return first, refs


def _forward(us, s0, opt, cell, interpret):
    B, T, S, k, acc, Sb, L, K, n, grid, ins, specs = _layout(us, s0, opt)
    s0_acc = s0.astype(acc)

    if n == 1:
        s_in = s0_acc[:, None, :]
    else:
        def summary(*refs):
            first, (p_ref, q_ref) = _split_refs(refs, opt)
            steps, c = _Steps(cell, k, first, T, acc, Sb), pl.program_id(2)

            def body(j, pq):
                p, q = pq
                for blocks, flags in steps.rows(c * L + j * K, K):
                    a_t, b_t = steps.coefficients(blocks, flags)
                    p, q = p * a_t, a_t * q + b_t
                return p, q

            p, q = jax.lax.fori_loop(0, L // K, body, (steps.full(1.0), steps.full(0.0)))
            p_ref[0, 0, :] = p
            q_ref[0, 0, :] = q

        chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
        P, Q = lin._call(summary, [chunk_shape, chunk_shape], grid, specs,
                         [lin._chunk_spec(Sb)] * 2, interpret, ins)
        s_in = lin._combine(P, Q, False, start=s0_acc)

    def final(*refs):
        first, (s_in_ref, out_ref) = _split_refs(refs, opt)
        steps, c = _Steps(cell, k, first, T, acc, Sb), pl.program_id(2)

        def body(j, s):
            t0 = c * L + j * K
            outs = []
            for blocks, flags in steps.rows(t0, K):
                a_t, b_t = steps.coefficients(blocks, flags)
                s = a_t * s + b_t
                outs.append(s)
            lin._store_rows(out_ref, t0, outs)
            return s

        jax.lax.fori_loop(0, L // K, body, s_in_ref[0, 0, :])

    return lin._call(final, jax.ShapeDtypeStruct((B, T, S), acc), grid,
                     specs + [lin._chunk_spec(Sb)], lin._seq_spec(T, Sb), interpret,
                     ins + [s_in])


def _backward(us, s0, opt, s, g, cell, interpret):
    """(d us, d s0, d consts or None, d reset carry or None) for the cotangent g of the states s."""
    B, T, S, k, acc, Sb, L, K, n, grid, ins, specs = _layout(us, s0, opt)
    seq = lin._seq_spec(T, Sb)
    part = lin._part(acc)

    if n == 1:
        e_in = jnp.zeros((B, 1, S), acc)
    else:
        def summary(*refs):
            first, (g_ref, p_ref, q_ref) = _split_refs(refs, opt)
            steps, c = _Steps(cell, k, first, T, acc, Sb), pl.program_id(2)

            def body(j, pqa):
                p, q, after = pqa  # after: a_{t+1} for the step t about to run
                t0 = c * L + L - (j + 1) * K
                rows, g_rows = steps.rows(t0, K), lin._load_rows(g_ref, t0, K, part)
                for i in reversed(range(K)):
                    p, q, after = p * after, after * q + g_rows[i], steps.coefficients(*rows[i])[0]
                return p, q, after

            init = (steps.full(1.0), steps.full(0.0), steps.a_at(c * L + L))
            p, q, _ = jax.lax.fori_loop(0, L // K, body, init)
            p_ref[0, 0, :] = p
            q_ref[0, 0, :] = q

        chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
        P, Q = lin._call(summary, [chunk_shape, chunk_shape], grid, specs + [seq],
                         [lin._chunk_spec(Sb)] * 2, interpret, ins + [g])
        e_in = lin._combine(P, Q, reverse=True)

    nc = 0 if opt.consts is None else opt.consts.shape[0]
    resets = opt.resets is not None

    def final(*refs):
        first, rest = _split_refs(refs, opt)
        s0_ref, s_ref, g_ref, e_in_ref, du_ref, d_in_ref = rest[:6]
        steps, c = _Steps(cell, k, first, T, acc, Sb), pl.program_id(2)
        s0_row = s0_ref[0, :].astype(part)

        def body(j, carry):
            e, after, dcs, drc = carry  # after: a_{t+1}, which carries e_{t+1} back to step t
            t0 = c * L + L - (j + 1) * K
            rows, g_rows = steps.rows(t0, K), lin._load_rows(g_ref, t0, K, part)
            s_rows = lin._load_rows(s_ref, t0, K, part) if K > 1 else []
            before = _pick(t0 > 0, s_ref[0, jnp.maximum(t0 - 1, 0), :].astype(part), s0_row)  # s_{t0-1}
            prev = [before] + s_rows[:-1]
            du = [[None] * K for _ in range(k)]
            for i in reversed(range(K)):
                e = after * e + g_rows[i]
                # (d a_t, d b_t) = (e_t s_{t-1}, e_t)
                after, d_consts, d_rc, d_blocks = steps.cotangents(*rows[i], e * prev[i], e)
                dcs = tuple(x + d for x, d in zip(dcs, d_consts))
                drc = drc if d_rc is None else drc + d_rc
                for gate, d in enumerate(d_blocks):
                    du[gate][i] = d
            for gate in range(k):
                lin._store_rows(_Gate(du_ref, gate), t0, du[gate])
            return e, after, dcs, drc

        init = (e_in_ref[0, 0, :], steps.a_at(c * L + L), tuple(steps.full(0.0) for _ in range(nc)),
                steps.full(0.0) if resets else None)
        e, after, dcs, drc = jax.lax.fori_loop(0, L // K, body, init)
        d_in_ref[0, 0, :] = after * e  # a_{cL} e_{cL}: the cotangent of the state entering chunk c
        more = iter(rest[6:])
        if nc:
            dc_ref = next(more)
            for i, d in enumerate(dcs):  # this chunk's sums of the consts' cotangents
                dc_ref[0, 0, i, :] = d
        if resets:  # and of the reset carry's
            next(more)[0, 0, :] = drc

    outs = [jax.ShapeDtypeStruct((B, T, k, S), us.dtype), jax.ShapeDtypeStruct((B, n, S), acc)]
    out_specs = [specs[0], lin._chunk_spec(Sb)]
    if nc:
        outs.append(jax.ShapeDtypeStruct((B, n, nc, S), acc))
        out_specs.append(pl.BlockSpec((1, 1, nc, Sb), lambda b, j, c: (b, c, 0, j)))
    if resets:
        outs.append(jax.ShapeDtypeStruct((B, n, S), acc))
        out_specs.append(lin._chunk_spec(Sb))
    res = lin._call(final, outs, grid,
                    specs + [pl.BlockSpec((1, Sb), lambda b, j, c: (b, j)), seq, seq, lin._chunk_spec(Sb)],
                    out_specs, interpret, ins + [s0, s, g.astype(acc), e_in])
    more = iter(res[2:])
    d_consts = jnp.sum(next(more), axis=(0, 1)).astype(opt.consts.dtype) if nc else None
    d_rc = jnp.sum(next(more), axis=1).astype(opt.reset_carry.dtype) if resets else None
    return jnp.reshape(res[0], us.shape), res[1][:, 0].astype(s0.dtype), d_consts, d_rc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated(us, s0, opt, cell, interpret):
    return _forward(us, s0, opt, cell, interpret)


def _fwd(us, s0, opt, cell, interpret):
    s = _forward(us, s0, opt, cell, interpret)
    return s, (us, s0, opt, s)


def _bwd(cell, interpret, res, g):
    us, s0, opt, s = res
    dus, ds0, d_consts, d_rc = _backward(us, s0, opt, s, g, cell, interpret)
    zeros = lambda x: None if x is None else jnp.zeros_like(x)
    return dus, ds0, _Optional(zeros(opt.mask), d_consts, zeros(opt.resets), d_rc)


_gated.defvjp(_fwd, _bwd)
