"""Every cell of the zoo against a plain-NumPy float64 loop over its documented equations.

``tests/numpy_ref.py`` restates each docstring's equations independently of recur's code. Here:
- ``recur.scan`` (all T steps) and one ``cell.project`` + ``cell.step`` agree with the reference,
  on params where every leaf is perturbed (so zero-initialised biases and peepholes matter), from
  a random non-zero carry;
- the reference really depends on each switch (it differs from the family's default cell on the
  same params, or equals the default cell with the removed piece pinned to its documented value);
- the Elman cell reproduces the textbook NumPy loop.

Tolerance: recur runs in float32 (params and inputs are float32, so the reference sees exactly the
same numbers in float64). Over T = 6 steps float32 rounding (eps ~ 6e-8) accumulates to at most
~1e-6 absolute here (largest: elman:relu, whose outputs reach ~12; typically 1e-7). We allow
rtol = atol = 2e-5: over 15x margin, yet far below any real equation difference (a wrong gate,
bias, peephole or LayerNorm eps changes outputs by 1e-4..1). Matmuls run at "highest" precision
so that an accelerator's default TF32 matmuls would not need a looser tolerance.
"""
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recur
from cell_cases import ALIASES, CASES, hidden_size
from numpy_ref import reference
from recur.cells import LSTM, Elman

B, T, I = 3, 6, 4
RTOL = ATOL = 2e-5
NOISE = 0.3
# fields that only change the initialisation, not the equations
INIT_ONLY = {"forget_bias", "r_min", "r_max", "max_phase", "dtype", "param_dtype"}


def build(name):
    return recur.get_cell(name, hidden_size(name))


def rng_for(name, salt=""):
    return np.random.default_rng(zlib.crc32(f"{name}/{salt}".encode()))


def perturbed_params(cell, rng):
    """cell.init params with every leaf moved by N(0, NOISE²) noise, kept in the leaf's dtype."""
    params = cell.init(jax.random.key(0), I)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + NOISE * rng.normal(size=a.shape), a.dtype), params
    )


def random_carry(cell, rng, start=0):
    """A non-zero carry of initial_carry's structure; integer leaves (step counters) = start."""

    def leaf(a):
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            return jnp.asarray(0.5 * (rng.normal(size=a.shape) + 1j * rng.normal(size=a.shape)), a.dtype)
        if jnp.issubdtype(a.dtype, jnp.integer):
            return jnp.asarray(np.broadcast_to(np.asarray(start), a.shape), a.dtype)
        return jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype)

    return jax.tree.map(leaf, cell.initial_carry(B))


def random_problem(name, start=0):
    cell = build(name)
    rng = rng_for(name)
    params = perturbed_params(cell, rng)
    xs = jnp.asarray(rng.normal(size=(B, T, I)), jnp.float32)
    return cell, params, xs, random_carry(cell, rng, start)


def assert_tree_close(got, want, what, rtol=RTOL, atol=ATOL):
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"{what}: structure {got_def} != {want_def}"
    for path, g, w in zip(jax.tree_util.tree_flatten_with_path(want)[0], got_leaves, want_leaves):
        where = f"{what}{jax.tree_util.keystr(path[0])}"
        g = np.asarray(g)
        assert g.shape == np.shape(w), f"{where}: shape {g.shape} != {np.shape(w)}"
        if np.issubdtype(g.dtype, np.integer):
            np.testing.assert_array_equal(g, w, err_msg=where)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=where)


# --- recur against the reference --------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_scan_matches_reference(name):
    cell, params, xs, carry0 = random_problem(name)
    with jax.default_matmul_precision("highest"):
        hs, carry = recur.scan(cell, params, xs, initial_carry=carry0)
    ref_hs, ref_carry = reference(cell, params, xs, carry0)
    assert hs.shape == (B, T, cell.output_size) == ref_hs.shape
    assert_tree_close(hs, ref_hs, f"{name} hs")
    assert_tree_close(carry, ref_carry, f"{name} final carry")


@pytest.mark.parametrize("name", CASES)
def test_one_step_matches_reference(name):
    cell, params, xs, carry0 = random_problem(name)
    with jax.default_matmul_precision("highest"):
        us = cell.project(params, xs[:, :1])
        carry1, h1 = cell.step(params, carry0, jax.tree.map(lambda u: u[:, 0], us))
    ref_hs, ref_carry = reference(cell, params, xs[:, :1], carry0)
    assert_tree_close(h1, ref_hs[:, 0], f"{name} h_1")
    assert_tree_close(carry1, ref_carry, f"{name} carry_1")


