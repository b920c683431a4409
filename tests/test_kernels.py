"""recur.scan(mode="kernel" | "auto"): the Pallas kernels against the plain scan, and every fallback.

On CPU the kernels run in Pallas' interpret mode (RECUR_PALLAS_INTERPRET=1), which executes the
kernel's own code: its indexing, blocking over batch rows and chunking over time. A second group
lowers the kernels for an H100 through the Triton back end without a GPU, so a kernel that the
GPU compiler path cannot express fails here rather than only on a GPU.
"""
import functools
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recur
from cell_cases import CASES
from recur.cells.lru import LRU
from recur.kernels import dispatch
from recur.kernels.linear import linear_recurrence
from recur.kernels.loop import kernel_loop
from recur.kernels.pad import padded
from test_scan import B, T, make, random_carry



@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _assert_close(want, got, tol, what):
    for a, b in zip(_float_leaves(want), _float_leaves(got)):
        assert a.shape == b.shape, what
        assert np.allclose(a, b, atol=tol, rtol=tol), (what, float(jnp.max(jnp.abs(a - b))))


def _calls(monkeypatch, module, name):
    """The calls of module.name from now on, as (args, kwargs) pairs; the function still runs."""
    calls, run = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append((a, k)) or run(*a, **k))
    return calls


def _loss_and_grad(cell, mode, kwargs, w):
    def loss(p, x, c0, rc):
        hs, carry = recur.scan(cell, p, x, initial_carry=c0, reset_carry=rc, mode=mode, **kwargs)
        last = sum(jnp.sum(jnp.abs(l) ** 2) for l in _float_leaves(carry))  # the LRU's is complex
        return jnp.sum(jnp.sin(hs) * w) + last, (hs, carry)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True, allow_int=True))


@pytest.mark.parametrize("name", CASES)
def test_kernel_equals_sequential(name, interpret):
    """Outputs, final carry and every gradient (params, inputs, initial and reset carry), float64."""
    _check_kernel_equals_sequential(name)


@pytest.mark.parametrize("name", ["mingru", "lru"])
def test_linear_kernel_on_xlas_coefficients_equals_sequential(name, interpret, monkeypatch):
    """With recur/kernels/gated.py off, the minGRU and the LRU run linear.py on the (a, b) that
    XLA computes (what any other linear cell runs): the same checks as above."""
    from recur.kernels import gated, linear

    monkeypatch.setattr(gated, "ENABLED", False)
    calls = _calls(monkeypatch, linear, "linear_recurrence")
    _check_kernel_equals_sequential(name)
    assert calls, "linear.py did not run"


def _check_kernel_equals_sequential(name):
    with jax.enable_x64(True):
        cell, params, xs = make(name, dtype=jnp.float64)
        carry0, reset_carry = random_carry(cell, B, seed=3), random_carry(cell, B, seed=4)
        w = jax.random.normal(jax.random.key(9), (B, T, cell.output_size), jnp.float64)
        kwargs = dict(lengths=jnp.array([T, 4, 0]),
                      resets=jnp.zeros((B, T), bool).at[0, 3].set(True).at[1, 1].set(True))
        args = (params, xs, carry0, reset_carry)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dispatch.KernelFallback)  # the kernel must really run
            (_, got_out), got = _loss_and_grad(cell, "kernel", kwargs, w)(*args)
        (_, want_out), want = _loss_and_grad(cell, "sequential", kwargs, w)(*args)
        _assert_close(want_out, got_out, 1e-12, (name, "outputs"))
        _assert_close(want, got, 1e-10, (name, "gradients"))


@pytest.mark.parametrize("name", ["lstm", "mingru"])
def test_kernel_reverse_equals_sequential(name, interpret):
    with jax.enable_x64(True):
        cell, params, xs = make(name, dtype=jnp.float64)
        w = jax.random.normal(jax.random.key(9), (B, T, cell.output_size), jnp.float64)
        kwargs = dict(lengths=jnp.array([T, 4, 2]), reverse=True)
        args = (params, xs, cell.initial_carry(B), None)
        (_, got_out), got = _loss_and_grad(cell, "kernel", kwargs, w)(*args)
        (_, want_out), want = _loss_and_grad(cell, "sequential", kwargs, w)(*args)
        _assert_close(want_out, got_out, 1e-12, name)
        _assert_close(want, got, 1e-10, name)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_kernel_bfloat16_keeps_float32_state(name, interpret):
    cell, params, xs = make(name)
    cell = recur.get_cell(name, cell.hidden_size, dtype=jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallback)
        hs, carry = jax.jit(lambda p, x: recur.scan(cell, p, x, mode="kernel"))(params, xs)
    want, want_carry = recur.scan(cell, params, xs)
    state = carry["c"] if name == "lstm" else carry
    assert hs.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert np.allclose(hs.astype(np.float32), want.astype(np.float32), atol=2e-2)


def test_kernel_loop_blocks_rows_and_matches_lax_scan():
    """Several programs (block_b < B), reverse order, a row-blocked constant and a None input."""
    with jax.enable_x64(True):
        k = jax.random.normal(jax.random.key(0), (6, 6), jnp.float64)
        rows = jax.random.normal(jax.random.key(1), (8, 6), jnp.float64)
        xs = {"u": jax.random.normal(jax.random.key(2), (5, 8, 6), jnp.float64), "none": None}

        def body(k, rows, c, x):
            new = jnp.tanh(c @ k + x["u"] + rows)
            return new, (new * 2, jnp.sum(new, axis=-1))

        c0 = jnp.zeros((8, 6), jnp.float64)
        for reverse in (False, True):
            want = jax.lax.scan(lambda c, x: body(k, rows, c, x), c0, xs, reverse=reverse)
            got = kernel_loop(body, k, rows, c0, xs, reverse=reverse, block_b=2)
            _assert_close(want, got, 1e-14, reverse)
        with pytest.raises(ValueError, match="not a multiple of block_b"):
            kernel_loop(body, k, rows, c0, xs, block_b=3)


