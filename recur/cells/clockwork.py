"""The Clockwork RNN (Koutník et al. 2014, "A Clockwork RNN").

The H hidden units form g equal modules with periods T_1 < ... < T_g. At step t (counted from the
start of each sequence) module i is active when t mod T_i = 0:

    h_t^(i) = f(W_x^(i) x_t + Σ_{j >= i} W_h^(i,j) h_{t-1}^(j) + b^(i))   if t mod T_i = 0
    h_t^(i) = h_{t-1}^(i)                                                  otherwise

so each module reads itself and the slower modules (W_h is block upper-triangular with modules
sorted by period; the blocks below the diagonal are stored but masked to zero).

Parameters: W_x [H, I], W_h [H, H], b [H]. Carry: {"h": [B, H], "t": [B] int32 step counter};
a reset (``recur.scan(resets=...)``) restarts the counter with the state.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


@register("clockwork")
@dataclasses.dataclass(frozen=True)
class Clockwork(base.Cell):
    hidden_size: int
    periods: tuple = (1, 2, 4, 8)  # one module per period, exponential as in the paper
    activation: str = "tanh"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()
        base.activation(self.activation, "clockwork")
        p = tuple(self.periods)
        if not p or any(int(x) < 1 for x in p) or list(p) != sorted(p):
            raise ValueError(f"clockwork: periods must be increasing positive ints, got {self.periods!r}")
        if self.hidden_size % len(p):
            raise ValueError(
                f"clockwork: hidden_size {self.hidden_size} must split into {len(p)} equal modules "
                f"(one per period {p})"
            )

    @property
    def module_size(self):
        return self.hidden_size // len(self.periods)

    def initial_carry(self, batch_size):
        return {"h": jnp.zeros((batch_size, self.hidden_size), self.state_dtype),
                "t": jnp.zeros((batch_size,), jnp.int32)}

    def block_mask(self, dtype=jnp.float32):
        """[H, H] 0/1 mask: unit row r reads unit column c when module(c) >= module(r).

        Built from iota rather than a constant array, so that a Pallas kernel can trace it.
        """
        H = self.hidden_size
        row = jax.lax.broadcasted_iota(jnp.int32, (H, H), 0) // self.module_size
        col = jax.lax.broadcasted_iota(jnp.int32, (H, H), 1) // self.module_size
        return (col >= row).astype(dtype)

    def unit_periods(self):
        """[H] int32: the period of each unit's module (from iota, as block_mask)."""
        module = jax.lax.broadcasted_iota(jnp.int32, (self.hidden_size,), 0) // self.module_size
        period = jnp.zeros((self.hidden_size,), jnp.int32)
        for k, p in enumerate(self.periods):
            period = jnp.where(module == k, p, period)
        return period

    def init(self, key, input_size):
        kx, kh = jax.random.split(key)
        H, pd = self.hidden_size, self.param_dtype
        W_h = base.orthogonal(kh, H, H, 1, pd) * self.block_mask(pd)
        return {"W_x": base.glorot(kx, H, input_size, 1, pd), "W_h": W_h, "b": jnp.zeros((H,), pd)}

    def project(self, params, xs_BxTxI):
        return base.add_bias(base.dense(xs_BxTxI, params["W_x"], self.dtype), params["b"])

    def recurrent(self, params, carry):
        W_h = base.whole(params["W_h"]) * self.block_mask(params["W_h"].dtype)
        return base.dense(carry["h"], W_h, self.dtype)

    def step(self, params, carry, u_BxH, rec=None):
        h, t = carry["h"], carry["t"]
        f = base.activation(self.activation, "clockwork")
        candidate = f(u_BxH + (self.recurrent(params, carry) if rec is None else rec))
        active = (t[:, None] % self.unit_periods()[None, :]) == 0  # [B, H]
        h_new = jnp.where(active, candidate, h).astype(self.state_dtype)
        return {"h": h_new, "t": t + 1}, h_new.astype(self.dtype)
