"""Tests for causal history features against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.data.history import causal_history, seen_before
from twotower.features import Bag


def history_reference(users, timestamps, items, length, ordered=False) -> list[list[int]]:
    """Per event: its user's items with a strictly earlier time (``ordered``: or the same
    time and earlier in the input), by (time, input order), last N."""
    out = []
    for e in range(len(users)):
        earlier = [(int(timestamps[f]), f) for f in range(len(users))
                   if users[f] == users[e] and (int(timestamps[f]), f) < (int(timestamps[e]), e)
                   and (ordered or timestamps[f] < timestamps[e])]
        earlier.sort()
        kept = earlier[max(0, len(earlier) - length):] if length else []
        out.append([int(items[f]) for _, f in kept])
    return out


def as_lists(bag: Bag) -> list[list[int]]:
    return [bag.values[bag.offsets[i]:bag.offsets[i + 1]].tolist() for i in range(len(bag))]


def test_small_known_example():
    # user 1: times 10, 20, 20, 30; user 2: times 20, 5.
    users = np.array([1, 2, 1, 1, 2, 1])
    times = np.array([20, 20, 10, 30, 5, 20])
    items = np.array([100, 200, 101, 102, 201, 103])
    got = as_lists(causal_history(users, times, items, length=2))
    assert got == [
        [101],        # user 1 at 20: only the event at 10 (not its same-time neighbour)
        [201],        # user 2 at 20
        [],           # user 1 at 10: first event
        [100, 103],   # user 1 at 30: the last two of 10, 20, 20 (ties in input order)
        [],           # user 2 at 5
        [101],        # user 1 at 20
    ]
    assert as_lists(causal_history(users, times, items, length=0)) == [[]] * 6
    assert as_lists(causal_history(users, times, items, length=10))[3] == [101, 100, 103]


def test_ordered_ties_see_the_earlier_events_at_their_time():
    users = np.array([1, 2, 1, 1, 2, 1])
    times = np.array([20, 20, 10, 30, 5, 20])
    items = np.array([100, 200, 101, 102, 201, 103])
    assert as_lists(causal_history(users, times, items, length=2, ordered=True)) == [
        [101],        # user 1 at 20, first of its time in the input
        [201],
        [],
        [100, 103],
        [],
        [101, 100],   # user 1 at 20, second: sees the first
    ]


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_logs_with_ties(seed, ordered):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    users = rng.integers(0, int(rng.integers(1, 6)), n).astype(np.int64)
    times = rng.integers(0, int(rng.integers(1, 12)), n).astype(np.int64)  # many ties
    items = rng.integers(0, 1000, n).astype(np.int64)
    length = int(rng.integers(0, 8))
    got = causal_history(users, times, items, length, ordered)
    assert got.offsets.dtype == np.int64 and len(got) == n
    assert as_lists(got) == history_reference(users, times, items, length, ordered)


def test_empty_log():
    empty = np.zeros(0, dtype=np.int64)
    got = causal_history(empty, empty, empty, 5)
    assert len(got) == 0 and got.offsets.tolist() == [0] and got.values.size == 0


def test_negative_length_raises():
    one = np.array([1])
    with pytest.raises(ValueError, match="history length must be >= 0"):
        causal_history(one, one, one, -1)


@settings(max_examples=150, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 3), st.integers(-3, 3)), max_size=60),
       length=st.integers(0, 6))
def test_no_event_sees_itself_or_the_future(events, length):
    users = np.array([u for u, _ in events], dtype=np.int64)
    times = np.array([t for _, t in events], dtype=np.int64)
    items = np.arange(len(events), dtype=np.int64)  # item e is event e, to trace each entry
    bags = as_lists(causal_history(users, times, items, length))
    for e, bag in enumerate(bags):
        assert len(bag) <= length
        assert len(set(bag)) == len(bag)
        for f in bag:
            assert f != e
            assert users[f] == users[e]
            assert times[f] < times[e]
        # Oldest first.
        assert [(times[f], f) for f in bag] == sorted((times[f], f) for f in bag)
        # Nothing newer that is still earlier than the event was skipped.
        earlier = sum(1 for f in range(len(events))
                      if users[f] == users[e] and times[f] < times[e])
        assert len(bag) == min(length, earlier)


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_seen_before_is_the_unbounded_history_of_the_chosen_events(seed, ordered):
    rng = np.random.default_rng(seed)
    n = 80
    users = rng.integers(0, 4, n).astype(np.int64)
    times = rng.integers(0, 10, n).astype(np.int64)
    items = rng.integers(0, 1000, n).astype(np.int64)
    rows = rng.choice(n, 15, replace=False)
    expected = history_reference(users, times, items, n, ordered)
    got = as_lists(seen_before(users, times, items, rows, ordered))
    assert got == [expected[r] for r in rows]
