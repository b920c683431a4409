"""recur.models.classifier: pooling over valid steps only, padding invariance, dropout, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fit import fit
from flax import nnx

from recur.models.classifier import Classifier

V, C = 20, 3  # vocabulary, classes
TOKENS = np.array([[3, 4, 5, 6, 7],
                   [8, 9, 0, 0, 0],
                   [10, 11, 12, 13, 0],
                   [0, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 4, 0], np.int32)  # a length-0 row pools to zeros


# Eager calls re-trace the scans on every call (about a second each here); jitted, once per shape.
logits_of = nnx.jit(lambda model, tokens, lengths, key: model(tokens, lengths, dropout_key=key))
sentence_of = nnx.jit(lambda model, tokens, lengths: model.embed_sentence(tokens, lengths))
encode = nnx.jit(lambda model, tokens, lengths: model.encode(tokens, lengths))
predict = nnx.jit(lambda model, batch: model.predict(batch))


def make(pooling="last", bidirectional=False, cell="lstm", seed=0, **kwargs):
    """A small model; tests that share the defaults share the jitted functions' compilations."""
    kwargs = dict(dict(embed_dim=6, hidden_size=5, num_layers=2, mlp_hidden=4, embed_dropout=0.3,
                       dropout=0.3, locked_dropout=True), **kwargs)
    return Classifier(V, C, cell=cell, bidirectional=bidirectional, pooling=pooling,
                      rngs=nnx.Rngs(seed), **kwargs)


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "mean_max"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mlp_hidden", [0, 7])
def test_shapes(pooling, bidirectional, mlp_hidden):
    model = make(pooling, bidirectional, mlp_hidden=mlp_hidden)
    D = (10 if bidirectional else 5) * (2 if pooling == "mean_max" else 1)
    assert model.sentence_size == D
    batch = {"tokens": TOKENS, "lengths": LENGTHS, "labels": np.array([0, 1, 2, 0], np.int32)}
    shapes = nnx.eval_shape(lambda m: (m.embed_sentence(TOKENS, LENGTHS), m(TOKENS, LENGTHS),
                                       m(TOKENS, LENGTHS, dropout_key=jax.random.key(0)),
                                       m.loss(batch), m.predict(batch), m.probabilities(batch)), model)
    sentence, logits, dropped, loss, pred, probs = shapes
    assert sentence.shape == (4, D)
    assert logits.shape == dropped.shape == (4, C)
    assert loss.shape == ()
    assert pred.shape == (4,) and pred.dtype == jnp.int32
    assert probs.shape == (4, C)


@pytest.mark.parametrize("pooling,bidirectional", [("last", False), ("last", True), ("max", True)])
def test_padding_does_not_change_logits(pooling, bidirectional):
    model = make(pooling, bidirectional)
    logits = logits_of(model, TOKENS, LENGTHS, None)
    # other ids in the padded positions, then three more padding columns of non-zero ids
    mask = np.arange(5)[None, :] < LENGTHS[:, None]
    noisy = np.where(mask, TOKENS, 17)
    wider = np.concatenate([noisy, np.full((4, 3), 19, np.int32)], axis=1)
    np.testing.assert_allclose(logits_of(model, noisy, LENGTHS, None), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits_of(model, wider, LENGTHS, None), logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "max", "mean_max"])