@pytest.mark.parametrize("start", [3, "mixed"])
@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("clockwork")])
def test_clockwork_from_a_later_step(name, start):
    start = np.array([0, 1, 3]) if start == "mixed" else start
    cell, params, xs, carry0 = random_problem(name, start)
    with jax.default_matmul_precision("highest"):
        hs, carry = recur.scan(cell, params, xs, initial_carry=carry0)
    ref_hs, ref_carry = reference(cell, params, xs, carry0)
    assert_tree_close(hs, ref_hs, f"{name} hs")
    assert_tree_close(carry, ref_carry, f"{name} final carry")


# --- the reference depends on every switch -------------------------------------------------------
def _equations(cell):
    return {f.name: getattr(cell, f.name) for f in dataclasses.fields(cell) if f.name not in INIT_ONLY}


@pytest.mark.parametrize("name", [n for n in CASES if ":" in n])
def test_reference_depends_on_switch(name):
    """Same params, the family's default cell: outputs differ iff the equations' switches differ."""
    cell, params, xs, carry0 = random_problem(name)
    try:
        plain = type(cell)(hidden_size=cell.hidden_size)
    except ValueError as e:
        pytest.skip(f"no default cell at this size: {e}")
    plain_params = plain.init(jax.random.key(0), I)
    plain_carry = plain.initial_carry(B)
    same_shape = lambda want, have: all(k in have and have[k].shape == v.shape for k, v in want.items())
    plain_carry0 = carry0
    if isinstance(plain_carry, dict):
        if not same_shape(plain_carry, carry0):
            pytest.skip("carry shapes differ from the default cell's")
        plain_carry0 = {k: carry0[k] for k in plain_carry}
    if not same_shape(plain_params, params):
        pytest.skip("parameter shapes differ from the default cell's (see the gate-removal test)")
    hs, _ = reference(cell, params, xs, carry0)
    plain_hs, _ = reference(plain, {k: params[k] for k in plain_params}, xs, plain_carry0)
    if _equations(cell) == _equations(plain):
        np.testing.assert_array_equal(hs, plain_hs)
    else:
        assert np.abs(hs - plain_hs).max() > 1e-3, f"the reference ignores a switch of {name}"


def test_aliases_build_the_cell_they_stand_for():
    """The generic tests run each configuration once (tests/cell_cases.py): the names they leave
    out are the registry's aliases, which build the same cell at any size and precision."""
    assert ALIASES == {"elman:tanh": "elman", "lstm:peepholes": "lstm:vanilla", "lstm:np": "lstm",
                       "gru:reset_before": "gru:cho", "gru:reset_after": "gru", "indrnn:relu": "indrnn"}
    for alias, name in ALIASES.items():
        assert recur.get_cell(alias, 12, dtype=jnp.bfloat16) == recur.get_cell(name, 12, dtype=jnp.bfloat16)
    assert recur.get_cell("lstm:peepholes", 12) != recur.get_cell("lstm", 12)  # equality can fail


def test_reference_elman_nobias():
    """elman:nobias equals elman with b = 0 and differs from it with the perturbed b."""
    cell, params, xs, carry0 = random_problem("elman")
    nobias = recur.get_cell("elman:nobias", cell.hidden_size)
    hs, _ = reference(cell, dict(params, b=np.zeros(cell.hidden_size)), xs, carry0)
    nobias_hs, _ = reference(nobias, {k: params[k] for k in ("W_x", "W_h")}, xs, carry0)
    np.testing.assert_array_equal(nobias_hs, hs)
    assert np.abs(reference(cell, params, xs, carry0)[0] - nobias_hs).max() > 1e-3


def _lstm_with_all_gates(cell, params):
    """An LSTM with i, f, g, o all present, equal to ``cell`` by the docstring's definitions:
    a removed gate is pinned to 1 (zero weights, bias 60: σ(60) == 1.0 in float64) and CIFG's
    f = 1 - i = σ(-z_i) is a forget block holding minus the input block (peephole included)."""
    H = cell.hidden_size
    full = dataclasses.replace(cell, input_gate=True, forget_gate=True, output_gate=True, coupled=False)
    blocks = cell.blocks
    get = lambda key, g: np.asarray(params[key]).reshape(len(blocks), H, -1)[blocks.index(g)]
    W_x, W_h, b = [], [], []
    for g in "ifgo":
        if g in blocks:
            parts = [get("W_x", g), get("W_h", g), get("b", g)]
        elif g == "f" and cell.coupled:
            parts = [-get("W_x", "i"), -get("W_h", "i"), -get("b", "i")]
        else:
            parts = [np.zeros_like(get("W_x", "g")), np.zeros_like(get("W_h", "g")), np.full((H, 1), 60.0)]
        for out, part in zip((W_x, W_h, b), parts):
            out.append(part)
    new = dict(params, W_x=np.concatenate(W_x), W_h=np.concatenate(W_h), b=np.concatenate(b)[:, 0])
    if cell.peepholes:
        for g in "ifo":
            if f"p_{g}" not in params:
                new[f"p_{g}"] = -np.asarray(params["p_i"]) if (g == "f" and cell.coupled) else np.zeros(H)
    return full, new


