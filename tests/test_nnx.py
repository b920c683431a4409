"""recur.nnx.RNN: the module computes what the pure functions compute with its parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import recur
from recur.nnx import RNN, values

B, T, I = 3, 6, 4


def test_module_equals_pure_stack_and_counts_params():
    rnn = RNN("gru", I, hidden_size=5, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    lengths = jnp.array([6, 2, 4])
    hs, carries = rnn(xs, lengths=lengths)
    ref, ref_carries = recur.stack(rnn.cells, values(rnn.params), xs, lengths=lengths, bidirectional=True)
    np.testing.assert_allclose(hs, ref)
    assert hs.shape == (B, T, rnn.output_size) == (B, T, 10)
    # GRU layer: 3H(I + H) + 6H per direction; layer 2 reads 2H features
    n = sum(x.size for x in jax.tree.leaves(nnx.state(rnn, nnx.Param)))
    assert n == 2 * (15 * (4 + 5) + 30) + 2 * (15 * (10 + 5) + 30)


def test_learned_initial_carry_is_used_and_trained():
    rnn = RNN("lstm", I, hidden_size=5, learn_initial_carry=True, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    h0 = rnn.initial[0]["h"]
    h0[...] = jnp.full((1, 5), 0.7)
    hs, _ = rnn(xs)
    carry0 = {"h": jnp.full((B, 5), 0.7), "c": jnp.zeros((B, 5))}
    ref, _ = recur.scan(rnn.cells[0], values(rnn.params)[0], xs, initial_carry=carry0)
    np.testing.assert_allclose(hs, ref, rtol=1e-6)
    # a reset restarts from the learned carry too
    resets = jnp.zeros((B, T), bool).at[:, 3].set(True)
    hs_r, _ = rnn(xs, resets=resets)
    ref_r, _ = recur.scan(rnn.cells[0], values(rnn.params)[0], xs[:, 3:], initial_carry=carry0)
    np.testing.assert_allclose(hs_r[:, 3:], ref_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lstm:peepholes", "clockwork", "lru"])
def test_one_adam_step_changes_every_parameter(name):
    rnn = RNN(name, I, hidden_size=8, num_layers=2, learn_initial_carry=True, dropout=0.2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(rnn, optax.adam(1e-2), wrt=nnx.Param)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    before = jax.tree.map(np.array, nnx.state(rnn, nnx.Param))

    @nnx.jit
    def train_step(rnn, optimizer, xs, key):
        def loss_fn(rnn):
            hs, _ = rnn(xs, lengths=jnp.array([6, 3, 5]), dropout_key=key)
            return jnp.mean(hs**2)

        loss, grads = nnx.value_and_grad(loss_fn)(rnn)
        optimizer.update(rnn, grads)
        return loss

    train_step(rnn, optimizer, xs, jax.random.key(2))
    after = nnx.state(rnn, nnx.Param)
    unchanged = [jax.tree_util.keystr(path) for path, b, a in zip(
        [p for p, _ in jax.tree_util.tree_leaves_with_path(before)],
        jax.tree.leaves(before), jax.tree.leaves(after)) if np.array_equal(b, a)]
    assert not unchanged, f"parameters that did not change: {unchanged}"


def test_name_without_hidden_size_is_an_error():
    with pytest.raises(ValueError, match="hidden_size is required"):
        RNN("gru", I, rngs=nnx.Rngs(0))
