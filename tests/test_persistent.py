"""The persistent kernels (recur/kernels/persistent.py) of the plain LSTM, the reset-after GRU and the
Elman RNN: W_h split over a grid of programs that meet at a barrier each step.

On CPU it runs in Pallas' interpret mode, where one program walks every (row, unit) block in turn
within each step: the same kernel code, block slicing and barrier counting. A second group lowers
it for an H100 through the Triton back end (no GPU needed).
"""
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import recur
from recur.kernels import dispatch, persistent

B, T, I, H = 32, 7, 8, 32  # 2 row blocks x 2 unit blocks of 16


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")


def _setup(dtype, name="lstm"):
    cell = recur.get_cell(name, H, dtype=dtype)
    params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(7), p.shape, p.dtype),
                          cell.init(jax.random.key(0), I))
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    carry0 = {"h": 0.5 * jax.random.normal(jax.random.key(2), (B, cell.output_size)),
              "c": jax.random.normal(jax.random.key(3), (B, H))}
    if getattr(cell, "full_gate_recurrence", False):  # the previous step's i, f, o
        carry0["gates"] = jax.nn.sigmoid(jax.random.normal(jax.random.key(5), (B, 3 * H)))
    return cell, params, xs, (carry0 if name.startswith("lstm") else carry0["h"])


def _run(cell, mode, **kw):
    w = jax.random.normal(jax.random.key(4), (B, T, cell.output_size))

    def loss(p, x, c0):
        hs, carry = recur.scan(cell, p, x, initial_carry=c0, mode=mode, **kw)
        final = carry if isinstance(carry, dict) else {"h": carry}
        return (jnp.sum(hs.astype(jnp.float32) * w) + jnp.sum(final["h"] ** 2)
                + sum(jnp.sum(jnp.sin(v)) for k, v in final.items() if k != "h"), (hs, carry))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def test_layout_splits_w_h_over_at_most_the_given_programs():
    assert persistent.layout(64, 1024, 132) == (32, 16, 128)  # 2 x 64 = 128 programs
    assert persistent.layout(64, 256, 132) == (16, 16, 128)  # 4 x 16
    assert persistent.layout(16, 4096, 132) == (16, 32, 128)  # units grow once rows run out
    assert persistent.layout(32, 48, 132) == (16, 16, 16)
    assert "multiple of 16" in persistent.layout(24, 64, 132)
    assert "more than 2 programs" in persistent.layout(16, 48, 2)  # 3 unit blocks; 48 / 32 is no block
    for B_, H_ in [(64, 1024), (64, 256), (128, 512), (16, 4096)]:
        BB, U, KB = persistent.layout(B_, H_, 132)
        assert (B_ // BB) * (H_ // U) <= 132 and H_ % KB == 0 and B_ % BB == 0


@pytest.mark.parametrize("name,dtype,tol,backward", [
    ("lstm", jnp.float32, 2e-5, True), ("lstm", jnp.bfloat16, 1e-2, True), ("lstm", jnp.float32, 2e-5, False),
    ("gru", jnp.float32, 2e-5, True), ("gru", jnp.bfloat16, 1.5e-2, True), ("gru", jnp.float32, 2e-5, False),
    ("elman", jnp.float32, 2e-5, True), ("elman:relu", jnp.bfloat16, 1.5e-2, True),
    ("lstm:peepholes,cifg", jnp.float32, 2e-5, True), ("lstm:peepholes", jnp.float32, 2e-5, False),
    ("lstm:nfg,niaf,noaf", jnp.bfloat16, 1.5e-2, True), ("gru:cho", jnp.float32, 2e-5, True),
    ("mgu", jnp.bfloat16, 1.5e-2, True), ("lstm:ln", jnp.float32, 2e-5, True), ("lstm:ln", jnp.bfloat16, 1.5e-2, True),
    ("lstm:proj_size=16,peepholes", jnp.float32, 2e-5, True), ("lstm:proj_size=64,cifg,noaf", jnp.bfloat16, 1.5e-2, True),
    ("lstm:peepholes,cifg,ln", jnp.float32, 2e-5, True), ("lstm:nig,nog,niaf,noaf,ln,proj_size=64", jnp.bfloat16, 1.5e-2, True),
    ("lstm:peepholes,ln,proj_size=16", jnp.float32, 2e-5, True),
    ("lstm:peepholes,ln", jnp.float32, 2e-5, True), ("lstm:fgr,peepholes", jnp.float32, 2e-5, True)])
def test_persistent_equals_sequential(interpret, name, dtype, tol, backward, monkeypatch):
    """Outputs, final carry and the gradients for the weights, inputs and initial carry, with
    lengths (one of them 0) and reading backwards, against the sequential scan; the reverse loop
    as the persistent backward kernel or as the deferred scan's lax.scan loop (BACKWARD)."""
    monkeypatch.setattr(persistent, "BACKWARD", backward)
    cell, params, xs, carry0 = _setup(dtype, name)
    assert dispatch.choose(cell, "kernel", B, T, I, "none")[0] == "persistent"
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(recur.scan(cell, p, xs, mode="kernel")[0].astype(
        jnp.float32))))(params))
    kind = persistent.rule_for(cell).name
    assert f"recur_{kind}_persistent" in jaxpr and (f"recur_{kind}_persistent_backward" in jaxpr) == backward
    with_lengths = {"lengths": jnp.arange(B) % (T + 1), "reverse": True}
    # the kernels without a mask once (the float32 LSTM, LSTMP); the others with lengths, which cover more
    plain_too = {("lstm", jnp.float32, True), ("lstm:proj_size=16,peepholes", jnp.float32, True),
                 ("lstm:peepholes,ln", jnp.float32, True), ("lstm:fgr,peepholes", jnp.float32, True)}
    for kw in ([{}, with_lengths] if (name, dtype, backward) in plain_too else [with_lengths]):
        (lw, (hw, cw)), gw = _run(cell, "sequential", **kw)(params, xs, carry0)
        (lg, (hg, cg)), gg = _run(cell, "kernel", **kw)(params, xs, carry0)
        assert hg.dtype == hw.dtype == jnp.dtype(dtype)
        for a, b in zip(jax.tree.leaves((hw, cw, gw)), jax.tree.leaves((hg, cg, gg))):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            scale = float(np.max(np.abs(a)))
            assert scale > 0 and float(np.max(np.abs(a - b))) <= tol * scale, (kw.keys(), a.shape)