@pytest.mark.parametrize("steps,cx", [(1, False), (8, False), (1, True), (8, True)])
@pytest.mark.parametrize("T_", [7, 64, 320])
def test_linear_recurrence_chunks(T_, steps, cx, monkeypatch):
    """One chunk (T=7), two (64 = 2 x 32) and ten (320 = 10 x 32); values and gradients; each
    program loading one step at a time or blocks of 8 (linear.STEP_BLOCK; T=7 stays at 1); and
    complex a and b (the LRU's: the kernels run on their real and imaginary parts, one step at a
    time whatever STEP_BLOCK is), also with only one of them complex."""
    from recur.kernels import linear

    monkeypatch.setattr(linear, "STEP_BLOCK", steps)
    with jax.enable_x64(True):
        ka, kb, kw, kt, kc = jax.random.split(jax.random.key(T_), 5)
        a = jax.random.uniform(ka, (2, T_, 40), jnp.float64, 0.5, 1.0)
        b = jax.random.normal(kb, (2, T_, 40), jnp.float64)
        w = jax.random.normal(kw, (2, T_, 40), jnp.float64)
        if cx:  # |a| < 1 at any angle
            a = a * jnp.exp(1j * jax.random.uniform(kt, a.shape, jnp.float64, -3.0, 3.0))
            b = jax.lax.complex(b, jax.random.normal(kc, b.shape, jnp.float64))

        def ref(a, b):
            def body(s, ab):
                s = ab[0] * s + ab[1]
                return s, s

            swap = lambda x: jnp.swapaxes(x, 0, 1)
            return swap(jax.lax.scan(body, jnp.zeros_like(b[:, 0], jnp.result_type(a, b)), (swap(a), swap(b)))[1])

        assert linear_recurrence(a, b).dtype == b.dtype
        _assert_close(ref(a, b), linear_recurrence(a, b), 1e-12, "states")
        # a real loss of both parts, so that complex cotangents have both parts too
        part = lambda s: jnp.real(s) + jnp.imag(s) ** 2 if cx else s
        grad = lambda f, a, b: jax.grad(lambda a, b: jnp.sum(jnp.sin(part(f(a, b))) * w), argnums=(0, 1))(a, b)
        _assert_close(grad(ref, a, b), grad(linear_recurrence, a, b), 1e-11, "gradients")
        if cx:  # one of them real (promoted to complex; its gradient real)
            for a_, b_ in ((jnp.abs(a), b), (a, jnp.real(b))):
                _assert_close(ref(a_, b_), linear_recurrence(a_, b_), 1e-12, "states, one real")
                got = grad(linear_recurrence, a_, b_)
                assert [g.dtype for g in got] == [a_.dtype, b_.dtype]
                _assert_close(grad(ref, a_, b_), got, 1e-11, "gradients, one real")


class _SquaredDecayLRU(LRU):
    """An LRU whose input term is λ² ⊙ B x_t: coefficients holomorphic in λ and not the identity,
    so that a cotangent conjugated the wrong way inside the gated kernel shows."""

    def coefficients(self, params, us):
        a, b = super().coefficients(params, us)
        return a, a * a * b

    def block_coefficients(self, lam, bx):
        return lam, lam * lam * bx


GATED = ["mingru", "minlstm", "mingru:identity", "minlstm:identity", "lru", "lru:state_size=6", "lru-squared"]


@pytest.mark.parametrize("T_,steps,S_,resets", [(7, 1, 40, True), (320, 1, 40, False), (320, 8, 48, True)])
@pytest.mark.parametrize("name", GATED)
def test_gated_kernel_equals_sequential(name, T_, steps, S_, resets, interpret, monkeypatch):
    """Cells with element-wise coefficients (minGRU, minLSTM, the LRU and an LRU variant whose b is
    a complex function of λ) run recur/kernels/gated.py (coefficients, mask, resets and initial
    state inside the kernels; linear.py must not run): one chunk (T=7) and ten (320 = 10 x 32),
    one step or blocks of 8 per load (complex: always 1), one block of state units or three;
    lengths T, 4 (ending inside the first chunk) and 0 (the row keeps its initial state); with
    resets (at step 0, at a chunk's first step, at the last step, in a padded step) or without; outputs,
    final carry and the gradients of params (the LRU's λ through the kernel's consts), inputs,
    initial carry and reset carry (through both the outputs and the carry), float64 /
    complex128."""
    from recur.kernels import gated, linear

    monkeypatch.setattr(linear, "STEP_BLOCK", steps)
    calls = _calls(monkeypatch, gated, "gated_recurrence")
    monkeypatch.setattr(linear, "linear_recurrence", None)  # calling it would fail
    with jax.enable_x64(True):
        # S = 48: three blocks of 16 state units (40: one block)
        cell = (_SquaredDecayLRU(S_, dtype=jnp.float64) if name == "lru-squared"
                else recur.get_cell(name, S_, dtype=jnp.float64))
        params = cell.init(jax.random.key(0), 5)
        if "b" in params:
            params["b"] = jax.random.normal(jax.random.key(4), params["b"].shape, jnp.float64)
        xs = jax.random.normal(jax.random.key(1), (3, T_, 5), jnp.float64)
        c0 = random_carry(cell, 3, seed=2)
        w = jax.random.normal(jax.random.key(3), (3, T_, S_), jnp.float64)
        kw = dict(lengths=jnp.array([T_, 4, 0]))
        if resets:  # row 0 restarts at 0, 3, inside a chunk, at a chunk's start (160 = 5 x 32) and at
            # its last step; row 2's is padding
            kw["resets"] = jnp.zeros((3, T_), bool).at[0, jnp.array([0, 3, T_ // 3, T_ // 2, T_ - 1])].set(True).at[
                1, 1].set(True).at[2, 2].set(True)
        rc = random_carry(cell, 3, seed=5)

        def loss(p, x, c, rc, mode):
            hs, carry = recur.scan(cell, p, x, initial_carry=c, mode=mode, reset_carry=rc, **kw)
            return jnp.sum(jnp.sin(hs) * w) + jnp.sum(jnp.real(carry) ** 3 + jnp.imag(carry) ** 2), (hs, carry)

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dispatch.KernelFallback)
            (_, got_out), got = grad(params, xs, c0, rc, "kernel")
        assert [a[2] is not None for a, _ in calls] == [True], "the gated kernel did not run (with its mask)"
        (_, want_out), want = grad(params, xs, c0, rc, "sequential")
        assert bool(jnp.any(got[3] != 0)) == resets  # the reset carry's gradient
        _assert_close(want_out, got_out, 1e-12, (name, "outputs"))
        _assert_close(want, got, 1e-10, (name, "gradients"))
        np.testing.assert_array_equal(got_out[1][2], c0[2])  # length 0: the initial state


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_gated_kernel_in_bfloat16_matches_the_kernel_on_xlas_gates(name, interpret, monkeypatch):
    """bfloat16 inputs (float32 state): the gated kernel and linear.py on XLA's (a, b) compute the
    same gates from the same bfloat16 us; outputs and gradients agree to float32 rounding, and
    the gradients keep their dtypes. No mask and no initial carry: the unmasked kernels."""
    from recur.kernels import gated

    cell = recur.get_cell(name, 32, dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), 16)
    xs = jax.random.normal(jax.random.key(1), (4, 64, 16), jnp.bfloat16)

    def run():
        loss = lambda p, x: jnp.sum(jnp.sin(recur.scan(cell, p, x, mode="kernel")[0].astype(jnp.float32)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)

    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallback)
        got = run()
        monkeypatch.setattr(gated, "ENABLED", False)
        want = run()
    assert got[1][1].dtype == jnp.bfloat16 and got[1][0]["W_x"].dtype == jnp.float32
    # the kernel's own cotangents keep their primals' dtypes (bfloat16 us, and a bfloat16 s0)
    us, s0 = jnp.ones((2, 64, cell.n_blocks * 32), jnp.bfloat16), jnp.ones((2, 32), jnp.bfloat16)
    d = jax.grad(lambda u, s: jnp.sum(gated.gated_recurrence(u, s, None, (), cell)), argnums=(0, 1))(us, s0)
    assert d[0].dtype == d[1].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-3)


