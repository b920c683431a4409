"""minGRU / minLSTM on a GPU: the chunked linear kernel with the cell's gates computed inside it.

recur/kernels/linear.py scans s_t = a_t ⊙ s_{t-1} + b_t over coefficients (a, b) that XLA
computes beforehand from the projected inputs us [B, T, k S] (k gate blocks: 2 for the minGRU,
3 for the minLSTM). Here the kernels read us themselves and compute (a, b) one step at a time in
registers (``cell.block_coefficients``), so a and b never reach memory; the backward kernel
recomputes them from us and writes d us directly (the derivative of the gates by ``jax.vjp``,
traced into the kernel). The padding mask and the initial state enter the kernels too (a padded
step passes the state through: a = 1, b = 0), instead of being folded into (a, b) by XLA.

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

(the summaries run only when T is longer than one chunk; the backward summary reads only the
blocks that a depends on: the compiler drops the other loads). The chunking is linear.py's:
every chunk folds its steps into an affine map, the maps are combined in order by an
associative scan over [B, n, S], and every chunk reruns from its true entering state; the
initial state enters that combination, and the backward kernel returns the cotangent of each
chunk's entering state (the first chunk's is d s0).

Applies (:func:`applies`) to cells with ``block_coefficients`` (recur/cells/minrnn.py) and real
inputs and state; recur.scan takes it for ``impl == "linear"`` without resets (a reset restarts
the state from the reset carry mid-chunk: those scans fold it into (a, b) and run linear.py).
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


def applies(cell, carry0, us) -> bool:
    """Whether recur.scan's linear kernel path can run this scan here: a cell whose coefficients
    are element-wise in its gate blocks (``block_coefficients``), with real floating-point inputs
    and state. Resets are the caller's to exclude."""
    real = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    return ENABLED and hasattr(cell, "block_coefficients") and real(carry0) and real(us)


def gated_recurrence(us, s0, mask, cell, interpret=True):
    """States s [B, T, S] of s_t = a_t ⊙ s_{t-1} + b_t with s_{-1} = s0 [B, S], where
    (a_t, b_t) = cell.block_coefficients(*gate blocks of us_t) and us [B, T, k S] holds k gate
    blocks of S units; mask [B, T] (bool or float; None: every step is real) marks the real
    steps, across the others the state passes through. s is in promote(s0.dtype, float32).
    ``interpret=False`` compiles for the GPU."""
    B, T, G = us.shape
    S = s0.shape[-1]
    if T == 0 or G % S or s0.shape != (B, S):
        raise ValueError(f"gated_recurrence: us {us.shape} must be [B, T > 0, k * S] for s0 {s0.shape} [B, S]")
    if mask is not None:
        if mask.shape != (B, T):
            raise ValueError(f"gated_recurrence: mask has shape {mask.shape}, not [B, T] = {(B, T)}")
        mask = mask.astype(_acc(s0))
    return _gated(us, s0, mask, cell, interpret)


def _acc(s0):
    return jnp.promote_types(s0.dtype, jnp.float32)


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
    """Reads steps of us (and the mask) in one program of the kernels below and turns them into
    coefficients."""

    def __init__(self, cell, k, us_ref, m_ref, T, acc):
        self.cell, self.k, self.us_ref, self.m_ref, self.T, self.acc = cell, k, us_ref, m_ref, T, acc

    def rows(self, t0, K):
        """Steps t0 .. t0+K-1: K pairs (the k gate blocks' rows [Sb], the mask value or None)."""
        blocks = [lin._load_rows(_Gate(self.us_ref, i), t0, K, self.acc) for i in range(self.k)]
        masks = [None] * K if self.m_ref is None else [self.m_ref[0, t0 + i] for i in range(K)]
        return [(tuple(b[i] for b in blocks), masks[i]) for i in range(K)]

    def coefficients(self, blocks, m):
        a, b = self.cell.block_coefficients(*blocks)
        if m is None:
            return a, b
        real = m > 0  # a padded step: a = 1, b = 0
        return jnp.where(real, a, jnp.ones_like(a)), jnp.where(real, b, jnp.zeros_like(b))

    def a_at(self, t):
        """a_t, which carries step t's cotangent back to step t - 1; 0 for t = T."""
        (step,) = self.rows(jnp.minimum(t, self.T - 1), 1)
        return lin._where(t < self.T, self.coefficients(*step)[0])


