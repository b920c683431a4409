"""The linear recurrent unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for
Long Sequences"): a diagonal complex linear recurrence with an exponential parametrisation.

    λ = exp(-exp(ν) + i·exp(θ))                      (|λ| < 1 for any ν, θ: always stable)
    s_t = λ ⊙ s_{t-1} + exp(γ_log) ⊙ (B x_t)          s_t ∈ C^N,  γ = sqrt(1 - |λ|²) at init
    h_t = Re(C s_t) + D x_t

a_t = λ and b_t = exp(γ_log) ⊙ B x_t, so the cell runs in parallel. λ is initialised uniformly on
the ring r_min <= |λ| <= r_max with phase in [0, max_phase] (the paper's Lemma 3.2 init).
The paper's D is diagonal because its input and output sizes are equal; here the input size
may differ from H, so D is a full [H, I] matrix.

Parameters (names of the paper's code): nu_log, theta_log, gamma_log [N]; B_re, B_im [N, I];
C_re, C_im [H, N]; D [H, I]. N = ``state_size`` (default H). Carry: complex [B, N].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


@register("lru")
@dataclasses.dataclass(frozen=True)
class LRU(base.LinearCell):
    hidden_size: int
    state_size: int = 0  # N; 0 means N = H
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()
        if not 0.0 <= self.r_min < self.r_max <= 1.0:
            raise ValueError(f"lru: need 0 <= r_min < r_max <= 1, got r_min={self.r_min}, r_max={self.r_max}")

    @property
    def n(self):
        return self.state_size or self.hidden_size

    @property
    def complex_dtype(self):
        return jnp.complex128 if self.state_dtype == jnp.float64 else jnp.complex64

    def initial_carry(self, batch_size):
        return jnp.zeros((batch_size, self.n), self.complex_dtype)

    def input_size(self, params):
        return int(params["B_re"].shape[-1])

    def init(self, key, input_size):
        H, N, pd = self.hidden_size, self.n, self.param_dtype
        k = jax.random.split(key, 7)
        u1 = jax.random.uniform(k[0], (N,), pd)
        u2 = jax.random.uniform(k[1], (N,), pd)
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2))
        theta_log = jnp.log(self.max_phase * u2)
        gamma_log = jnp.log(jnp.sqrt(1.0 - jnp.exp(-2.0 * jnp.exp(nu_log))))
        normal = lambda kk, shape, fan: jax.random.normal(kk, shape, pd) / math.sqrt(fan)
        return {
            "nu_log": nu_log, "theta_log": theta_log, "gamma_log": gamma_log,
            "B_re": normal(k[2], (N, input_size), 2 * input_size),
            "B_im": normal(k[3], (N, input_size), 2 * input_size),
            "C_re": normal(k[4], (H, N), N),
            "C_im": normal(k[5], (H, N), N),
            "D": normal(k[6], (H, input_size), input_size),
        }

    def _lambda(self, params):
        sd = self.state_dtype
        return jnp.exp(-jnp.exp(params["nu_log"].astype(sd)) + 1j * jnp.exp(params["theta_log"].astype(sd)))

    def project(self, params, xs_BxTxI):
        sd = self.state_dtype
        bx = jax.lax.complex(base.dense(xs_BxTxI, params["B_re"], sd), base.dense(xs_BxTxI, params["B_im"], sd))
        bx = base.scale(bx, jnp.exp(params["gamma_log"].astype(sd)).astype(self.complex_dtype))
        return {"bx": bx, "dx": base.dense(xs_BxTxI, params["D"], self.dtype)}

    def coefficients(self, params, us):
        b = us["bx"]
        lam = self._lambda(params)
        a = jnp.broadcast_to(jnp.reshape(lam, (1,) * (b.ndim - 1) + lam.shape), b.shape)
        return a, b

    def gate_operands(self, params, us):
        return us["bx"], (self._lambda(params),)

    def block_coefficients(self, lam, bx):
        """(a, b) = (λ, γ ⊙ B x_t) for one step's row (recur/kernels/gated.py)."""
        return lam, bx

    def readout(self, params, s, us):
        sd = self.state_dtype
        y = base.dense(s.real, params["C_re"], sd) - base.dense(s.imag, params["C_im"], sd)
        return (y + us["dx"]).astype(self.dtype)
