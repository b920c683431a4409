"""recur.scan and its options on every cell: references built another way (a Python loop over
step, one sequence at a time, finite differences)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import recur
from recur.layers import drop
from cell_cases import CASES, hidden_size

LINEAR = [n for n in CASES if recur.cells.switches(n)[0].linear]
B, T, I = 3, 7, 4


def make(name, seed=0, dtype=jnp.float32, noise=0.3):
    """A cell, params with every leaf perturbed (so zero-initialised biases matter too), inputs."""
    cell = recur.get_cell(name, hidden_size(name), dtype=dtype, param_dtype=dtype)
    params = cell.init(jax.random.key(seed), I)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [l + noise * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    xs = jax.random.normal(jax.random.key(seed + 2), (B, T, I), dtype)
    return cell, jax.tree.unflatten(treedef, leaves), xs


def random_carry(cell, batch, seed=3):
    """A non-zero carry with the cell's structure (step counters stay at zero)."""
    carry = cell.initial_carry(batch)
    leaves, treedef = jax.tree.flatten(carry)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for leaf, k in zip(leaves, keys):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            out.append(leaf)
        elif jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            re, im = jax.random.normal(k, (2,) + leaf.shape)
            out.append((0.5 * (re + 1j * im)).astype(leaf.dtype))
        else:
            out.append(0.5 * jax.random.normal(k, leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def step_loop(cell, params, xs, carry):
    """The reference: project, then a Python loop over cell.step."""
    us = cell.project(params, xs)
    hs = []
    for t in range(xs.shape[1]):
        carry, h = cell.step(params, carry, jax.tree.map(lambda u: u[:, t], us))
        hs.append(h)
    return jnp.stack(hs, axis=1), carry


def assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


def row(tree, b):
    return jax.tree.map(lambda x: x[b : b + 1], tree)


@pytest.mark.parametrize("name", CASES)
def test_jit_scan_equals_step_loop(name):
    cell, params, xs = make(name)
    carry0 = random_carry(cell, B)
    hs, carry = jax.jit(lambda p, x, c: recur.scan(cell, p, x, initial_carry=c))(params, xs, carry0)
    ref_hs, ref_carry = step_loop(cell, params, xs, carry0)
    assert hs.shape == (B, T, cell.output_size)
    assert_trees_close((hs, carry), (ref_hs, ref_carry))


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        cell, params, xs = make(name, dtype=jnp.float64)
        xs = xs[:2, :4]
        w = jax.random.normal(jax.random.key(9), (2, 4, cell.output_size), jnp.float64)
        lengths = jnp.array([4, 2])

        def loss(p, x):
            hs, carry = recur.scan(cell, p, x, lengths=lengths)
            h_last = [l for l in jax.tree.leaves(carry) if jnp.issubdtype(l.dtype, jnp.inexact)][0]
            return jnp.sum(hs * w) + jnp.sum(jnp.abs(h_last) ** 2)

        check_grads(loss, (params, xs), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("reverse", [False, True])
def test_parallel_equals_sequential(name, reverse):
    cell, params, xs = make(name)
    lengths = jnp.array([7, 4, 0])
    resets = jnp.zeros((B, T), bool).at[0, 3].set(True).at[1, 2].set(True)
    kw = dict(initial_carry=random_carry(cell, B), reset_carry=random_carry(cell, B, 5),
              lengths=lengths, resets=resets, reverse=reverse)
    w = jax.random.normal(jax.random.key(4), (B, T, cell.output_size))

    def loss(p, x, mode):
        hs, carry = recur.scan(cell, p, x, mode=mode, **kw)
        return jnp.sum(hs * w) + jnp.sum(jnp.abs(carry) ** 2), (hs, carry)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    g_seq, out_seq = jax.jit(grad, static_argnums=2)(params, xs, "sequential")
    g_par, out_par = jax.jit(grad, static_argnums=2)(params, xs, "parallel")
    # float32: the associative scan multiplies the a_t in a different order; 1e-5 relative
    assert_trees_close(out_par, out_seq, tol=1e-5)
    assert_trees_close(g_par, g_seq, tol=2e-4)


@pytest.mark.parametrize("name", CASES)
def test_lengths_match_each_sequence_alone(name):
    cell, params, xs = make(name)
    lengths = jnp.array([7, 3, 0])
    carry0 = random_carry(cell, B)
    hs, carry = recur.scan(cell, params, xs, lengths=lengths, initial_carry=carry0)
    for b, n in enumerate(lengths.tolist()):
        if n:
            ref_hs, ref_carry = step_loop(cell, params, xs[b : b + 1, :n], row(carry0, b))
            assert_trees_close(hs[b : b + 1, :n], ref_hs)
        else:
            ref_carry = row(carry0, b)  # an empty sequence leaves the initial carry
        assert_trees_close(row(carry, b), ref_carry)
        assert not np.asarray(hs[b, n:]).any(), "padded outputs must be zero"


@pytest.mark.parametrize("name", CASES)
def test_resets_match_sequences_run_separately(name):
    cell, params, xs = make(name)
    # row 0 packs sequences [0, 3) and [3, 7); row 1 packs [0, 2), [2, 5), [5, 7); row 2 one sequence
    starts = {0: [0, 3], 1: [0, 2, 5], 2: [0]}
    resets = jnp.zeros((B, T), bool)
    for b, ss in starts.items():
        for s in ss[1:]:
            resets = resets.at[b, s].set(True)
    carry0 = random_carry(cell, B)
    hs, carry = recur.scan(cell, params, xs, resets=resets, initial_carry=carry0)
    fresh = cell.initial_carry(1)
    for b, ss in starts.items():
        bounds = ss + [T]
        for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            ref_hs, ref_carry = step_loop(cell, params, xs[b : b + 1, s:e], row(carry0, b) if k == 0 else fresh)
            assert_trees_close(hs[b : b + 1, s:e], ref_hs)
        assert_trees_close(row(carry, b), ref_carry)


@pytest.mark.parametrize("name", ["lstm", "gru", "clockwork", "mingru"])
def test_reverse_reads_each_valid_part_backwards(name):
    cell, params, xs = make(name)
    lengths = jnp.array([7, 4, 1])
    resets = jnp.zeros((B, T), bool).at[0, 5].set(True)  # row 0: sequences [0, 5) and [5, 7)
    hs, carry = recur.scan(cell, params, xs, lengths=lengths, resets=resets, reverse=True)
    fresh = cell.initial_carry(1)
    segments = {0: [(0, 5), (5, 7)], 1: [(0, 4)], 2: [(0, 1)]}
    for b, segs in segments.items():
        for s, e in segs:
            ref_hs, ref_carry = step_loop(cell, params, xs[b : b + 1, s:e][:, ::-1], fresh)
            assert_trees_close(hs[b : b + 1, s:e], ref_hs[:, ::-1])
        # the final carry is the one after reading step 0, i.e. the first segment's
        first_hs, first_carry = step_loop(cell, params, xs[b : b + 1, segs[0][0] : segs[0][1]][:, ::-1], fresh)
        assert_trees_close(row(carry, b), first_carry)
        assert not np.asarray(hs[b, int(lengths[b]) :]).any()


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional_with_padding(merge):
    cell, p_fw, xs = make("gru")
    _, p_bw, _ = make("gru", seed=10)
    lengths = jnp.array([7, 5, 2])
    hs, (c_fw, c_bw) = recur.bidirectional(cell, (p_fw, p_bw), xs, lengths=lengths, merge=merge)
    H = cell.output_size
    assert hs.shape == (B, T, 2 * H if merge == "concat" else H)
    for b, n in enumerate(lengths.tolist()):
        x = xs[b : b + 1, :n]
        f_hs, f_c = step_loop(cell, p_fw, x, cell.initial_carry(1))
        b_hs, b_c = step_loop(cell, p_bw, x[:, ::-1], cell.initial_carry(1))
        b_hs = b_hs[:, ::-1]
        ref = jnp.concatenate([f_hs, b_hs], -1) if merge == "concat" else f_hs + b_hs
        assert_trees_close(hs[b : b + 1, :n], ref)
        assert_trees_close((row(c_fw, b), row(c_bw, b)), (f_c, b_c))
        assert not np.asarray(hs[b, n:]).any()


def test_truncated_bptt_windows_equal_one_scan():
    cell, params, xs = make("lstm")
    hs, carry = recur.scan(cell, params, xs)
    h1, c1 = recur.scan(cell, params, xs[:, :3])
    h2, c2 = recur.scan(cell, params, xs[:, 3:], initial_carry=jax.lax.stop_gradient(c1))
    assert_trees_close((jnp.concatenate([h1, h2], 1), c2), (hs, carry))


@pytest.mark.parametrize("remat", ["step", "sqrt", 3, 100])
@pytest.mark.parametrize("unroll", [1, 4])
def test_remat_and_unroll_do_not_change_values_or_gradients(remat, unroll):
    cell, params, xs = make("lstm:peepholes")
    lengths = jnp.array([7, 5, 2])

    def loss(p, remat, unroll):
        hs, carry = recur.scan(cell, p, xs, lengths=lengths, remat=remat, unroll=unroll)
        return jnp.sum(hs**2) + jnp.sum(carry["c"] ** 2)

    ref = jax.value_and_grad(loss)(params, "none", 1)
    got = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(params, remat, unroll)
    assert_trees_close(got, ref, tol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_shapes_and_dtypes(name):
    cell, params, xs = make(name, dtype=jnp.bfloat16)
    hs, carry = jax.jit(lambda p, x: recur.scan(cell, p, x, lengths=jnp.array([7, 2, 5])))(params, xs)
    assert hs.shape == (B, T, cell.output_size) and hs.dtype == jnp.bfloat16
    ref = cell.initial_carry(B)
    assert jax.tree.structure(carry) == jax.tree.structure(ref)
    for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(ref)):
        assert got.shape == want.shape and got.dtype == want.dtype  # float32 state under bfloat16
        assert want.dtype in (jnp.float32, jnp.complex64, jnp.int32)
    assert np.isfinite(np.asarray(hs, np.float32)).all()


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru", "lru"])
def test_a_narrower_carry_is_widened_to_the_state_dtype(name):
    """An initial and a reset carry in bfloat16 for a cell whose state is float32 (complex64 for
    the LRU): every mode widens them (the sequential scan used to fail: its loop's carry changed
    type), returns the state dtype, and agrees with the run given the widened carries."""
    cell, params, xs = make(name)
    state = cell.initial_carry(B).dtype if not isinstance(cell.initial_carry(B), dict) else jnp.float32
    narrow = jax.tree.map(lambda c: jnp.real(c).astype(jnp.bfloat16), random_carry(cell, B, seed=1))
    wide = jax.tree.map(lambda c: c.astype(state), narrow)
    kw = dict(resets=jnp.zeros((B, T), bool).at[0, 3].set(True), lengths=jnp.array([T, 4, 2]))
    modes = ("sequential", "parallel", "chunked") if cell.linear else ("sequential",)
    for mode in modes:
        want = recur.scan(cell, params, xs, initial_carry=wide, reset_carry=wide, mode=mode, **kw)
        got = recur.scan(cell, params, xs, initial_carry=narrow, reset_carry=narrow, mode=mode, **kw)
        assert all(c.dtype == state for c in jax.tree.leaves(got[1])), (name, mode)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), want, got)


def _count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_keras_simple_rnn_shapes_and_parameter_counts():
    # SimpleRNN(3, input_shape=(2, 10)): 10*3 + 3*3 + 3 = 42 parameters
    cell = recur.get_cell("elman", 3)
    params = cell.init(jax.random.key(0), 10)
    assert _count(params) == 42
    xs = jnp.ones((8, 2, 10))
    hs, h_last = recur.scan(cell, params, xs)
    assert h_last.shape == (8, 3) and hs.shape == (8, 2, 3)  # return_sequences=False / True
    # input 4, hidden 2, then Dense(2): 14 + 6 = 20 parameters; (1, 2, 4) -> (1, 2, 2)
    cell = recur.get_cell("elman", 2)
    params = cell.init(jax.random.key(0), 4)
    dense = {"W": jnp.ones((2, 2)), "b": jnp.zeros((2,))}
    assert _count(params) == 14 and _count(params) + _count(dense) == 20
    hs, _ = recur.scan(cell, params, jnp.ones((1, 2, 4)))
    assert (hs @ dense["W"].T).shape == (1, 2, 2)
    # two stacked SimpleRNN(8, return_sequences=True) on (B, 10, 5): 112 + 136 = 248
    cells = [recur.get_cell("elman", 8)] * 2
    params = recur.init_stack(cells, jax.random.key(0), 5)
    assert [_count(p) for p in params] == [112, 136]
    hs, carries = recur.stack(cells, params, jnp.ones((4, 10, 5)))
    assert hs.shape == (4, 10, 8) and len(carries) == 2


def test_stack_equals_layers_composed_by_hand_and_residual():
    cells = [recur.get_cell("gru", 6), recur.get_cell("lstm", 6)]
    params = recur.init_stack(cells, jax.random.key(1), I)
    xs = jax.random.normal(jax.random.key(2), (B, T, I))
    lengths = jnp.array([7, 3, 5])
    h1, c1 = recur.scan(cells[0], params[0], xs, lengths=lengths)
    h2, c2 = recur.scan(cells[1], params[1], h1, lengths=lengths)
    hs, carries = recur.stack(cells, params, xs, lengths=lengths)
    assert_trees_close((hs, carries), (h2, [c1, c2]))
    hs_res, _ = recur.stack(cells, params, xs, lengths=lengths, residual=True)
    assert_trees_close(hs_res, h2 + h1)
    with pytest.raises(ValueError, match="residual connection around layer 1"):
        bad = [recur.get_cell("gru", 6), recur.get_cell("gru", 4)]
        recur.stack(bad, recur.init_stack(bad, jax.random.key(0), I), xs, residual=True)


def test_stack_dropout_locked_shares_mask_over_time_and_is_off_without_key():
    cells = [recur.get_cell("elman:relu", 6)] * 2
    params = recur.init_stack(cells, jax.random.key(1), I)
    xs = jax.random.normal(jax.random.key(2), (B, T, I))
    plain, _ = recur.stack(cells, params, xs, dropout=0.5)
    ref, _ = recur.stack(cells, params, xs)
    assert_trees_close(plain, ref)  # no key: evaluation, no dropout
    dropped, _ = recur.stack(cells, params, xs, dropout=0.5, dropout_key=jax.random.key(3))
    assert not np.allclose(dropped, ref)
    mask = drop(jax.random.key(0), jnp.ones((4, 50, 16)), 0.5, locked=True)
    assert (mask == mask[:, :1]).all()  # one mask per sequence and feature, shared by all steps
    assert set(np.unique(np.asarray(mask)).tolist()) == {0.0, 2.0}
    free = drop(jax.random.key(0), jnp.ones((4, 50, 16)), 0.5)
    assert not (free == free[:, :1]).all()


def test_stack_weight_dropout_drops_recurrent_matrices_once_per_call():
    from recur.layers import _drop_recurrent_weights

    cells = [recur.get_cell("lstm", 6)] * 2
    params = recur.init_stack(cells, jax.random.key(1), I, bidirectional=True)
    xs = jax.random.normal(jax.random.key(2), (B, T, I))
    ref, _ = recur.stack(cells, params, xs, bidirectional=True)
    off, _ = recur.stack(cells, params, xs, bidirectional=True, weight_dropout=0.5)
    assert_trees_close(off, ref)  # no key: evaluation
    key = jax.random.key(3)
    got, _ = recur.stack(cells, params, xs, bidirectional=True, weight_dropout=0.5, dropout_key=key)
    assert not np.allclose(got, ref)
    # the same as running the plain stack on each layer's params with W_h masked, W_x untouched
    keys = jax.random.split(key, 2)
    dropped = [_drop_recurrent_weights(jax.random.fold_in(k, 1), p, 0.5) for k, p in zip(keys, params)]
    want, _ = recur.stack(cells, dropped, xs, bidirectional=True)
    assert_trees_close(got, want)
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(dropped)):
        if before.shape == (24, 6):  # W_h: zeros or scaled by 2
            assert set(np.unique(np.round(np.asarray(after / jnp.where(before == 0, 1, before)), 5))) <= {0.0, 2.0}
            assert 0 < float(jnp.mean(after == 0)) < 1
    (fw, bw) = dropped[0]
    assert not np.array_equal(np.asarray(fw["W_h"] == 0), np.asarray(bw["W_h"] == 0))  # a mask per direction
    assert_trees_close(fw["W_x"], params[0][0]["W_x"])
    with pytest.raises(ValueError, match="weight_dropout must be a rate"):
        recur.stack(cells, params, xs, bidirectional=True, weight_dropout=1.0)


