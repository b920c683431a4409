"""The deferred-weight-gradient BPTT (recur/backprop.py) against plain autodiff, every cell."""
import jax
import jax.numpy as jnp
import pytest

import recur
from cell_cases import CASES
from test_scan import B, T, make, random_carry

OPTIONS = {
    # no mask, 3 steps per loop iteration (T = 7: a remainder); unroll and masks are independent
    # (lax.scan's unroll), so the masked options below run at unroll 1
    "plain, unrolled": {"unroll": 3},
    "resets": {"resets": jnp.zeros((B, T), bool).at[0, 3].set(True).at[1, 1].set(True), "reset_carry": True},
    # lengths (one of them 0) read backwards: the deferred scan sees the same mask as reading
    # forwards (recur.scan reverses the inputs within each length, not the mask), so this one
    # option covers lengths alone too
    "lengths, reverse": {"lengths": jnp.array([T, 4, 0]), "reverse": True},
}


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


@pytest.mark.parametrize("name", CASES)
def test_deferred_gradients_equal_autodiff(name):
    with jax.enable_x64(True):
        cell, params, xs = make(name, dtype=jnp.float64)
        carry0, reset_carry = random_carry(cell, B, seed=3), random_carry(cell, B, seed=4)
        w = jax.random.normal(jax.random.key(9), (B, T, cell.output_size), jnp.float64)
        for option, kwargs in OPTIONS.items():
            kwargs = dict(kwargs)

            def loss(p, x, c0, rc, backward):
                kw = dict(kwargs, reset_carry=rc) if "reset_carry" in kwargs else kwargs
                hs, carry = recur.scan(cell, p, x, initial_carry=c0, backward=backward, **kw)
                last = sum(jnp.sum(jnp.abs(l) ** 2) for l in _float_leaves(carry))
                return jnp.sum(jnp.sin(jnp.real(hs)) * w) + last

            args = (params, xs, carry0, reset_carry)
            grad = jax.grad(loss, argnums=(0, 1, 2, 3), allow_int=True)
            want, got = grad(*args, "autodiff"), grad(*args, "deferred")
            for a, b in zip(_float_leaves(want), _float_leaves(got)):
                assert jnp.allclose(a, b, atol=1e-10, rtol=1e-8), (option, float(jnp.max(jnp.abs(a - b))))
            assert any(float(jnp.max(jnp.abs(g))) > 0 for g in _float_leaves(got[3])) == ("reset_carry" in kwargs)


@pytest.fixture
def ln_fused(monkeypatch):
    """The layer-norm LSTM with its hand-written backward step (off by default)."""
    from recur.cells import lstm

    monkeypatch.setattr(lstm, "LN_FUSED_BACKWARD", True)


@pytest.mark.parametrize("name,fused", [("lstm", True), ("gru", True), ("lstm:ln", False), ("lstm:ln", True)])
def test_deferred_under_jit_with_bfloat16(name, fused, monkeypatch):
    """bfloat16 compute (float32 state): the fused backward steps (lstm, gru, and lstm:ln with
    LN_FUSED_BACKWARD) and the generic one (lstm:ln by default) against autodiff, values and
    gradients for the weights and the inputs."""
    from recur.cells import lstm

    monkeypatch.setattr(lstm, "LN_FUSED_BACKWARD", fused)
    cell, params, xs = make(name)
    cell = recur.get_cell(name, cell.hidden_size, dtype=jnp.bfloat16)
    assert cell.fused_backward == fused
    w = jax.random.normal(jax.random.key(5), (B, T, cell.output_size))
    kw = dict(lengths=jnp.array([T, 4, 0]))

    def loss(p, x, backward):
        hs, carry = recur.scan(cell, p, x, backward=backward, **kw)
        assert hs.dtype == jnp.bfloat16 and carry_dtypes(carry) == {jnp.dtype(jnp.float32)}
        return jnp.sum(hs.astype(jnp.float32) * w) + jnp.sum(jax.tree.leaves(carry)[0] ** 2), hs

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (want, hs_want), (got, hs_got) = grad(params, xs, "autodiff"), grad(params, xs, "deferred")
    assert jnp.array_equal(hs_want, hs_got) or float(jnp.max(jnp.abs(
        hs_want.astype(jnp.float32) - hs_got.astype(jnp.float32)))) <= 2 ** -7
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert a.dtype == b.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(a)))
        assert scale > 0 and float(jnp.max(jnp.abs(a - b))) <= 1e-2 * scale, (name, a.shape)


