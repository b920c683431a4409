"""The depth-gated LSTM (Yao et al. 2015, "Depth-Gated Recurrent Neural Networks").

A stack of L LSTM layers in one cell, where a depth gate lets each layer's memory cell read the
memory cell of the layer below at the same step. Layer 1 is a standard LSTM (``recur.cells.lstm``,
no peepholes). For layers l = 2..L, with x_t^(l) = h_t^(l-1):

    i, f, o = σ(W_{i,f,o} x_t^(l) + R_{i,f,o} h_{t-1}^(l) + b_{i,f,o}),   g = tanh(W_g x_t^(l) + R_g h_{t-1}^(l) + b_g)
    d_t^(l) = σ(W_d x_t^(l) + w_cd ⊙ c_{t-1}^(l) + w_ld ⊙ c_t^(l-1) + b_d)      depth gate
    c_t^(l) = d_t^(l) ⊙ c_t^(l-1) + f ⊙ c_{t-1}^(l) + i ⊙ g
    h_t^(l) = o ⊙ tanh(c_t^(l))

The cell's output is the top layer's h_t^(L). All layers have H units (the depth gate adds
cells element-wise).

Parameters: layer 1 W_x [4H, I], W_h [4H, H], b [4H] (gate order i, f, g, o); layers 2..L stacked
on a leading axis of size L-1: up_W_x [L-1, 5H, H] (i, f, g, o, d), up_W_h [L-1, 4H, H],
up_b [L-1, 5H], w_cd [L-1, H], w_ld [L-1, H]. Carry: {"h": [B, L, H], "c": [B, L, H]}.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


@register("dglstm")
@dataclasses.dataclass(frozen=True)
class DepthGatedLSTM(base.Cell):
    hidden_size: int
    num_layers: int = 2
    forget_bias: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()
        if self.num_layers < 2:
            raise ValueError(f"dglstm: a depth gate needs num_layers >= 2, got {self.num_layers}")

    def initial_carry(self, batch_size):
        z = jnp.zeros((batch_size, self.num_layers, self.hidden_size), self.state_dtype)
        return {"h": z, "c": z}

    def init(self, key, input_size):
        H, L, pd = self.hidden_size, self.num_layers, self.param_dtype
        k = jax.random.split(key, 2 + 4 * (L - 1))
        fb = jnp.zeros((4, H), pd).at[1].set(self.forget_bias).reshape(4 * H)
        up_b = jnp.zeros((5, H), pd).at[1].set(self.forget_bias).reshape(5 * H)
        return {
            "W_x": base.glorot(k[0], H, input_size, 4, pd),
            "W_h": base.orthogonal(k[1], H, H, 4, pd),
            "b": fb,
            "up_W_x": jnp.stack([base.glorot(k[2 + l], H, H, 5, pd) for l in range(L - 1)]),
            "up_W_h": jnp.stack([base.orthogonal(k[L + 1 + l], H, H, 4, pd) for l in range(L - 1)]),
            "up_b": jnp.stack([up_b] * (L - 1)),
            "w_cd": jnp.stack([base.uniform(k[2 * L + l], (H,), 0.1, pd) for l in range(L - 1)]),
            "w_ld": jnp.stack([base.uniform(k[3 * L - 1 + l], (H,), 0.1, pd) for l in range(L - 1)]),
        }

    def project(self, params, xs_BxTxI):
        return base.add_bias(base.dense(xs_BxTxI, params["W_x"], self.dtype), params["b"])

    @staticmethod
    def _gates(pre_Bx4H):
        i, f, g, o = jnp.split(pre_Bx4H, 4, axis=-1)
        i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
        return i, f, jnp.tanh(g), o

    def recurrent(self, params, carry):
        """Each layer's recurrent matmul: W_h h^0 and up_W_h[l - 1] h^l."""
        h = carry["h"]
        return [base.dense(h[:, 0], params["W_h"], self.dtype)] + [
            base.dense(h[:, l], params["up_W_h"][l - 1], self.dtype) for l in range(1, self.num_layers)
        ]

    def step(self, params, carry, u_Bx4H, rec=None):
        H, sd = self.hidden_size, self.state_dtype
        rec = self.recurrent(params, carry) if rec is None else rec
        hs, cs = [], []
        pre = u_Bx4H + rec[0]
        i, f, g, o = self._gates(pre)
        c = f * carry["c"][:, 0] + i * g
        h = o * jnp.tanh(c)
        hs.append(h), cs.append(c)
        for l in range(1, self.num_layers):
            p = {name: params[name][l - 1] for name in ("up_W_x", "up_W_h", "up_b", "w_cd", "w_ld")}
            c_prev = carry["c"][:, l]
            ux = base.add_bias(base.dense(h, p["up_W_x"], self.dtype), p["up_b"])
            pre = ux[:, : 4 * H] + rec[l]
            i, f, g, o = self._gates(pre)
            d = jax.nn.sigmoid(ux[:, 4 * H :] + base.scale(c_prev, p["w_cd"]) + base.scale(c, p["w_ld"]))
            c = d * c + f * c_prev + i * g
            h = o * jnp.tanh(c)
            hs.append(h), cs.append(c)
        new = {"h": jnp.stack(hs, axis=1).astype(sd), "c": jnp.stack(cs, axis=1).astype(sd)}
        return new, h.astype(self.dtype)