def test_bidirectional_stack_sizes():
    cells = [recur.get_cell("lstm", 4), recur.get_cell("lstm", 4)]
    params = recur.init_stack(cells, jax.random.key(0), I, bidirectional=True)
    hs, carries = recur.stack(cells, params, jnp.ones((B, T, I)), bidirectional=True)
    assert hs.shape == (B, T, 8) and len(carries) == 2 and len(carries[0]) == 2
    assert params[1][0]["W_x"].shape == (16, 8)  # the second layer reads both directions


# --- bad input --------------------------------------------------------------------------------
@pytest.fixture
def lstm():
    cell = recur.get_cell("lstm", 5)
    return cell, cell.init(jax.random.key(0), I)


@pytest.mark.parametrize(
    "kwargs, xs_shape, message",
    [
        ({}, (B, T), r"xs must have shape \[batch, time, features\], got shape \(3, 7\)"),
        ({}, (B, T, I + 1), "xs has 5 features per step but the lstm params were made for input_size=4"),
        ({"lengths": jnp.array([7, 8, 1])}, (B, T, I), r"lengths must lie in \[0, T=7\]; lengths\[1\] = 8"),
        ({"lengths": jnp.array([7, -1, 1])}, (B, T, I), r"lengths\[1\] = -1"),
        ({"lengths": jnp.array([7, 1])}, (B, T, I), r"lengths must be an int array of shape \[batch\]"),
        ({"lengths": jnp.array([7.0, 1.0, 2.0])}, (B, T, I), "lengths must be an int array"),
        ({"resets": jnp.zeros((B, T + 1), bool)}, (B, T, I), r"resets must have shape \[batch, time\]=\(3, 7\)"),
        ({"mode": "parallel"}, (B, T, I), "mode='parallel' needs a cell that is linear in its state; lstm is not. Linear cells: mingru, minlstm, lru"),
        ({"mode": "fast"}, (B, T, I), "mode must be one of"),
        ({"remat": "always"}, (B, T, I), "remat must be"),
        ({"initial_carry": jnp.zeros((B, 5))}, (B, T, I), "initial_carry must have the structure"),
        ({"resets": jnp.zeros((B, T), bool), "reset_carry": {"h": jnp.zeros((B, 6)), "c": jnp.zeros((B, 6))}},
         (B, T, I), r"reset_carry leaf has shape \(3, 6\), expected \(3, 5\)"),
    ],
)
def test_bad_input_is_a_clear_error(lstm, kwargs, xs_shape, message):
    cell, params = lstm
    with pytest.raises(ValueError, match=message):
        recur.scan(cell, params, jnp.ones(xs_shape), **kwargs)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lsmt", r"unknown cell 'lsmt' in 'lsmt' \(did you mean lstm, dglstm\?\); valid cells: elman, elman:tanh"),
        ("lstm:cifq", r"unknown variant 'cifq' of cell 'lstm' in 'lstm:cifq' \(did you mean cifg\?\)"),
        ("gru:forget_bias=1", "unknown field 'forget_bias' in cell name 'gru:forget_bias=1'; gru fields: reset_after"),
        ("clockwork:periods=4-2", "periods must be increasing positive ints"),
        ("lstm:cifg,nfg", "cifg couples the input and forget gates"),
        ("elman:activation=softplus", "unknown activation 'softplus'"),
    ],
)
def test_bad_cell_names_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        recur.get_cell(spec, 8)


