"""Bidirectional and stacked (deep) recurrent layers, built on :func:`recur.scan`.

Bidirectional (Schuster & Paliwal 1997): a forward scan and a padding-aware backward scan
(``reverse=True``: each sequence's valid part read from its end), merged per step:

    h_t = [h→_t ; h←_t]  (merge="concat", O_fw + O_bw features)  or  h→_t + h←_t  (merge="sum")

Stacked: layer l reads the outputs of layer l - 1, each with its own weights; optional dropout
between layers (Zaremba et al. 2014; ``locked=True`` uses one mask for every step, Gal &
Ghahramani 2016) and residual connections h^(l) = scan^(l)(h^(l-1)) + h^(l-1) on every layer but
the first (Wu et al. 2016).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from recur.cells.base import Cell
from recur.scan import scan

MERGES = ("concat", "sum")


def _pair(x):
    return (x, x) if isinstance(x, Cell) else tuple(x)


def merged_size(cell, merge: str) -> int:
    """Output features of a bidirectional layer of ``cell`` (a cell or a (forward, backward) pair)."""
    fw, bw = _pair(cell)
    if merge not in MERGES:
        raise ValueError(f"bidirectional: merge must be one of {MERGES}, got {merge!r}")
    if merge == "sum" and fw.output_size != bw.output_size:
        raise ValueError(f"bidirectional: merge='sum' needs equal output sizes, got {fw.output_size} and {bw.output_size}")
    return fw.output_size + bw.output_size if merge == "concat" else fw.output_size


def bidirectional(cell, params, xs, *, lengths=None, resets=None, initial_carry=None,
                  reset_carry=None, merge="concat", **scan_kwargs):
    """Run forwards and backwards over xs [B, T, I]; returns (hs [B, T, O'], (carry_fw, carry_bw)).

    ``cell`` is one cell (used in both directions, with separate weights) or a (forward, backward)
    pair; ``params`` is (params_fw, params_bw); ``initial_carry`` and ``reset_carry`` are None or
    (forward, backward) pairs.
    """
    fw, bw = _pair(cell)
    merged_size((fw, bw), merge)
    p_fw, p_bw = params
    c_fw, c_bw = (None, None) if initial_carry is None else initial_carry
    r_fw, r_bw = (None, None) if reset_carry is None else reset_carry
    common = dict(lengths=lengths, resets=resets, **scan_kwargs)
    h_fw, carry_fw = scan(fw, p_fw, xs, initial_carry=c_fw, reset_carry=r_fw, **common)
    h_bw, carry_bw = scan(bw, p_bw, xs, initial_carry=c_bw, reset_carry=r_bw, reverse=True, **common)
    hs = jnp.concatenate([h_fw, h_bw], axis=-1) if merge == "concat" else h_fw + h_bw
    return hs, (carry_fw, carry_bw)


def init_stack(cells: Sequence[Cell], key, input_size: int, *, bidirectional=False, merge="concat"):
    """Parameters for :func:`stack`: a list with one entry per layer (a pair when bidirectional)."""
    params = []
    for cell, k in zip(cells, jax.random.split(key, len(cells))):
        if bidirectional:
            fw, bw = _pair(cell)
            k_fw, k_bw = jax.random.split(k)
            params.append((fw.init(k_fw, input_size), bw.init(k_bw, input_size)))
            input_size = merged_size(cell, merge)
        else:
            params.append(cell.init(k, input_size))
            input_size = cell.output_size
    return params


def stack(cells: Sequence[Cell], params, xs, *, lengths=None, resets=None, initial_carries=None,
          reset_carries=None, bidirectional=False, merge="concat", dropout=0.0, dropout_key=None, locked=False,
          residual=False, weight_dropout=0.0, projected=False, **scan_kwargs):
    """Run layers of cells over xs [B, T, I]; returns (hs of the top layer, [final carry per layer]).

    ``initial_carries`` and ``reset_carries`` are None or one entry per layer (a pair when
    bidirectional), passed to :func:`recur.scan` as ``initial_carry`` and ``reset_carry``.

    ``dropout`` (a rate) is applied to each layer's input except the first, only when a
    ``dropout_key`` is given (training); ``locked=True`` draws one mask per sequence and feature,
    shared by all steps. ``residual=True`` adds each layer's input to its output from the second
    layer on (their sizes must agree).

    ``weight_dropout`` (a rate; DropConnect on the recurrent weights, Wan et al. 2013, as in
    Merity et al. 2018's AWD-LSTM) zeroes entries of every layer's and direction's recurrent
    matrix ``W_h`` (kept ones scaled by 1 / (1 - rate)) with one mask per call, shared by every
    sequence and step, again only with a ``dropout_key``. Cells without a ``W_h`` are unaffected.

    ``projected=True``: xs is the first layer's projected input, ``cells[0].project(params[0],
    inputs)`` (see recur.scan); not with ``bidirectional`` (each direction projects its own).
    """
    if len(cells) != len(params):
        raise ValueError(f"stack: got {len(cells)} cells but {len(params)} parameter sets")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"stack: dropout must be a rate in [0, 1), got {dropout}")
    if not 0.0 <= weight_dropout < 1.0:
        raise ValueError(f"stack: weight_dropout must be a rate in [0, 1), got {weight_dropout}")
    if projected and bidirectional:
        raise ValueError("stack: projected inputs need a unidirectional first layer (each direction of a "
                         "bidirectional one projects the inputs with its own weights)")
    layer = _bidirectional_layer(merge) if bidirectional else scan
    carries = []
    keys = jax.random.split(dropout_key, len(cells)) if dropout_key is not None else [None] * len(cells)
    for l, (cell, p, k) in enumerate(zip(cells, params, keys)):
        inputs = xs
        if l > 0 and dropout > 0.0 and k is not None:
            inputs = drop(k, xs, dropout, locked)
        if weight_dropout > 0.0 and k is not None:
            p = _drop_recurrent_weights(jax.random.fold_in(k, 1), p, weight_dropout)
        carry0 = None if initial_carries is None else initial_carries[l]
        reset0 = None if reset_carries is None else reset_carries[l]
        hs, carry = layer(cell, p, inputs, lengths=lengths, resets=resets, initial_carry=carry0,
                          reset_carry=reset0, **(dict(scan_kwargs, projected=True) if projected and l == 0
                                                 else scan_kwargs))
        if residual and l > 0:
            if hs.shape != xs.shape:
                raise ValueError(
                    f"stack: residual connection around layer {l} needs equal input and output "
                    f"sizes, got {xs.shape[-1]} in and {hs.shape[-1]} out"
                )
            hs = hs + xs.astype(hs.dtype)
        carries.append(carry)
        xs = hs
    return xs, carries


def _drop_recurrent_weights(key, params, rate):
    """params with every dict entry named "W_h" (at any depth: both directions) dropped out."""
    def visit(tree, key):
        if isinstance(tree, dict):
            return {name: (drop(jax.random.fold_in(key, i), v, rate) if name == "W_h" else visit(v, jax.random.fold_in(key, i)))
                    for i, (name, v) in enumerate(sorted(tree.items()))}
        if isinstance(tree, (list, tuple)):
            return type(tree)(visit(v, jax.random.fold_in(key, i)) for i, v in enumerate(tree))
        return tree

    return visit(params, key)


def _bidirectional_layer(merge):
    def layer(cell, p, xs, **kwargs):
        return bidirectional(cell, p, xs, merge=merge, **kwargs)

    return layer


def drop(key, x, rate: float, locked: bool = False, whole_vectors: bool = False):
    """Inverted dropout of x (any shape): kept values are scaled by 1 / (1 - rate).

    ``locked`` (x [B, T, F]) shares one mask [B, 1, F] across all T steps (Gal & Ghahramani 2016);
    ``whole_vectors`` (x [B, T, F]) drops whole vectors x[b, t] (word dropout on embeddings).
    """
    if locked:
        shape = (x.shape[0], 1, x.shape[2])
    elif whole_vectors:
        shape = x.shape[:2] + (1,)
    else:
        shape = x.shape
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
