"""The C++ kernels on the CPU (recur/kernels/cpu.py) against the XLA scans: the plain LSTM's and
reset-after GRU's time loops, and the chunked linear scan (generic (a, b) and minGRU / minLSTM
with their gates inside) that recur.scan's parallel mode runs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recur
from recur.kernels import cpu

WHY = cpu.unavailable() if os.environ.get("RECUR_CPU_KERNELS", "1") != "0" else None
if WHY and os.environ.get("CI"):
    raise RuntimeError(f"CI has a C++ compiler, so the CPU LSTM kernels must build: {WHY}")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"CPU kernels unavailable: {WHY}")


def _uses_kernel(f, *args):
    jaxpr = str(jax.make_jaxpr(f)(*args))
    return any(f"recur_{k}" in jaxpr for k in ("lstm_forward", "lstm_infer", "gru_forward", "gru_infer"))


def _problem(B, T, I, H, seed=0, name="lstm"):
    cell = recur.get_cell(name, H)
    params = cell.init(jax.random.key(seed), I)
    # perturb every leaf, so that the zero-initialised biases matter too
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    xs = jax.random.normal(jax.random.key(seed + 2), (B, T, I))
    carry, carry_tree = jax.tree.flatten(cell.initial_carry(B))
    keys = jax.random.split(jax.random.key(seed + 3), len(carry))  # h0 and c0 differ
    c0 = jax.tree.unflatten(carry_tree, [jax.random.normal(k, c.shape) for c, k in zip(carry, keys)])
    return cell, params, xs, c0


def _loss(cell, **kw):
    def f(params, xs, c0):
        hs, c = recur.scan(cell, params, xs, initial_carry=c0, **kw)
        w = jnp.cos(jnp.arange(hs.size, dtype=hs.dtype)).reshape(hs.shape)
        return jnp.sum(hs * w) + sum(jnp.sum(jnp.sin(l) * (1 + k)) for k, l in enumerate(jax.tree.leaves(c)))
    return f


# B < 8 (one block of rows), B = 17 (blocks of 9 and 8, rows beyond a multiple of 8), H = 33
# (a partial 32-column panel), H = 64 (whole panels), T = 1
@pytest.mark.parametrize("B,T,I,H", [(3, 7, 4, 5), (17, 6, 8, 33), (32, 5, 16, 64), (2, 1, 3, 8)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_kernel_values_and_gradients_equal_autodiff(B, T, I, H, reverse, padded, name):
    cell, params, xs, c0 = _problem(B, T, I, H, name=name)
    # padded: every length from 0 to T, so rows end before, at and after one another
    lengths = jnp.arange(B) % (T + 1) if padded else None
    kernel = _loss(cell, reverse=reverse, lengths=lengths)
    plain = _loss(cell, reverse=reverse, lengths=lengths, backward="autodiff")
    assert _uses_kernel(kernel, params, xs, c0) and not _uses_kernel(plain, params, xs, c0)
    got = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1, 2)))(params, xs, c0)
    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(params, xs, c0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), got, want)
    # not differentiated (the outputs and the final carry): the same value, from the inference
    # kernel, which writes no residuals
    np.testing.assert_allclose(jax.jit(kernel)(params, xs, c0), want[0], rtol=2e-5, atol=2e-5)
    assert f"recur_{name}_infer" in str(jax.make_jaxpr(kernel)(params, xs, c0))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_kernel_under_vmap_equals_each_model_alone(name):
    cell, params, xs, c0 = _problem(4, 6, 5, 9, name=name)
    stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), params)
    grads = jax.vmap(jax.grad(_loss(cell)), in_axes=(0, None, None))(stacked, xs, c0)
    for k in range(2):
        alone = jax.grad(_loss(cell, backward="autodiff"))(jax.tree.map(lambda p: p[k], stacked), xs, c0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=2e-5, atol=2e-5), grads, alone)


def test_kernel_is_used_only_where_it_applies(monkeypatch):
    cell, params, xs, c0 = _problem(3, 4, 2, 5)
    assert _uses_kernel(_loss(cell), params, xs, c0)
    # resets, other variants and remat keep the XLA loops
    resets = jnp.zeros((3, 4), bool).at[1, 2].set(True)
    assert not _uses_kernel(_loss(cell, resets=resets), params, xs, c0)
    assert not _uses_kernel(_loss(cell, remat="step"), params, xs, c0)
    peep = recur.get_cell("lstm:peepholes", 5)
    assert not _uses_kernel(_loss(peep), peep.init(jax.random.key(0), 2), xs, c0)
    cho = recur.get_cell("gru:cho", 5)  # reset before the matmul: no fused step
    assert not _uses_kernel(_loss(cho), cho.init(jax.random.key(0), 2), xs, c0["h"])
    f64 = recur.get_cell("lstm", 5, dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        p64 = f64.init(jax.random.key(0), 2)
        c64 = jax.tree.map(lambda c: c.astype(jnp.float64), c0)
        assert not _uses_kernel(_loss(f64), p64, xs.astype(jnp.float64), c64)
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    assert cpu.unavailable() == "RECUR_CPU_KERNELS=0"
    assert not _uses_kernel(_loss(cell), params, xs, c0)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_language_model_training_step_matches_the_xla_loops(monkeypatch, name):
    from flax import nnx

    from recur.models.lm import LanguageModel

    model = LanguageModel(50, embed_dim=16, hidden_size=24, num_layers=2, cell=name, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (9, 12), 0, 50)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[:, :-1].reshape(-1, 50)[jnp.arange(9 * 11),
                                                                        tokens[:, 1:].reshape(-1)])

    got = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    want = jax.jit(jax.value_and_grad(loss))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_a_gradient_of_a_gradient_is_a_clear_error_and_works_without_the_kernels(monkeypatch):
    cell, params, xs, c0 = _problem(3, 4, 2, 5)

    def grad_norm(p):
        g = jax.grad(_loss(cell), argnums=1)(p, xs, c0)
        return jnp.sum(g ** 2)

    with pytest.raises(NotImplementedError, match="RECUR_CPU_KERNELS=0"):
        jax.grad(grad_norm)(params)
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    assert np.isfinite(float(jax.tree.leaves(jax.grad(grad_norm)(params))[0].sum()))


# --- the linear recurrence: recur.scan(mode="parallel") on the CPU ---------------------------
GATED = ["mingru", "mingru:identity", "minlstm", "minlstm:identity"]


def _uses(names, f, *args):
    jaxpr = str(jax.make_jaxpr(f)(*args))
    return {name: name in jaxpr for name in names}


def _scan_states(a, b):
    """s_t = a_t s_{t-1} + b_t, s_{-1} = 0, by lax.scan along axis 1."""
    swap = lambda x: jnp.swapaxes(x, 0, 1)

    def body(s, ab):
        s = ab[0] * s + ab[1]
        return s, s

    return swap(jax.lax.scan(body, jnp.zeros_like(b[:, 0]), (swap(a), swap(b)))[1])


# chunks: 0 lets the kernel choose; 1 is one pass; 3 and 7 run the three-pass scan across time
# (2 would reproduce the sequential order exactly, so it could not catch a wrong combination);
# T = 1, T not a multiple of the chunks, more chunks than steps
@pytest.mark.parametrize("B,T,S", [(2, 1, 3), (3, 37, 5), (1, 200, 17), (4, 5, 33)])
@pytest.mark.parametrize("chunks", [0, 1, 3, 7])
def test_linear_recurrence_equals_the_sequential_scan(B, T, S, chunks):
    ka, kb, kw = jax.random.split(jax.random.key(B * T + chunks), 3)
    # gates near 1: each chunk's state reaches far into the next, so the combination matters
    a = jax.random.uniform(ka, (B, T, S), minval=0.9, maxval=1.0)
    b = jax.random.normal(kb, (B, T, S))
    w = jax.random.normal(kw, (B, T, S))
    np.testing.assert_allclose(cpu.linear_recurrence(a, b, chunks), _scan_states(a, b), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)) * w)
    got = jax.grad(loss(lambda a, b: cpu.linear_recurrence(a, b, chunks)), argnums=(0, 1))(a, b)
    want = jax.grad(loss(_scan_states), argnums=(0, 1))(a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4), got, want)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("B,T,I,H", [(3, 7, 4, 5), (1, 150, 3, 33), (4, 1, 2, 8)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_parallel_gated_kernel_equals_the_sequential_scan(name, B, T, I, H, reverse, padded):
    """The values and the gradients (params, inputs, initial state) of mode="parallel", which runs
    the minGRU / minLSTM kernel, equal jax.grad of the sequential scan."""
    cell, params, xs, c0 = _problem(B, T, I, H, name=name)
    lengths = jnp.arange(B) % (T + 1) if padded else None
    kernel = _loss(cell, reverse=reverse, lengths=lengths, mode="parallel")
    plain = _loss(cell, reverse=reverse, lengths=lengths, backward="autodiff")
    assert _uses(["recur_gated_forward"], kernel, params, xs, c0) == {"recur_gated_forward": True}
    got = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1, 2)))(params, xs, c0)
    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(params, xs, c0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5), got, want)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_gated_kernel_across_time_chunks(name, chunks):
    """cpu.gated with the time axis cut into chunks (pass 1-3 of cpu/rnn.cc), an initial state and
    padding, against the sequential scan of the projected inputs. The pre-activations are shifted
    so that a_t is about 0.95 (a chunk's entering state still counts 30 steps on) and the
    candidate's pre-activations take both signs (both branches of g)."""
    B, T, H = 3, 90, 6
    cell, params, xs, c0 = _problem(B, T, 4, H, name=name)
    shift = [-3.0, 0.5] if name.startswith("mingru") else [3.0, -3.0, 0.5]
    us = cell.project(params, xs) + jnp.repeat(jnp.array(shift), H)[None, None]
    lengths = jnp.array([90, 41, 0])
    mask = jnp.arange(T)[None, :] < lengths[:, None]
    w = jnp.cos(jnp.arange(B * T * H, dtype=jnp.float32)).reshape(B, T, H)
    kind = cpu.gated_kind(cell, c0, us)

    def kernel(us, c0):
        s = cpu.gated(us, c0, mask.astype(jnp.float32), kind, chunks)
        return jnp.sum(jnp.where(mask[:, :, None], s, 0.0) * w) + jnp.sum(jnp.sin(s[:, -1]))

    def plain(us, c0):
        hs, c = recur.scan(cell, params, us, initial_carry=c0, lengths=lengths, projected=True,
                           backward="autodiff")
        return jnp.sum(hs * w) + jnp.sum(jnp.sin(c))

    got = jax.value_and_grad(kernel, argnums=(0, 1))(us, c0)
    want = jax.value_and_grad(plain, argnums=(0, 1))(us, c0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5), got, want)
    assert float(jnp.max(jnp.abs(got[1][0][2]))) == 0.0  # the padded row has no input gradient