def test_vmap_takes_the_loop_kernel_not_the_persistent_one(interpret):
    """Under jax.vmap a Pallas kernel's grid is multiplied by the batch, and the persistent
    kernels' programs must all be resident at once: a vmapped scan takes the loop kernel (same
    values). (jax.vmap of an already jitted function is not seen: the next test.)"""
    cell, params, xs, _ = _setup(jnp.float32, "gru")
    xs3 = jnp.stack([xs, 2 * xs, -xs])
    f = lambda mode: lambda x: recur.scan(cell, params, x, mode=mode, lengths=jnp.arange(B) % (T + 1))[0]
    kinds = lambda g, x: [k for k in ("persistent", "loop") if f"recur_gru_{k}" in str(jax.make_jaxpr(g)(x))
                          or (k == "loop" and "pallas_call" in str(jax.make_jaxpr(g)(x)))]
    assert kinds(f("kernel"), xs)[0] == "persistent"
    for g in (jax.vmap(f("kernel")), jax.jit(jax.vmap(f("kernel")))):
        assert kinds(g, xs3) == ["loop"]
    np.testing.assert_allclose(jax.vmap(f("kernel"))(xs3), jax.vmap(f("sequential"))(xs3), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["gru"])  # every persistent kernel launches through Kernels.launch
def test_vmap_of_a_jitted_scan_runs_the_persistent_kernel_once_per_element(interpret, name):
    """jax.vmap of an already jitted function traces its scan unbatched, so the scan takes the
    persistent kernel; vmap would then batch the pallas_call by multiplying its grid (on a GPU more
    programs than SMs, whose barriers give up: NaN). persistent.one_at_a_time makes the batched
    kernel a lax.map over the elements, with a warning that says how to batch them instead: forward
    and gradients equal the sequential scan's."""
    cell, params, xs, _ = _setup(jnp.float32, name)
    xs3 = jnp.stack([xs, 2 * xs, -xs])
    lengths = jnp.arange(B) % (T + 1)

    def f(mode):
        def loss(p, x):
            hs = recur.scan(cell, p, x, mode=mode, lengths=lengths)[0]
            return jnp.sum(jnp.sin(hs)), hs
        return jax.vmap(jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), in_axes=(None, 0))

    with pytest.warns(persistent.PerformanceWarning, match=r"runs the persistent kernel recur_gru_persistent(_backward)? "
                      r"once per element \(3 in turn\); jax.vmap inside jax.jit runs them all at once"):
        jaxpr = jax.make_jaxpr(f("kernel"))(params, xs3)
        got = f("kernel")(params, xs3)
    assert f"recur_{persistent.rule_for(cell).name}_persistent" in str(jaxpr)
    grids = [tuple(e.params["grid_mapping"].grid) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    assert len(grids) >= 2 and set(grids) == {(1,)}, grids  # each kernel its own grid of one (interpret mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain scan: nothing to warn of
        want = f("sequential")(params, xs3)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(b)) and np.max(np.abs(a - b)) <= 2e-5 * np.max(np.abs(a)), a.shape


