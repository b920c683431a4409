"""The LSTM (Hochreiter & Schmidhuber 1997; forget gate Gers et al. 2000) and the variants of
Greff et al. 2015, "LSTM: A Search Space Odyssey", plus LSTMP and layer normalisation.

The default is the colah / PyTorch form, without peepholes:

    i_t = σ(W_i x_t + R_i h_{t-1} + p_i ⊙ c_{t-1} + b_i)        input gate
    f_t = σ(W_f x_t + R_f h_{t-1} + p_f ⊙ c_{t-1} + b_f)        forget gate
    g_t = act_in(W_g x_t + R_g h_{t-1} + b_g)                     candidate (act_in = tanh)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    o_t = σ(W_o x_t + R_o h_{t-1} + p_o ⊙ c_t + b_o)            output gate
    h_t = o_t ⊙ act_out(c_t)                                      (act_out = tanh)

The p terms exist only with ``peepholes=True`` (Greff's vanilla LSTM "V"; Gers & Schmidhuber
2000). Greff's variants are switches:

    NP   peepholes=False              NIG  input_gate=False   (i_t = 1)
    NFG  forget_gate=False (f_t = 1)  NOG  output_gate=False  (o_t = 1)
    NIAF input_activation=False (g_t = W_g x + R_g h + b_g)   NOAF output_activation=False (h = o ⊙ c)
    CIFG coupled=True (f_t = 1 - i_t; no forget-gate weights; b_i starts at -forget_bias)
    FGR  full_gate_recurrence=True: i, f, o also receive the previous step's i, f, o activations,
         + R_gates [i_{t-1}; f_{t-1}; o_{t-1}] (nine H×H blocks, kept in the carry as "gates")

Further switches: ``forget_bias`` (initial b_f, Gers et al. 2000 / Jozefowicz et al. 2015);
``proj_size`` P > 0 gives LSTMP (Sak et al. 2014): h_t = W_p (o_t ⊙ act_out(c_t)), and the
recurrence reads the projected h; ``layer_norm`` follows Ba et al. 2016:
pre = LN(W x_t) + LN(R h_{t-1}) + b and h_t = o_t ⊙ act_out(LN(c_t)); peephole and FGR terms are
added after the normalisation.

Parameters (gate blocks in PyTorch's order i, f, g, o, leaving out removed gates; n = number of
gate blocks present, P = proj_size or H):
    W_x [nH, I]  W_h [nH, P]  b [nH]  (PyTorch: weight_ih_l0, weight_hh_l0, bias_ih + bias_hh;
    Keras: kernel.T, recurrent_kernel.T, bias; Keras' order i, f, c, o is the same)
    p_i, p_f, p_o [H] (peepholes, for the gates that exist: cifg has no p_f, nig no p_i, nog no p_o)
    R_gates [3H, 3H] (FGR)   W_p [P, H] (PyTorch weight_hr_l0)
    ln_x_scale, ln_x_bias, ln_h_scale, ln_h_bias [nH], ln_c_scale, ln_c_bias [H] (layer_norm)
Carry: {"h": [B, P], "c": [B, H]} (+ "gates": [B, 3H] with FGR).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from recur.cells import base
from recur.cells.registry import register


#: The layer-norm LSTM's hand-written backward step (see LSTM.fused_backward). Off: on this CPU
#: it was no faster than autodiff of the step (B=32, T=128, I=128, H=256, forward + backward,
#: median of 9 interleaved: float32 174 ms generic against 182-184 fused; bfloat16 165 against
#: 160-164), and it is not yet measured on a GPU, where the reverse loop's per-step kernels are
#: what it removes (experiments/gpu_explore.py --ln-fused).
LN_FUSED_BACKWARD = False


@register(
    "lstm",
    variants={
        "vanilla": dict(peepholes=True),
        "peepholes": dict(peepholes=True),
        "np": dict(peepholes=False),
        "nig": dict(input_gate=False),
        "nfg": dict(forget_gate=False),
        "nog": dict(output_gate=False),
        "niaf": dict(input_activation=False),
        "noaf": dict(output_activation=False),
        "cifg": dict(coupled=True),
        "fgr": dict(full_gate_recurrence=True),
        "ln": dict(layer_norm=True),
    },
)
@dataclasses.dataclass(frozen=True)
class LSTM(base.Cell):
    hidden_size: int
    peepholes: bool = False
    input_gate: bool = True
    forget_gate: bool = True
    output_gate: bool = True
    input_activation: bool = True
    output_activation: bool = True
    coupled: bool = False
    full_gate_recurrence: bool = False
    forget_bias: float = 1.0
    proj_size: int = 0
    layer_norm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check()
        if self.coupled and not (self.input_gate and self.forget_gate):
            raise ValueError("lstm: cifg couples the input and forget gates; it needs both (no nig/nfg)")
        if self.full_gate_recurrence and not (self.input_gate and self.forget_gate and self.output_gate and not self.coupled):
            raise ValueError("lstm: fgr connects all three gates i, f, o; it cannot be combined with nig/nfg/nog/cifg")
        if self.proj_size < 0:
            raise ValueError(f"lstm: proj_size must be >= 0, got {self.proj_size}")

    # gate blocks present in W_x / W_h / b, in order
    @property
    def blocks(self) -> tuple[str, ...]:
        keep = {"i": self.input_gate, "f": self.forget_gate and not self.coupled, "g": True, "o": self.output_gate}
        return tuple(g for g in "ifgo" if keep[g])

    @property
    def output_size(self):
        return self.proj_size or self.hidden_size

    def initial_carry(self, batch_size):
        zeros = lambda n: jnp.zeros((batch_size, n), self.state_dtype)
        carry = {"h": zeros(self.output_size), "c": zeros(self.hidden_size)}
        if self.full_gate_recurrence:
            carry["gates"] = zeros(3 * self.hidden_size)
        return carry

    def init(self, key, input_size):
        H, P, n = self.hidden_size, self.output_size, len(self.blocks)
        k = iter(jax.random.split(key, 8))
        pd = self.param_dtype
        b = jnp.zeros((n, H), pd)
        if "f" in self.blocks:
            b = b.at[self.blocks.index("f")].set(self.forget_bias)
        elif self.coupled:
            b = b.at[self.blocks.index("i")].set(-self.forget_bias)
        params = {
            "W_x": base.glorot(next(k), H, input_size, n, pd),
            "W_h": base.orthogonal(next(k), H, P, n, pd),
            "b": b.reshape(n * H),
        }
        if self.peepholes:
            for g in "ifo":
                if g in self.blocks:  # a removed or coupled gate has no peephole
                    params[f"p_{g}"] = base.uniform(next(k), (H,), 0.1, pd)
        if self.full_gate_recurrence:
            params["R_gates"] = base.orthogonal(next(k), H, 3 * H, 3, pd)
        if self.proj_size:
            params["W_p"] = base.glorot(next(k), P, H, 1, pd)
        if self.layer_norm:
            for part, size in (("x", n * H), ("h", n * H), ("c", H)):
                params[f"ln_{part}_scale"] = jnp.ones((size,), pd)
                params[f"ln_{part}_bias"] = jnp.zeros((size,), pd)
        return params

    def project(self, params, xs_BxTxI):
        us = base.dense(xs_BxTxI, params["W_x"], self.dtype)
        if self.layer_norm:
            us = base.layer_norm(us, params["ln_x_scale"], params["ln_x_bias"])
        return base.add_bias(us, params["b"])

    def recurrent(self, params, carry):
        """W_h h, and R_gates applied to the previous gates with fgr."""
        rec = {"h": base.dense(carry["h"], params["W_h"], self.dtype)}
        if self.full_gate_recurrence:
            rec["gates"] = base.dense(carry["gates"], params["R_gates"], self.dtype)
        return rec

    def step(self, params, carry, u_BxG, rec=None):
        c = carry["c"]
        recs = self.recurrent(params, carry) if rec is None else rec
        rec = recs["h"]
        if self.layer_norm:
            rec = base.layer_norm(rec, params["ln_h_scale"], params["ln_h_bias"])
        pre = u_BxG + rec
        if self._fused_gates:
            i, f, g, o = self._fused_gates_of(pre)
            out_gate = lambda c_new: o
        else:
            parts = dict(zip(self.blocks, base.split(pre, len(self.blocks))))
            if self.full_gate_recurrence:
                for name, extra in zip("ifo", jnp.split(recs["gates"], 3, axis=-1)):
                    parts[name] = parts[name] + extra

            def gate(name, cell_state):
                z = parts[name]
                if self.peepholes:
                    z = z + base.scale(cell_state, params[f"p_{name}"])
                return jax.nn.sigmoid(z)

            i = gate("i", c) if self.input_gate else 1.0
            if self.coupled:
                f = 1.0 - i
            else:
                f = gate("f", c) if self.forget_gate else 1.0
            g = jnp.tanh(parts["g"]) if self.input_activation else parts["g"]
            out_gate = lambda c_new: gate("o", c_new) if self.output_gate else 1.0  # peephole on c_t
        c_new = (f * c + i * g).astype(self.state_dtype)
        o = out_gate(c_new)
        c_out = base.layer_norm(c_new, params["ln_c_scale"], params["ln_c_bias"]) if self.layer_norm else c_new
        h_new = o * (jnp.tanh(c_out) if self.output_activation else c_out)
        if self.proj_size:
            h_new = base.dense(h_new, params["W_p"], self.dtype)
        h_new = h_new.astype(self.state_dtype)
        new = {"h": h_new, "c": c_new}
        if self.full_gate_recurrence:
            new["gates"] = jnp.concatenate([i, f, o], axis=-1).astype(self.state_dtype)
        return new, h_new.astype(self.dtype)

    @property
    def gate_layout(self):
        """n gate blocks in W_h (the padded layout of recur/kernels/pad.py); not with layer norm,
        whose statistics run over all blocks."""
        return None if self.layer_norm else (len(self.blocks), ("W_h",))

    @property
    def _fused_gates(self) -> bool:
        """Gates without peepholes or gate recurrence: one tanh over all blocks at once."""
        return not (self.peepholes or self.full_gate_recurrence) and self.input_activation

    def _fused_gates_of(self, pre):
        """(i, f, g, o) from the [B, n * H] pre-activations with one element-wise tanh.

        sigmoid(x) = (1 + tanh(x / 2)) / 2, so scaling the sigmoid blocks by 1/2 lets a single
        tanh serve every block (about 5x less time on CPU than one sigmoid or tanh per block).
        """
        return self._gates_from_tanh(self._gate_tanh(pre))

    def _gate_tanh(self, pre):
        """tanh(pre * s), s = 1 on the g block and 1/2 on the sigmoid blocks: [B, n * H]."""
        H = self.hidden_size
        # the scale vector from iota rather than a constant array: kernels cannot capture arrays
        col = jax.lax.broadcasted_iota(jnp.int32, pre.shape, pre.ndim - 1)
        lo = self.blocks.index("g") * H
        return jnp.tanh(pre * jnp.where((col >= lo) & (col < lo + H), 1.0, 0.5).astype(pre.dtype))

    def _gates_from_tanh(self, t):
        parts = dict(zip(self.blocks, base.split(t, len(self.blocks))))
        sig = lambda b: 0.5 * parts[b] + 0.5 if b in parts else 1.0
        i = sig("i")
        return i, 1.0 - i if self.coupled else sig("f"), parts["g"], sig("o")

    # --- the fused backward step (recur.backprop; see base.Cell) ----------------------------
    @property
    def project_in_loop(self) -> bool:
        return self.fused_backward

    @property
    def _plain_gates(self) -> bool:
        """All four gates, tanh on the candidate and the output (no niaf / noaf), no peepholes,
        gate recurrence or projection."""
        return (self._fused_gates and self.blocks == ("i", "f", "g", "o") and not self.proj_size
                and self.output_activation)

    @property
    def layer_norm_fusable(self) -> bool:
        """With LN_FUSED_BACKWARD this layer-norm LSTM takes the hand-written backward step."""
        return self._plain_gates and self.layer_norm

    @property
    def plain(self) -> bool:
        """The plain LSTM (cuDNN's): :attr:`_plain_gates` without layer norm."""
        return self._plain_gates and not self.layer_norm

    @property
    def fused_backward(self) -> bool:
        """The plain LSTM has a hand-written backward step, in any precision: with a half-precision
        dtype only the matmul operands are half (base.dense accumulates in float32), so the gates,
        the state and the step's derivative are float32 either way. So does the plain LSTM with
        layer norm when LN_FUSED_BACKWARD is set: its step has parameters of its own (the scales
        and biases of LN(W_h h) and LN(c_t)), so its backward step also returns their per-row
        cotangent pieces, which :meth:`param_grads` sums after the loop."""
        return self.plain or (self.layer_norm_fusable and LN_FUSED_BACKWARD)

    def step_saving(self, params, carry, u_BxG, rec):
        """:meth:`step`, also returning what :meth:`step_backward` reads: the gate tanh t [B, 4H]
        and tanh(c_t) [B, H]; with layer norm, tanh(LN(c_t)) instead and also the normalised
        W_h h and c_t with their 1 / std per row."""
        if self.layer_norm:
            return self._ln_step_saving(params, carry, u_BxG, rec)
        t = self._gate_tanh(u_BxG + rec["h"])
        i, f, g, o = self._gates_from_tanh(t)
        c_new = f * carry["c"] + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        return {"h": h_new, "c": c_new}, h_new.astype(self.dtype), (t, tc)

    def _ln_step_saving(self, params, carry, u_BxG, rec):
        # base.layer_norm's normalisation, keeping x_hat and 1 / std for the backward step
        r_hat, r_inv = base.normalised(rec["h"])
        t = self._gate_tanh(u_BxG + base.add_bias(base.scale(r_hat, params["ln_h_scale"]), params["ln_h_bias"]))
        i, f, g, o = self._gates_from_tanh(t)
        c_new = (f * carry["c"] + i * g).astype(self.state_dtype)
        c_hat, c_inv = base.normalised(c_new)
        tc = jnp.tanh(base.add_bias(base.scale(c_hat, params["ln_c_scale"]), params["ln_c_bias"]))
        h_new = (o * tc).astype(self.state_dtype)
        return {"h": h_new, "c": c_new}, h_new.astype(self.dtype), (t, tc, r_hat, r_inv, c_hat, c_inv)

    def step_backward(self, params, carry, saved, dnew, dh_BxH):
        """(d carry (the part not through W_h), d pre [B, 4H], None: d rec = d pre) of one step,
        pre = u + W_h h.

        ``saved`` is (t, tanh(c_t)) from :meth:`step_saving`, t = tanh(s * pre) (s = 1/2 on the
        sigmoid blocks), so a sigmoid gate's derivative is (1 - t^2) / 4 and the candidate's
        1 - t^2; nothing is recomputed.

        With layer norm: (d carry, d u, d rec, (d pre, d LN(c_t))), the last two per-row pieces of
        the norms' parameter cotangents (:meth:`param_grads`); d rec = LN's derivative of d pre.
        """
        t_BxG, tc = saved[:2]
        c_prev = carry["c"]
        t_i, t_f, t_g, t_o = base.split(t_BxG, 4)
        i, f, g, o = self._gates_from_tanh(t_BxG)
        dh = dnew["h"] + dh_BxH
        d_tc = dh * o * (1.0 - tc * tc)  # d of act_out's input: c_t, or LN(c_t) with layer norm
        if self.layer_norm:
            _, _, r_hat, r_inv, c_hat, c_inv = saved
            dc = dnew["c"] + _normalised_grad(base.scale(d_tc, params["ln_c_scale"]), c_hat, c_inv)
        else:
            dc = dnew["c"] + d_tc
        d_pre = jnp.concatenate([(0.25 * dc) * g * (1.0 - t_i * t_i), (0.25 * dc) * c_prev * (1.0 - t_f * t_f),
                                 dc * i * (1.0 - t_g * t_g), (0.25 * dh) * tc * (1.0 - t_o * t_o)], axis=-1)
        # materialised once: otherwise XLA recomputes d_pre inside the fusion that stores it
        d_pre = jax.lax.optimization_barrier(d_pre)
        d_carry = {"h": jnp.zeros_like(dh), "c": dc * f}
        if self.layer_norm:
            d_rec = _normalised_grad(base.scale(d_pre, params["ln_h_scale"]), r_hat, r_inv)
            return d_carry, d_pre, {"h": d_rec}, (d_pre, d_tc)
        return d_carry, d_pre, None

    def param_grads(self, params, saved, pieces):
        """The layer norms' scale and bias cotangents from every step's :meth:`step_backward`
        pieces and :meth:`step_saving` values, stacked over the leading axes [T, B] (zeros for the
        other parameters: the step reads no other)."""
        _, _, r_hat, _, c_hat, _ = saved
        d_pre, d_tc = pieces
        total = lambda x: jnp.sum(x, axis=tuple(range(x.ndim - 1)))
        grads = jax.tree.map(jnp.zeros_like, params)
        grads.update(ln_h_scale=total(d_pre * r_hat), ln_h_bias=total(d_pre),
                     ln_c_scale=total(d_tc * c_hat), ln_c_bias=total(d_tc))
        return {k: v.astype(params[k].dtype) for k, v in grads.items()}

    def recurrent_cotangent(self, d_pre):
        """The cotangent of :meth:`recurrent`'s output, given that of pre = u + rec["h"]."""
        return {"h": d_pre}


def _normalised_grad(d_hat, x_hat, inv):
    """d x from d x_hat through x_hat = (x - mean(x)) / std(x) over the last axis."""
    mean = lambda v: jnp.mean(v, axis=-1, keepdims=True)
    return inv * (d_hat - mean(d_hat) - x_hat * mean(d_hat * x_hat))