def test_parallel_mode_uses_the_kernels_only_where_they_apply(monkeypatch):
    names = ["recur_gated_forward", "recur_linear_forward"]
    cell, params, xs, c0 = _problem(3, 6, 2, 5, name="mingru")
    assert _uses(names, _loss(cell, mode="parallel"), params, xs, c0) == {names[0]: True, names[1]: False}
    assert _uses(names, _loss(cell, mode="auto"), params, xs, c0)[names[0]]
    assert not any(_uses(names, _loss(cell), params, xs, c0).values())  # the sequential scan
    # resets: the gates are computed by XLA, the recurrence by the generic kernel
    resets = jnp.zeros((3, 6), bool).at[1, 2].set(True)
    loss = _loss(cell, mode="parallel", resets=resets)
    assert _uses(names, loss, params, xs, c0) == {names[0]: False, names[1]: True}
    got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, c0)
    want = jax.grad(_loss(cell, resets=resets, backward="autodiff"), argnums=(0, 1, 2))(params, xs, c0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5), got, want)
    # a bfloat16 cell (float32 state): its float32 (a, b) go through the generic kernel
    bf = recur.get_cell("mingru", 5, dtype=jnp.bfloat16)
    got = _uses(names, _loss(bf, mode="parallel"), bf.init(jax.random.key(0), 2), xs, c0)
    assert got == {names[0]: False, names[1]: True}
    # the complex LRU keeps lax.associative_scan
    lru = recur.get_cell("lru", 5)
    p_lru = lru.init(jax.random.key(0), 2)
    assert not any(_uses(names, _loss(lru, mode="parallel"), p_lru, xs, lru.initial_carry(3)).values())
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    assert not any(_uses(names, _loss(cell, mode="parallel"), params, xs, c0).values())


