"""The cell interface every recurrent cell in recur implements, and the helpers cells share.

A cell is a frozen dataclass of hyper-parameters with four pure functions:

    init(key, input_size)          -> params     a pytree of arrays
    initial_carry(batch_size)      -> carry      a pytree whose leaves have a leading batch axis
    project(params, xs_BxTxI)      -> us         everything that depends on the inputs only,
                                                  for all T steps at once (one large matmul)
    step(params, carry, u_t)       -> (carry, h_t)   one step of the recurrence; h_t is [B, O]

and, optionally, a fifth that makes the backward pass fast:

    recurrent(params, carry)       -> rec        the carry times the recurrent weight matrices
                                                  (everything in step that multiplies the carry
                                                  by a weight); step(params, carry, u_t, rec)
                                                  then takes it instead of computing it

With ``recurrent`` split out, recur.scan's backward pass (``backward="deferred"``) stores rec,
runs the reverse time loop on activations only and computes the weight gradients of
``recurrent`` as one large matmul over all steps after the loop (see recur/backprop.py).

A cell whose step uses no parameters of its own (everything is in project and recurrent:
LSTM, GRU, Elman) may also hand-write that step's backward pass (so may one that does, below),
which the deferred scan then uses instead of autodiff of step (``fused_backward = True``):

    step_saving(params, carry, u_t, rec)       -> (carry, h_t, saved)   step, plus what the
                                                  backward step reads (stored instead of rec)
    step_backward(params, carry, saved, d_new_carry, d_h_t) -> (d_carry, d_u, d_rec)
                                                  d_carry without the path through rec;
                                                  d_rec None when step reads u_t and rec only
                                                  as u_t + rec (then d_rec = d_u, stored once)
    recurrent_cotangent(d_u)                   -> d_rec from d_u, for those additive cells

A step that does read parameters of its own (the layer-norm LSTM's norms) returns a fourth
output from step_backward, per-row pieces of their cotangents, and sums them after the loop:

    param_grads(params, saved_T, pieces_T)     -> d params (zeros where the step reads none),
                                                  saved and pieces stacked over [T, B]

Shape letters: B batch, T time, I input features, H hidden units, G = gates * H, O output
features (H, or the projection size for LSTMP).

Precision: parameters are stored in ``param_dtype`` (float32 by default); matmuls run in
``dtype`` and the outputs h_t are ``dtype``; the carry (the state) is kept in
``state_dtype`` = promote(dtype, float32), so bfloat16 runs keep a float32 state.

Weights follow the layout of the equations (and of PyTorch): an input matrix is ``W_x`` of
shape [G, I], a recurrent matrix ``W_h`` of shape [G, H]; the Keras kernel is the transpose.

Cells whose recurrence is linear in the state, s_t = a_t * s_{t-1} + b_t with a_t and b_t
functions of the inputs only, subclass :class:`LinearCell`: they expose that (a, b) form so
``recur.scan(..., mode="parallel")`` can run them with an associative scan.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


class Cell:
    """Base class of all cells. Subclasses are ``@dataclasses.dataclass(frozen=True)``."""

    hidden_size: int
    dtype: Any
    param_dtype: Any

    #: True for cells that implement the (a, b) form of :class:`LinearCell`.
    linear = False
    #: True for cells that hand-write their step's backward pass (see the module docstring).
    fused_backward = False
    #: True: with the fused backward step, recur.scan projects each step's inputs inside the
    #: forward loop instead of writing all T projected steps out first (project must then work
    #: row by row). It pays where the projected inputs are wide (LSTM 4H, GRU 3H per row), not
    #: for the Elman RNN's H.
    project_in_loop = False
    #: (n, param keys) for a cell whose pre-activations are n gate blocks (split by ``split``) and
    #: whose recurrent and step read the gate-blocked params named (leading axis n * H) only
    #: through ``split`` / ``head`` or whole: such a step also runs with the blocks padded to a
    #: power of 2 (recur/kernels/pad.py, for the GPU kernels). None: not in that form.
    gate_layout = None

    # --- the interface -------------------------------------------------------------------
    def init(self, key: Array, input_size: int) -> PyTree:
        raise NotImplementedError

    def initial_carry(self, batch_size: int) -> PyTree:
        return jnp.zeros((batch_size, self.hidden_size), self.state_dtype)

    def project(self, params: PyTree, xs_BxTxI: Array) -> PyTree:
        raise NotImplementedError

    def step(self, params: PyTree, carry: PyTree, u_t: PyTree, rec: PyTree = None) -> tuple[PyTree, Array]:
        raise NotImplementedError

    def recurrent(self, params: PyTree, carry: PyTree) -> PyTree:
        """The carry's products with the recurrent weights, or None if the cell has none split out."""
        return None

    # --- derived facts -------------------------------------------------------------------
    @property
    def output_size(self) -> int:
        """Features of each output h_t."""
        return self.hidden_size

    @property
    def state_dtype(self):
        return jnp.promote_types(self.dtype, jnp.float32)

    def input_size(self, params: PyTree) -> int:
        """The input feature size these params were initialised for."""
        return int(params["W_x"].shape[-1])

    @property
    def name(self) -> str:
        """The registry name with the switches that differ from the defaults."""
        from recur.cells.registry import name_of

        return name_of(self)

    def _check(self):
        if not isinstance(self.hidden_size, (int, np.integer)) or self.hidden_size <= 0:
            raise ValueError(
                f"{type(self).__name__}: hidden_size must be a positive int, got {self.hidden_size!r}"
            )