def _eqns(jaxpr):
    """Every equation of jaxpr and of the jaxprs in its equations' parameters (jit, scan, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def test_persistent_forward_alone_is_the_inference_path(interpret):
    cell, params, xs, carry0 = _setup(jnp.float32)
    lengths = jnp.array([T, 3, 0] + [5] * (B - 3))
    want = recur.scan(cell, params, xs, initial_carry=carry0, lengths=lengths)
    jaxpr = str(jax.make_jaxpr(lambda p: recur.scan(cell, p, xs, initial_carry=carry0, lengths=lengths,
                                                    mode="kernel"))(params))
    assert "recur_lstm_persistent" in jaxpr
    got = recur.scan(cell, params, xs, initial_carry=carry0, lengths=lengths, mode="kernel")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    # a row of length 0 keeps its initial carry, a padded step leaves the carry alone
    np.testing.assert_allclose(np.asarray(got[1]["c"][2]), np.asarray(carry0["c"][2]))


def test_saved_values_are_what_the_fused_backward_step_reads(interpret):
    """keep=True: c_t, the gate tanh and tanh(c_t) equal step_saving's, step by step."""
    cell, params, xs, carry0 = _setup(jnp.float32)
    us = cell.project(params, jnp.swapaxes(xs, 0, 1))
    hq, hT, cT, (cs, tg, tc) = persistent.lstm_forward(us, params["W_h"], carry0["h"], carry0["c"],
                                                       dtype=jnp.float32, keep=True, interpret=True)
    carry = carry0
    for t in range(T):
        new, h, (tg_want, tc_want) = cell.step_saving(params, carry, us[t], cell.recurrent(params, carry))
        for want, got in ((carry["h"], hq[t]), (new["c"], cs[t]), (tg_want, tg[t]), (tc_want, tc[t]), (h, hq[t + 1])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
        carry = new
    np.testing.assert_allclose(np.asarray(hT), np.asarray(carry["h"]), atol=2e-6)
    np.testing.assert_allclose(np.asarray(cT), np.asarray(carry["c"]), atol=2e-6)


@pytest.mark.parametrize("name", ["gru", "elman:sigmoid"])
def test_forward_and_backward_fns_are_the_cells_step_saving_and_step_backward(name):
    """forward_fn / backward_fn (the deferred scan's protocol) against the cell's own step_saving
    and step_backward run step by step, with padded steps: carries, saved values, outputs, d u,
    d rec and d carry0 (float32)."""
    cell, params, xs, h0 = _setup(jnp.float32, name)
    us = cell.project(params, jnp.swapaxes(xs, 0, 1))
    mask = (jnp.arange(T)[:, None] < (jnp.arange(B) % (T + 1))[None, :])
    final, (hs, carries, saved) = persistent.forward_fn(cell, interpret=True)(params, h0, us, mask, True)
    close = lambda got, want: np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    h, at = h0, lambda tree, t: jax.tree.map(lambda x: x[t], tree)
    for t in range(T):
        new, _, sv = cell.step_saving(params, h, us[t], cell.recurrent(params, h))
        close(carries[t], h)
        jax.tree.map(close, at(saved, t), sv)
        h = jnp.where(mask[t][:, None], new, h)
        close(hs[t], h)
    close(final, h)
    dhs = jax.random.normal(jax.random.key(8), (T, B, H))
    dT = jax.random.normal(jax.random.key(9), (B, H))
    d0, du, drec, dparams = persistent.backward_fn(cell, interpret=True)(params, carries, saved, us, dhs, mask, dT)
    assert (drec is None) == (name != "gru") and dparams is None  # no parameters in the step
    d = dT
    for t in reversed(range(T)):
        m = mask[t][:, None]
        dc, du_want, drec_want = cell.step_backward(params, carries[t], at(saved, t), jnp.where(m, d, 0.0), dhs[t])
        drec_want = du_want if drec_want is None else drec_want
        close(du[t], du_want)
        close((du if drec is None else drec)[t], drec_want)
        d = dc + drec_want @ params["W_h"] + jnp.where(m, 0.0, d)
    close(d0, d)


def test_which_scans_take_the_persistent_kernel(interpret):
    choose = lambda name, B_=B, **kw: dispatch.choose(recur.get_cell(name, H), "kernel", B_, T, I, "none", **kw)[0]
    assert choose("lstm") == "persistent"
    assert choose("lstm", B_=24) == "loop"  # rows not a multiple of 16
    assert choose("lstm", resets=True) == "loop"
    assert choose("lstm", backward="autodiff") == "loop"
    assert choose("gru") == choose("elman") == choose("elman:relu,nobias") == "persistent"
    for name in ("lstm:peepholes", "lstm:cifg", "lstm:peepholes,cifg", "lstm:nig,noaf", "lstm:nfg,nog,niaf"):
        assert choose(name) == "persistent", name
    assert choose("gru:cho") == choose("mgu") == "persistent"  # two barriers per step
    # layer norm's statistics: a reduction across the programs (persistent_ln.py), with Greff's variants too
    for name in ("lstm:ln", "lstm:ln,peepholes", "lstm:ln,cifg", "lstm:ln,nig,nog"):
        assert choose(name) == "persistent", name
    assert choose("lstm:ln,proj_size=16") == choose("lstm:ln,cifg,proj_size=64") == "persistent"  # 4 barriers
    assert "does not split" in persistent.problem(recur.get_cell("lstm:ln,proj_size=48", H), B)
    assert choose("lstm:ln,peepholes", B_=24) == "loop"  # rows not a multiple of 16: 4 gate blocks, no padding
    assert choose("indrnn") == "loop"  # no W_h in indrnn
    # gate recurrence: i, f, o of every unit feed every unit, a second source in the one barrier's buffer
    assert choose("lstm:fgr") == choose("lstm:fgr,peepholes,noaf") == "persistent"
    assert choose("lstm:fgr", B_=24) != "persistent"  # rows not a multiple of 16
    # LSTMP: proj_size in power-of-2 blocks of >= 16 columns, at most one per unit block (2 here)
    assert choose("lstm:proj_size=16") == choose("lstm:proj_size=64") == "persistent"
    assert choose("lstm:proj_size=16,peepholes") == choose("lstm:proj_size=16,cifg,noaf") == "persistent"  # Gates
    assert "does not split" in persistent.problem(recur.get_cell("lstm:proj_size=48", H), B)
    # auto's fixed table (what measures on a GPU does not measure in interpret mode unless asked) keeps the
    # sequential scan: the persistent kernel is not measured on a GPU yet
    assert dispatch.choose(recur.get_cell("lstm", H), "auto", B, T, I, "none")[0] == "sequential"
    # remat="step": every persistent kernel recomputes the gates in the reverse loop; other remats fall back
    step = lambda name, remat="step": dispatch.choose(recur.get_cell(name, H), "kernel", B, T, I, remat)[0]
    assert step("lstm") == step("gru") == step("lstm:cifg") == step("lstm:fgr") == "persistent"
    assert step("lstm:ln") == step("lstm:cifg,ln") == "persistent"  # the rows' statistics kept, the rest recomputed
    assert step("gru:cho") == step("mgu") == step("lstm:proj_size=16") == "persistent"
    assert step("lstm", "sqrt") == step("gru:cho", 4) == "sequential"
    assert "remat 'none' or 'step'" in persistent.problem(recur.get_cell("lstm", H), B, remat=4)
    why = dispatch.choose(recur.get_cell("gru:cho", H), "kernel", B, T, I, "sqrt")[2]
    assert "remat" in why


def test_backward_kernel_matches_the_fused_step_backward_loop():
    """lstm_backward's d pre and d carry0 against recur.cells.lstm's step_backward run step by
    step in reverse (with a padded step and the carry's pass-through), float32."""
    cell, params, xs, carry0 = _setup(jnp.float32)
    us = cell.project(params, jnp.swapaxes(xs, 0, 1))
    mask = (jnp.arange(T)[:, None] < (jnp.arange(B) % (T + 1))[None, :])
    hq, _, _, (cs, tg, tc) = persistent.lstm_forward(us, params["W_h"], carry0["h"], carry0["c"], mask,
                                                     dtype=jnp.float32, keep=True, interpret=True)
    c_prev = jnp.concatenate([carry0["c"][None], cs[:-1]])
    dhs = jax.random.normal(jax.random.key(8), (T, B, H))
    dT = {"h": jax.random.normal(jax.random.key(9), (B, H)), "c": jax.random.normal(jax.random.key(10), (B, H))}
    dpre, dh0, dc0 = persistent.lstm_backward(dhs, tg, tc, c_prev, params["W_h"], dT["h"], dT["c"], mask,
                                              dtype=jnp.float32, interpret=True)
    d = dT
    for t in reversed(range(T)):
        m = mask[t][:, None]
        dnew = {k: jnp.where(m, v, 0.0) for k, v in d.items()}
        dc, dp, _ = cell.step_backward(params, {"h": hq[t], "c": c_prev[t]}, (tg[t], tc[t]), dnew, dhs[t])
        np.testing.assert_allclose(np.asarray(dpre[t]), np.asarray(dp), atol=1e-5, rtol=1e-5)
        d = {"h": dp @ params["W_h"] + jnp.where(m, 0.0, d["h"]), "c": dc["c"] + jnp.where(m, 0.0, d["c"])}
    np.testing.assert_allclose(np.asarray(dh0), np.asarray(d["h"]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dc0), np.asarray(d["c"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["lstm:nog,ln,proj_size=16", "lstm:ln", "lstm:proj_size=16,cifg", "lstm:fgr"])
def test_kernels_take_the_outputs_cotangent_at_padded_steps(interpret, name):
    """recur.backprop.deferred_scan with the kernels' forward_fn / backward_fn against its lax.scan
    loops, under output cotangents that are not zero at padded steps (recur.scan zeroes those
    outputs, so the tests through it cannot tell whether a kernel drops their cotangent): the
    gradients, and the outputs at live steps (at a padded step the loops output the step's
    value, the kernels the carried one). Not with o's peephole: its gradient reads the carried
    c_t, which at a padded step is not the step's own (exact under recur.scan, see the note in
    persistent.Gates.peephole_grads)."""
    from recur.backprop import deferred_scan

    cell, params, xs, carry0 = _setup(jnp.float32, name)
    us = cell.project(params, jnp.swapaxes(xs, 0, 1))
    mask = jnp.arange(T)[:, None] < (jnp.arange(B) % (T + 1))[None, :]
    fns = {"forward_fn": persistent.forward_fn(cell, True), "backward_fn": persistent.backward_fn(cell, True)}
    outs, grads = [], []
    for kw in ({}, fns):
        out, pull = jax.vjp(lambda p, c, u: deferred_scan(cell, **kw)(p, c, u, mask, None, None), params, carry0, us)
        cot = jax.tree.map(lambda x, k: jax.random.normal(jax.random.key(k), x.shape, x.dtype), out,
                           jax.tree.unflatten(jax.tree.structure(out), range(len(jax.tree.leaves(out)))))
        outs.append(out)
        grads.append(pull(cot))
    # the outputs at padded steps are the carried state: their cotangent reaches d u of the steps before
    assert float(jnp.max(jnp.abs(jnp.where(mask[:, :, None], 0.0, grads[0][2])))) > 0.1
    outs = [(jnp.where(mask[:, :, None], hs, 0.0), final) for hs, final in outs]
    for a, b in zip(jax.tree.leaves((outs[0], grads[0])), jax.tree.leaves((outs[1], grads[1]))):
        scale = float(jnp.max(jnp.abs(a)))
        assert float(jnp.max(jnp.abs(a - b))) <= 2e-5 * max(scale, 1.0), a.shape


def test_forward_and_backward_fn_replace_the_lax_scan_loops_of_projected_inputs():
    from recur.backprop import deferred_scan

    cell = recur.get_cell("lstm", H)
    fn, bwd = persistent.forward_fn(cell), persistent.backward_fn(cell)
    with pytest.raises(ValueError, match="project=False and no loop"):
        deferred_scan(cell, project=True, forward_fn=fn)
    with pytest.raises(ValueError, match="project=False and no loop"):
        deferred_scan(cell, loop=dispatch.loop_fn(B, True), forward_fn=fn)
    with pytest.raises(ValueError, match="give both"):
        deferred_scan(cell, backward_fn=bwd)
    for name in ("lstm:fgr,ln", "lstm:fgr,proj_size=16", "indrnn", "clockwork"):
        cell = recur.get_cell(name, H)
        with pytest.raises(ValueError, match=f"not {cell.name}"):
            persistent.forward_fn(cell)


def test_barrier_gives_up_after_max_spins_and_then_never_waits(monkeypatch):
    """A barrier that waits for a program that never comes stops after MAX_SPINS polls, and the
    next one neither waits nor arrives (so a grid that is not resident ends in NaN, not a hang)."""
    monkeypatch.setattr(persistent, "MAX_SPINS", 5)

    def kernel(_, counter_ref, out_ref):  # the counter in and, aliased to it, out
        first = persistent._grid_barrier(counter_ref, 2, 1, jnp.bool_(False), gpu=False)
        second = persistent._grid_barrier(counter_ref, 2, 2, first, gpu=False)
        ok = persistent._grid_barrier(counter_ref, 1, 2, jnp.bool_(False), gpu=False)  # 2 >= 1 * 2
        out_ref[0] = first.astype(jnp.int32)
        out_ref[1] = second.astype(jnp.int32)
        out_ref[2] = ok.astype(jnp.int32)

    counter, out = pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32)],
        input_output_aliases={0: 0}, interpret=True)(jnp.zeros((1,), jnp.int32))
    assert out.tolist() == [1, 1, 0] and int(counter[0]) == 2  # the second barrier added nothing


