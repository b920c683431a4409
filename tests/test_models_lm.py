"""recur.models.lm.LanguageModel: the folded embedding projection equals the plain one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recur.models.lm import LanguageModel
from cell_cases import CASES, hidden_size

V, B, T = 11, 3, 6  # V < B * T: the fold applies


def _model(name, fold, num_layers=2):
    return LanguageModel(V, embed_dim=4, hidden_size=hidden_size(name), cell=name, num_layers=num_layers,
                         dropout=0.3, fold_embedding=fold, rngs=nnx.Rngs(0))


def _loss_and_grads(model, tokens, carries, key):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits, new = nnx.merge(graphdef, p)(tokens, carries, dropout_key=key)
        out = jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return out + sum(jnp.sum(jnp.real(l)) for l in jax.tree.leaves(new)
                         if jnp.issubdtype(l.dtype, jnp.inexact))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("name", CASES)
def test_folded_embedding_projection_equals_projecting_each_token(name):
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    folded, plain = _model(name, True), _model(name, False)
    carries = jax.tree.map(lambda c: c + 0.1 if jnp.issubdtype(c.dtype, jnp.inexact) else c,
                           plain.initial_carries(B))
    # training with dropout between layers (and, for the plain LSTM, evaluation without)
    for key in ((None,) if name == "lstm" else ()) + (jax.random.key(2),):
        got = _loss_and_grads(folded, tokens, carries, key)
        want = _loss_and_grads(plain, tokens, carries, key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                                             atol=2e-5), got, want)
    # the gradient reaches the embedding and the first layer's input weights
    grads = got[1]
    assert float(jnp.abs(grads["embed"]["embedding"][...]).sum()) > 0


def test_fold_is_skipped_with_embedding_dropout_and_for_large_vocabularies(monkeypatch):
    model = LanguageModel(V, embed_dim=4, hidden_size=5, embed_dropout=0.5, rngs=nnx.Rngs(0))
    calls = []
    real = model.rnn.__call__.__func__

    def spy(self, xs, **kw):
        calls.append(kw.get("projected", False))
        return real(self, xs, **kw)

    monkeypatch.setattr(type(model.rnn), "__call__", spy)
    tokens = jnp.zeros((B, T), jnp.int32)
    model(tokens)                                   # eval: folded
    model(tokens, dropout_key=jax.random.key(0))    # embedding dropout needs the embedded tokens
    model(tokens[:1, :2])                           # V = 11 >= B * T = 2: projecting tokens is cheaper
    assert calls == [True, False, False]


def test_scan_mode_reaches_the_scan_from_the_config():
    """config.model.scan_mode picks recur.scan's mode for the model's layers: the minGRU language
    model built with mode "parallel" (on the CPU, the compiled scan) gives the sequential loss
    and gradients; the builder reads the field (and defaults it for older configs); a bad mode is
    an error naming the valid ones."""
    import ml_collections

    from recur.nnx import RNN
    from recur.train.lm import build_model

    m = ml_collections.ConfigDict(dict(cell="mingru", embed_dim=4, hidden=8, layers=2, tie_weights=False,
                                       embed_dropout=0.0, dropout=0.0, output_dropout=0.0,
                                       locked_dropout=False, init_scale=0.0, scan_mode="parallel"))
    parallel = build_model(m, V, seed=0)
    assert parallel.rnn.scan_kwargs["mode"] == "parallel"
    del m["scan_mode"]
    sequential = build_model(m, V, seed=0)
    assert sequential.rnn.scan_kwargs["mode"] == "sequential"
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    carries = sequential.initial_carries(B)
    got = _loss_and_grads(parallel, tokens, carries, None)
    want = _loss_and_grads(sequential, tokens, carries, None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 got, want)
    with pytest.raises(ValueError, match=r"RNN: mode must be one of \('sequential', 'parallel', .*got 'fast'"):
        RNN("gru", 4, hidden_size=8, mode="fast", rngs=nnx.Rngs(0))