class LinearCell(Cell):
    """A cell whose state obeys s_t = a_t * s_{t-1} + b_t (element-wise), a_t, b_t from inputs.

    Subclasses implement ``coefficients`` and ``readout``; ``step`` follows from them, so the
    sequential and the parallel scan compute the same function by construction of the (a, b)
    form, and the test that they agree checks the scan machinery.
    """

    linear = True

    def coefficients(self, params: PyTree, us: PyTree) -> tuple[Array, Array]:
        """(a, b) for every step, each [B, T, S] (or [B, S] for a single step's u_t)."""
        raise NotImplementedError

    def gate_operands(self, params: PyTree, us: PyTree):
        """None, or (blocks [B, T, k S], consts) when the coefficients are element-wise:
        (a_t, b_t) = ``self.block_coefficients(*consts, *the k blocks of step t)``, consts being
        [S] vectors constant in time. A GPU scan then computes the coefficients inside its kernel
        (recur/kernels/gated.py) instead of writing them to memory."""
        return None

    def readout(self, params: PyTree, s: Array, us: PyTree) -> Array:
        """The output h_t from the state s_t (and the step's inputs); works on [B, S] or [B, T, S]."""
        return s.astype(self.dtype)

    def step(self, params, carry, u_t, rec=None):
        a, b = self.coefficients(params, u_t)
        s = a * carry + b
        return s, self.readout(params, s, u_t)


# --- shared numerics ---------------------------------------------------------------------
_IN_KERNEL = []  # non-empty while recur.kernels traces a cell's step into a Pallas kernel


@contextlib.contextmanager
def kernel_trace():
    """Mark that the cell functions called inside are being traced into a GPU kernel."""
    _IN_KERNEL.append(True)
    try:
        yield
    finally:
        _IN_KERNEL.pop()


def split(x: Array, n: int, axis: int = -1) -> list[Array]:
    """jnp.split(x, n, axis), the gate blocks of a pre-activation (or of a weight's rows).

    Traced into a kernel (``kernel_trace``) with n a power of 2, it halves x recursively by
    reshape [..., 2, m] -> transpose [..., m, 2] -> unstack: Pallas' Triton back end lowers
    these and their transposes (stack, transpose, reshape), whereas the transpose of a split,
    an n-way concatenate, it does not lower.

    In the padded gate layout (``padded_gates``, recur/kernels/pad.py) a count of blocks that is
    not a power of 2 is followed by zero blocks up to the next power of 2: x holds that many
    blocks and the first n are returned.
    """
    m = padded_count(n)
    if _tiled(x):  # a kernel's weight read tile by tile: views of its blocks of rows
        size = _tiled_rows(x, axis) // m
        return [x.rows(i * size, size) for i in range(n)]
    if not _IN_KERNEL or m == 1 or m & (m - 1):
        return jnp.split(x, m, axis=axis)[:n]
    axis = axis % x.ndim
    if axis != x.ndim - 1:
        return [jnp.moveaxis(p, -1, axis) for p in split(jnp.moveaxis(x, axis, -1), n)]
    return halved(x, m)[:n]