def test_a_program_that_gives_up_writes_nan(interpret, monkeypatch):
    """If the barrier expects one program more than there are, every output is NaN (not stale)."""
    cell, params, xs, carry0 = _setup(jnp.float32)
    barrier = persistent._grid_barrier
    monkeypatch.setattr(persistent, "MAX_SPINS", 3)
    monkeypatch.setattr(persistent, "_grid_barrier", lambda counter, n, *a, **k: barrier(counter, n + 1, *a, **k))
    hs, carry = recur.scan(cell, params, xs, initial_carry=carry0, mode="kernel")
    assert bool(jnp.all(jnp.isnan(hs))) and bool(jnp.all(jnp.isnan(carry["h"])))
    # the backward kernel's: all but the last step's d pre (computed before any barrier, from its
    # own rows and units only) and d carry0
    z = jnp.zeros((T, B, H))
    dpre, dh0, dc0 = persistent.lstm_backward(z, jnp.zeros((T, B, 4 * H)), z, z, params["W_h"], carry0["h"],
                                              carry0["c"], dtype=jnp.float32, interpret=True)
    assert bool(jnp.all(jnp.isfinite(dpre[-1]))) and bool(jnp.all(jnp.isnan(dpre[:-1])))
    assert bool(jnp.all(jnp.isnan(dh0))) and bool(jnp.all(jnp.isnan(dc0)))