def test_gated_kernel_keeps_the_cells_state_dtype(interpret):
    """A float64 minGRU given a float32 initial carry runs (as the other scans do) in float64:
    its final carry is float64 and its outputs are the sequential scan's to float64 rounding."""
    with jax.enable_x64(True):
        cell = recur.get_cell("mingru", 16, dtype=jnp.float64)
        params = cell.init(jax.random.key(0), 4)
        xs = jax.random.normal(jax.random.key(1), (2, 9, 4), jnp.float64)
        c0 = jax.random.normal(jax.random.key(2), (2, 16), jnp.float32)
        got, got_carry = recur.scan(cell, params, xs, initial_carry=c0, mode="kernel")
        want, want_carry = recur.scan(cell, params, xs, initial_carry=c0.astype(jnp.float64))
        assert got_carry.dtype == jnp.float64
        _assert_close((want, want_carry), (got, got_carry), 1e-12, "float64 with a float32 carry")


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru", "lru"])
def test_kernel_mode_with_no_steps_returns_the_initial_carry(name, interpret):
    """T = 0: nothing for a kernel to run; mode="kernel" runs the plain scan, silently (it crashed)."""
    cell = recur.get_cell(name, 16)
    params = cell.init(jax.random.key(0), 4)
    c0 = random_carry(cell, 2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallback)
        hs, carry = recur.scan(cell, params, jnp.zeros((2, 0, 4)), initial_carry=c0, mode="kernel")
    assert hs.shape == (2, 0, cell.output_size)
    jax.tree.map(np.testing.assert_array_equal, carry, c0)


def test_gated_recurrence_checks_its_shapes():
    from recur.kernels.gated import gated_recurrence

    cell = recur.get_cell("mingru", 4)
    with pytest.raises(ValueError, match=r"us \(2, 3, 7\) must be \[B, T > 0, k \* S\] for s0 \(2, 4\)"):
        gated_recurrence(jnp.zeros((2, 3, 7)), jnp.zeros((2, 4)), None, (), cell)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\), not \[B, T\] = \(2, 3\)"):
        gated_recurrence(jnp.zeros((2, 3, 8)), jnp.zeros((2, 4)), jnp.ones((2, 4), bool), (), cell)
    with pytest.raises(ValueError, match=r"consts\[0\] has shape \(3,\), not \[S\] = \(4,\)"):
        gated_recurrence(jnp.zeros((2, 3, 8)), jnp.zeros((2, 4)), None, (jnp.ones(3),), cell)


def test_linear_chunk_length_leaves_enough_programs(monkeypatch):
    """Chunks are as long as possible while rows x chunks still fills PROGRAMS programs; a T with
    no chunk length that divides it runs as one chunk; CHUNK pins the length."""
    from recur.kernels import linear

    assert linear._chunk(65536, 16) == 512 and linear._chunk(4096, 16) == 32
    assert linear._chunk(4096, 1024) == 512 and linear._chunk(96, 1) == 32 and linear._chunk(7, 4) == 7
    monkeypatch.setattr(linear, "CHUNK", 128)
    assert linear._chunk(4096, 16) == 128


# --- fallbacks and the auto choice ----------------------------------------------------------
def test_kernel_on_cpu_falls_back_with_a_notice(monkeypatch):
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET", raising=False)
    cell, params, xs = make("gru")
    with pytest.warns(dispatch.KernelFallback, match="needs a GPU"):
        hs, _ = recur.scan(cell, params, xs, mode="kernel")
    assert np.allclose(hs, recur.scan(cell, params, xs)[0])
    assert dispatch.choose(cell, "kernel", B, T, 4, "none")[0] == "sequential"