def test_gated_kernel_rejects_an_unknown_kind():
    with pytest.raises(Exception, match="kind must be 1..4"):
        jax.block_until_ready(cpu.gated(jnp.zeros((1, 2, 6)), jnp.zeros((1, 3)), jnp.ones((1, 2)), 9))


def test_linear_kernels_take_zero_steps():
    assert cpu.linear_recurrence(jnp.zeros((2, 0, 3)), jnp.zeros((2, 0, 3))).shape == (2, 0, 3)
    s0 = jnp.ones((2, 3))
    f = lambda s0: jnp.sum(cpu.gated(jnp.zeros((2, 0, 6)), s0, jnp.zeros((2, 0)), 1))
    assert float(f(s0)) == 0.0
    np.testing.assert_array_equal(jax.grad(f)(s0), np.zeros((2, 3)))


def test_switched_sets_the_kernels_for_the_block_and_restores_the_variable(monkeypatch):
    monkeypatch.delenv("RECUR_CPU_KERNELS", raising=False)
    with cpu.switched(False):
        assert cpu.unavailable() == "RECUR_CPU_KERNELS=0"
    assert "RECUR_CPU_KERNELS" not in os.environ and cpu.unavailable() is None
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    with cpu.switched(True):
        assert cpu.unavailable() is None
    assert os.environ["RECUR_CPU_KERNELS"] == "0"
