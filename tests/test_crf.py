"""The CRF against brute-force enumeration of all K^L tag paths (NumPy, float64)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from recur import crf

K, T = 3, 4
LENGTHS = np.array([4, 1, 3, 2])


def _random_problem(seed, lengths=LENGTHS, garbage=True):
    """Params, emissions [B, T, K] and gold tags [B, T]; padded positions hold garbage."""
    rng = np.random.default_rng(seed)
    params = {"transitions": rng.normal(size=(K, K)), "start": rng.normal(size=K),
              "end": rng.normal(size=K)}
    emissions = rng.normal(size=(len(lengths), T, K))
    tags = rng.integers(0, K, size=(len(lengths), T))
    if garbage:
        pad = np.arange(T)[None, :] >= lengths[:, None]
        emissions[pad] = 1e4
        emissions[0 if pad[0].any() else 1, -1, 0] = np.nan  # a NaN in some padded position
        tags[pad] = -7
    return params, emissions, tags


def _path_score(params, emissions, path):
    """s(x, y) written out term by term, for one sequence of length len(path)."""
    score = params["start"][path[0]] + params["end"][path[-1]]
    score += sum(emissions[t, y] for t, y in enumerate(path))
    score += sum(params["transitions"][a, b] for a, b in zip(path[:-1], path[1:]))
    return score


def _brute_force(params, emissions, lengths):
    """log Z, the best path and its score for each sequence, by enumerating every path."""
    log_z, best_path, best_score = [], [], []
    for b, length in enumerate(lengths):
        paths = list(itertools.product(range(K), repeat=int(length)))
        scores = np.array([_path_score(params, emissions[b], p) for p in paths])
        m = scores.max()
        log_z.append(m + np.log(np.exp(scores - m).sum()))
        best_path.append(list(paths[int(scores.argmax())]) + [0] * (T - int(length)))
        best_score.append(m)
    return np.array(log_z), np.array(best_path), np.array(best_score)


def _jnp(params, emissions):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), jnp.asarray(
        emissions, jnp.float32)


def test_init_shapes():
    params = crf.init(jax.random.key(0), 5)
    assert params["transitions"].shape == (5, 5)
    assert params["start"].shape == params["end"].shape == (5,)
    assert all(bool(jnp.all(jnp.abs(p) <= 0.1)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_likelihood_equals_brute_force(seed):
    params, emissions, tags = _random_problem(seed)
    log_z, _, _ = _brute_force(params, emissions, LENGTHS)
    gold = np.array([_path_score(params, emissions[b], tags[b, :n])
                     for b, n in enumerate(LENGTHS)])
    ll = crf.log_likelihood(*_jnp(params, emissions), jnp.asarray(tags), jnp.asarray(LENGTHS))
    assert ll.shape == (len(LENGTHS),)
    np.testing.assert_allclose(ll, gold - log_z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_equals_brute_force(seed):
    params, emissions, _ = _random_problem(seed)
    _, best_path, best_score = _brute_force(params, emissions, LENGTHS)
    tags, score = crf.viterbi(*_jnp(params, emissions), jnp.asarray(LENGTHS))
    assert tags.dtype == jnp.int32 and tags.shape == (len(LENGTHS), T)
    np.testing.assert_array_equal(tags, best_path)  # padded positions hold 0
    np.testing.assert_allclose(score, best_score, rtol=1e-5, atol=1e-5)


def test_probabilities_of_all_paths_sum_to_one():
    """sum_y p(y|x) = 1 over every path of a length-3 sequence, with log_likelihood batched."""
    params, emissions, _ = _random_problem(3, lengths=np.array([3]), garbage=False)
    paths = np.array([list(p) + [0] for p in itertools.product(range(K), repeat=3)])
    params, emissions = _jnp(params, emissions)
    emissions_B = jnp.broadcast_to(emissions, (len(paths), T, K))
    ll = crf.log_likelihood(params, emissions_B, jnp.asarray(paths),
                            jnp.full(len(paths), 3))
    np.testing.assert_allclose(jnp.sum(jnp.exp(ll)), 1.0, rtol=1e-5)


def test_length_zero():
    params, emissions, tags = _random_problem(4, lengths=np.array([0, 2]))
    params, emissions = _jnp(params, emissions)
    lengths = jnp.array([0, 2])
    ll = crf.log_likelihood(params, emissions, jnp.asarray(tags), lengths)
    best_tags, best_score = crf.viterbi(params, emissions, lengths)
    assert ll[0] == 0 and best_score[0] == 0 and not best_tags[0].any()
    grads = jax.grad(lambda e: crf.log_likelihood(params, e, jnp.asarray(tags), lengths)[0])(
        emissions)
    assert not grads.any()


def test_lengths_out_of_range_raise():
    params, emissions, tags = _random_problem(0)
    params, emissions = _jnp(params, emissions)
    with pytest.raises(ValueError, match="lengths must lie in"):
        crf.viterbi(params, emissions, jnp.array([5, 1, 1, 1]))
    with pytest.raises(ValueError, match="tags have shape"):
        crf.log_likelihood(params, emissions, jnp.asarray(tags[:, :2]), jnp.asarray(LENGTHS))


def test_padding_garbage_changes_nothing():
    params, dirty, tags = _random_problem(5)
    clean = np.where((np.arange(T)[None, :] < LENGTHS[:, None])[:, :, None], dirty, 0.0)
    clean_tags = np.where(np.arange(T)[None, :] < LENGTHS[:, None], tags, 0)
    params, dirty = _jnp(params, dirty)
    clean = jnp.asarray(clean, jnp.float32)
    lengths = jnp.asarray(LENGTHS)

    def loss(p, e, y):
        return -crf.log_likelihood(p, e, jnp.asarray(y), lengths).sum()

    (l_dirty, g_dirty) = jax.value_and_grad(loss, argnums=(0, 1))(params, dirty, tags)
    (l_clean, g_clean) = jax.value_and_grad(loss, argnums=(0, 1))(params, clean, clean_tags)
    np.testing.assert_array_equal(l_dirty, l_clean)
    jax.tree.map(np.testing.assert_array_equal, g_dirty, g_clean)
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    assert np.all(np.isfinite(g_dirty[1])) and not np.asarray(g_dirty[1])[pad].any()
    for a, b in zip(crf.viterbi(params, dirty, lengths), crf.viterbi(params, clean, lengths)):
        np.testing.assert_array_equal(a, b)


def test_gradients_match_finite_differences_in_float64():
    params, emissions, tags = _random_problem(6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.grad(
        lambda p, e: crf.log_likelihood(p, e, jnp.asarray(tags), jnp.asarray(LENGTHS)).sum(),
        argnums=(0, 1))(*_jnp(params, emissions))))
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        emissions64 = jnp.asarray(np.nan_to_num(emissions, nan=0.0), jnp.float64)
        lengths, tags64 = jnp.asarray(LENGTHS), jnp.asarray(tags)
        ll = jax.jit(lambda p, e: crf.log_likelihood(p, e, tags64, lengths))
        assert ll(params64, emissions64).dtype == jnp.float64
        check_grads(ll, (params64, emissions64), order=1, modes=("fwd", "rev"))


def test_jit_gives_the_same_results():
    params, emissions, tags = _random_problem(7)
    params, emissions = _jnp(params, emissions)
    args = (params, emissions, jnp.asarray(tags), jnp.asarray(LENGTHS))
    np.testing.assert_allclose(jax.jit(crf.log_likelihood)(*args), crf.log_likelihood(*args),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.jit(crf.viterbi)(params, emissions, jnp.asarray(LENGTHS)),
                    crf.viterbi(params, emissions, jnp.asarray(LENGTHS))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_viterbi_path_scores_best_score():
    """The Viterbi path's log-likelihood is its score minus log Z, and no sampled path beats it."""
    params, emissions, _ = _random_problem(8, garbage=False)
    params, emissions = _jnp(params, emissions)
    lengths = jnp.asarray(LENGTHS)
    tags, _ = crf.viterbi(params, emissions, lengths)
    ll_best = crf.log_likelihood(params, emissions, tags, lengths)
    others = jax.random.randint(jax.random.key(0), (64, len(LENGTHS), T), 0, K)
    ll_others = jax.vmap(lambda y: crf.log_likelihood(params, emissions, y, lengths))(others)
    assert bool(jnp.all(ll_others <= ll_best[None, :] + 1e-5))