def test_auto_on_cpu_is_the_sequential_scan_silently(monkeypatch):
    """On the CPU, auto is the sequential scan, except for a float32 minGRU / minLSTM with the CPU
    kernels built: their parallel mode is the compiled chunked scan (recur/kernels/cpu.py)."""
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET", raising=False)
    from recur.kernels import cpu

    gated = "parallel" if cpu.unavailable() is None else "sequential"
    for name, want in (("lstm", "sequential"), ("lru", "sequential"), ("mingru", gated), ("minlstm", gated)):
        cell, params, xs = make(name)
        for mode in ("auto", "kernel") if want == "parallel" else ("auto",):
            assert dispatch.choose(cell, mode, B, T, 4, "none") == (want, False, None), (name, mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hs, _ = recur.scan(cell, params, xs, mode="auto")
        assert np.allclose(hs, recur.scan(cell, params, xs)[0], atol=1e-6), name
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    assert dispatch.choose(make("mingru")[0], "auto", B, T, 4, "none")[0] == "sequential"


def test_auto_in_interpret_mode_picks_what_was_measured_fastest(interpret):
    """With measuring off (interpret mode on a CPU, without RECUR_AUTOTUNE=1) auto takes the fixed
    table: the sequential scan for every cell not linear in its state (unrolled, it beat cuDNN and
    the loop kernel on an H200), and the chunked kernel for linear cells; mode="kernel" / "cudnn"
    still ask for the kernels."""
    choose = lambda name, mode="auto", **kw: dispatch.choose(make(name)[0], mode, B, T, 4, "none", **kw)[0]
    for name in ("lstm", "lstm:peepholes", "gru", "mgu", "elman"):
        assert choose(name) == "sequential", name
        assert choose(name, "kernel") == "loop", name
    assert choose("lstm", resets=True) == choose("lstm", projected=True) == "sequential"
    assert choose("lstm", "cudnn") == "cudnn"
    assert choose("mingru") == choose("mingru", "kernel") == "linear"


@pytest.fixture
def fresh_autotune(monkeypatch, tmp_path):
    """recur.kernels.autotune with nothing chosen or measured yet and an empty cache in tmp_path."""
    from recur.kernels import autotune

    monkeypatch.setenv("RECUR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    monkeypatch.setattr(autotune, "RESULTS", {})
    return autotune


@pytest.fixture
def tuning(interpret, fresh_autotune, monkeypatch):
    """auto measuring in interpret mode (RECUR_AUTOTUNE=1), with an empty cache."""
    monkeypatch.setenv("RECUR_AUTOTUNE", "1")
    return fresh_autotune


def test_auto_measures_the_candidates_that_can_run_and_keeps_the_fastest(tuning, monkeypatch):
    """With autotuning on, auto times the plain scan, the kernel mode="kernel" would run and
    cuDNN's LSTM where each can take the scan, takes the fastest, and keeps the choice in memory
    and in $RECUR_CACHE_DIR/autotune.json; a candidate that failed is dropped."""
    timings, asked = {}, []

    def fake(cell, names, *a, **k):
        asked.append((cell.name, tuple(names), k["masked"], k["resets"], k["unroll"]))
        return {m: timings.get(m, 1.0) for m in names}

    monkeypatch.setattr(tuning, "measure", fake)
    choose = lambda name, **kw: dispatch.choose(make(name)[0], "auto", B, T, 4, "none", **kw)
    timings.update(kernel=0.5, cudnn=2.0)
    assert choose("lstm") == ("loop", True, None)  # B = 3: the loop kernel, not the persistent one
    assert asked == [("lstm", ("sequential", "kernel", "cudnn"), False, False, 1)]
    assert choose("lstm") == ("loop", True, None) and len(asked) == 1  # kept in memory
    tuning._CHOSEN.clear()
    assert choose("lstm")[0] == "loop" and len(asked) == 1  # read back from the file
    stored = json.loads((tuning.cache_path()).read_text())
    assert [v["choice"] for v in stored.values()] == ["kernel"]
    assert list(stored.values())[0]["ms"] == {"sequential": 1000.0, "kernel": 500.0, "cudnn": 2000.0}
    assert tuning.DECISIONS[-3:] == ["auto measured sequential 1000.000 ms, kernel 500.000 ms, cudnn 2000.000 ms: "
                                     "took kernel", "auto took kernel (measured earlier in this process)",
                                     f"auto took kernel as measured before ({tuning.cache_path()})"]
    # the scan's options are part of the key; cuDNN cannot restart sequences; a choice with a
    # failed candidate is not written to the file (the failure may pass)
    timings.update(kernel=None, sequential=3.0)
    assert choose("lstm", masked=True, resets=True, unroll=8) == ("sequential", False, None)
    assert asked[-1] == ("lstm", ("sequential", "kernel"), True, True, 8)
    assert len(json.loads((tuning.cache_path()).read_text())) == 1
    timings.update(kernel=2.95, sequential=3.0, cudnn=5.0)  # within MARGIN of the plain scan: the plain scan
    assert choose("lstm", unroll=2) == ("sequential", False, None)
    timings.update(sequential=None, kernel=None, parallel=None, cudnn=None)  # nothing ran: the plain scan
    assert choose("mgu")[0] == "sequential" and asked[-1][1] == ("sequential", "kernel")
    assert choose("mingru")[0] == "parallel" and asked[-1][1] == ("parallel", "kernel")
    timings.update(kernel=0.1)
    assert choose("gru", masked=True)[0] == "loop"
    cell, params, xs = make("gru")
    jaxpr = str(jax.make_jaxpr(lambda p: recur.scan(cell, p, xs, mode="auto", lengths=jnp.array([7, 2, 0]))[0])(params))
    assert "pallas_call" in jaxpr and len(asked) == 6  # the kernel measured faster, the choice kept
    # inside shard_map the kernels do not lower: the plain scan, nothing measured
    mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(jax.shard_map(lambda x: recur.scan(cell, params, x, mode="auto", lengths=jnp.array([7, 2, 0]))[0],
                                    mesh=mesh, in_specs=jax.P("b"), out_specs=jax.P("b")))
    assert "pallas_call" not in str(jax.make_jaxpr(sharded)(xs)) and len(asked) == 6
    n = len(asked)
    monkeypatch.setenv("RECUR_AUTOTUNE", "0")  # off: the fixed table, measured on an H200
    assert choose("lstm:peepholes")[0] == "sequential" and choose("minlstm")[0] == "linear" and len(asked) == n
    monkeypatch.delenv("RECUR_AUTOTUNE")  # unset: measures on a GPU only, not in interpret mode on a CPU
    assert choose("lstm:peepholes")[0] == "sequential" and len(asked) == n
    assert tuning.enabled(gpu=True) and not tuning.enabled(gpu=False)
    with monkeypatch.context() as m:  # several processes: only when asked
        m.setattr(jax, "process_count", lambda: 2)
        assert not tuning.enabled(gpu=True)
        m.setenv("RECUR_AUTOTUNE", "1")
        assert tuning.enabled(gpu=True)
    monkeypatch.setenv("RECUR_AUTOTUNE", "1")
    timings.update(sequential=1.0, kernel=0.1, cudnn=2.0)
    for damaged in ("{not json", "[]", json.dumps({k: {"choice": ["kernel"]} for k in stored})):
        tuning.cache_path().write_text(damaged)  # measured again, and rewritten
        tuning._CHOSEN.clear()
        assert choose("lstm")[0] == "loop" and len(asked) == n + 1, damaged
        n += 1
        assert [v["choice"] for v in json.loads(tuning.cache_path().read_text()).values()] == ["kernel"]


def test_processes_storing_choices_at_once_keep_every_key(tmp_path):
    """Four processes add 40 keys each to one autotune cache file at once (each starts storing when
    a file appears, so that their stores overlap): under the file's lock none of their
    read-update-replace cycles loses another's key."""
    go = tmp_path / "go"
    code = ("import os, pathlib, sys, time; from recur.kernels import autotune\n"
            f"pathlib.Path({str(tmp_path)!r}, 'ready' + sys.argv[1]).touch()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
            "for i in range(40): autotune._store(f'{sys.argv[1]}-{i}', {'choice': 'kernel'})")
    root = str(pathlib.Path(recur.__file__).parents[1])  # this checkout's recur, whatever the cwd
    env = dict(os.environ, RECUR_CACHE_DIR=str(tmp_path), PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)], env=env, cwd=root) for n in range(4)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < 4 and time.monotonic() < deadline:  # every import done
        time.sleep(0.01)
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert sorted(stored) == sorted(f"{n}-{i}" for n in range(4) for i in range(40))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_cache_folder_without_file_locks_still_stores(fresh_autotune, monkeypatch):
    """Where flock fails (a file system without locks: ENOLCK), the choice is written unlocked."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh_autotune._store("k", {"choice": "kernel"})
    assert json.loads(fresh_autotune.cache_path().read_text()) == {"k": {"choice": "kernel"}}


def test_auto_on_a_gpu_compiles_each_kernel_once_in_its_measurement(fresh_autotune, monkeypatch):
    """On a GPU, mode="kernel" compiles the kernel (dispatch's probe) before choosing it; auto's
    measurement compiles it anyway, so neither the choice of candidates nor the measured scans
    probe, and a kernel that does not compile is dropped there (here: no GPU to compile for)."""
    autotune = fresh_autotune
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_gpu_problem", lambda *a: pytest.fail(f"probed {a}"))
    assert dispatch.choose(make("mingru")[0], "auto", B, T, 4, "none") == ("parallel", False, None)
    (timings,) = autotune.RESULTS.values()
    assert set(timings) == {"parallel", "kernel"} and timings["kernel"] is None and timings["parallel"] > 0


def test_autotune_times_each_candidate_inside_a_trace(tuning, monkeypatch, caplog):
    """measure compiles each candidate ahead of time and runs it while the caller's function is
    being traced (where the scan chooses); a candidate that fails, or whose gradients are not the
    plain scan's (a persistent kernel whose grid gave up waiting: NaN), is None."""
    from recur.kernels import persistent

    cell = recur.get_cell("elman", 16)

    def traced(B, resets):
        got = {}
        jax.jit(lambda x: got.update(tuning.measure(
            cell, ["sequential", "kernel", "nonsense"], B, 3, 4, remat="none", resets=resets, projected=False,
            backward="deferred", masked=True, unroll=1, rounds=3)) or x)(1.0)
        return got

    got = traced(8, True)  # the loop kernel (B = 8; resets)
    assert got["nonsense"] is None and all(0 < got[m] < 1 for m in ("sequential", "kernel")), got
    jit, compiled = jax.jit, []

    def failing_later(*a, **k):  # the second candidate's step raises on its third call (a timing round)
        lowered = jit(*a, **k).lower
        n_jit = len(compiled)

        class Step:
            def lower(self, *args):
                step = lowered(*args).compile()
                calls = []

                def call(*xs):
                    calls.append(1)
                    if n_jit == 1 and len(calls) == 3:
                        raise RuntimeError()  # no message: the log line names its type
                    return step(*xs)
                return types.SimpleNamespace(compile=lambda: call)
        compiled.append(1)
        return Step()

    with monkeypatch.context() as m:
        m.setattr(tuning.jax, "jit", failing_later)
        got = tuning.measure(cell, ["sequential", "kernel"], 8, 3, 4, remat="none", resets=False, projected=False,
                             backward="deferred", masked=False, unroll=1, rounds=3)
    assert got["kernel"] is None and 0 < got["sequential"] < 1, got
    barrier = persistent._grid_barrier
    monkeypatch.setattr(persistent, "MAX_SPINS", 3)
    monkeypatch.setattr(persistent, "_grid_barrier", lambda counter, n, *a, **k: barrier(counter, n + 1, *a, **k))
    assert dispatch.choose(cell, "kernel", 16, 3, 4, "none", masked=True)[0] == "persistent"
    with caplog.at_level("INFO", logger="recur"):
        got = traced(16, False)
    assert got["kernel"] is None and 0 < got["sequential"] < 1, got
    assert "kernel failed for elman: its gradients differ from sequential's by nan" in caplog.text


def test_auto_times_inference_apart_from_training(tuning, monkeypatch):
    """auto's forward pass that is not differentiated runs what auto measured fastest for the
    forward pass alone (sequential scan or persistent kernel), jax.grad what it measured for the
    training step; the values are the same either way."""
    timings, asked = {}, []

    def fake(cell, names, *a, train=True, **k):
        asked.append((tuple(names), train))
        return {m: timings[train].get(m, 1.0) for m in names}

    monkeypatch.setattr(tuning, "measure", fake)
    cell = recur.get_cell("elman", 16)
    params = cell.init(jax.random.key(0), 4)
    xs = jax.random.normal(jax.random.key(1), (16, 5, 4))
    lengths = jnp.arange(16) % 6

    def forward(mode):
        return lambda p: recur.scan(cell, p, xs, mode=mode, lengths=lengths)[0]

    def loss(mode):
        return lambda p: jnp.sum(jnp.sin(forward(mode)(p)))

    def ran_kernel(f):
        return "pallas_call" in str(jax.make_jaxpr(f)(params))

    for train_kernel, infer_kernel in ((False, True), (True, False)):
        tuning._CHOSEN.clear()
        tuning.cache_path().unlink(missing_ok=True)
        timings.update({True: {"kernel": 0.5 if train_kernel else 2.0}, False: {"kernel": 0.5 if infer_kernel else 2.0}})
        del asked[:]
        assert ran_kernel(jax.grad(loss("auto"))) == train_kernel
        assert asked == [(("sequential", "kernel"), True)]  # the training step's measurement only
        assert ran_kernel(forward("auto")) == infer_kernel
        assert asked[1:] == [(("sequential", "kernel"), False)]
        assert ran_kernel(forward("auto")) == infer_kernel and len(asked) == 2  # kept
        np.testing.assert_allclose(forward("auto")(params), forward("sequential")(params), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jax.grad(loss("auto"))(params)["W_h"], jax.grad(loss("sequential"))(params)["W_h"],
                                   rtol=1e-4, atol=1e-6)
    keys = list(json.loads(tuning.cache_path().read_text()))
    assert len(keys) == 2 and sum("task='infer'" in k for k in keys) == 1, keys
    # without measuring, nothing is asked, and the scan has no inference hook
    monkeypatch.setenv("RECUR_AUTOTUNE", "0")
    assert dispatch.inference_choice(cell, "sequential", 16, 5, 4, "none") is None and len(asked) == 2
    scan_module = importlib.import_module("recur.scan")
    assert scan_module._inference(cell, "auto", "sequential", 16, 5, "none", 1, False, "deferred", None, None,
                                  False, False) is None
    monkeypatch.setenv("RECUR_AUTOTUNE", "1")
    assert scan_module._inference(cell, "auto", "sequential", 16, 5, "none", 1, False, "deferred", None, None,
                                  False, False) is not None


def test_autotune_tolerates_what_rounding_does_to_the_plain_scan(tuning, monkeypatch):
    """A candidate may differ from the plain scan by AGREE, or by JITTER_FACTOR times what the
    plain scan's own gradients do when its weights move by one rounding unit (a chaotic recurrence:
    there no two correct implementations agree better), whichever is larger."""
    cell = recur.get_cell("elman", 16)
    params = cell.init(jax.random.key(0), 4)
    for dtype, u in ((jnp.bfloat16, 2.0 ** -8), (jnp.float32, 2.0 ** -11)):  # each weight by +-u of itself
        ratio = jax.tree.map(lambda a, b: np.abs(np.asarray(a / b)) - 1, tuning.nudge(params, dtype), params)
        assert all(np.allclose(np.abs(r[np.isfinite(r)]), u, rtol=1e-2) for r in jax.tree.leaves(ratio))
    run = functools.partial(tuning.measure, cell, ["sequential", "kernel"], 8, 3, 4, remat="none", resets=False,
                            projected=False, backward="deferred", masked=False, unroll=1, rounds=1)
    monkeypatch.setitem(tuning.AGREE, "float32", 1e-12)  # below the kernel's own rounding (~1e-7)
    errors = {}
    got = run(errors=errors)  # the plain scan moves by ~1e-3 under a 2^-11 nudge: the kernel passes
    assert 1e-5 < errors["sequential"] < 1e-1 and 0 < errors["kernel"] < tuning.JITTER_FACTOR * errors["sequential"]
    assert got["kernel"] is not None, (got, errors)
    errors = {}
    got = run(errors=errors, train=False)  # the forward pass alone: its outputs compared
    assert got["kernel"] is not None and errors["kernel"] < 1e-5 < errors["sequential"], (got, errors)
    def failing(params, dtype):
        raise RuntimeError("out of memory")

    for nudged in (failing, lambda params, dtype: jax.tree.map(lambda w: w * jnp.inf, params)):
        monkeypatch.setattr(tuning, "nudge", nudged)
        errors = {}  # the nudged run fails, or moves by inf: the plain scan stays, AGREE alone judges
        got = run(errors=errors)
        assert got["sequential"] is not None and got["kernel"] is None, (got, errors)
    monkeypatch.setattr(tuning, "nudge", lambda params, dtype: params)  # no move: AGREE alone
    errors = {}
    got = run(errors=errors)
    assert errors["sequential"] == 0 and errors["kernel"] > 1e-12 and got["kernel"] is None, (got, errors)
    assert got["sequential"] is not None


def test_the_fixed_table_sends_half_precision_to_the_persistent_kernels(monkeypatch):
    """Without measuring (RECUR_AUTOTUNE=0), auto on a GPU takes the H200's fixed table: the
    sequential scan in float32, the persistent kernels in half precision where they can run
    (else the sequential scan, silently), the chunked kernel for linear cells."""
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET", raising=False)
    monkeypatch.setenv("RECUR_AUTOTUNE", "0")
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    problems, probed = {}, []
    monkeypatch.setattr(dispatch, "_gpu_problem", lambda cell, impl, *a: probed.append(impl) or problems.get(impl))

    def auto(name, dtype, B=16, **kw):
        return dispatch.choose(recur.get_cell(name, 32, dtype=dtype), "auto", B, 8, 4, "none", **kw)

    for name in ("lstm", "gru", "elman", "mgu", "lstm:ln"):
        assert auto(name, jnp.float32) == ("sequential", False, None), name
        assert auto(name, jnp.bfloat16) == ("persistent", False, None), name
    assert auto("lstm", jnp.float16)[0] == "persistent"
    assert probed == ["persistent"] * 6
    assert auto("lstm", jnp.bfloat16, resets=True) == ("sequential", False, None)  # the kernels take no resets
    assert auto("lstm", jnp.bfloat16, B=8) == ("sequential", False, None)  # B not a multiple of 16
    assert len(probed) == 6  # nothing compiled for them (the loop kernel's probe would, on a GPU)
    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")  # interpreted kernels on a GPU: far too slow to pick
    assert auto("lstm", jnp.bfloat16) == ("sequential", False, None)
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET")
    problems["persistent"] = "Triton could not lower it"
    assert auto("lstm", jnp.bfloat16) == ("sequential", False, None)
    assert auto("mingru", jnp.bfloat16)[0] == "linear" and auto("mingru", jnp.float32)[0] == "linear"


def test_the_gpu_probe_lowers_the_form_that_runs(monkeypatch):
    """On a GPU, dispatch lowers the kernel before choosing it: with the scan's lengths and resets
    when it has them (the kernels then read a mask and reset flags), so that a form only they
    hit falls back too instead of failing."""
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    probed, probe = [], dispatch._gpu_problem.__wrapped__
    monkeypatch.setattr(dispatch, "_gpu_problem", lambda *a: probed.append(a[-2:]) or None)
    cell = make("mingru")[0]
    for masked, resets in ((False, False), (True, False), (True, True)):
        assert dispatch.choose(cell, "kernel", B, T, 4, "none", masked=masked, resets=resets)[0] == "linear"
        assert probed[-1] == (masked, resets)
    seen = []
    scan = recur.scan
    monkeypatch.setattr(recur, "scan", lambda *a, **k: seen.append((k["lengths"], k["resets"])) or scan(*a, **k))
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: False)  # lower only (there is no GPU to compile for)
    probe(cell, "linear", B, T, 4, "none", True, True)
    assert [(n.shape, r.shape) for n, r in seen] == [((B,), (B, T))]
    probe(cell, "linear", B, T, 4, "none", False, False)
    assert seen[-1] == (None, None)