def test_registry_names_round_trip():
    for name in CASES:
        cell = recur.get_cell(name, hidden_size(name))
        assert recur.get_cell(cell.name, cell.hidden_size) == cell, name
    cell = recur.get_cell("lstm:forget_bias=0.5,proj_size=3", 8)
    assert cell.forget_bias == 0.5 and cell.proj_size == 3 and cell.output_size == 3


def test_a_list_of_cell_names_keeps_each_names_variants():
    from recur.cells import split_specs

    assert split_specs("lstm:fgr,peepholes,gru, lstm:proj_size=512,mgu,lstm:peepholes,cifg,ln,") == [
        "lstm:fgr,peepholes", "gru", "lstm:proj_size=512", "mgu", "lstm:peepholes,cifg,ln"]
    assert split_specs("lstm,gru:cho") == ["lstm", "gru:cho"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["sequential", "autodiff", "reverse"])
def test_projected_inputs_give_the_same_outputs_and_gradients(name, mode):
    """scan(project(xs), projected=True) == scan(xs), and the gradients agree through project."""
    cell, params, xs = make(name)
    carry0 = random_carry(cell, B)
    lengths = jnp.array([T, 4, 0])
    kw = dict(initial_carry=carry0, lengths=lengths, reverse=mode == "reverse",
              backward="autodiff" if mode == "autodiff" else "deferred")

    def loss(projected):
        def f(p, x):
            us = cell.project(p, x) if projected else x
            hs, c = recur.scan(cell, p, us, projected=projected, **kw)
            out = jnp.sum(jnp.real(hs) ** 2)
            return out + sum(jnp.sum(jnp.real(l) ** 2) for l in jax.tree.leaves(c)
                             if jnp.issubdtype(l.dtype, jnp.inexact))
        return f

    got = jax.value_and_grad(loss(True), argnums=(0, 1))(params, xs)
    want = jax.value_and_grad(loss(False), argnums=(0, 1))(params, xs)
    assert_trees_close(got, want, tol=1e-4)


def test_projected_inputs_of_the_wrong_shape_are_a_clear_error():
    cell, params, xs = make("lstm")
    us = cell.project(params, xs)
    with pytest.raises(ValueError, match=r"projected xs leaf has shape \(3, 7, 4\), expected \(3, 7, 20\)"):
        recur.scan(cell, params, xs, projected=True)
    with pytest.raises(ValueError, match="projected inputs need a unidirectional first layer"):
        recur.stack([cell], [(params, params)], us, bidirectional=True, projected=True)
