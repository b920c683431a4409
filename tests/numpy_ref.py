"""Plain-NumPy float64 references for every cell of the zoo, written from the docstrings' equations.

    hs_BxTxO, final_carry = reference(cell, params, xs_BxTxI, carry0)

Each reference is an explicit Python loop over time (and over layers for the depth-gated LSTM,
over modules for the Clockwork RNN) that reads the cell's dataclass fields and its params by the
names the docstrings give. Nothing here calls recur's ``project`` / ``step``: the point is an
independent statement of the documented equations. The result has the same structure as
``recur.scan``'s (the final carry is a dict where the cell's carry is a dict).

A cell class not listed here, or a listed class that grew a dataclass field this file does not
know, raises NotImplementedError so a new cell or switch fails loudly instead of passing.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from recur.cells import (
    GRU, LRU, LSTM, MGU, Clockwork, DepthGatedLSTM, Elman, IndRNN, MinGRU, MinLSTM,
)

LN_EPS = 1e-5


# --- element-wise functions ------------------------------------------------------------------
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0.0)


ACTIVATIONS = {"tanh": np.tanh, "relu": relu, "sigmoid": sigmoid, "identity": lambda x: x}


def act(name: str):
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"numpy_ref: no reference for activation {name!r}")
    return ACTIVATIONS[name]


def layer_norm(x, scale, bias):
    """LayerNorm over the last axis, biased variance, eps = 1e-5 (Ba et al. 2016)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * scale + bias


def min_g(x):
    """Feng et al. 2024's positive activation: x + 0.5 for x >= 0, sigmoid(x) otherwise."""
    return np.where(x >= 0, x + 0.5, sigmoid(x))


def mv(W, x_BxK):
    """W x for each batch row: [B, K] -> [B, R] for W [R, K]."""
    return x_BxK @ W.T


# --- conversions -------------------------------------------------------------------------------
def _f64(tree):
    if isinstance(tree, dict):
        return {k: _f64(v) for k, v in tree.items()}
    a = np.asarray(tree)
    if np.iscomplexobj(a):
        return a.astype(np.complex128)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64)
    return a.astype(np.float64)


# Fields each reference knows; a new field means a new switch this file would silently ignore.
_KNOWN_FIELDS = {
    Elman: {"hidden_size", "activation", "bias", "dtype", "param_dtype"},
    LSTM: {"hidden_size", "peepholes", "input_gate", "forget_gate", "output_gate",
           "input_activation", "output_activation", "coupled", "full_gate_recurrence",
           "forget_bias", "proj_size", "layer_norm", "dtype", "param_dtype"},
    GRU: {"hidden_size", "reset_after", "dtype", "param_dtype"},
    MGU: {"hidden_size", "dtype", "param_dtype"},
    IndRNN: {"hidden_size", "activation", "dtype", "param_dtype"},
    MinGRU: {"hidden_size", "candidate", "dtype", "param_dtype"},
    MinLSTM: {"hidden_size", "candidate", "dtype", "param_dtype"},
    LRU: {"hidden_size", "state_size", "r_min", "r_max", "max_phase", "dtype", "param_dtype"},
    Clockwork: {"hidden_size", "periods", "activation", "dtype", "param_dtype"},
    DepthGatedLSTM: {"hidden_size", "num_layers", "forget_bias", "dtype", "param_dtype"},
}


def reference(cell, params, xs_BxTxI, carry0):
    """Run ``cell``'s documented equations over xs [B, T, I] from ``carry0``, in float64."""
    cls = type(cell)
    if cls not in _REFERENCES:
        raise NotImplementedError(f"numpy_ref: no reference for cell class {cls.__name__}")
    fields = {f.name for f in dataclasses.fields(cell)}
    unknown = fields - _KNOWN_FIELDS[cls]
    if unknown:
        raise NotImplementedError(f"numpy_ref: {cls.__name__} has fields the reference ignores: {sorted(unknown)}")
    p = _f64(dict(params))
    xs = _f64(xs_BxTxI)
    carry = _f64(carry0)
    return _REFERENCES[cls](cell, p, xs, carry)


# --- Elman: h_t = f(W_x x_t + W_h h_{t-1} + b) ---------------------------------------------------
def _elman(cell, p, xs, h):
    f = act(cell.activation)
    hs = []
    for t in range(xs.shape[1]):
        pre = mv(p["W_x"], xs[:, t]) + mv(p["W_h"], h)
        if cell.bias:
            pre = pre + p["b"]
        h = f(pre)
        hs.append(h)
    return np.stack(hs, 1), h