def test_mean_and_max_pool_over_valid_steps(pooling):
    model = make(pooling, bidirectional=True)
    hs, _ = encode(model, TOKENS, LENGTHS)
    hs = np.asarray(hs)
    O = hs.shape[-1]
    want = np.zeros((4, 2 * O if pooling == "mean_max" else O), np.float32)
    for b, L in enumerate(LENGTHS):
        if L:
            mean, top = hs[b, :L].mean(0), hs[b, :L].max(0)
            want[b] = {"mean": mean, "max": top, "mean_max": np.concatenate([mean, top])}[pooling]
    np.testing.assert_allclose(sentence_of(model, TOKENS, LENGTHS), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm:proj_size=3"])
def test_bidirectional_last_is_forward_last_and_backward_first(cell):
    model = make("last", True, cell=cell)
    hs, carries = encode(model, TOKENS, LENGTHS)
    hs = np.asarray(hs)
    half = hs.shape[-1] // 2
    want = np.stack([np.concatenate([hs[b, max(L - 1, 0), :half], hs[b, 0, half:]])
                     for b, L in enumerate(LENGTHS)])
    got = sentence_of(model, TOKENS, LENGTHS)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the same as the top layer's final carries, which the scan keeps at each row's last valid step
    fw, bw = carries[-1]
    h = (lambda c: c["h"]) if cell.startswith("lstm") else (lambda c: c)
    np.testing.assert_allclose(got, np.concatenate([h(fw), h(bw)], axis=-1), rtol=1e-5, atol=1e-6)


def test_probabilities_are_the_softmax_of_the_logits_and_agree_with_predict():
    model = make("mean_max", True)
    batch = {"tokens": TOKENS, "lengths": LENGTHS}
    probs = np.asarray(nnx.jit(lambda m, b: m.probabilities(b))(model, batch))
    logits = np.asarray(logits_of(model, TOKENS, LENGTHS, None), np.float64)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), predict(model, batch))


def test_dropout_only_with_a_key():
    model = make("max", True)
    plain = logits_of(model, TOKENS, LENGTHS, None)
    np.testing.assert_array_equal(logits_of(model, TOKENS, LENGTHS, None), plain)
    a = logits_of(model, TOKENS, LENGTHS, jax.random.key(1))
    b = logits_of(model, TOKENS, LENGTHS, jax.random.key(2))
    np.testing.assert_array_equal(logits_of(model, TOKENS, LENGTHS, jax.random.key(1)), a)
    assert not np.allclose(a, plain) and not np.allclose(a, b)


def test_word_dropout_to_unk_reads_dropped_words_as_unk():
    # with every real word already <unk> (id 1), dropping words to <unk> changes nothing; zeroing
    # their vectors does; and on ordinary words the <unk> kind does drop (rate 0.9: some are)
    unks = np.where(TOKENS > 0, 1, 0).astype(np.int32)
    kw = dict(embed_dropout=0.9, dropout=0.0, num_layers=1)
    to_unk, to_zero = make("max", True, word_dropout_to="unk", **kw), make("max", True, **kw)
    key = jax.random.key(3)
    np.testing.assert_allclose(logits_of(to_unk, unks, LENGTHS, key), logits_of(to_unk, unks, LENGTHS, None),
                               rtol=1e-6)
    assert not np.allclose(logits_of(to_zero, unks, LENGTHS, key), logits_of(to_zero, unks, LENGTHS, None))
    dropped = logits_of(to_unk, TOKENS, LENGTHS, key)
    assert not np.allclose(dropped, logits_of(to_unk, TOKENS, LENGTHS, None))
    # padding stays padding: the padded positions' ids still do not matter
    noisy = np.where(np.arange(5)[None, :] < LENGTHS[:, None], TOKENS, 17)
    np.testing.assert_allclose(logits_of(to_unk, noisy, LENGTHS, key), dropped, rtol=1e-6)
    with pytest.raises(ValueError, match="word_dropout_to must be one of"):
        make(word_dropout_to="mask")