@pytest.mark.parametrize("name,dtype", [("gru:cho", jnp.float32), ("mgu", jnp.float32), ("lstm:ln", jnp.float32),
                                        ("lstm:ln,proj_size=64", jnp.bfloat16),
                                        ("lstm:proj_size=16", jnp.float32), ("lstm:fgr,peepholes", jnp.float32),
                                        ("lstm:fgr,peepholes", jnp.bfloat16)])
def test_multi_barrier_steps_that_give_up_write_nan(interpret, monkeypatch, name, dtype):
    """The kernels with two (reset-before cells, the projection), three (layer norm) or four (both)
    barriers per step, and the FGR LSTM's (a second recurrent source), end in NaN too, forward and backward (in
    bfloat16 the reverse loop shares d pre through a copy in the compute dtype: NaN there too)."""
    cell, params, xs, carry0 = _setup(dtype, name)
    barrier = persistent._grid_barrier
    monkeypatch.setattr(persistent, "MAX_SPINS", 3)
    monkeypatch.setattr(persistent, "_grid_barrier", lambda counter, n, *a, **k: barrier(counter, n + 1, *a, **k))
    hs, carry = recur.scan(cell, params, xs, initial_carry=carry0, mode="kernel")
    assert bool(jnp.all(jnp.isnan(hs))) and all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(carry))
    grads = jax.grad(lambda p, c: jnp.sum(recur.scan(cell, p, xs, initial_carry=c, mode="kernel")[0]),
                     argnums=(0, 1))(params, carry0)
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(grads[1]))
    assert bool(jnp.any(jnp.isnan(grads[0]["W_h"])))


def test_a_counter_that_does_not_end_where_it_should_turns_the_outputs_to_nan(interpret, monkeypatch):
    """Each barrier arriving twice stands for a counter that did not start at zero (the barriers
    then pass early): the final count is off, and the results are NaN, not a race's."""
    cell, params, xs, carry0 = _setup(jnp.float32)
    barrier = persistent._grid_barrier

    def twice(counter, n, arrivals, gave_up, **k):
        return barrier(counter, n, arrivals, barrier(counter, n, arrivals, gave_up, **k), **k)

    monkeypatch.setattr(persistent, "_grid_barrier", twice)
    hs, carry = recur.scan(cell, params, xs, initial_carry=carry0, mode="kernel")
    assert bool(jnp.all(jnp.isnan(hs))) and bool(jnp.all(jnp.isnan(carry["c"])))
    z = jnp.zeros((T, B, H))
    _, dh0, dc0 = persistent.lstm_backward(z, jnp.zeros((T, B, 4 * H)), z, z, params["W_h"], carry0["h"],
                                           carry0["c"], dtype=jnp.float32, interpret=True)
    assert bool(jnp.all(jnp.isnan(dh0))) and bool(jnp.all(jnp.isnan(dc0)))