# --- LSTM and Greff's variants, LSTMP, LayerNorm ------------------------------------------------------
def _lstm(cell, p, xs, carry):
    H = cell.hidden_size
    B = xs.shape[0]
    present = {"i": cell.input_gate, "f": cell.forget_gate and not cell.coupled, "g": True,
               "o": cell.output_gate}
    blocks = [g for g in "ifgo" if present[g]]
    n = len(blocks)
    assert p["W_x"].shape[0] == n * H and p["b"].shape == (n * H,), (blocks, p["W_x"].shape)

    def block(v, g):
        k = blocks.index(g)
        return v[:, k * H:(k + 1) * H]

    h, c = carry["h"], carry["c"]
    gates = carry.get("gates")
    hs = []
    ones = np.ones((B, H))
    for t in range(xs.shape[1]):
        wx = mv(p["W_x"], xs[:, t])
        rh = mv(p["W_h"], h)
        if cell.layer_norm:
            wx = layer_norm(wx, p["ln_x_scale"], p["ln_x_bias"])
            rh = layer_norm(rh, p["ln_h_scale"], p["ln_h_bias"])
        pre = wx + rh + p["b"]
        z = {g: block(pre, g) for g in blocks}
        if cell.full_gate_recurrence:
            extra = mv(p["R_gates"], gates)  # R_gates [i_{t-1}; f_{t-1}; o_{t-1}]
            for k, g in enumerate("ifo"):
                z[g] = z[g] + extra[:, k * H:(k + 1) * H]
        if cell.peepholes:
            for g in "if":
                if g in blocks:  # a removed or coupled gate has no peephole
                    z[g] = z[g] + p[f"p_{g}"] * c  # peek at c_{t-1}
        i = sigmoid(z["i"]) if cell.input_gate else ones
        if cell.coupled:
            f = 1.0 - i
        else:
            f = sigmoid(z["f"]) if cell.forget_gate else ones
        g = np.tanh(z["g"]) if cell.input_activation else z["g"]
        c = f * c + i * g
        if cell.output_gate:
            zo = z["o"] + (p["p_o"] * c if cell.peepholes else 0.0)  # peek at c_t
            o = sigmoid(zo)
        else:
            o = ones
        c_read = layer_norm(c, p["ln_c_scale"], p["ln_c_bias"]) if cell.layer_norm else c
        m = o * (np.tanh(c_read) if cell.output_activation else c_read)
        h = mv(p["W_p"], m) if cell.proj_size else m
        if cell.full_gate_recurrence:
            gates = np.concatenate([i, f, o], axis=-1)
        hs.append(h)
    final = {"h": h, "c": c}
    if cell.full_gate_recurrence:
        final["gates"] = gates
    return np.stack(hs, 1), final


# --- GRU (both forms) and MGU ------------------------------------------------------------------------
def _gru(cell, p, xs, h):
    H = cell.hidden_size
    Wx = [p["W_x"][k * H:(k + 1) * H] for k in range(3)]  # r, z, n
    Wh = [p["W_h"][k * H:(k + 1) * H] for k in range(3)]
    bx = [p["b_x"][k * H:(k + 1) * H] for k in range(3)]
    bh = [p["b_h"][k * H:(k + 1) * H] for k in range(3)]
    hs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        r = sigmoid(mv(Wx[0], x) + bx[0] + mv(Wh[0], h) + bh[0])
        z = sigmoid(mv(Wx[1], x) + bx[1] + mv(Wh[1], h) + bh[1])
        if cell.reset_after:
            n = np.tanh(mv(Wx[2], x) + bx[2] + r * (mv(Wh[2], h) + bh[2]))
        else:
            n = np.tanh(mv(Wx[2], x) + bx[2] + mv(Wh[2], r * h) + bh[2])
        h = (1.0 - z) * n + z * h
        hs.append(h)
    return np.stack(hs, 1), h


def _mgu(cell, p, xs, h):
    H = cell.hidden_size
    Wf, Wn = p["W_x"][:H], p["W_x"][H:]
    Rf, Rn = p["W_h"][:H], p["W_h"][H:]
    bf, bn = p["b"][:H], p["b"][H:]
    hs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        f = sigmoid(mv(Wf, x) + mv(Rf, h) + bf)
        n = np.tanh(mv(Wn, x) + mv(Rn, f * h) + bn)
        h = (1.0 - f) * h + f * n
        hs.append(h)
    return np.stack(hs, 1), h


# --- IndRNN: h_t = f(W_x x_t + u ⊙ h_{t-1} + b) ------------------------------------------------------
def _indrnn(cell, p, xs, h):
    f = act(cell.activation)
    hs = []
    for t in range(xs.shape[1]):
        h = f(mv(p["W_x"], xs[:, t]) + p["u"] * h + p["b"])
        hs.append(h)
    return np.stack(hs, 1), h


# --- minGRU / minLSTM -----------------------------------------------------------------------------
def _candidate(cell):
    if cell.candidate == "g":
        return min_g
    if cell.candidate == "identity":
        return lambda x: x
    raise NotImplementedError(f"numpy_ref: unknown candidate {cell.candidate!r}")