def test_unroll_defaults_to_8_on_a_gpu_and_is_checked(monkeypatch):
    import importlib

    scan_mod = importlib.import_module("recur.scan")
    assert scan_mod.default_unroll() == 1  # these tests run on a CPU
    monkeypatch.setattr(scan_mod.jax, "default_backend", lambda: "gpu")
    assert scan_mod.default_unroll() == 8
    monkeypatch.undo()
    # what a GPU runs by default: 8 steps per iteration, T not a multiple of 8, with lengths,
    # resets and reverse reading; values and gradients as at unroll 1
    for name in ("gru", "lstm:peepholes"):  # an array carry and a dict carry
        cell = recur.get_cell(name, 6)
        params = cell.init(jax.random.key(0), 5)
        xs = jax.random.normal(jax.random.key(1), (3, 13, 5))
        kw = dict(lengths=jnp.array([13, 9, 0]), resets=jnp.zeros((3, 13), bool).at[0, 4].set(True), reverse=True)
        loss = lambda p, x, u: jnp.sum(jnp.sin(recur.scan(cell, p, x, unroll=u, **kw)[0]))
        want = jax.value_and_grad(loss, argnums=(0, 1))(params, xs, 1)
        got = jax.value_and_grad(loss, argnums=(0, 1))(params, xs, 8)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    cell, params, xs = make("gru")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="unroll must be None or a positive int"):
            recur.scan(cell, params, xs, unroll=bad)


