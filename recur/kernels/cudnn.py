"""The standard LSTM through cuDNN (``jax.experimental.rnn.lstm``), for ``recur.scan(mode="cudnn")``.

cuDNN's persistent LSTM keeps its weights on chip across steps. It beat the plain ``lax.scan``
(issue 7's H100 table: 17.3 ms against 19.2 at B=64, T=512, H=256; 28.1 against 41.4 at
H=1024), but on an H200 recur's unrolled sequential scan beat it (7.8 against 17.1 ms at H=256,
19.4 against 29.4 at H=1024; docs/benchmarks.md), so ``mode="auto"`` takes it only where its
measurement (recur/kernels/autotune.py) finds it faster. It knows one cell: the
PyTorch / colah LSTM without peepholes, layer norm, projection or removed gates, which is recur's
default ``lstm``. recur's parameters map onto cuDNN's packed weight vector exactly: W_x is
weight_ih, W_h weight_hh, b is bias_ih and bias_hh is zero (gate order i, f, g, o in both).

``jax.experimental.rnn.lstm`` has no bfloat16 path and no CPU lowering; recur uses it for a
float32 LSTM on a GPU without resets (cuDNN restarts no sequence mid-way) and without projected
inputs (cuDNN multiplies W_x itself). Lengths become cuDNN's sequence lengths; a row of length 0
keeps its initial carry, as in every recur scan (cuDNN runs it one step and the result is
discarded). With ``RECUR_PALLAS_INTERPRET=1`` the same packed weights go through
``jax.experimental.rnn.lstm_ref`` (jax's reference LSTM, unpacking the vector the way cuDNN
reads it), which is how the tests check the packing and the plumbing on a CPU.
"""
from __future__ import annotations

import jax.numpy as jnp


def problem(cell, *, resets: bool, projected: bool, remat) -> str | None:
    """None if cuDNN's LSTM computes this scan, else why not (for the notice)."""
    from recur.cells.lstm import LSTM

    if not (isinstance(cell, LSTM) and cell.plain):
        return f"cuDNN's LSTM is the plain LSTM only, not {cell.name}"
    if jnp.dtype(cell.dtype) != jnp.float32:
        return f"cuDNN's LSTM runs in float32 here (jax.experimental.rnn has no {jnp.dtype(cell.dtype).name})"
    if resets:
        return "cuDNN's LSTM cannot restart sequences (resets)"
    if projected:
        return "cuDNN's LSTM takes the raw inputs (projected=True)"
    if remat != "none":
        return f"cuDNN's LSTM keeps its own residuals (remat={remat!r} asks not to)"
    return None


def pack(params):
    """cuDNN's flat weight vector for one layer, one direction: W_ih, W_hh, b_ih, b_hh."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    b = f32(params["b"])
    return jnp.concatenate([jnp.ravel(f32(params["W_x"])), jnp.ravel(f32(params["W_h"])), b,
                            jnp.zeros_like(b)])


def lstm(cell, params, xs_BxTxI, carry0, lengths_B, *, reference: bool):
    """(hs [B, T, H] float32, final carry) of the plain LSTM over xs, through cuDNN (or, with
    ``reference``, through jax's reference implementation of the same call)."""
    from jax.experimental import rnn

    B, T, I = xs_BxTxI.shape
    H = cell.hidden_size
    weights = pack(params)
    n = jnp.full((B,), T, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    seq = jnp.maximum(n, 1)  # cuDNN needs >= 1 step per row; length-0 rows are restored below
    x = xs_BxTxI.astype(jnp.float32)
    h0, c0 = carry0["h"].astype(jnp.float32)[None], carry0["c"].astype(jnp.float32)[None]
    if reference:
        W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, I, H, 1, False)
        ys, h_n, c_n = rnn.lstm_ref(x, h0, c0, W_ih, W_hh, b_ih, b_hh, seq, I, H, 1, 0.0, False)
    else:
        ys, h_n, c_n = rnn.lstm(x, h0, c0, weights, seq, I, H, 1, 0.0, False)
    empty = (n == 0)[:, None]
    carry = {"h": jnp.where(empty, carry0["h"], h_n[0].astype(carry0["h"].dtype)),
             "c": jnp.where(empty, carry0["c"], c_n[0].astype(carry0["c"].dtype))}
    return ys.astype(cell.dtype), carry


def available() -> bool:
    """jax was built with the cuDNN RNN bindings (jax.experimental.rnn's lowering exists)."""
    try:
        from jax.experimental import rnn
    except ImportError:
        return False
    return hasattr(getattr(rnn, "gpu_rnn", None), "compute_rnn_workspace_reserve_space_sizes")

