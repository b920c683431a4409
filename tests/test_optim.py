"""Learning-rate schedules and optimisers against the recipes they reproduce."""
import jax.numpy as jnp
import numpy as np
import pytest

from recur.train.optim import Schedule, make_optimizer, with_learning_rate


def test_epoch_decay_is_zarembas_small_recipe():
    # Zaremba et al.'s ptb_word_lm: lr_decay = 0.5 ** max(i + 1 - max_epoch, 0), max_epoch = 4, i from 0
    s = Schedule("epoch_decay", 1.0, decay=0.5, decay_after=4)
    assert [s(0, i) for i in range(7)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]


def test_cosine_warms_up_then_decays_to_min_lr():
    s = Schedule("cosine", 1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(0, 0) == pytest.approx(0.1) and s(9, 0) == pytest.approx(1.0)
    assert s(60, 0) == pytest.approx(0.55) and s(110, 0) == pytest.approx(0.1)


def test_plateau_decays_after_patience_and_round_trips_its_state():
    s = Schedule("plateau", 1.0, decay=0.25, patience=1)
    for loss in (5.0, 4.0, 4.5, 4.2):  # two evaluations without improvement on 4.0
        s.observe(loss)
    assert s(0, 0) == 0.25
    t = Schedule("plateau", 1.0, decay=0.25, patience=1)
    t.load_state_dict(s.state_dict())
    assert (t(0, 0), t.best, t.bad) == (0.25, 4.0, 0)


def test_injected_learning_rate_and_clipping():
    tx = make_optimizer("sgd", 1.0, clip_norm=1.0)
    params = {"w": jnp.zeros(2)}
    state = with_learning_rate(tx.init(params), jnp.float32(0.5))
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    # clipped to norm 1 -> [0.6, 0.8], times -lr
    np.testing.assert_allclose(updates["w"], [-0.3, -0.4], rtol=1e-6)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("adagrad", 1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        Schedule("linear", 1.0)