def _scan_loss_and_grad(cell, mode, **kwargs):
    def loss(p, x, c0):
        hs, carry = recur.scan(cell, p, x, initial_carry=c0, mode=mode, **kwargs)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(carry["h"] ** 2) + jnp.sum(carry["c"] ** 3), (hs, carry)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("reverse", [False, True])
def test_cudnn_lstm_equals_sequential(reverse, interpret):
    """mode="cudnn": recur's LSTM parameters packed into cuDNN's weight vector (run here through
    jax.experimental.rnn.lstm_ref, which unpacks it as cuDNN reads it), with lengths (one of
    them 0: that row keeps its initial carry), an initial carry and reverse reading; outputs,
    final carry and the gradients of params, inputs and initial carry."""
    cell = recur.get_cell("lstm", 16)
    params = cell.init(jax.random.key(0), 12)
    params["b"] = jax.random.normal(jax.random.key(5), params["b"].shape)  # a bias the test can see
    xs = jax.random.normal(jax.random.key(1), (4, 9, 12))
    c0 = random_carry(cell, 4, seed=2)
    kw = dict(lengths=jnp.array([9, 5, 0, 1]), reverse=reverse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallback)
        (_, got_out), got = _scan_loss_and_grad(cell, "cudnn", **kw)(params, xs, c0)
    (_, want_out), want = _scan_loss_and_grad(cell, "sequential", **kw)(params, xs, c0)
    _assert_close(want_out, got_out, 2e-6, "outputs")
    _assert_close(want, got, 2e-5, "gradients")
    np.testing.assert_array_equal(got_out[1]["h"][2], c0["h"][2])  # length 0: the initial carry


def test_cudnn_packs_weights_in_cudnns_layout():
    from jax.experimental import rnn

    from recur.kernels.cudnn import pack

    cell = recur.get_cell("lstm", 4)
    params = cell.init(jax.random.key(0), 3)
    w = pack(params)
    assert w.shape == (rnn.get_num_params_in_lstm(3, 4, 1, False),)
    W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, 3, 4, 1, False)
    np.testing.assert_array_equal(W_ih[0], params["W_x"])
    np.testing.assert_array_equal(W_hh[0], params["W_h"])
    np.testing.assert_array_equal(b_ih[0], params["b"])
    np.testing.assert_array_equal(b_hh[0], 0.0)