CHARS = np.array([[[3, 4, 0], [5, 0, 0], [6, 7, 8], [4, 4, 0], [9, 0, 0]],
                  [[3, 0, 0], [4, 5, 6], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
                  [[7, 7, 0], [3, 0, 0], [4, 6, 0], [5, 5, 5], [0, 0, 0]],
                  [[0, 0, 0]] * 5], np.int32)
WORD_LENGTHS = (CHARS > 0).sum(-1).astype(np.int32)
chars_logits_of = nnx.jit(lambda model, tokens, lengths, chars, word_lengths:
                          model(tokens, lengths, chars, word_lengths))


def test_character_features_are_each_words_own_spelling():
    model = make("max", True, char_vocab_size=10, char_embed_dim=4, char_hidden=3)
    logits = chars_logits_of(model, TOKENS, LENGTHS, CHARS, WORD_LENGTHS)
    respelt = CHARS.copy()
    respelt[0, 2, 1] = 9  # one character of sentence 0's third word
    changed = chars_logits_of(model, TOKENS, LENGTHS, respelt, WORD_LENGTHS)
    assert not np.allclose(changed[0], logits[0])
    np.testing.assert_allclose(changed[1:], logits[1:], rtol=1e-6)
    # characters past a word's length, and words past the sentence's, are ignored
    noisy = np.where(CHARS > 0, CHARS, 2)
    np.testing.assert_allclose(chars_logits_of(model, TOKENS, LENGTHS, noisy, WORD_LENGTHS), logits, rtol=1e-5)
    batch = {"tokens": TOKENS, "lengths": LENGTHS, "chars": CHARS, "word_lengths": WORD_LENGTHS}
    np.testing.assert_array_equal(predict(model, batch), logits.argmax(-1))
    with pytest.raises(ValueError, match="chars .* and word_lengths .* are required"):
        model(TOKENS, LENGTHS)


def test_unknown_pooling_is_an_error():
    with pytest.raises(ValueError, match="pooling must be one of"):
        make("sum")


def keyword_task(n=16, T=7, seed=0):
    """Sentence b has class labels[b], marked by one occurrence of keyword id 1 + labels[b]
    among random filler ids >= 4; lengths vary from 3 to T."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n).astype(np.int32)
    lengths = rng.integers(3, T + 1, n).astype(np.int32)
    tokens = np.zeros((n, T), np.int32)
    for b in range(n):
        tokens[b, :lengths[b]] = rng.integers(4, V, lengths[b])
        tokens[b, rng.integers(0, lengths[b])] = 1 + labels[b]
    return {"tokens": tokens, "lengths": lengths, "labels": labels}


def test_overfits_a_tiny_task():
    batch = keyword_task()
    model = make("last", True, embed_dim=16, hidden_size=16, num_layers=1, mlp_hidden=16,
                 embed_dropout=0.1, dropout=0.1)
    fit(model, batch, steps=100)
    np.testing.assert_array_equal(predict(model, batch), batch["labels"])


def lm_model(bidirectional=True, lm_weight=0.5):
    return make("max", bidirectional, num_layers=1, lm_vocab=9, lm_weight=lm_weight)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lm_loss_matches_a_loop_over_words(bidirectional):
    model = lm_model(bidirectional)
    batch = {"tokens": TOKENS, "lengths": LENGTHS, "labels": np.array([0, 1, 2, 0], np.int32)}
    hs = np.asarray(encode(model, TOKENS, LENGTHS)[0], np.float64)
    heads = [(np.asarray(h.kernel[...], np.float64), np.asarray(h.bias[...], np.float64))
             for h in model.lm_heads]
    H = hs.shape[-1] // len(heads)
    total = []
    for d, (W, b) in enumerate(heads):
        losses = []
        for row, L in enumerate(LENGTHS):
            words = [0] + list(TOKENS[row, :L]) + [0]  # the boundary class 0 past either end
            for t in range(L):
                target = words[t + 2] if d == 0 else words[t]  # the next word, or the previous one
                target = 1 if target >= 9 else target  # rarer than the 9 classes: <unk>
                logits = hs[row, t, d * H:(d + 1) * H] @ W + b
                losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target])
        total.append(np.mean(losses))
    lm = nnx.jit(lambda m, b: m.lm_loss(b))(model, batch)
    np.testing.assert_allclose(lm, np.mean(total), rtol=1e-5)
    # the training loss adds lm_weight times it to the classification loss
    plain = lm_model(bidirectional, lm_weight=0.0)
    ce = nnx.jit(lambda m, b: m.loss(b))(plain, batch)
    np.testing.assert_allclose(nnx.jit(lambda m, b: m.loss(b))(model, batch), ce + 0.5 * lm, rtol=1e-5)


def test_lm_loss_ignores_padding_and_drops_out_with_a_key():
    model = lm_model()
    lm_of = nnx.jit(lambda m, tokens, lengths: m.lm_loss({"tokens": tokens, "lengths": lengths}))
    mask = np.arange(5)[None, :] < LENGTHS[:, None]
    noisy = np.concatenate([np.where(mask, TOKENS, 17), np.full((4, 3), 19, np.int32)], axis=1)
    np.testing.assert_allclose(lm_of(model, noisy, LENGTHS), lm_of(model, TOKENS, LENGTHS), rtol=1e-5)
    # dropout applies with a key
    batch = {"tokens": TOKENS, "lengths": LENGTHS}
    dropped = nnx.jit(lambda m, b, k: m.lm_loss(b, dropout_key=k))(model, batch, jax.random.key(0))
    assert not np.isclose(dropped, lm_of(model, TOKENS, LENGTHS))


def test_lm_settings_are_checked():
    with pytest.raises(ValueError, match="needs num_layers=1"):
        make("max", True, num_layers=2, lm_vocab=9)
    with pytest.raises(ValueError, match="needs a language-model head"):
        make("max", True, num_layers=1, lm_weight=0.5)
    with pytest.raises(ValueError, match="lm_vocab must be in"):
        make("max", True, num_layers=1, lm_vocab=V + 1)
    with pytest.raises(ValueError, match="needs a language-model head"):
        make("max", True).lm_loss({"tokens": TOKENS, "lengths": LENGTHS})


def test_adversarial_loss_adds_the_loss_at_inputs_moved_uphill():
    batch = {"tokens": TOKENS, "lengths": LENGTHS, "labels": np.array([0, 1, 2, 0], np.int32)}
    loss_of = nnx.jit(lambda m, b, k: m.loss(b, dropout_key=k))
    key = jax.random.key(3)
    plain = float(loss_of(make("max", True), batch, key))
    adv = make("max", True, adv_eps=0.05)  # same seed: the same parameters
    total = float(loss_of(adv, batch, key))
    # loss = ce(x) + ce(x + r): the same dropout masks, so ce(x) is the plain loss, and r points
    # up the loss, so ce(x + r) > ce(x) (a step down the gradient would lower it)
    assert total - plain > plain
    # a much larger step raises it further; evaluation (no key) is unchanged
    assert float(loss_of(make("max", True, adv_eps=0.5), batch, key)) - plain > total - plain
    no_key = nnx.jit(lambda m, b: m.loss(b))
    np.testing.assert_allclose(no_key(adv, batch), no_key(make("max", True), batch), rtol=1e-6)
    with pytest.raises(ValueError, match="adv_eps must be a finite number"):
        make(adv_eps=-0.1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_adversarial_training_gradient_is_the_same_with_and_without_the_cpu_kernels(cell, monkeypatch):
    """The gradient of ce(x) + ce(x + r) needs r's direction, itself a gradient: it must not need
    a second derivative of the scan (the CPU kernels have none), and must not change with them."""
    batch = {"tokens": TOKENS, "lengths": LENGTHS, "labels": np.array([0, 1, 2, 0], np.int32)}
    model = make("max", True, cell=cell, num_layers=1, adv_eps=0.05)
    graphdef, params = nnx.split(model, nnx.Param)

    def grad_of_loss():
        return jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch, dropout_key=jax.random.key(3))))(params)

    got = grad_of_loss()
    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")
    want = grad_of_loss()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