def carry_dtypes(carry):
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(carry)}


@pytest.mark.parametrize("name", ["lstm", "gru", "elman"])
def test_fused_backward_with_half_precision_projected_inputs(name):
    """projected=True with bfloat16 inputs: the fused step's float32 d pre comes back as the
    inputs' dtype (a custom_vjp cotangent must match its primal)."""
    cell, params, xs = make(name)
    cell = recur.get_cell(name, cell.hidden_size, dtype=jnp.bfloat16)
    us = cell.project(params, xs).astype(jnp.bfloat16)

    def loss(u, backward):
        hs, _ = recur.scan(cell, params, u, projected=True, backward=backward)
        return jnp.sum(jnp.sin(hs.astype(jnp.float32)))

    want = jax.jit(jax.grad(loss), static_argnums=1)(us, "autodiff")
    got = jax.jit(jax.grad(loss), static_argnums=1)(us, "deferred")
    assert got.dtype == want.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    assert scale > 0 and float(jnp.max(jnp.abs((want - got).astype(jnp.float32)))) <= 1e-2 * scale


def test_deferred_is_the_default_and_remat_uses_autodiff():
    cell, params, xs = make("lstm")
    jaxpr = lambda **kw: str(jax.make_jaxpr(lambda p: recur.scan(cell, p, xs, **kw)[0].sum())(params))
    assert "custom_vjp" in jaxpr()
    assert "custom_vjp" not in jaxpr(backward="autodiff")
    assert "custom_vjp" not in jaxpr(remat="step")


def test_unknown_backward_is_an_error():
    cell, params, xs = make("gru")
    with pytest.raises(ValueError, match="backward must be one of"):
        recur.scan(cell, params, xs, backward="manual")


FUSED = ["lstm", "lstm:ln", "gru", "elman", "elman:relu", "elman:sigmoid", "elman:nobias", "elman:activation=identity"]


@pytest.mark.parametrize("name", FUSED)
def test_fused_backward_step_matches_autodiff_of_the_step(name, ln_fused):
    """A cell's hand-written step backward (used by the deferred scan) against jax.vjp of step."""
    with jax.enable_x64(True):
        cell = recur.get_cell(name, 5, dtype=jnp.float64, param_dtype=jnp.float64)
        assert cell.fused_backward
        params = jax.tree.map(lambda p: p + 0.3, cell.init(jax.random.key(0), 3))  # non-zero biases
        rand = lambda tree, seed: jax.tree.map(
            lambda x: jax.random.normal(jax.random.key(seed), x.shape, jnp.float64), tree)
        carry = rand(cell.initial_carry(4), 1)
        us = cell.project(params, jax.random.normal(jax.random.key(2), (4, 1, 3), jnp.float64))
        u = jax.tree.map(lambda x: x[:, 0], us)
        rec = cell.recurrent(params, carry)
        dnew, dh = rand(carry, 3), jax.random.normal(jax.random.key(4), (4, 5), jnp.float64)
        new, h, saved = cell.step_saving(params, carry, u, rec)
        want_new, want_h = cell.step(params, carry, u, rec)
        for a, b in zip(jax.tree.leaves((new, h)), jax.tree.leaves((want_new, want_h))):
            assert jnp.allclose(a, b, atol=1e-12)
        _, pull = jax.vjp(lambda p, c, u, r: cell.step(p, c, u, r), params, carry, u, rec)
        dp_want, dc_want, du_want, drec_want = pull((dnew, dh))
        dc, du, drec, *pieces = cell.step_backward(params, carry, saved, dnew, dh)
        drec = cell.recurrent_cotangent(du) if drec is None else drec
        # the step's own parameters (the layer-norm LSTM's): pieces summed by param_grads; none else
        assert bool(pieces) == (name == "lstm:ln")
        stack = lambda tree: jax.tree.map(lambda x: x[None], tree)
        dp = cell.param_grads(params, stack(saved), stack(pieces[0])) if pieces else jax.tree.map(
            jnp.zeros_like, params)
        for got, want in ((dc, dc_want), (du, du_want), (drec, drec_want), (dp, dp_want)):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                assert jnp.allclose(a, b, atol=1e-12), name