CELLS_DTYPES = [("lstm", jnp.float32), ("lstm", jnp.bfloat16), ("gru", jnp.bfloat16), ("elman", jnp.float32),
                ("lstm:peepholes,cifg", jnp.bfloat16), ("gru:cho", jnp.float32), ("mgu", jnp.bfloat16),
                ("lstm:ln,proj_size=512", jnp.bfloat16), ("lstm:peepholes,cifg,ln", jnp.bfloat16), ("lstm:proj_size=512,peepholes", jnp.float32),
                ("lstm:proj_size=512", jnp.bfloat16), ("lstm:fgr,peepholes", jnp.bfloat16),
                ("lstm:fgr,peepholes", jnp.float32)]


@pytest.mark.parametrize("name,dtype", CELLS_DTYPES)
def test_persistent_kernels_lower_for_an_h100(name, dtype):
    """The training step's forward and backward kernels at the benchmark's shape (B=64, H=1024:
    128 programs) lower through the Triton back end, with their barrier: bar.sync and an atomic
    counter."""
    from experiments.triton_compile import persistent_ir

    modules = persistent_ir(1024, dtype, cell=name)
    assert len(modules) == 2
    for text in modules:  # forward, backward
        assert "tt.atomic_rmw" in text and text.count("gpu.barrier") >= 2 and "tt.dot" in text
        assert "isVolatile = true" in text  # what other programs wrote is read past the L1 copy


@pytest.mark.parametrize("name,dtype", CELLS_DTYPES)
def test_persistent_kernels_fit_an_h100_without_spills(name, dtype):
    """Compiled for sm_90 by the triton package at the default settings (K_BLOCK, NUM_WARPS,
    NUM_STAGES), B=64, H=1024: both kernels fit an H100's 227 KiB of shared memory and spill no
    registers (measured for the LSTM: forward 48 / 96 KiB in bf16 / fp32, backward 24 / 48 KiB;
    docs/kernels.md has the GRU's and the Elman RNN's)."""
    pytest.importorskip("triton", reason="the triton package compiles the kernels for a GPU target")
    from experiments.triton_compile import compile_sm90, persistent_ir

    for text in persistent_ir(1024, dtype, cell=name):
        shared, regs, spill_st, spill_ld = compile_sm90(text, persistent.NUM_WARPS, persistent.NUM_STAGES)
        assert shared <= 227 * 1024 and spill_st == spill_ld == 0 and 0 < regs <= 255, (shared, regs, spill_st)


def test_layer_norm_kernels_are_the_cells_step_saving_and_step_backward():
    """persistent_ln's forward values and reverse loop against recur.cells.lstm's layer-norm
    step_saving / step_backward, step by step, float32, with a padded step. H = 48: 3 unit blocks,
    so the partial-sum buffers have a padding row (4), and W_h h has a large common offset per row
    (about 72, spread 0.9): the partial moments are combined without cancellation (E[x^2] - E[x]^2
    is 3e-3 off in r_hat here, the kernel 4e-5: the product's rounding, normalised)."""
    from recur.kernels import persistent_ln

    H_ = 48
    cell = recur.get_cell("lstm:ln", H_)
    params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(7), p.shape, p.dtype),
                          cell.init(jax.random.key(0), I))
    params["W_h"] = params["W_h"] + 3.0  # W_h h = large offset + small spread in each row
    xs = jax.random.normal(jax.random.key(1), (T, B, I))
    h0 = 0.5 + 0.1 * jax.random.normal(jax.random.key(2), (B, H_))
    c0 = jax.random.normal(jax.random.key(3), (B, H_))
    us = cell.project(params, xs)
    mask = (jnp.arange(T)[:, None] < (jnp.arange(B) % (T + 1))[None, :])
    assert persistent.layout(B, H_, persistent.sm_count())[1] == 16  # 3 unit blocks
    hq, hT, cT, saved = persistent_ln.run_forward(us, params["W_h"], params, h0, c0, mask, dtype=jnp.float32,
                                                  keep=True, interpret=True)
    carry = {"h": h0, "c": c0}
    for t in range(T):
        new, h, sv = cell._ln_step_saving(params, carry, us[t], cell.recurrent(params, carry))
        new = {k: jnp.where(mask[t][:, None], new[k], carry[k]) for k in new}
        got = (hq[t + 1], saved["c"][t], saved["tg"][t], saved["tc"][t], saved["r_hat"][t],
               saved["r_inv"][t][:, None], saved["c_hat"][t], saved["c_inv"][t][:, None])  # step_saving's order
        for want, g in zip((new["h"], new["c"]) + sv, got):
            m = mask[t][:, None]  # padded rows keep the carry; their saved values are not read
            np.testing.assert_allclose(np.asarray(jnp.where(m, g, 0.0)), np.asarray(jnp.where(m, want, 0.0)),
                                       atol=2e-4, rtol=1e-4)
        carry = new
    np.testing.assert_allclose(np.asarray(hT), np.asarray(carry["h"]), atol=2e-4)
    np.testing.assert_allclose(np.asarray(cT), np.asarray(carry["c"]), atol=2e-4)
    # the reverse loop from the kernel's own saved values (the reference's differ by the rounding above)
    c_prev = jnp.concatenate([c0[None], saved["c"][:-1]])
    saves = [(saved["tg"][t], saved["tc"][t], saved["r_hat"][t], saved["r_inv"][t][:, None], saved["c_hat"][t],
              saved["c_inv"][t][:, None]) for t in range(T)]
    dhs = jax.random.normal(jax.random.key(8), (T, B, H_)) * mask[:, :, None]
    dT = {"h": jax.random.normal(jax.random.key(9), (B, H_)), "c": jax.random.normal(jax.random.key(10), (B, H_))}
    dpre, drec, d_norms, dh0, dc0 = persistent_ln.run_backward(dhs, saved, c_prev, params["W_h"], params, dT["h"],
                                                               dT["c"], mask, dtype=jnp.float32, interpret=True)
    d, pieces = dT, []
    for t in reversed(range(T)):
        m = mask[t][:, None]
        dnew = {k: jnp.where(m, v, 0.0) for k, v in d.items()}
        dc, dp, dr, piece = cell.step_backward(params, {"h": hq[t], "c": c_prev[t]}, saves[t], dnew, dhs[t])
        for want, got in ((dp, dpre[t]), (dr["h"], drec[t])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)
        d = {"h": dr["h"] @ params["W_h"] + jnp.where(m, 0.0, d["h"]), "c": dc["c"] + jnp.where(m, 0.0, d["c"])}
        pieces.insert(0, piece)
    np.testing.assert_allclose(np.asarray(dh0), np.asarray(d["h"]), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dc0), np.asarray(d["c"]), atol=1e-5, rtol=1e-4)
    # the norms' gradients, each program's sums over its rows and the steps (cell.param_grads: sums of the pieces)
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
    want = cell.param_grads(params, stack(saves), stack(pieces))
    for k, got in d_norms.items():
        np.testing.assert_allclose(np.asarray(got), np.asarray(want[k]), atol=1e-4, rtol=1e-4)


