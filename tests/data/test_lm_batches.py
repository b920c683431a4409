"""Tests of recur.data.lm_batches: the truncated-BPTT layout and exact resumption."""
import numpy as np
import pytest

from recur.data.lm_batches import LMBatches

B, T = 4, 7


def _ids(n: int = 1003) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50, size=n)


def _collect(batches, epochs=1):
    return [(x.copy(), y.copy()) for _ in range(epochs) for x, y in batches]


def test_batches_reconstruct_the_streams():
    ids = _ids()
    batches = LMBatches(ids, B, T)
    out = _collect(batches)
    stream_len = len(ids) // B
    assert batches.num_dropped == len(ids) - B * stream_len == 3
    assert len(out) == batches.num_batches == -(-(stream_len - 1) // T)
    inputs = np.concatenate([x for x, _ in out], axis=1)
    rebuilt = np.concatenate([inputs, out[-1][1][:, -1:]], axis=1)
    np.testing.assert_array_equal(rebuilt, ids[:B * stream_len].reshape(B, stream_len))
    assert all(x.dtype == np.int32 and y.dtype == np.int32 for x, y in out)


def test_targets_are_inputs_shifted_by_one():
    out = _collect(LMBatches(_ids(), B, T))
    for (x, y), (x_next, _) in zip(out, out[1:] + [(None, None)]):
        assert x.shape == y.shape and x.shape[0] == B
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
        if x_next is not None:
            np.testing.assert_array_equal(y[:, -1], x_next[:, 0])


def test_last_window_is_kept_shorter_or_dropped():
    ids = np.arange(4 * 11)  # streams of 11 tokens: 10 steps = 7 + 3
    kept = _collect(LMBatches(ids, 4, 7))
    assert [x.shape[1] for x, _ in kept] == [7, 3]
    dropped = _collect(LMBatches(ids, 4, 7, drop_last=True))
    assert [x.shape[1] for x, _ in dropped] == [7]


@pytest.mark.parametrize("stop_after", [0, 1, 17, 35, 36, 50])
def test_resume_reads_the_same_batches(stop_after):
    ids = _ids()
    expected = _collect(LMBatches(ids, B, T), epochs=2)
    first = LMBatches(ids, B, T)
    seen = []
    while len(seen) < stop_after:
        for batch in first:
            seen.append(batch)
            if len(seen) == stop_after:
                break  # interrupted right after a batch, possibly the last of an epoch
    resumed = LMBatches(ids, B, T)
    resumed.load_state_dict(first.state_dict())
    while len(seen) < len(expected):
        seen.extend(resumed)
    assert len(seen) == len(expected)
    for (x, y), (ex, ey) in zip(seen, expected):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_state_is_plain_ints_and_validated():
    batches = LMBatches(_ids(), B, T)
    next(iter(batches))
    assert batches.state_dict() == {"epoch": 0, "position": 1}
    with pytest.raises(ValueError, match="does not fit"):
        batches.load_state_dict({"epoch": 0, "position": batches.num_batches + 1})


def test_too_little_data_is_an_error():
    with pytest.raises(ValueError, match="too few"):
        LMBatches(np.arange(5), 4, 3)
