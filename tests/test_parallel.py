"""recur.scan(mode="chunked") and mode="parallel" against the sequential scan, on every linear cell.

Tolerances (float32): outputs and final carries to 1e-5 (relative and absolute), gradients to
2e-4, as for the parallel scan in test_scan.py: the associative scan multiplies the a_t in a
different order than the sequential loop, so the results differ by float rounding only.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recur
from recur.cells import linear_cells
from test_scan import B, T, assert_trees_close, make, random_carry

LINEAR = linear_cells()


def _kwargs(cell, reverse):
    lengths = jnp.array([7, 4, 0])
    # row 0 restarts at 3 and 5; row 1 at 2 (and at 6, past its length: ignored)
    resets = jnp.zeros((B, T), bool).at[0, 3].set(True).at[0, 5].set(True).at[1, 2].set(True).at[1, 6].set(True)
    return dict(initial_carry=random_carry(cell, B), reset_carry=random_carry(cell, B, 5),
                lengths=lengths, resets=resets, reverse=reverse)


@functools.cache
def _grad_fn(name, reverse, mode, chunk, remat="none"):
    cell, _, _ = make(name)
    kw = _kwargs(cell, reverse)
    w = jax.random.normal(jax.random.key(4), (B, T, cell.output_size))

    def loss(p, x):
        hs, carry = recur.scan(cell, p, x, mode=mode, chunk=chunk, remat=remat, **kw)
        return jnp.sum(hs * w) + jnp.sum(jnp.abs(carry) ** 2), (hs, carry)

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("name", LINEAR)
# T = 7: chunks of one step, 7 % 3 != 0, chunk == T, chunk > T; reverse on the uneven split
@pytest.mark.parametrize("reverse, chunk", [(False, 1), (False, 3), (False, 7), (False, 16), (True, 3)])
def test_chunked_equals_sequential_values_and_gradients(name, reverse, chunk):
    _, params, xs = make(name)
    g_seq, out_seq = _grad_fn(name, reverse, "sequential", 256)(params, xs)
    g_chk, out_chk = _grad_fn(name, reverse, "chunked", chunk)(params, xs)
    assert_trees_close(out_chk, out_seq, tol=1e-5)
    assert_trees_close(g_chk, g_seq, tol=2e-4)


@pytest.mark.parametrize("name", LINEAR)
def test_chunked_remat_recomputes_the_same_values_and_gradients(name):
    _, params, xs = make(name)
    ref = _grad_fn(name, False, "chunked", 3)(params, xs)
    got = _grad_fn(name, False, "chunked", 3, remat="step")(params, xs)
    assert_trees_close(got, ref, tol=1e-6)


@pytest.mark.parametrize("name", LINEAR)
def test_chunked_defaults_and_padding_only(name):
    """No lengths, resets or carries; T = 7 with the default chunk (one chunk longer than T)."""
    cell, params, xs = make(name)
    ref = recur.scan(cell, params, xs)
    assert_trees_close(recur.scan(cell, params, xs, mode="chunked"), ref)
    assert_trees_close(recur.scan(cell, params, xs, mode="chunked", chunk=2), ref)


def test_chunked_many_chunks_long_sequence():
    """T = 150 in chunks of 32 (4 full chunks and one of 22) with packed sequences and padding."""
    cell = recur.get_cell("mingru", 6)
    params = cell.init(jax.random.key(0), 3)
    n = 150
    xs = jax.random.normal(jax.random.key(1), (2, n, 3))
    resets = jax.random.bernoulli(jax.random.key(2), 0.02, (2, n))
    kw = dict(lengths=jnp.array([n, 120]), resets=resets, initial_carry=random_carry(cell, 2))

    def loss(p, mode):
        hs, carry = recur.scan(cell, p, xs, mode=mode, chunk=32, **kw)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(carry**2), (hs, carry)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g_seq, out_seq = grad(params, "sequential")
    for mode in ("chunked", "parallel"):
        g, out = grad(params, mode)
        assert_trees_close(out, out_seq, tol=1e-5)
        assert_trees_close(g, g_seq, tol=2e-4)


@pytest.mark.parametrize("mode", ["parallel", "chunked"])
def test_vanishing_gate_products_underflow_harmlessly(mode):
    """Long T with gates far below 1: the products of a_t underflow to 0 in float32, as they
    do in the sequential scan. Checked against a float64 sequential reference."""
    n = 4096
    cell32 = recur.get_cell("mingru", 4)
    params = cell32.init(jax.random.key(0), 2)
    params = {"W_x": params["W_x"], "b": params["b"].at[:4].set(-1.0)}  # z ~ 0.27: a ~ 0.73
    xs = jax.random.normal(jax.random.key(1), (2, n, 2))
    hs, carry = jax.jit(lambda p, x: recur.scan(cell32, p, x, mode=mode, chunk=512))(params, xs)
    with jax.enable_x64(True):
        cell64 = recur.get_cell("mingru", 4, dtype=jnp.float64, param_dtype=jnp.float64)
        p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), params)
        ref_hs, ref_carry = recur.scan(cell64, p64, jnp.asarray(np.asarray(xs), jnp.float64))
        ref_hs, ref_carry = np.asarray(ref_hs), np.asarray(ref_carry)
    assert np.isfinite(np.asarray(hs)).all()
    np.testing.assert_allclose(np.asarray(hs), ref_hs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(carry), ref_carry, rtol=1e-5, atol=1e-5)


def test_chunked_runs_in_bfloat16_with_float32_state():
    cell, params, xs = make("minlstm", dtype=jnp.bfloat16)
    hs, carry = recur.scan(cell, params, xs, mode="chunked", chunk=3, lengths=jnp.array([7, 2, 5]))
    assert hs.dtype == jnp.bfloat16 and hs.shape == (B, T, cell.output_size)
    assert carry.dtype == jnp.float32
    ref, _ = recur.scan(cell, params, xs, lengths=jnp.array([7, 2, 5]))
    np.testing.assert_allclose(np.asarray(hs, np.float32), np.asarray(ref, np.float32), atol=2e-2)


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, -4, 2.5, "auto", None, True])
def test_bad_chunk_is_a_clear_error(chunk):
    cell, params, xs = make("mingru")
    with pytest.raises(ValueError, match=r"chunk must be a positive int \(steps per chunk\), got"):
        recur.scan(cell, params, xs, mode="chunked", chunk=chunk)


@pytest.mark.parametrize("mode", ["parallel", "chunked"])
def test_nonlinear_cell_is_refused(mode):
    cell, params, xs = make("gru")
    with pytest.raises(ValueError, match=rf"mode='{mode}' needs a cell that is linear in its state; "
                                         r"gru is not\. Linear cells: mingru, minlstm, lru"):
        recur.scan(cell, params, xs, mode=mode)


def test_modes_are_listed():
    from recur.scan import MODES

    assert MODES == ("sequential", "parallel", "chunked", "kernel", "cudnn", "auto")


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("mode", ["parallel", "chunked"])
def test_zero_steps_give_no_outputs_and_the_initial_carry(name, mode):
    cell, params, _ = make(name)
    carry0 = random_carry(cell, B)
    xs = jnp.zeros((B, 0, cell.input_size(params)))
    hs, carry = recur.scan(cell, params, xs, mode=mode, initial_carry=carry0)
    want, want_carry = recur.scan(cell, params, xs, initial_carry=carry0)
    assert hs.shape == want.shape == (B, 0, cell.output_size) and hs.dtype == want.dtype
    np.testing.assert_array_equal(carry, carry0)
    np.testing.assert_array_equal(want_carry, carry0)
