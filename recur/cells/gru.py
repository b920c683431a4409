"""The GRU (Cho et al. 2014) in both of its forms, and the MGU (Zhou et al. 2016).

GRU, reset applied after the recurrent matmul (cuDNN, PyTorch ``nn.GRU``, Keras
``reset_after=True``; the default, ``reset_after=True``):

    r_t = σ(W_r x_t + b_xr + R_r h_{t-1} + b_hr)
    z_t = σ(W_z x_t + b_xz + R_z h_{t-1} + b_hz)
    n_t = tanh(W_n x_t + b_xn + r_t ⊙ (R_n h_{t-1} + b_hn))
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Cho et al.'s original (``gru:cho``, ``reset_after=False``) resets the state before the matmul:

    n_t = tanh(W_n x_t + b_xn + R_n (r_t ⊙ h_{t-1}) + b_hn)

Parameters (PyTorch ``nn.GRU`` layout, gate order r, z, n):
    W_x [3H, I] (weight_ih_l0)   W_h [3H, H] (weight_hh_l0)   b_x [3H] (bias_ih_l0)   b_h [3H] (bias_hh_l0)
Keras orders the gates z, r, n: reorder the blocks when loading its kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


@register(
    "gru",
    variants={
        "cho": dict(reset_after=False),
        "reset_before": dict(reset_after=False),
        "reset_after": dict(reset_after=True),
    },
)
@dataclasses.dataclass(frozen=True)
class GRU(base.Cell):
    hidden_size: int
    reset_after: bool = True  # False: Cho et al. 2014 (reset before the recurrent matmul)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()

    def init(self, key, input_size):
        kx, kh = jax.random.split(key)
        H, pd = self.hidden_size, self.param_dtype
        return {
            "W_x": base.glorot(kx, H, input_size, 3, pd),
            "W_h": base.orthogonal(kh, H, H, 3, pd),
            "b_x": jnp.zeros((3 * H,), pd),
            "b_h": jnp.zeros((3 * H,), pd),
        }

    def project(self, params, xs_BxTxI):
        return base.add_bias(base.dense(xs_BxTxI, params["W_x"], self.dtype), params["b_x"])

    def recurrent(self, params, h_BxH):
        """W_h h + b_h for all three blocks (reset after), for r and z only (Cho: reset before)."""
        W_h, b_h = params["W_h"], params["b_h"]
        if not self.reset_after:
            W_h, b_h = base.head(W_h, 3, 2, axis=0), base.head(b_h, 3, 2)
        return base.add_bias(base.dense(h_BxH, W_h, self.dtype), b_h)

    def step(self, params, h_BxH, u_Bx3H, rec=None):
        # gate blocks by base.split (no slices), so that the step also runs in a GPU kernel
        u_r, u_z, u_n = base.split(u_Bx3H, 3)
        rec = self.recurrent(params, h_BxH) if rec is None else rec
        # sigmoid(x) = (1 + tanh(x / 2)) / 2: one element-wise function for every block
        sig = lambda x: 0.5 * jnp.tanh(0.5 * x) + 0.5
        if self.reset_after:
            rec_r, rec_z, rec_n = base.split(rec, 3)
            r, z = sig(u_r + rec_r), sig(u_z + rec_z)
            n = jnp.tanh(u_n + r * rec_n)
        else:
            rec_r, rec_z = base.split(rec, 2)
            r, z = sig(u_r + rec_r), sig(u_z + rec_z)
            W_n, b_n = base.split(params["W_h"], 3, axis=0)[2], base.split(params["b_h"], 3)[2]
            n = jnp.tanh(u_n + base.add_bias(base.dense(r * h_BxH, W_n, self.dtype), b_n))
        h = ((1.0 - z) * n + z * h_BxH).astype(self.state_dtype)
        return h, h.astype(self.dtype)

    #: the padded gate layout of recur/kernels/pad.py: 3 gate blocks, padded in W_h and b_h
    gate_layout = (3, ("W_h", "b_h"))

    # --- the fused backward step (recur.backprop; see base.Cell) ----------------------------
    @property
    def project_in_loop(self) -> bool:
        return self.fused_backward

    @property
    def fused_backward(self) -> bool:
        """The reset-after GRU's step reads only u and rec (Cho's form multiplies by W_h in it); in
        any precision, as the LSTM's."""
        return self.reset_after

    def step_saving(self, params, h_BxH, u_Bx3H, rec_Bx3H):
        """:meth:`step`, also returning (tanh of the r, z pre-activations / 2, n_t, (W_h h + b_h)_n)."""
        H = self.hidden_size
        t = jnp.tanh(0.5 * (u_Bx3H[:, : 2 * H] + rec_Bx3H[:, : 2 * H]))
        r, z = 0.5 * t[:, :H] + 0.5, 0.5 * t[:, H:] + 0.5
        rec_n = rec_Bx3H[:, 2 * H:]
        n = jnp.tanh(u_Bx3H[:, 2 * H:] + r * rec_n)
        h = (1.0 - z) * n + z * h_BxH
        return h, h.astype(self.dtype), (t, n, rec_n)

    def step_backward(self, params, h_BxH, saved, d_new, dh_BxH):
        """(d h_{t-1} not through W_h, d u [B, 3H], d rec [B, 3H]) of one step; d rec differs from
        d u in the n block, which the reset gate scales: d rec_n = r d u_n."""
        t, n, rec_n = saved
        H = self.hidden_size
        t_r, t_z = t[:, :H], t[:, H:]
        r, z = 0.5 * t_r + 0.5, 0.5 * t_z + 0.5
        d = d_new + dh_BxH
        du_n = d * (1.0 - z) * (1.0 - n * n)
        du_r = du_n * rec_n * (0.25 * (1.0 - t_r * t_r))
        du_z = d * (h_BxH - n) * (0.25 * (1.0 - t_z * t_z))
        du = jnp.concatenate([du_r, du_z, du_n], axis=-1)
        drec = jnp.concatenate([du_r, du_z, r * du_n], axis=-1)
        return d * z, du, drec