@pytest.mark.parametrize("name,fused", [("lstm", True), ("lstm:peepholes", False), ("lstm:ln", False),
                                        ("lstm:cifg", False), ("lstm:noaf", False), ("gru", True),
                                        ("gru:cho", False), ("elman", True), ("mgu", False)])
def test_which_cells_take_the_fused_backward_step(name, fused):
    assert recur.get_cell(name, 4).fused_backward == fused
    # half-precision compute keeps float32 gates and state: the same hand-written step serves it
    assert recur.get_cell(name, 4, dtype=jnp.bfloat16).fused_backward == fused
    # the wide-gated fused cells project inside the forward loop; Elman's H-wide inputs do not pay
    assert recur.get_cell(name, 4).project_in_loop == (fused and not name.startswith("elman"))


def test_projecting_inside_the_loop_needs_a_fused_step():
    from recur.backprop import deferred_scan

    with pytest.raises(ValueError, match="project=True needs a cell with a fused backward step"):
        deferred_scan(recur.get_cell("lstm:peepholes", 4), project=True)


def test_layer_norm_fused_backward_is_a_switch(ln_fused):
    assert recur.get_cell("lstm:ln", 4).fused_backward and not recur.get_cell("lstm:ln,cifg", 4).fused_backward
    assert not recur.get_cell("lstm:ln,peepholes", 4).fused_backward


def test_layer_norm_fused_gradients_equal_autodiff(ln_fused):
    """The layer-norm LSTM's hand-written step (its norms' parameter pieces summed after the
    loop) against autodiff, float64, with every option of test_deferred_gradients_equal_autodiff."""
    test_deferred_gradients_equal_autodiff("lstm:ln")


@pytest.mark.parametrize("name", ["lstm", "gru", "elman", "lstm:ln"])
def test_fused_path_in_float32_with_lengths_resets_and_reverse_together(name, ln_fused):
    cell, params, xs = make(name)
    assert cell.fused_backward
    kw = dict(lengths=jnp.array([T, 4, 0]), reverse=True, reset_carry=random_carry(cell, B, seed=4),
              resets=jnp.zeros((B, T), bool).at[0, 0].set(True).at[0, 3].set(True).at[1, 1].set(True))

    def loss(p, x, backward):
        hs, carry = recur.scan(cell, p, x, backward=backward, **kw)
        assert hs.dtype == jnp.float32
        return jnp.sum(jnp.sin(hs)) + sum(jnp.sum(l ** 2) for l in jax.tree.leaves(carry))

    want = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, xs, "autodiff")
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, xs, "deferred")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert a.dtype == b.dtype == jnp.float32
        assert jnp.allclose(a, b, atol=1e-5, rtol=1e-4), float(jnp.max(jnp.abs(a - b)))


def test_an_elman_activation_without_a_known_derivative_is_not_fused(monkeypatch):
    from recur.cells import base

    monkeypatch.setitem(base.ACTIVATIONS, "softsign", jax.nn.soft_sign)
    assert not recur.get_cell("elman:activation=softsign", 4).fused_backward
    assert recur.get_cell("elman:activation=relu", 4).fused_backward
