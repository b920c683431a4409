"""The Elman RNN (Elman 1990), in the three textbook forms.

    h_t = f(W_x x_t + W_h h_{t-1} + b)

f is tanh (wikidocs, Keras SimpleRNN), relu (WildML's alternative) or sigmoid (CS224N lecture 6).
W_h starts orthogonal whatever f is (for Le et al. 2015's IRNN, set it to the identity).
``bias=False`` gives WildML's s_t = f(U x_t + W s_{t-1}).
The output layer (V s_t, softmax) belongs to the model, not the cell.

Parameters (PyTorch ``nn.RNN`` layout; Keras' ``kernel`` is ``W_x.T``, ``recurrent_kernel`` is
``W_h.T``; PyTorch's ``bias_ih + bias_hh`` is ``b``):
    W_x [H, I]   W_h [H, H]   b [H] (absent when bias=False)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


FUSED_ACTIVATIONS = ("tanh", "sigmoid", "relu", "identity")


@register(
    "elman",
    variants={
        "tanh": dict(activation="tanh"),
        "relu": dict(activation="relu"),
        "sigmoid": dict(activation="sigmoid"),
        "nobias": dict(bias=False),
    },
)
@dataclasses.dataclass(frozen=True)
class Elman(base.Cell):
    hidden_size: int
    activation: str = "tanh"  # tanh | relu | sigmoid
    bias: bool = True  # False: WildML's bias-free form
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()
        base.activation(self.activation, "elman")

    def init(self, key, input_size):
        kx, kh = jax.random.split(key)
        H = self.hidden_size
        params = {
            "W_x": base.glorot(kx, H, input_size, 1, self.param_dtype),
            "W_h": base.orthogonal(kh, H, H, 1, self.param_dtype),
        }
        if self.bias:
            params["b"] = jnp.zeros((H,), self.param_dtype)
        return params

    def project(self, params, xs_BxTxI):
        us = base.dense(xs_BxTxI, params["W_x"], self.dtype)
        return base.add_bias(us, params["b"]) if self.bias else us

    def recurrent(self, params, h_BxH):
        return base.dense(h_BxH, params["W_h"], self.dtype)

    def step(self, params, h_BxH, u_BxH, rec=None):
        f = base.activation(self.activation, "elman")
        pre = u_BxH + (self.recurrent(params, h_BxH) if rec is None else rec)
        h = f(pre).astype(self.state_dtype)
        return h, h.astype(self.dtype)

    # --- the fused backward step (recur.backprop; see base.Cell) ----------------------------
    @property
    def fused_backward(self) -> bool:
        """For the activations whose derivative :meth:`step_backward` knows (in any precision, as
        the LSTM's)."""
        return self.activation in FUSED_ACTIVATIONS

    def step_saving(self, params, h_BxH, u_BxH, rec):
        """:meth:`step`, also returning h_t: each activation's derivative is a function of it."""
        h = base.activation(self.activation, "elman")(u_BxH + rec).astype(self.state_dtype)
        return h, h.astype(self.dtype), h

    def step_backward(self, params, h_BxH, h_new, d_new, dh_BxH):
        """(0, d pre, None: d rec = d pre), pre = u + W_h h; the activation's derivative from its
        output: tanh 1 - h^2, sigmoid h (1 - h), relu [h > 0], identity 1."""
        d = d_new + dh_BxH
        if self.activation == "tanh":
            d_pre = d * (1.0 - h_new * h_new)
        elif self.activation == "sigmoid":
            d_pre = d * h_new * (1.0 - h_new)
        elif self.activation == "relu":
            d_pre = jnp.where(h_new > 0, d, 0.0)
        elif self.activation == "identity":
            d_pre = d
        else:  # fused_backward is False for any other activation
            raise ValueError(f"elman: no hand-written derivative of activation {self.activation!r}")
        return jnp.zeros_like(d), d_pre, None

    def recurrent_cotangent(self, d_pre):
        return d_pre
