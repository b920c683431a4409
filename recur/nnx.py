"""Flax NNX modules that own a recurrent layer's parameters; the scanned function stays pure.

    rnn = recur.nnx.RNN("lstm:cifg", input_size=32, hidden_size=128, num_layers=2,
                        bidirectional=True, dropout=0.3, rngs=nnx.Rngs(0))
    hs_BxTxO, carries = rnn(xs_BxTxI, lengths=lengths_B, dropout_key=key)

The module stores the same parameter pytrees as :func:`recur.init_stack` (as ``nnx.Param``
leaves) and calls :func:`recur.stack` with them, so everything said there holds here.
``learn_initial_carry=True`` adds a learned initial state per layer and direction (CS224N's
"h_0 learned"), used both before step 0 and wherever ``resets`` restarts a sequence.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from recur.cells.base import Cell
from recur.cells.registry import get_cell
from recur.layers import init_stack, merged_size, stack


def _is_var(x):
    return isinstance(x, nnx.Variable)


def values(tree):
    """The arrays inside a pytree of ``nnx.Variable``."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=_is_var)


def _learnable(carry):
    """A carry for one row whose float leaves are parameters (step counters stay constants)."""
    return jax.tree.map(lambda x: nnx.Param(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x, carry)


def _broadcast(carry_1, batch):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), carry_1)


class RNN(nnx.Module):
    """A stack of ``num_layers`` recurrent layers (optionally bidirectional).

    ``cell`` is a registry name (then ``hidden_size`` is required), a cell, or a list of cells,
    one per layer.
    """

    def __init__(self, cell: str | Cell | Sequence[Cell], input_size: int, *, rngs: nnx.Rngs,
                 hidden_size: int | None = None, num_layers: int = 1, bidirectional: bool = False,
                 merge: str = "concat", dropout: float = 0.0, locked_dropout: bool = False,
                 residual: bool = False, learn_initial_carry: bool = False, weight_dropout: float = 0.0,
                 **scan_kwargs):
        if isinstance(cell, str):
            if hidden_size is None:
                raise ValueError(f"RNN: cell {cell!r} is given by name, so hidden_size is required")
            cell = get_cell(cell, hidden_size)
        cells = [cell] * num_layers if isinstance(cell, Cell) else list(cell)
        self.cells = tuple(cells)
        self.bidirectional, self.merge = bidirectional, merge
        self.dropout, self.locked_dropout, self.residual = dropout, locked_dropout, residual
        if not 0.0 <= weight_dropout < 1.0:
            raise ValueError(f"RNN: weight_dropout must be a rate in [0, 1), got {weight_dropout}")
        self.weight_dropout = weight_dropout
        from recur.scan import MODES

        if scan_kwargs.get("mode", "sequential") not in MODES:
            raise ValueError(f"RNN: mode must be one of {MODES}, got {scan_kwargs['mode']!r}")
        self.scan_kwargs = dict(scan_kwargs)
        params = init_stack(cells, rngs.params(), input_size, bidirectional=bidirectional, merge=merge)
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.initial = None
        if learn_initial_carry:
            per_layer = []
            for c in cells:
                carry = c.initial_carry(1)
                per_layer.append((_learnable(carry), _learnable(carry)) if bidirectional else _learnable(carry))
            self.initial = nnx.data(per_layer)

    @property
    def output_size(self) -> int:
        top = self.cells[-1]
        return merged_size(top, self.merge) if self.bidirectional else top.output_size

    def __call__(self, xs_BxTxI, *, lengths=None, resets=None, initial_carries=None, dropout_key=None,
                 projected=False):
        """Returns (hs [B, T, output_size], [final carry per layer]). Dropout only with a key.

        ``projected=True``: xs is the first layer's projected input (see recur.stack).
        """
        reset_carries = None
        if self.initial is not None:
            B = jax.tree.leaves(xs_BxTxI)[0].shape[0]
            reset_carries = _broadcast(values(self.initial), B)
            if initial_carries is None:
                initial_carries = reset_carries
        return stack(self.cells, values(self.params), xs_BxTxI, lengths=lengths, resets=resets,
                     initial_carries=initial_carries, reset_carries=reset_carries,
                     bidirectional=self.bidirectional, merge=self.merge, dropout=self.dropout,
                     dropout_key=dropout_key, locked=self.locked_dropout, residual=self.residual,
                     weight_dropout=self.weight_dropout, projected=projected, **self.scan_kwargs)