@pytest.mark.parametrize(
    "name", [n for n in CASES if isinstance(build(n), LSTM) and len(build(n).blocks) < 4]
)
def test_reference_removed_gates(name):
    """nig / nfg / nog / cifg equal the full LSTM with that gate pinned as documented."""
    cell, params, xs, carry0 = random_problem(name)
    assert not cell.layer_norm  # LN statistics run over all gate blocks: no such equivalence
    full, full_params = _lstm_with_all_gates(cell, params)
    hs, carry = reference(cell, params, xs, carry0)
    full_hs, full_carry = reference(full, full_params, xs, carry0)
    np.testing.assert_allclose(hs, full_hs, rtol=1e-12, atol=1e-12)
    assert_tree_close(carry, full_carry, name, rtol=1e-12, atol=1e-12)


def test_reference_dglstm_bottom_layer_is_an_lstm():
    cell, params, xs, carry0 = random_problem("dglstm")
    hs, carry = reference(cell, params, xs, carry0)
    lstm = LSTM(cell.hidden_size)
    lstm_params = {k: params[k] for k in ("W_x", "W_h", "b")}
    _, lstm_carry = reference(lstm, lstm_params, xs, {"h": carry0["h"][:, 0], "c": carry0["c"][:, 0]})
    np.testing.assert_allclose(carry["h"][:, 0], lstm_carry["h"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(carry["c"][:, 0], lstm_carry["c"], rtol=1e-12, atol=1e-12)
    assert np.abs(hs[:, -1] - carry["h"][:, 0]).max() > 1e-3  # the output is the top layer


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("clockwork")])
def test_reference_clockwork_periods(name):
    """Period 1 everywhere: an Elman RNN with W_h's lower blocks zeroed; the real periods differ."""
    cell, params, xs, carry0 = random_problem(name)
    every = dataclasses.replace(cell, periods=(1,) * len(cell.periods))
    hs, _ = reference(cell, params, xs, carry0)
    every_hs, _ = reference(every, params, xs, carry0)
    module = np.arange(cell.hidden_size) // (cell.hidden_size // len(cell.periods))
    elman_params = dict(params, W_h=np.asarray(params["W_h"]) * (module[None, :] >= module[:, None]))
    elman_hs, _ = reference(Elman(cell.hidden_size, activation=cell.activation), elman_params, xs, carry0["h"])
    np.testing.assert_allclose(every_hs, elman_hs, rtol=1e-12, atol=1e-12)
    assert np.abs(hs - every_hs).max() > 1e-3


def test_reference_rejects_unknown_cells():
    @dataclasses.dataclass(frozen=True)
    class Mystery(recur.cells.Cell):
        hidden_size: int = 2

    with pytest.raises(NotImplementedError):
        reference(Mystery(), {}, np.zeros((1, 1, 1)), np.zeros((1, 2)))


# --- the Elman tutorial ------------------------------------------------------------------------
def test_elman_reproduces_the_tutorial():
    """h_t = tanh(W_x x_t + W_h h_{t-1} + b), T = 10, input 4, hidden 8, h_0 = 0."""
    timesteps, input_size, hidden = 10, 4, 8
    rng = np.random.default_rng(0)
    # float32-representable values, so NumPy and recur start from identical numbers
    f32 = lambda *shape: rng.random(shape).astype(np.float32).astype(np.float64)
    inputs = f32(timesteps, input_size)
    W_x, W_h, b = f32(hidden, input_size), f32(hidden, hidden), f32(hidden)
    hidden_state = np.zeros((hidden,))
    outputs = []
    for x_t in inputs:
        hidden_state = np.tanh(np.dot(W_x, x_t) + np.dot(W_h, hidden_state) + b)
        outputs.append(hidden_state)
    outputs = np.stack(outputs, axis=0)
    assert outputs.shape == (10, 8)

    cell = recur.get_cell("elman", hidden)
    template = cell.init(jax.random.key(0), input_size)
    params = {"W_x": jnp.asarray(W_x, jnp.float32), "W_h": jnp.asarray(W_h, jnp.float32),
              "b": jnp.asarray(b, jnp.float32)}
    assert jax.tree.map(jnp.shape, template) == jax.tree.map(jnp.shape, params)
    with jax.default_matmul_precision("highest"):
        hs, h_last = recur.scan(cell, params, jnp.asarray(inputs[None], jnp.float32))
    assert hs.shape == (1, 10, 8)
    np.testing.assert_allclose(np.asarray(hs[0]), outputs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h_last[0]), outputs[-1], rtol=1e-6, atol=1e-6)
    ref_hs, _ = reference(cell, params, inputs[None], np.zeros((1, hidden)))
    np.testing.assert_allclose(ref_hs[0], outputs, rtol=1e-13, atol=1e-13)
