"""Gate blocks padded to a power of 2, so that cells with 3 gate blocks run in the GPU kernels.

Pallas' Triton back end needs every array in a kernel to have a power-of-2 size, so a GRU's
[B, 3H] pre-activations (or an LSTM variant's with one gate removed: cifg, nig, nfg, nog) cannot
live in the loop kernel as they are. ``padded(cell, params, us)`` appends zero blocks up to the
next power of 2 (3 -> 4) to the projected inputs and to the gate-blocked parameters that the
step reads (``cell.gate_layout``: the GRU's W_h and b_h, the LSTM's W_h), and returns a cell that
runs the original cell's functions in the padded layout (``recur.cells.base.padded_gates``: its
``split`` of n blocks then splits into the padded count and drops the zero blocks). The padded
blocks only ever hold zeros and are never read, so the results are the original cell's; the
gradients reach the original parameters and inputs through the padding (a slice).

The price is the zero block's share of the recurrent product (a third more work for W_h's
[B, H] x [H, 3H] product, now [H, 4H]); the alternative on a GPU is the per-step plain scan.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from recur.cells import base


def needs_padding(cell) -> bool:
    """True for a cell whose gate blocks are not a power of 2 in number and can be padded."""
    layout = getattr(cell, "gate_layout", None)
    return layout is not None and layout[0] & (layout[0] - 1) != 0


def padded(cell, params, us):
    """(cell, params, us) in the padded gate layout; unchanged where no padding is needed.

    us: the projected inputs [..., n * H] (any leading axes).
    """
    if not needs_padding(cell):
        return cell, params, us
    n, keys = cell.gate_layout
    m = base.next_pow2(n)
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"recur.kernels.pad: {cell.name}'s params have no {missing} (gate_layout names them)")
    params = dict(params)
    for k in keys:
        params[k] = _pad_axis(params[k], 0, n, m, f"params[{k!r}]", cell)
    return Padded(cell), params, _pad_axis(us, us.ndim - 1, n, m, "the projected inputs", cell)


def _pad_axis(x, axis, n, m, what, cell):
    size = x.shape[axis]
    if size % n:
        raise ValueError(f"recur.kernels.pad: {what} of {cell.name} has {size} entries on axis {axis}, "
                         f"not {n} gate blocks")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, (m - n) * (size // n))
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class Padded(base.Cell):
    """``inner`` run in the padded gate layout: what recur.backprop.deferred_scan calls of a cell."""

    inner: base.Cell

    hidden_size = property(lambda self: self.inner.hidden_size)
    dtype = property(lambda self: self.inner.dtype)
    param_dtype = property(lambda self: self.inner.param_dtype)
    output_size = property(lambda self: self.inner.output_size)
    state_dtype = property(lambda self: self.inner.state_dtype)
    name = property(lambda self: f"{self.inner.name} (gate blocks padded)")
    # the hand-written backward steps slice the unpadded layout; the kernels use autodiff of step
    fused_backward = False

    def initial_carry(self, batch_size):
        return self.inner.initial_carry(batch_size)

    def recurrent(self, params, carry):
        with base.padded_gates():
            return self.inner.recurrent(params, carry)

    def step(self, params, carry, u_t, rec=None):
        with base.padded_gates():
            return self.inner.step(params, carry, u_t, rec)

    def project(self, params, xs):
        raise TypeError("recur.kernels.pad.Padded takes inputs projected (and padded) by padded()")

