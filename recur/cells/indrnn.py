"""The independently recurrent network (Li et al. 2018, "Independently Recurrent Neural Network
(IndRNN): Building A Longer and Deeper RNN"):

    h_t = f(W_x x_t + u ⊙ h_{t-1} + b)          f = relu by default

Each unit sees only its own past through the element-wise recurrent weight u, so gradients
through time are products of scalars that |u| can bound (the paper keeps |u| <= 2^(1/T_max)).

Parameters: W_x [H, I], u [H] (initialised uniform in [0, 1]), b [H].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


@register("indrnn", variants={"relu": dict(activation="relu"), "tanh": dict(activation="tanh")})
@dataclasses.dataclass(frozen=True)
class IndRNN(base.Cell):
    hidden_size: int
    activation: str = "relu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()
        base.activation(self.activation, "indrnn")

    def init(self, key, input_size):
        kx, ku = jax.random.split(key)
        H, pd = self.hidden_size, self.param_dtype
        return {
            "W_x": base.glorot(kx, H, input_size, 1, pd),
            "u": jax.random.uniform(ku, (H,), pd, 0.0, 1.0),
            "b": jnp.zeros((H,), pd),
        }

    def project(self, params, xs_BxTxI):
        return base.add_bias(base.dense(xs_BxTxI, params["W_x"], self.dtype), params["b"])

    def step(self, params, h_BxH, u_BxH, rec=None):
        f = base.activation(self.activation, "indrnn")
        h = f(u_BxH + base.scale(h_BxH, params["u"])).astype(self.state_dtype)
        return h, h.astype(self.dtype)