def _kernel_outputs(jaxpr, name):
    """The output avals of the pallas_calls called ``name`` in a closed jaxpr (sub-jaxprs included)."""
    return [[v.aval for v in eqn.outvars] for eqn in _eqns(jaxpr.jaxpr)
            if eqn.primitive.name == "pallas_call" and eqn.params.get("name") == name]


# (cell, dtype, tolerance, the float32 values per row and step that remat="step" does not keep: the
# saved values of a Rule; the FGR LSTM's and LSTMP's gate tanh and act(c_t); the layer-norm LSTM's
# gate tanh, act(LN(c_t)), r_hat, c_hat (n H + H + n H + H) less the two means it keeps beside the
# 1 / std; Cho's GRU's and the MGU's gates and n_t (they keep m_t, which d W_n reads))
@pytest.mark.parametrize("name,dtype,tol,dropped", [
    ("lstm", jnp.float32, 2e-5, 5 * H), ("gru", jnp.bfloat16, 1.5e-2, 4 * H),
    ("lstm:peepholes,cifg", jnp.float32, 2e-5, 3 * H), ("lstm:fgr,peepholes,noaf", jnp.bfloat16, 1.5e-2, 5 * H),
    ("lstm:ln", jnp.float32, 2e-5, 10 * H - 2), ("lstm:peepholes,cifg,ln,proj_size=16", jnp.bfloat16, 2e-2, 8 * H - 2),
    ("gru:cho", jnp.float32, 2e-5, 3 * H),
    ("lstm:proj_size=64,peepholes,nig", jnp.bfloat16, 1.5e-2, 4 * H)])
def test_remat_step_recomputes_the_gates_in_the_reverse_loop(interpret, name, dtype, tol, dropped):
    """remat="step": the forward kernel keeps only the carries, and the backward kernel recomputes
    each step's products and gates from them; values and gradients as the sequential scan's (with
    lengths and reverse reading)."""
    cell, params, xs, carry0 = _setup(dtype, name)
    rule = persistent.rule_for(cell)
    if isinstance(rule, persistent.Rule):
        assert dropped == H * sum(k for _, k in rule.saved)
    grad = lambda remat: jax.make_jaxpr(jax.grad(lambda p: jnp.sum(recur.scan(
        cell, p, xs, mode="kernel", remat=remat)[0].astype(jnp.float32))))(params)
    size = lambda avals: sum(a.size * a.dtype.itemsize for a in avals)
    (stored,), (kept,) = (_kernel_outputs(grad(r), f"recur_{rule.name}_persistent") for r in ("none", "step"))
    assert size(stored) - size(kept) == dropped * T * B * 4
    assert len(_kernel_outputs(grad("step"), f"recur_{rule.name}_persistent_backward")) == 1
    kw = {"lengths": jnp.arange(B) % (T + 1), "reverse": True}
    (_, (hw, cw)), gw = _run(cell, "sequential", **kw)(params, xs, carry0)
    (_, (hg, cg)), gg = _run(cell, "kernel", remat="step", **kw)(params, xs, carry0)
    for a, b in zip(jax.tree.leaves((hw, cw, gw)), jax.tree.leaves((hg, cg, gg))):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = float(np.max(np.abs(a)))
        assert scale > 0 and float(np.max(np.abs(a - b))) <= tol * scale, a.shape


@pytest.mark.parametrize("name,dtype,remat,tol", [
    ("gru", jnp.float32, "none", 2e-5), ("lstm:peepholes,cifg", jnp.bfloat16, "step", 1.5e-2),
    ("lstm:peepholes,cifg,ln", jnp.float32, "step", 2e-5), ("lstm:fgr,peepholes", jnp.float32, "none", 2e-5)])
