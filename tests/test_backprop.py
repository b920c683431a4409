"""The deferred-weight-gradient BPTT (recur/backprop.py) against plain autodiff, every cell."""
import jax
import jax.numpy as jnp
import pytest

import recur
from cell_cases import CASES
from test_scan import B, T, make, random_carry

OPTIONS = {
    "plain": {},
    "lengths": {"lengths": jnp.array([T, 4, 0])},
    "resets": {"resets": jnp.zeros((B, T), bool).at[0, 3].set(True).at[1, 1].set(True), "reset_carry": True},
    "reverse": {"lengths": jnp.array([T, 4, 0]), "reverse": True},
    "unroll": {"lengths": jnp.array([T, 5, 2]), "unroll": 3},
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


@pytest.mark.parametrize("name", ["lstm", "gru", "lstm:ln"])
def test_deferred_under_jit_with_bfloat16(name):
    cell, params, xs = make(name)
    cell = recur.get_cell(name, cell.hidden_size, dtype=jnp.bfloat16)

    def loss(p, backward):
        hs, _ = recur.scan(cell, p, xs, backward=backward)
        return jnp.sum(hs.astype(jnp.float32) ** 2)

    want = jax.jit(jax.grad(loss), static_argnums=1)(params, "autodiff")
    got = jax.jit(jax.grad(loss), static_argnums=1)(params, "deferred")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert a.dtype == b.dtype == jnp.float32
        assert jnp.allclose(a, b, atol=5e-2, rtol=5e-2)


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


def test_lstm_fused_backward_step_matches_autodiff_of_its_step():
    """The LSTM's hand-written step backward (used by the deferred scan) against jax.vjp of step."""
    with jax.enable_x64(True):
        cell = recur.get_cell("lstm", 5, dtype=jnp.float64, param_dtype=jnp.float64)
        assert cell.fused_backward
        params = cell.init(jax.random.key(0), 3)
        k = iter(jax.random.split(jax.random.key(1), 6))
        carry = {"h": jax.random.normal(next(k), (4, 5), jnp.float64), "c": jax.random.normal(next(k), (4, 5), jnp.float64)}
        u = jax.random.normal(next(k), (4, 20), jnp.float64)
        rec = cell.recurrent(params, carry)
        dnew = {"h": jax.random.normal(next(k), (4, 5), jnp.float64), "c": jax.random.normal(next(k), (4, 5), jnp.float64)}
        dh = jax.random.normal(next(k), (4, 5), jnp.float64)
        new, h, saved = cell.step_saving(params, carry, u, rec)
        want_new, want_h = cell.step(params, carry, u, rec)
        assert all(jnp.allclose(a, b) for a, b in zip(jax.tree.leaves((new, h)), jax.tree.leaves((want_new, want_h))))
        _, pull = jax.vjp(lambda c, u, r: cell.step(params, c, u, r), carry, u, rec)
        dc_want, du_want, drec_want = pull((dnew, dh))
        dc, du = cell.step_backward(params, carry, saved, dnew, dh)
        assert jnp.allclose(du, du_want, atol=1e-12) and jnp.allclose(du, drec_want["h"], atol=1e-12)
        assert jnp.allclose(dc["c"], dc_want["c"], atol=1e-12)
        # the step reads the carry's h only through rec = W_h h: its direct gradient is zero
        assert jnp.allclose(dc_want["h"], 0.0) and jnp.allclose(dc["h"], 0.0)


@pytest.mark.parametrize("name,fused", [("lstm", True), ("lstm:peepholes", False), ("lstm:ln", False),
                                        ("lstm:cifg", False), ("lstm:noaf", False)])
def test_which_lstms_take_the_fused_backward_step(name, fused):
    assert recur.get_cell(name, 4).fused_backward == fused
    assert not recur.get_cell(name, 4, dtype=jnp.bfloat16).fused_backward
