"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that read only the
input, so the state is linear in its past and the whole sequence can be scanned in parallel.

minGRU:   z_t = σ(W_z x_t + b_z),   h̃_t = g(W_h x_t + b_h)
          h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t                 a_t = 1 - z_t, b_t = z_t ⊙ h̃_t
minLSTM:  f_t = σ(W_f x_t + b_f),   i_t = σ(W_i x_t + b_i),   h̃_t = g(W_h x_t + b_h)
          f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)
          h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t                      a_t = f'_t, b_t = i'_t ⊙ h̃_t

g is the paper's positive activation for its log-space implementation, g(x) = x + 0.5 for
x >= 0 and σ(x) otherwise (``candidate="g"``, the default), or the identity
(``candidate="identity"``, the paper's plain sequential form).

Parameters: minGRU W_x [2H, I] (blocks z, h), b [2H]; minLSTM W_x [3H, I] (blocks f, i, h), b [3H].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


def g(x):
    """Feng et al.'s continuous positive activation: x + 0.5 where x >= 0, else σ(x)."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


_CANDIDATES = {"g": g, "identity": lambda x: x}


class _MinRNN(base.LinearCell):
    n_blocks = 0

    def __post_init__(self):
        self._check()
        if self.candidate not in _CANDIDATES:
            raise ValueError(f"{self.family}: unknown candidate {self.candidate!r}; valid: {sorted(_CANDIDATES)}")

    def init(self, key, input_size):
        H, n, pd = self.hidden_size, self.n_blocks, self.param_dtype
        return {"W_x": base.glorot(key, H, input_size, n, pd), "b": jnp.zeros((n * H,), pd)}

    def project(self, params, xs_BxTxI):
        return base.add_bias(base.dense(xs_BxTxI, params["W_x"], self.dtype), params["b"])

    def coefficients(self, params, us):
        return self.block_coefficients(*jnp.split(us.astype(self.state_dtype), self.n_blocks, axis=-1))

    def gate_operands(self, params, us):
        return us, ()

    def block_coefficients(self, *pre):
        """(a, b) from the gate blocks' pre-activations, each [..., S] in the state dtype:
        element-wise, no parameters (recur/kernels/gated.py computes it inside its kernel)."""
        raise NotImplementedError


@register("mingru", variants={"identity": dict(candidate="identity")})
@dataclasses.dataclass(frozen=True)
class MinGRU(_MinRNN):
    hidden_size: int
    candidate: str = "g"  # g | identity
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    n_blocks = 2

    def block_coefficients(self, pre_z, pre_h):
        z = jax.nn.sigmoid(pre_z)
        return 1.0 - z, z * _CANDIDATES[self.candidate](pre_h)


@register("minlstm", variants={"identity": dict(candidate="identity")})
@dataclasses.dataclass(frozen=True)
class MinLSTM(_MinRNN):
    hidden_size: int
    candidate: str = "g"  # g | identity
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    n_blocks = 3

    def block_coefficients(self, pre_f, pre_i, pre_h):
        f, i = jax.nn.sigmoid(pre_f), jax.nn.sigmoid(pre_i)
        total = f + i
        return f / total, (i / total) * _CANDIDATES[self.candidate](pre_h)