def test_three_gate_blocks_as_one_padded_window(interpret, monkeypatch, name, dtype, remat, tol):
    """PAD_THREE: the kernels multiply three gate blocks (the GRU's, lstm:cifg's, the gate
    recurrence's R) as one window of four, the fourth zero, instead of two; the same values and
    gradients as the sequential scan (with lengths and reverse reading), and one dot per K block
    where there were two."""
    cell, params, xs, carry0 = _setup(dtype, name)
    dots = lambda: str(jax.make_jaxpr(lambda p: recur.scan(cell, p, xs, mode="kernel")[0])(params)).count("dot_general")
    two = dots()
    monkeypatch.setattr(persistent, "PAD_THREE", True)
    assert dots() < two
    kw = {"lengths": jnp.arange(B) % (T + 1), "reverse": True}
    (_, (hw, cw)), gw = _run(cell, "sequential", **kw)(params, xs, carry0)
    (_, (hg, cg)), gg = _run(cell, "kernel", remat=remat, **kw)(params, xs, carry0)
    for a, b in zip(jax.tree.leaves((hw, cw, gw)), jax.tree.leaves((hg, cg, gg))):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = float(np.max(np.abs(a)))
        assert scale > 0 and float(np.max(np.abs(a - b))) <= tol * scale, a.shape


def test_padded_three_gate_kernels_fit_an_h100_without_spills(monkeypatch):
    """With PAD_THREE the GRU's float32 kernels (B=64, H=1024) still compile for sm_90 without
    spills, and the forward's IR holds fewer dots."""
    pytest.importorskip("triton", reason="the triton package compiles the kernels for a GPU target")
    from experiments.triton_compile import compile_sm90, persistent_ir

    two = persistent_ir(1024, jnp.float32, cell="gru")[0].count("tt.dot")
    monkeypatch.setattr(persistent, "PAD_THREE", True)
    forward, backward = persistent_ir(1024, jnp.float32, cell="gru")
    assert forward.count("tt.dot") < two
    for text in (forward, backward):
        shared, regs, spill_st, spill_ld = compile_sm90(text, persistent.NUM_WARPS, persistent.NUM_STAGES)
        assert shared <= 227 * 1024 and spill_st == spill_ld == 0 and 0 < regs <= 255, (shared, regs, spill_st)


def test_barriers_polling_by_volatile_loads_compile_for_an_h100(monkeypatch):
    """POLL="load": a program waiting at a barrier polls the counter with volatile loads, not
    atomics, and takes one acq_rel atomic once the count is reached; the LSTM's float32 kernels
    (B=64, H=1024) compile for sm_90 without spills. An unknown POLL is refused."""
    pytest.importorskip("triton", reason="the triton package compiles the kernels for a GPU target")
    import re

    from experiments.triton_compile import compile_sm90, persistent_ir, sm90

    def forward_ptx():
        forward, backward = persistent_ir(1024, jnp.float32, cell="lstm")
        ptx = sm90(forward, persistent.NUM_WARPS, persistent.NUM_STAGES).asm["ptx"]
        return forward, backward, len(re.findall(r"ld\.volatile\.global", ptx)), len(re.findall(r"atom\.global\.gpu\.acq_rel", ptx))

    *_, polls, atomics = forward_ptx()
    monkeypatch.setattr(persistent, "POLL", "load")
    forward, backward, polls_by_load, atomics_by_load = forward_ptx()
    # the forward kernel's two barriers (before the loop, then each step): two polling loads, and per
    # barrier still two atomics (the arrival, the acquire after the polls instead of the polls)
    assert (polls, polls_by_load) == (0, 2) and atomics == atomics_by_load == 4
    for text in (forward, backward):
        shared, regs, spill_st, spill_ld = compile_sm90(text, persistent.NUM_WARPS, persistent.NUM_STAGES)
        assert shared <= 227 * 1024 and spill_st == spill_ld == 0 and 0 < regs <= 255, (shared, regs, spill_st)
    monkeypatch.setattr(persistent, "POLL", "spin")
    with pytest.raises(ValueError, match="POLL must be 'atomic' or 'load', got 'spin'"):
        persistent_ir(64, jnp.float32, cell="lstm")


@pytest.mark.parametrize("name,dtype,spill", [("lstm", jnp.bfloat16, 0), ("gru", jnp.float32, 0),
                                              ("lstm:fgr,peepholes", jnp.float32, 128), ("lstm:ln", jnp.bfloat16, 0),
                                              ("gru:cho", jnp.bfloat16, 0)])
def test_recomputing_backward_kernels_fit_an_h100_without_spills(name, dtype, spill):
    """remat="step"'s backward kernel (two products per step: W_h h again, then d rec W_h) at B=64,
    H=1024 compiles for sm_90 at the default settings without spills (the GRU's float32 one holds
    the most registers: 208 per thread; docs/kernels.md); the FGR LSTM's (three products before
    the barrier, four after it) spills at most ``spill`` bytes per thread (116 measured)."""
    pytest.importorskip("triton", reason="the triton package compiles the kernels for a GPU target")
    from experiments.triton_compile import compile_sm90, persistent_ir

    forward, backward = persistent_ir(1024, dtype, cell=name, remat="step")
    assert backward.count("tt.dot") > persistent_ir(1024, dtype, cell=name)[1].count("tt.dot")
    shared, regs, spill_st, spill_ld = compile_sm90(backward, persistent.NUM_WARPS, persistent.NUM_STAGES)
    assert shared <= 227 * 1024 and spill_st <= spill and spill_ld <= spill and 0 < regs <= 255, (shared, regs, spill_st)