def _layout(us, s0, mask):
    """Shapes, tiling, the grid, the inputs every kernel reads (us as [B, T, k, S], the mask)
    and their specs."""
    B, T, G = us.shape
    S = s0.shape[-1]
    k = G // S
    acc = _acc(s0)
    Sb, L, K = lin._tiling(B, T, S, acc)
    specs = [pl.BlockSpec((1, T, k, Sb), lambda b, j, c: (b, 0, 0, j))]
    ins = [jnp.reshape(us, (B, T, k, S))]
    if mask is not None:
        specs.append(pl.BlockSpec((1, T), lambda b, j, c: (b, 0)))
        ins.append(mask)
    return B, T, S, k, acc, Sb, L, K, T // L, (B, S // Sb, T // L), ins, specs


def _split_refs(refs, masked):
    """(us_ref, m_ref or None, the rest) of a kernel's refs."""
    return refs[0], (refs[1] if masked else None), refs[2 if masked else 1:]


def _forward(us, s0, mask, cell, interpret):
    B, T, S, k, acc, Sb, L, K, n, grid, ins, specs = _layout(us, s0, mask)
    masked = mask is not None
    s0_acc = s0.astype(acc)

    if n == 1:
        s_in = s0_acc[:, None, :]
    else:
        def summary(*refs):
            us_ref, m_ref, (p_ref, q_ref) = _split_refs(refs, masked)
            steps, c = _Steps(cell, k, us_ref, m_ref, T, acc), pl.program_id(2)

            def body(j, pq):
                p, q = pq
                for blocks, m in steps.rows(c * L + j * K, K):
                    a_t, b_t = steps.coefficients(blocks, m)
                    p, q = p * a_t, a_t * q + b_t
                return p, q

            p, q = jax.lax.fori_loop(0, L // K, body, (jnp.ones((Sb,), acc), jnp.zeros((Sb,), acc)))
            p_ref[0, 0, :] = p
            q_ref[0, 0, :] = q

        chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
        P, Q = lin._call(summary, [chunk_shape, chunk_shape], grid, specs,
                         [lin._chunk_spec(Sb)] * 2, interpret, ins)
        # the maps of chunks 0..c composed (in time order), applied to s0: the state after chunk c
        Pc, Qc = jax.lax.associative_scan(lambda x, y: (y[0] * x[0], y[0] * x[1] + y[1]), (P, Q), axis=1)
        s_in = jnp.concatenate([s0_acc[:, None], Pc[:, :-1] * s0_acc[:, None] + Qc[:, :-1]], axis=1)

    def final(*refs):
        us_ref, m_ref, (s_in_ref, out_ref) = _split_refs(refs, masked)
        steps, c = _Steps(cell, k, us_ref, m_ref, T, acc), pl.program_id(2)

        def body(j, s):
            t0 = c * L + j * K
            outs = []
            for blocks, m in steps.rows(t0, K):
                a_t, b_t = steps.coefficients(blocks, m)
                s = a_t * s + b_t
                outs.append(s)
            lin._store_rows(out_ref, t0, outs)
            return s

        jax.lax.fori_loop(0, L // K, body, s_in_ref[0, 0, :])

    return lin._call(final, jax.ShapeDtypeStruct((B, T, S), acc), grid,
                     specs + [lin._chunk_spec(Sb)], lin._seq_spec(T, Sb), interpret,
                     ins + [s_in])


def _backward(us, s0, mask, s, g, cell, interpret):
    """(d us, d s0) for the cotangent g of the states s."""
    B, T, S, k, acc, Sb, L, K, n, grid, ins, specs = _layout(us, s0, mask)
    masked = mask is not None
    seq = lin._seq_spec(T, Sb)

    if n == 1:
        e_in = jnp.zeros((B, 1, S), acc)
    else:
        def summary(*refs):
            us_ref, m_ref, (g_ref, p_ref, q_ref) = _split_refs(refs, masked)
            steps, c = _Steps(cell, k, us_ref, m_ref, T, acc), pl.program_id(2)

            def body(j, pqa):
                p, q, after = pqa  # after: a_{t+1} for the step t about to run
                t0 = c * L + L - (j + 1) * K
                rows, g_rows = steps.rows(t0, K), lin._load_rows(g_ref, t0, K, acc)
                for i in reversed(range(K)):
                    p, q, after = p * after, after * q + g_rows[i], steps.coefficients(*rows[i])[0]
                return p, q, after

            init = (jnp.ones((Sb,), acc), jnp.zeros((Sb,), acc), steps.a_at(c * L + L))
            p, q, _ = jax.lax.fori_loop(0, L // K, body, init)
            p_ref[0, 0, :] = p
            q_ref[0, 0, :] = q

        chunk_shape = jax.ShapeDtypeStruct((B, n, S), acc)
        P, Q = lin._call(summary, [chunk_shape, chunk_shape], grid, specs + [seq],
                         [lin._chunk_spec(Sb)] * 2, interpret, ins + [g])
        e_in = lin._combine(P, Q, reverse=True)

    def final(*refs):
        us_ref, m_ref, (s0_ref, s_ref, g_ref, e_in_ref, du_ref, d_in_ref) = _split_refs(refs, masked)
        steps, c = _Steps(cell, k, us_ref, m_ref, T, acc), pl.program_id(2)
        s0_row = s0_ref[0, :].astype(acc)

        def body(j, ea):
            e, after = ea  # after: a_{t+1}, which carries e_{t+1} back to step t
            t0 = c * L + L - (j + 1) * K
            rows, g_rows = steps.rows(t0, K), lin._load_rows(g_ref, t0, K, acc)
            s_rows = lin._load_rows(s_ref, t0, K, acc) if K > 1 else []
            before = jnp.where(t0 > 0, s_ref[0, jnp.maximum(t0 - 1, 0), :].astype(acc), s0_row)  # s_{t0-1}
            prev = [before] + s_rows[:-1]
            du = [[None] * K for _ in range(k)]
            for i in reversed(range(K)):
                blocks, m = rows[i]
                e = after * e + g_rows[i]
                (a_t, _), vjp = jax.vjp(lambda *x: steps.coefficients(x, m), *blocks)
                for gate, d in enumerate(vjp((e * prev[i], e))):  # (d a_t, d b_t) = (e_t s_{t-1}, e_t)
                    du[gate][i] = d
                after = a_t
            for gate in range(k):
                lin._store_rows(_Gate(du_ref, gate), t0, du[gate])
            return e, after

        e, after = jax.lax.fori_loop(0, L // K, body, (e_in_ref[0, 0, :], steps.a_at(c * L + L)))
        d_in_ref[0, 0, :] = after * e  # a_{cL} e_{cL}: the cotangent of the state entering chunk c

    du4, d_in = lin._call(
        final, [jax.ShapeDtypeStruct((B, T, k, S), us.dtype), jax.ShapeDtypeStruct((B, n, S), acc)], grid,
        specs + [pl.BlockSpec((1, Sb), lambda b, j, c: (b, j)), seq, seq, lin._chunk_spec(Sb)],
        [specs[0], lin._chunk_spec(Sb)], interpret, ins + [s0, s, g.astype(acc), e_in])
    return jnp.reshape(du4, us.shape), d_in[:, 0].astype(s0.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated(us, s0, mask, cell, interpret):
    return _forward(us, s0, mask, cell, interpret)


def _fwd(us, s0, mask, cell, interpret):
    s = _forward(us, s0, mask, cell, interpret)
    return s, (us, s0, mask, s)


def _bwd(cell, interpret, res, g):
    us, s0, mask, s = res
    dus, ds0 = _backward(us, s0, mask, s, g, cell, interpret)
    return dus, ds0, (None if mask is None else jnp.zeros_like(mask))


_gated.defvjp(_fwd, _bwd)