def test_cudnn_falls_back_for_what_it_cannot_run(interpret, monkeypatch):
    cell, params, xs = make("lstm")
    resets = jnp.zeros(xs.shape[:2], bool).at[0, 2].set(True)
    for name, kw, why in (("lstm:peepholes", {}, "plain LSTM only"), ("gru", {}, "plain LSTM only"),
                          ("lstm", dict(resets=resets), "cannot restart"),
                          ("lstm", dict(remat="step"), "remat='step'")):
        c, p, x = make(name)
        with pytest.warns(dispatch.KernelFallback, match=why):
            hs, _ = recur.scan(c, p, x, mode="cudnn", **kw)
        assert np.allclose(hs, recur.scan(c, p, x, **kw)[0], atol=1e-6), name
    with pytest.warns(dispatch.KernelFallback, match="raw inputs"):
        recur.scan(cell, params, cell.project(params, xs), mode="cudnn", projected=True)
    bf16 = recur.get_cell("lstm", cell.hidden_size, dtype=jnp.bfloat16)
    assert "float32" in dispatch.choose(bf16, "cudnn", B, T, 4, "none")[2]
    monkeypatch.delenv("RECUR_PALLAS_INTERPRET")
    with pytest.warns(dispatch.KernelFallback, match="mode='cudnn' needs a GPU"):
        recur.scan(cell, params, xs, mode="cudnn")


def test_unsupported_combinations_fall_back(interpret):
    cell, params, xs = make("lstm")
    with pytest.warns(dispatch.KernelFallback, match="remat='step'"):
        hs, _ = recur.scan(cell, params, xs, mode="kernel", remat="step")
    assert np.allclose(hs, recur.scan(cell, params, xs)[0], atol=1e-6)


def test_block_rows():
    assert dispatch.block_rows(64, gpu=True) == 16
    assert dispatch.block_rows(12, gpu=True) == 12
    assert dispatch.block_rows(12, gpu=False) == 4
    assert dispatch.block_rows(3, gpu=False) == 1


# --- lowering for a GPU, without one --------------------------------------------------------
# The cells whose kernels the Triton back end lowers (power-of-2 sizes); docs/kernels.md lists
# them. The others fall back on a GPU (dispatch probes the lowering before choosing).
GPU_CELLS = ["elman", "elman:relu", "lstm", "lstm:peepholes", "lstm:ln", "lstm:niaf", "lstm:noaf",
             "mgu", "indrnn", "clockwork", "mingru", "minlstm", "lru",
             # 3 gate blocks, padded to 4 (recur/kernels/pad.py)
             "gru", "gru:cho", "lstm:cifg", "lstm:nig", "lstm:nfg", "lstm:nog", "lstm:cifg,peepholes"]


@pytest.fixture
def fake_h100(monkeypatch):
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))


