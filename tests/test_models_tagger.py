"""recur.models.tagger: padding invariance, per-word char features, CRF and token losses, learning."""
import jax
import numpy as np
import pytest
from fit import fit
from flax import nnx

from recur import crf
from recur.models.tagger import Tagger

V, K, NC = 12, 3, 8  # words, tags, characters
TOKENS = np.array([[3, 4, 5, 6],
                   [7, 8, 0, 0],
                   [9, 0, 0, 0]], np.int32)
LENGTHS = np.array([4, 2, 1], np.int32)
WORD_LENGTHS = np.array([[5, 2, 3, 1],
                         [4, 1, 0, 0],
                         [2, 0, 0, 0]], np.int32)
W = 5
_chars = np.random.default_rng(0).integers(1, NC, (3, 4, W)).astype(np.int32)
CHARS = np.where(np.arange(W)[None, None, :] < WORD_LENGTHS[:, :, None], _chars, 0)
TAGS = np.array([[0, 1, 2, 1],
                 [2, 2, 0, 0],
                 [1, 0, 0, 0]], np.int32)
BATCH = {"tokens": TOKENS, "lengths": LENGTHS, "chars": CHARS, "word_lengths": WORD_LENGTHS,
         "tags": TAGS}

# Eager calls re-trace the scans on every call (about a second each here); jitted, once per shape.
scores_of = nnx.jit(lambda model, batch, key: model.scores(batch, dropout_key=key))
loss_of = nnx.jit(lambda model, batch: model.loss(batch))
predict = nnx.jit(lambda model, batch: model.predict(batch))
char_features = nnx.jit(lambda model, chars, word_lengths: model.char_features(chars, word_lengths))


def make(chars=True, use_crf=False, seed=0, **kwargs):
    """A small model; tests that share the defaults share the jitted functions' compilations."""
    kwargs = dict(dict(embed_dim=6, hidden_size=5, char_embed_dim=4, char_hidden=3, num_layers=2,
                       embed_dropout=0.3, dropout=0.3), **kwargs)
    return Tagger(V, K, char_vocab_size=NC if chars else 0, crf=use_crf, rngs=nnx.Rngs(seed), **kwargs)


def valid(T):
    return np.arange(T)[None, :] < LENGTHS[:, None]


@pytest.mark.parametrize("chars,use_crf", [(False, False), (True, True)])
def test_shapes_and_padding_invariance(chars, use_crf):
    model = make(chars, use_crf)
    scores = np.asarray(scores_of(model, BATCH, None))
    assert scores.shape == (3, 4, K)
    assert np.all(scores[~valid(4)] == 0)
    tags = np.asarray(predict(model, BATCH))
    assert tags.dtype == np.int32 and tags.shape == (3, 4) and np.all(tags[~valid(4)] == 0)
    # other ids in padded words and padding characters, then 3 more padding words and 2 more
    # padding characters per word, all non-zero
    mask = valid(4)
    noisy = dict(BATCH, tokens=np.where(mask, TOKENS, 11),
                 chars=np.where(np.arange(W)[None, None, :] < WORD_LENGTHS[:, :, None], CHARS, 7))
    wider = dict(noisy, tokens=np.pad(noisy["tokens"], ((0, 0), (0, 3)), constant_values=10),
                 tags=np.pad(TAGS, ((0, 0), (0, 3))),
                 chars=np.pad(noisy["chars"], ((0, 0), (0, 3), (0, 2)), constant_values=6),
                 word_lengths=np.pad(WORD_LENGTHS, ((0, 0), (0, 3))))
    for other in (noisy, wider):
        np.testing.assert_allclose(scores_of(model, other, None)[:, :4], scores, rtol=1e-5, atol=1e-6)


def test_char_features_of_a_word_depend_on_its_characters_only():
    model = make()
    feats = np.asarray(char_features(model, CHARS, WORD_LENGTHS))
    assert feats.shape == (3, 4, 6)
    rng = np.random.default_rng(1)
    for b, t in zip(*np.nonzero(valid(4))):
        L = WORD_LENGTHS[b, t]
        # the word alone in a batch of one, its padding characters random
        alone = rng.integers(1, NC, (1, 1, W + 2)).astype(np.int32)
        alone[0, 0, :L] = CHARS[b, t, :L]
        got = char_features(model, alone, np.array([[L]], np.int32))[0, 0]
        np.testing.assert_allclose(got, feats[b, t], rtol=1e-5, atol=1e-6)


def test_crf_loss_is_mean_negative_log_likelihood_and_predict_is_viterbi():
    model = make(chars=True, use_crf=True)
    scores = scores_of(model, BATCH, None)
    params = model.crf_params()
    want = -crf.log_likelihood(params, scores, TAGS, LENGTHS).mean()
    np.testing.assert_allclose(loss_of(model, BATCH), want, rtol=1e-6)
    np.testing.assert_array_equal(predict(model, BATCH), crf.viterbi(params, scores, LENGTHS)[0])


def test_token_loss_is_cross_entropy_over_valid_tokens():
    model = make(chars=False, use_crf=False)
    scores = np.asarray(scores_of(model, BATCH, None), np.float64)
    log_p = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    nll = [-log_p[b, t, TAGS[b, t]] for b, t in zip(*np.nonzero(valid(4)))]
    np.testing.assert_allclose(loss_of(model, BATCH), np.mean(nll), rtol=1e-5)
    np.testing.assert_array_equal(predict(model, BATCH), np.where(valid(4), scores.argmax(-1), 0))


def test_dropout_only_with_a_key():
    model = make(chars=True, use_crf=True)
    plain = scores_of(model, BATCH, None)
    np.testing.assert_array_equal(scores_of(model, BATCH, None), plain)
    a = scores_of(model, BATCH, jax.random.key(1))
    b = scores_of(model, BATCH, jax.random.key(2))
    np.testing.assert_array_equal(scores_of(model, BATCH, jax.random.key(1)), a)
    assert not np.allclose(a, plain) and not np.allclose(a, b)


def test_missing_chars_is_an_error():
    model = make()
    with pytest.raises(ValueError, match="chars"):
        model(TOKENS, LENGTHS)


def context_task(n=16, T=6, seed=0):
    """tag_t = (w_t + w_{t-1}) mod K (w_{-1} = 0): each tag needs the previous word too. Every
    word id has a fixed random spelling of 1 to 4 characters."""
    rng = np.random.default_rng(seed)
    spell_len = rng.integers(1, 5, V)
    spelling = rng.integers(1, NC, (V, 4))
    lengths = rng.integers(2, T + 1, n).astype(np.int32)
    tokens = np.zeros((n, T), np.int32)
    tags = np.zeros((n, T), np.int32)
    for b in range(n):
        words = rng.integers(1, V, lengths[b])
        tokens[b, :lengths[b]] = words
        tags[b, :lengths[b]] = (words + np.concatenate([[0], words[:-1]])) % K
    word_lengths = np.where(tokens > 0, spell_len[tokens], 0).astype(np.int32)
    chars = np.where(np.arange(4)[None, None, :] < word_lengths[:, :, None], spelling[tokens], 0)
    return {"tokens": tokens, "lengths": lengths, "tags": tags, "chars": chars.astype(np.int32),
            "word_lengths": word_lengths}


def test_crf_tagger_overfits_a_tiny_task():
    batch = context_task()
    model = make(use_crf=True, embed_dim=16, hidden_size=16, char_hidden=8, num_layers=1,
                 embed_dropout=0.1, dropout=0.1)
    fit(model, batch, steps=100)
    np.testing.assert_array_equal(predict(model, batch), batch["tags"])