@register("mgu")
@dataclasses.dataclass(frozen=True)
class MGU(base.Cell):
    """Minimal gated unit (Zhou et al. 2016, "Minimal Gated Unit for Recurrent Neural Networks"):

        f_t = σ(W_f x_t + R_f h_{t-1} + b_f)
        n_t = tanh(W_n x_t + R_n (f_t ⊙ h_{t-1}) + b_n)
        h_t = (1 - f_t) ⊙ h_{t-1} + f_t ⊙ n_t

    Parameters (gate order f, n): W_x [2H, I], W_h [2H, H], b [2H].
    """

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()

    def init(self, key, input_size):
        kx, kh = jax.random.split(key)
        H, pd = self.hidden_size, self.param_dtype
        return {
            "W_x": base.glorot(kx, H, input_size, 2, pd),
            "W_h": base.orthogonal(kh, H, H, 2, pd),
            "b": jnp.zeros((2 * H,), pd),
        }

    def project(self, params, xs_BxTxI):
        return base.add_bias(base.dense(xs_BxTxI, params["W_x"], self.dtype), params["b"])

    def recurrent(self, params, h_BxH):
        """R_f h (the candidate's R_n (f ⊙ h) needs f, so it stays in step)."""
        # base.split, not a slice: Pallas' Triton back end lowers equal power-of-2 splits only
        return base.dense(h_BxH, base.split(params["W_h"], 2, axis=0)[0], self.dtype)

    def step(self, params, h_BxH, u_Bx2H, rec=None):
        uf, un = base.split(u_Bx2H, 2)
        f = jax.nn.sigmoid(uf + (self.recurrent(params, h_BxH) if rec is None else rec))
        n = jnp.tanh(un + base.dense(f * h_BxH, base.split(params["W_h"], 2, axis=0)[1], self.dtype))
        h = ((1.0 - f) * h_BxH + f * n).astype(self.state_dtype)
        return h, h.astype(self.dtype)