def head(x: Array, n: int, k: int, axis: int = -1) -> Array:
    """The first k of x's n gate blocks along axis, as one array (a slice outside a kernel; in
    one, halves of halves where the block counts allow it)."""
    m = padded_count(n)
    if _tiled(x):
        return x.rows(0, k * (_tiled_rows(x, axis) // m))
    axis = axis % x.ndim
    size = x.shape[axis] // m
    if _IN_KERNEL and not (m & (m - 1)) and not (k & (k - 1)):
        while m > k:
            x, m = split(x, 2, axis)[0], m // 2
        return x
    return jax.lax.slice_in_dim(x, 0, k * size, axis=axis)


_PADDED = []  # non-empty while a cell's functions run in the padded gate layout


@contextlib.contextmanager
def padded_gates():
    """Cell functions called inside see their gate blocks padded to a power of 2 (see split)."""
    _PADDED.append(True)
    try:
        yield
    finally:
        _PADDED.pop()


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def padded_count(n: int) -> int:
    """n gate blocks, or the next power of 2 in the padded gate layout."""
    return next_pow2(n) if _PADDED else n


def halved(x, m: int) -> list[Array]:
    """x split along its last axis into m (a power of 2) equal parts by repeated halving (reshape,
    transpose, unstack: what Pallas' Triton back end lowers), in order."""
    parts = [x]
    while len(parts) < m:
        parts = [half for p in parts for half in _halves(p)]
    return parts


def _halves(x):
    m = x.shape[-1] // 2
    x2 = jnp.reshape(x, x.shape[:-1] + (2, m))
    perm = tuple(range(x2.ndim - 2)) + (x2.ndim - 1, x2.ndim - 2)
    return jax.lax.unstack(jnp.transpose(x2, perm), axis=-1)


def _tiled(x) -> bool:
    """x is a kernel's weight that it reads tile by tile (recur.kernels.loop.WeightTiles)."""
    return hasattr(x, "tile_product")


def _tiled_rows(x, axis):
    if axis not in (0, -2):
        raise ValueError(f"a kernel's tiled weight {x.shape} splits into blocks of rows only (axis 0), not axis {axis}")
    return x.shape[0]


def whole(W):
    """W as one array: a kernel's tiled weight loaded whole (for a step that does more with it
    than ``dense``, ``split`` and ``head``: e.g. masks it), any other array as it is."""
    return W.whole() if _tiled(W) else W


def dense(x: Array, W_GxI: Array, dtype) -> Array:
    """x @ W.T over the last axis of x, computed in ``dtype`` with float32 accumulation."""
    acc = jnp.promote_types(dtype, jnp.float32)
    if _tiled(W_GxI):  # inside a kernel: tile by tile from the weight's memory
        return W_GxI.tile_product(x, dtype, acc)
    if _IN_KERNEL and jnp.dtype(dtype).itemsize < 4:
        # Triton's dot takes operands of one type: a half x half product (the tensor cores
        # accumulate it in float32) widened afterwards, so that the transposed products of the
        # backward pass are half x half too
        return jnp.einsum("...i,gi->...g", x.astype(dtype), W_GxI.astype(dtype)).astype(acc)
    return jnp.einsum(
        "...i,gi->...g", x.astype(dtype), W_GxI.astype(dtype), preferred_element_type=acc
    )


def add_bias(x: Array, b: Array) -> Array:
    """x + b with b broadcast explicitly over the leading axes of x (no rank promotion)."""
    return x + jnp.reshape(b, (1,) * (x.ndim - b.ndim) + b.shape).astype(x.dtype)


def scale(x: Array, w: Array) -> Array:
    """x * w with w broadcast explicitly over the leading axes of x."""
    return x * jnp.reshape(w, (1,) * (x.ndim - w.ndim) + w.shape).astype(x.dtype)


def layer_norm(x: Array, gamma: Array, beta: Array, eps: float = 1e-5) -> Array:
    """LayerNorm over the last axis (Ba et al. 2016), in float32 or wider."""
    return add_bias(scale(normalised(x, eps)[0], gamma), beta)


def normalised(x: Array, eps: float = 1e-5) -> tuple[Array, Array]:
    """(x_hat, 1 / std): layer_norm's normalisation over the last axis, in float32 or wider."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)
    return (x - mean) * inv, inv


ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def activation(name: str, where: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"{where}: unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}"
        ) from None


# --- initialisers --------------------------------------------------------------------------
def glorot(key: Array, rows: int, cols: int, blocks: int, dtype) -> Array:
    """[blocks * rows, cols], each gate block Glorot-uniform (Keras' kernel default)."""
    keys = jax.random.split(key, blocks)
    init = jax.nn.initializers.glorot_uniform(in_axis=1, out_axis=0)
    return jnp.concatenate([init(k, (rows, cols), _init_dtype(dtype)) for k in keys], axis=0).astype(dtype)


def orthogonal(key: Array, rows: int, cols: int, blocks: int, dtype) -> Array:
    """[blocks * rows, cols], each gate block orthogonal (Keras' recurrent default)."""
    keys = jax.random.split(key, blocks)
    init = jax.nn.initializers.orthogonal()
    return jnp.concatenate([init(k, (rows, cols), _init_dtype(dtype)) for k in keys], axis=0).astype(dtype)


def _init_dtype(dtype):
    """Draw in float32 (or float64) and cast: QR and friends do not take half precision."""
    return jnp.promote_types(dtype, jnp.float32)


def uniform(key: Array, shape, bound: float, dtype) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def replace(cell: Cell, **changes) -> Cell:
    return dataclasses.replace(cell, **changes)