def _mingru(cell, p, xs, h):
    H = cell.hidden_size
    cand = _candidate(cell)
    hs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        z = sigmoid(mv(p["W_x"][:H], x) + p["b"][:H])
        h_tilde = cand(mv(p["W_x"][H:], x) + p["b"][H:])
        h = (1.0 - z) * h + z * h_tilde
        hs.append(h)
    return np.stack(hs, 1), h


def _minlstm(cell, p, xs, h):
    H = cell.hidden_size
    cand = _candidate(cell)
    W = [p["W_x"][k * H:(k + 1) * H] for k in range(3)]  # f, i, h
    b = [p["b"][k * H:(k + 1) * H] for k in range(3)]
    hs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        f = sigmoid(mv(W[0], x) + b[0])
        i = sigmoid(mv(W[1], x) + b[1])
        h_tilde = cand(mv(W[2], x) + b[2])
        f_n, i_n = f / (f + i), i / (f + i)
        h = f_n * h + i_n * h_tilde
        hs.append(h)
    return np.stack(hs, 1), h


# --- LRU --------------------------------------------------------------------------------------------
def _lru(cell, p, xs, s):
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    gamma = np.exp(p["gamma_log"])
    Bm = p["B_re"] + 1j * p["B_im"]
    Cm = p["C_re"] + 1j * p["C_im"]
    s = s.astype(np.complex128)
    hs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        s = lam * s + gamma * mv(Bm, x)
        hs.append(np.real(mv(Cm, s)) + mv(p["D"], x))
    return np.stack(hs, 1), s


# --- Clockwork ----------------------------------------------------------------------------------------
def _clockwork(cell, p, xs, carry):
    periods = [int(q) for q in cell.periods]
    g = len(periods)
    H = cell.hidden_size
    assert H % g == 0
    k = H // g
    f = act(cell.activation)
    h, step = carry["h"].copy(), carry["t"].copy()
    sl = [slice(m * k, (m + 1) * k) for m in range(g)]
    hs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        new = h.copy()
        for i in range(g):  # module i reads itself and the slower modules j >= i
            pre = mv(p["W_x"][sl[i]], x) + p["b"][sl[i]]
            for j in range(i, g):
                pre = pre + mv(p["W_h"][sl[i], sl[j]], h[:, sl[j]])
            active = (step % periods[i]) == 0  # [B]
            new[:, sl[i]] = np.where(active[:, None], f(pre), h[:, sl[i]])
        h = new
        step = step + 1
        hs.append(h)
    return np.stack(hs, 1), {"h": h, "t": step}


# --- depth-gated LSTM ---------------------------------------------------------------------------------
def _dglstm(cell, p, xs, carry):
    H, L = cell.hidden_size, cell.num_layers
    h_prev, c_prev = carry["h"].copy(), carry["c"].copy()  # [B, L, H]

    def split(v, n):
        return [v[:, k * H:(k + 1) * H] for k in range(n)]

    hs = []
    for t in range(xs.shape[1]):
        h_new, c_new = np.zeros_like(h_prev), np.zeros_like(c_prev)
        # layer 1: a standard LSTM without peepholes, gate order i, f, g, o
        zi, zf, zg, zo = split(mv(p["W_x"], xs[:, t]) + mv(p["W_h"], h_prev[:, 0]) + p["b"], 4)
        c = sigmoid(zf) * c_prev[:, 0] + sigmoid(zi) * np.tanh(zg)
        h = sigmoid(zo) * np.tanh(c)
        h_new[:, 0], c_new[:, 0] = h, c
        for l in range(1, L):
            x_l, c_below = h, c
            Wx, Wh, b = p["up_W_x"][l - 1], p["up_W_h"][l - 1], p["up_b"][l - 1]
            zx = split(mv(Wx, x_l) + b, 5)  # i, f, g, o, d
            zh = split(mv(Wh, h_prev[:, l]), 4)
            i, f, o = (sigmoid(zx[k] + zh[k]) for k in (0, 1, 3))
            g = np.tanh(zx[2] + zh[2])
            d = sigmoid(zx[4] + p["w_cd"][l - 1] * c_prev[:, l] + p["w_ld"][l - 1] * c_below)
            c = d * c_below + f * c_prev[:, l] + i * g
            h = o * np.tanh(c)
            h_new[:, l], c_new[:, l] = h, c
        h_prev, c_prev = h_new, c_new
        hs.append(h)
    return np.stack(hs, 1), {"h": h_prev, "c": c_prev}


_REFERENCES = {
    Elman: _elman, LSTM: _lstm, GRU: _gru, MGU: _mgu, IndRNN: _indrnn, MinGRU: _mingru,
    MinLSTM: _minlstm, LRU: _lru, Clockwork: _clockwork, DepthGatedLSTM: _dglstm,
}