def _lower_for_cuda(cell, B_, T_, I_, dtype=jnp.float32):
    """The StableHLO text of a training step through the loop kernel (linear cells: linear.py on
    XLA's (a, b)) lowered for CUDA (with fake_h100)."""
    from experiments.triton_compile import loop_step

    step, (params, xs) = loop_step(cell, B_, T_, I_, dtype)
    if cell.linear:
        scan_mod = importlib.import_module("recur.scan")

        def run(p, x):
            rec = lambda a, b: linear_recurrence(a, b, False)
            return scan_mod._linear_scan(cell, p, cell.project(p, x), cell.initial_carry(B_), None, None,
                                         None, rec)[0]

        step = jax.jit(jax.grad(lambda p, x: jnp.sum(run(p, x).astype(jnp.float32)), argnums=(0, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Pallas' Triton back end is deprecated
        return step.trace(params, xs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", GPU_CELLS)
def test_kernels_lower_for_an_h100(name, fake_h100):
    cell = recur.get_cell(name, 32)
    text = _lower_for_cuda(cell, 32, 16, 16)
    # forward and backward: at least two Triton kernels in the module
    assert text.count("__gpu$xla.gpu.triton") >= 2, name


@pytest.mark.parametrize("name,dtype", [("mingru", jnp.float32), ("mingru", jnp.bfloat16), ("minlstm", jnp.float32),
                                        ("minlstm", jnp.bfloat16), ("lru", jnp.float32)])
def test_gated_kernels_lower_for_an_h100(name, dtype, monkeypatch):
    """recur/kernels/gated.py's four kernels (forward and backward, each a summary pass and a
    final pass at T = 4,096) with a mask, loading one step or 8 at a time, lower through Triton
    (experiments/triton_compile.py's linear_ir patches the GPU query to an H100)."""
    from experiments.triton_compile import linear_ir
    from recur.kernels import gated, linear

    calls = _calls(monkeypatch, gated, "gated_recurrence")
    for steps in (1, 8):
        monkeypatch.setattr(linear, "STEP_BLOCK", steps)
        assert len(linear_ir(recur.get_cell(name, 256, dtype=dtype), resets=steps == 8)) == 4, (name, steps)
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["lstm", "gru", "lstm:cifg"])
def test_half_precision_lowers_for_an_h100(name, fake_h100):
    cell = recur.get_cell(name, 64, dtype=jnp.bfloat16)
    assert _lower_for_cuda(cell, 32, 16, 64, jnp.bfloat16).count("__gpu$xla.gpu.triton") >= 2


def test_padded_gate_layout_runs_the_same_step():
    """The GRU's step in the padded layout (3 blocks + a zero block) equals its unpadded step,
    and its input cotangent is zero on the padded block."""
    for name in ["gru", "gru:cho", "lstm:cifg,peepholes"]:
        cell = recur.get_cell(name, 8)
        params = cell.init(jax.random.key(0), 5)
        us = cell.project(params, jax.random.normal(jax.random.key(1), (3, 1, 5)))[:, 0]
        carry = random_carry(cell, 3, seed=2)
        cell_p, params_p, us_p = padded(cell, params, us)
        assert us_p.shape[-1] == us.shape[-1] // 3 * 4 and cell_p is not cell, name
        want = cell.step(params, carry, us)
        got = cell_p.step(params_p, carry, us_p)
        _assert_close(want, got, 1e-6, name)
        du = jax.grad(lambda u: jnp.sum(cell_p.step(params_p, carry, u)[1] ** 2))(us_p)
        np.testing.assert_array_equal(np.asarray(du[:, us.shape[-1]:]), 0.0)
    lstm = recur.get_cell("lstm", 8)  # 4 blocks: nothing to pad
    assert padded(lstm, {}, jnp.zeros((2, 32)))[0] is lstm


def test_padding_checks_the_gate_blocks():
    cell = recur.get_cell("gru", 8)
    params = cell.init(jax.random.key(0), 5)
    with pytest.raises(ValueError, match="projected inputs of gru has 10 entries on axis 1, not 3 gate"):
        padded(cell, params, jnp.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"no \['b_h'\]"):
        padded(cell, {"W_h": params["W_h"]}, jnp.zeros((2, 24)))


def test_a_step_too_wide_for_one_program_is_refused(fake_h100):
    """An LSTM at H = 512 has [16, 2048] gate arrays per program: compiled for an H100 it spills
    ~100 KiB of registers per thread, so the loop kernel refuses it with the reason (dispatch's
    probe turns that into a fallback notice). So does a
    matrix of more than 16 tiles per step (Triton's compile time)."""
    with pytest.raises(ValueError, match=r"a step's arrays hold 32,768 values per program \(16 rows\), more than "
                                         r"the 16,384"):
        _lower_for_cuda(recur.get_cell("lstm", 512), 16, 4, 512)
    assert _lower_for_cuda(recur.get_cell("elman", 512), 16, 4, 512).count("__gpu$xla.gpu.triton") >= 2
    # a large matrix the step never multiplies by (W_x [1024, 4096], used before the loop) is no reason
    assert _lower_for_cuda(recur.get_cell("lstm", 256), 16, 4, 4096).count("__gpu$xla.gpu.triton") >= 2
    # Elman at H = 1024: [16, 1024] steps, but W_h (4 MiB) would take 64 tiles per step
    with pytest.raises(ValueError, match=r"\['W_h'\] \(1024, 1024\) takes 64 tiles per step, more than 16"):
        _lower_for_cuda(recur.get_cell("elman", 1024), 16, 4, 1024)


# --- large recurrent matrices: read tile by tile (recur.kernels.loop.WeightTiles) ------------
TILED = ["lstm", "lstm:peepholes,cifg", "lstm:proj_size=3", "gru", "gru:cho", "mgu", "elman", "clockwork"]


@pytest.mark.parametrize("name", TILED)
def test_kernel_with_tiled_weights_equals_sequential(name, interpret, monkeypatch):
    """With every matrix read tile by tile (TILE_BYTES shrunk so the small test cells are tiled:
    several tiles per matrix), outputs, final carry and every gradient still equal the plain
    scan's; the tiled product and its hand-written derivative really ran (the clockwork RNN
    masks its W_h, so it loads the tiled weight whole)."""
    from recur.kernels import loop

    monkeypatch.setattr(loop, "TILE_BYTES", 8)
    calls = []
    product = loop.WeightTiles.tile_product
    monkeypatch.setattr(loop.WeightTiles, "tile_product",
                        lambda self, x, dtype, acc: calls.append(self._tile()) or product(self, x, dtype, acc))
    whole = loop.WeightTiles.whole
    monkeypatch.setattr(loop.WeightTiles, "whole", lambda self: calls.append("whole") or whole(self))
    with jax.enable_x64(True):
        cell, params, xs = make(name, dtype=jnp.float64)
        carry0 = random_carry(cell, B, seed=3)
        w = jax.random.normal(jax.random.key(9), (B, T, cell.output_size), jnp.float64)
        kwargs = dict(lengths=jnp.array([T, 4, 0]))
        args = (params, xs, carry0, None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dispatch.KernelFallback)
            (_, got_out), got = _loss_and_grad(cell, "kernel", kwargs, w)(*args)
        (_, want_out), want = _loss_and_grad(cell, "sequential", kwargs, w)(*args)
    assert ("whole" in calls) == (name == "clockwork") and len(calls) >= 2, (name, calls)
    _assert_close(want_out, got_out, 1e-12, (name, "outputs"))
    _assert_close(want, got, 1e-10, (name, "gradients"))


def test_weight_tiles_pick_rows_that_divide():
    from recur.kernels.loop import TILE_BYTES, WeightTiles

    class Ref:  # stands in for a kernel's ref: the tiles only read shape and dtype here
        def __init__(self, shape):
            self.shape, self.dtype = shape, jnp.float32

    assert WeightTiles(Ref((1024, 256)))._tile() == TILE_BYTES // (256 * 4)  # 64 rows of 1 KiB
    assert WeightTiles(Ref((4096, 1024)))._tile() == 16  # at least Triton's smallest dot
    assert WeightTiles(Ref((20, 5)))._tile() == 4  # a power of 2 that divides the rows
    assert WeightTiles(Ref((1024, 256))).rows(256, 512).shape == (512, 256)


@pytest.mark.parametrize("name", ["lstm", "gru", "gru:cho", "mgu", "elman", "clockwork"])
def test_tiled_kernels_lower_for_an_h100_at_h256(name, fake_h100):
    """At H = 256 the recurrent matrix (the LSTM's [1024, 256] float32, 1 MiB) is read in tiles of
    64 rows; the GRU (Cho) and the MGU also multiply by a tiled block inside their step, whose
    derivative needs the product's value in the backward kernel."""
    text = _lower_for_cuda(recur.get_cell(name, 256), 16, 4, 256)
    assert text.count("__gpu$xla.gpu.triton") >= 2, name


# --- compiled for an H100 by Triton itself (no GPU needed): shared memory -------------------
H100_SHARED = 232448  # bytes of shared memory a block may use on an H100 (227 KiB)


def _compile_for_h100(cell, I_):
    """[(shared bytes, num_warps)] of the forward and backward Triton kernels of recur.scan's
    training step for this cell, compiled by the triton package for sm_90 from the Triton IR
    that jax lowers (experiments/triton_compile.py)."""
    pytest.importorskip("triton", reason="the triton package compiles the kernels for a GPU target")
    from experiments.triton_compile import compile_sm90, kernels_ir

    irs = kernels_ir(cell, I_)
    assert len(irs) == 2  # the forward and the backward loop
    return [(compile_sm90(text, n)[0], n) for text, n in irs]


@pytest.mark.parametrize("name", ["lstm", "gru", "gru:cho", "mgu"])
def test_kernels_at_h256_fit_an_h100s_shared_memory(name):
    """The issue's H = 256: with the recurrent matrix read tile by tile, both kernels of the
    training step compile for sm_90 and use at most 128 KiB of shared memory (measured: 64 KiB
    forward, 128 KiB backward for the LSTM with 8 warps; the MGU's backward, which multiplies by
    its tiles twice, 80 KiB, and 320 KiB before its second pass's loads were kept apart)."""
    for shared, warps in _compile_for_h100(recur.get_cell(name, 256), 256):
        assert shared <= 128 * 1024 < H100_SHARED and warps == 8, (name, shared, warps)


def test_a_whole_recurrent_matrix_outgrows_shared_memory(monkeypatch):
    """The control: held whole (no tiles), an LSTM's W_h at H = 128 already needs more shared
    memory than an H100 has, which is what the tiles are for."""
    from recur.kernels import loop

    monkeypatch.setattr(loop, "TILE_BYTES", 1 << 30)
    shared = [s for s, _ in _compile_for_h100(recur.get_cell("lstm", 128), 128)]
    assert max(shared) > H100_SHARED, shared


@pytest.mark.parametrize("name", ["mingru", "minlstm", "lru"])
def test_gated_kernels_compile_for_sm90_without_spills(name, monkeypatch):
    """recur/kernels/gated.py's four kernels (with a mask, in bfloat16, one step or 8 per load
    and resets: the widest form; the LRU in complex64, one step per load), compiled for sm_90 by
    the triton package: no register spills."""
    pytest.importorskip("triton", reason="the triton package compiles the kernels for a GPU target")
    from experiments.triton_compile import compile_sm90, linear_ir
    from recur.kernels import linear

    for steps in (1, 8):  # with resets at 8
        monkeypatch.setattr(linear, "STEP_BLOCK", steps)
        irs = linear_ir(recur.get_cell(name, 256, dtype=jnp.float32 if name == "lru" else jnp.bfloat16),
                        resets=steps == 8)
        assert len(irs) == 4, (name, steps)
        for text, warps in irs:
            _, registers, spill_stores, spill_loads = compile_sm90(text, warps)
            assert spill_stores == spill_loads == 0 and 0 < registers <= 255, (name, steps, registers)
