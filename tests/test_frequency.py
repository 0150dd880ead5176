"""Tests for the streaming frequency estimator against a plain per-item reference loop."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from twotower.frequency import StreamingFrequencyEstimator
from twotower.hashing import hash_buckets, seed_for, to_int64_ids


class ReferenceEstimator:
    """Algorithms 2 and 3 as a plain loop: distinct ids in order of first occurrence, per hash."""

    def __init__(self, num_buckets: int, num_hashes: int, alpha: float, seed: int = 0) -> None:
        self.num_buckets = num_buckets
        self.alpha = alpha
        self.seeds = [seed_for(f"frequency/{i}") ^ (seed & 0xFFFFFFFFFFFFFFFF)
                      for i in range(num_hashes)]
        self.A = np.zeros((num_hashes, num_buckets), dtype=np.int64)
        self.B = np.zeros((num_hashes, num_buckets), dtype=np.float64)
        self.step = 0

    def bucket(self, i: int, y: int) -> int:
        return int(hash_buckets(np.array([y], dtype=np.int64), self.num_buckets, self.seeds[i])[0])

    def update(self, ids: object) -> None:
        t = self.step + 1
        distinct: list[int] = []
        for y in to_int64_ids(ids).ravel().tolist():
            if y not in distinct:
                distinct.append(y)
        for y in distinct:
            for i in range(len(self.seeds)):
                b = self.bucket(i, y)
                if self.A[i, b] == 0:
                    self.B[i, b] = np.float64(t)
                else:
                    self.B[i, b] = (1 - self.alpha) * self.B[i, b] + self.alpha * (t - self.A[i, b])
                self.A[i, b] = t
        self.step = t

    def probability(self, ids: object) -> list[float]:
        out = []
        for y in to_int64_ids(ids).ravel().tolist():
            effective = []
            for i in range(len(self.seeds)):
                b = self.bucket(i, y)
                effective.append(float(self.B[i, b]) if self.A[i, b] > 0 else float(self.step + 1))
            out.append(1.0 / max(max(effective), 1.0))
        return out


def assert_same_state(est: StreamingFrequencyEstimator, ref: ReferenceEstimator) -> None:
    state = est.state_dict()
    assert est.step == ref.step == int(state["step"])
    assert np.array_equal(state["last_step"], ref.A)
    assert np.array_equal(state["interval"], ref.B)


batches = st.lists(st.lists(st.integers(0, 50), max_size=12), min_size=1, max_size=15)
alphas = st.one_of(st.sampled_from([0.01, 0.05, 0.1, 0.3, 0.5, 1.0]),
                   st.floats(min_value=1e-4, max_value=1.0, exclude_min=True))


@settings(max_examples=100, deadline=None)
@given(stream=batches, num_buckets=st.one_of(st.integers(1, 7), st.integers(50, 200)),
       num_hashes=st.integers(1, 4), alpha=alphas, seed=st.integers(-(2**63), 2**64 - 1))
def test_vectorised_matches_reference_loop(stream, num_buckets, num_hashes, alpha, seed):
    est = StreamingFrequencyEstimator(num_buckets, num_hashes, alpha, seed)
    fused = StreamingFrequencyEstimator(num_buckets, num_hashes, alpha, seed)
    ref = ReferenceEstimator(num_buckets, num_hashes, alpha, seed)
    probe = np.arange(-3, 60, dtype=np.int64)
    assert est.probability(probe).tolist() == ref.probability(probe)
    for batch in stream:
        ids = np.array(batch, dtype=np.int64)
        est.update(ids)
        p_fused = fused.update_and_probability(ids)
        ref.update(ids)
        assert_same_state(est, ref)
        assert_same_state(fused, ref)
        p = est.probability(ids)
        assert p.dtype == np.float64 and p.shape == (len(batch),)
        assert p.tolist() == ref.probability(ids) == p_fused.tolist()
        p_all = est.probability(probe)
        assert p_all.tolist() == ref.probability(probe)
        assert np.all((p_all > 0) & (p_all <= 1))


@pytest.mark.parametrize(("num_buckets", "num_hashes"), [(1, 2), (16, 1), (64, 3), (4096, 2)])
def test_large_batches_match_reference_loop(num_buckets, num_hashes):
    """Hundreds of ids with repeats: buckets shared by one id, a few, or many (every path)."""
    rng = np.random.default_rng(num_buckets)
    est = StreamingFrequencyEstimator(num_buckets, num_hashes, alpha=0.1, seed=9)
    ref = ReferenceEstimator(num_buckets, num_hashes, alpha=0.1, seed=9)
    for _ in range(4):
        ids = rng.zipf(1.3, size=400) % 300
        p = est.update_and_probability(ids)
        ref.update(ids)
        assert_same_state(est, ref)
        assert p.tolist() == ref.probability(ids)


def test_public_names():
    import twotower.frequency

    assert twotower.frequency.__all__ == ["StreamingFrequencyEstimator", "gather_global_ids"]


def test_buckets_shape_and_hash_seeds():
    est = StreamingFrequencyEstimator(97, num_hashes=3, seed=5)
    ids = np.array([[1, 2], [3, 4]], dtype=np.int64)
    b = est.buckets(ids)
    assert b.shape == (3, 4) and b.dtype == np.int64
    for i in range(3):
        expected = hash_buckets(ids.ravel(), 97, seed_for(f"frequency/{i}") ^ 5)
        assert np.array_equal(b[i], expected)


def test_input_kinds_agree():
    ints = np.array([3, 1, 3, 7, 1_000_000_007], dtype=np.int64)
    strings = np.array(["a", "b", "a", "zz"])
    streams = {
        "numpy": [ints, ints[:2]],
        "torch": [torch.from_numpy(ints), torch.tensor([3, 1])],
        "list": [ints.tolist(), [3, 1]],
    }
    results = {}
    for name, stream in streams.items():
        est = StreamingFrequencyEstimator(11, num_hashes=2, alpha=0.2)
        for batch in stream:
            est.update(batch)
        results[name] = (est.state_dict(), est.probability(stream[0]))
    base_state, base_p = results["numpy"]
    for state, p in results.values():
        assert np.array_equal(state["interval"], base_state["interval"])
        assert np.array_equal(state["last_step"], base_state["last_step"])
        assert np.array_equal(p, base_p)

    by_string = StreamingFrequencyEstimator(11, num_hashes=2, alpha=0.2)
    by_hash = StreamingFrequencyEstimator(11, num_hashes=2, alpha=0.2)
    by_string.update(strings)
    by_string.update(pa.array(["zz", "b"]))
    by_hash.update(to_int64_ids(strings))
    by_hash.update(to_int64_ids(["zz", "b"]))
    for key, value in by_string.state_dict().items():
        assert np.array_equal(value, by_hash.state_dict()[key])
    assert np.array_equal(by_string.probability(strings),
                          by_hash.probability(to_int64_ids(strings)))


def test_int32_and_int64_ids_agree():
    a = StreamingFrequencyEstimator(13, num_hashes=2)
    b = StreamingFrequencyEstimator(13, num_hashes=2)
    a.update(np.array([1, 5, 9], dtype=np.int32))
    b.update(np.array([1, 5, 9], dtype=np.int64))
    assert np.array_equal(a.state_dict()["interval"], b.state_dict()["interval"])


def test_converges_to_inverse_period():
    periods = {101: 1, 102: 2, 103: 5, 104: 10}
    est = StreamingFrequencyEstimator(1 << 20, num_hashes=2, alpha=0.05, seed=3)
    fillers = np.arange(1000, 1020, dtype=np.int64)
    every = np.concatenate([np.array(list(periods), dtype=np.int64), fillers])
    assert len({*est.buckets(every)[0].tolist()}) == every.size  # collision-free
    steps = 3000
    for t in range(1, steps + 1):
        # Items start at step 100, so their first-sight B (= t) is far from the period.
        batch = [y for y, d in periods.items() if t >= 100 and t % d == 0]
        est.update(np.array(batch + fillers[t % 20: t % 20 + 3].tolist(), dtype=np.int64))
    assert steps % 10 == 0  # every item was in the last batch
    p = est.probability(np.array(list(periods), dtype=np.int64))
    expected = np.array([1.0 / d for d in periods.values()])
    np.testing.assert_allclose(p, expected, rtol=0.01)


def test_converges_on_random_stream():
    """Item ``j`` is in each step's batch with probability ``q_j``, independently: its true
    in-batch probability is exactly ``q_j``. With alpha = 0.01 the estimate averaged over
    30,000 steps is within 5% of it (the bias of ``1 / B`` is about alpha / 2 = 0.5%; the
    rest is sampling noise, under 3% over seeds 0-4)."""
    q = np.array([0.5, 0.2, 0.1, 0.05])
    rng = np.random.default_rng(0)
    est = StreamingFrequencyEstimator(1 << 20, alpha=0.01, seed=1)
    items = np.arange(q.size, dtype=np.int64)
    assert len(set(est.buckets(items)[0].tolist())) == q.size  # collision-free
    estimates = []
    for t, present in enumerate(rng.random((40_000, q.size)) < q):
        est.update(items[present])
        if t >= 10_000 and t % 10 == 0:
            estimates.append(est.probability(items))
    np.testing.assert_allclose(np.mean(estimates, axis=0), q, rtol=0.05)


def test_first_sight_and_never_seen():
    est = StreamingFrequencyEstimator(1 << 20, num_hashes=2, alpha=0.1)
    new_item = np.array([999_999], dtype=np.int64)
    assert est.probability(new_item).tolist() == [1.0]  # before any update
    fillers = np.arange(10, dtype=np.int64)
    hit = set(est.buckets(fillers).ravel().tolist())
    assert not hit & set(est.buckets(new_item).ravel().tolist())
    for _ in range(9):
        est.update(fillers)
    assert est.step == 9
    assert est.probability(new_item).tolist() == [1.0 / 10]  # never seen: 1 / (t + 1)
    p = est.update_and_probability(np.concatenate([fillers, new_item]))
    assert p[-1] == 1.0 / 10  # first seen at t = 10: 1 / t, as the training loop reads it
    assert est.probability(new_item).tolist() == [1.0 / 10]
    est.update(fillers)
    est.update(np.concatenate([fillers, new_item]))  # seen again 2 steps later
    assert est.probability(new_item)[0] == pytest.approx(1.0 / (0.9 * 10 + 0.1 * 2))


def test_read_does_not_change_state():
    est = StreamingFrequencyEstimator(5, num_hashes=2)
    est.update([1, 2, 3])
    before = est.state_dict()
    est.probability([1, 2, 3, 4])
    assert est.probability([]).shape == (0,)
    after = est.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_empty_batch_counts_as_a_step():
    est = StreamingFrequencyEstimator(5)
    est.update(np.array([], dtype=np.int64))
    est.update([])
    assert est.update_and_probability([]).shape == (0,)
    assert est.step == 3
    assert not est.state_dict()["last_step"].any()


@pytest.mark.parametrize("alpha", [0.01, 0.5, 1.0])
def test_probability_bounded_under_heavy_collisions(alpha):
    est = StreamingFrequencyEstimator(1, num_hashes=3, alpha=alpha)
    for t in range(50):
        est.update(np.arange(100 * t, 100 * t + 100))
        p = est.probability(np.arange(200))
        assert np.all(np.isfinite(p)) and np.all(p > 0) and np.all(p <= 1)
    assert est.probability([0]).tolist() == [1.0]  # B fell below 1, clamped


def test_state_dict_round_trip_via_safetensors():
    rng = np.random.default_rng(0)
    stream = [rng.integers(0, 40, size=16) for _ in range(30)]
    est = StreamingFrequencyEstimator(17, num_hashes=3, alpha=0.07, seed=11)
    for batch in stream[:15]:
        est.update(batch)
    state = est.state_dict()
    assert all(v.flags["C_CONTIGUOUS"] and isinstance(v, np.ndarray) for v in state.values())
    restored = StreamingFrequencyEstimator(17, num_hashes=3, alpha=0.07, seed=11)
    restored.load_state_dict(st_load(st_save(state)))
    assert restored.step == est.step
    for batch in stream[15:]:
        est.update(batch)
        restored.update(batch)
        assert np.array_equal(est.probability(batch), restored.probability(batch))
    for key, value in est.state_dict().items():
        assert np.array_equal(value, restored.state_dict()[key]), key
    assert est.nbytes == 3 * 17 * 16


def test_state_dict_is_a_copy():
    est = StreamingFrequencyEstimator(4)
    state = est.state_dict()
    state["interval"][:] = 5.0
    assert not est.state_dict()["interval"].any()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("interval", np.zeros((2, 5)), "interval"),
        ("last_step", np.zeros((2, 4), dtype=np.float64), "last_step"),
        ("step", np.array([3], dtype=np.int64), "step"),
        ("alpha", np.array(0.5), "alpha"),
        ("num_buckets", np.array(5, dtype=np.int64), "num_buckets"),
        ("num_hashes", np.array(3, dtype=np.int64), "num_hashes"),
        ("seed", np.array(1, dtype=np.uint64), "seed"),
        ("step", np.array(-1, dtype=np.int64), "step"),
        ("last_step", np.full((2, 4), 99, dtype=np.int64), "last_step"),
        ("interval", np.full((2, 4), np.nan), "interval"),
    ],
)
def test_load_state_dict_rejects_bad_state(key, value, match):
    est = StreamingFrequencyEstimator(4, num_hashes=2, alpha=0.01)
    est.update([1, 2])
    state = est.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=match):
        StreamingFrequencyEstimator(4, num_hashes=2, alpha=0.01).load_state_dict(state)


def test_load_state_dict_missing_or_extra_key():
    est = StreamingFrequencyEstimator(4)
    state = est.state_dict()
    del state["interval"]
    with pytest.raises(ValueError, match=r"missing.*interval"):
        est.load_state_dict(state)
    state = {**est.state_dict(), "bogus": np.zeros(1)}
    with pytest.raises(ValueError, match="bogus"):
        est.load_state_dict(state)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_step_counts_exact_past_2_pow_53(alpha):
    est = StreamingFrequencyEstimator(1 << 16, alpha=alpha)
    big = 2**53
    state = est.state_dict()
    state["step"] = np.array(big, dtype=np.int64)
    est.load_state_dict(state)
    item, other = [7], [8]
    assert est.buckets(item)[0, 0] != est.buckets(other)[0, 0]
    est.update(item)  # t = 2**53 + 1
    est.update(other)  # t = 2**53 + 2
    b_first = est.state_dict()["interval"][0, est.buckets(item)[0, 0]]
    assert b_first == np.float64(big + 1)
    est.update(item)  # t = 2**53 + 3: interval exactly 2
    state = est.state_dict()
    assert int(state["step"]) == big + 3
    assert int(state["last_step"][0, est.buckets(item)[0, 0]]) == big + 3
    expected = (1 - alpha) * b_first + alpha * 2.0
    assert state["interval"][0, est.buckets(item)[0, 0]] == expected
    if alpha == 1.0:
        assert est.probability(item).tolist() == [0.5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_buckets": 0},
        {"num_buckets": -3},
        {"num_buckets": 2.5},
        {"num_buckets": 4, "num_hashes": 0},
        {"num_buckets": 4, "alpha": 0.0},
        {"num_buckets": 4, "alpha": -0.1},
        {"num_buckets": 4, "alpha": 1.5},
        {"num_buckets": 4, "alpha": math.nan},
        {"num_buckets": 4, "alpha": "fast"},
        {"num_buckets": 4, "seed": 1.5},
    ],
)
def test_bad_constructor_args(kwargs):
    name = next(k for k in ("alpha", "num_hashes", "seed", "num_buckets") if k in kwargs)
    with pytest.raises(ValueError, match=name):
        StreamingFrequencyEstimator(**kwargs)
