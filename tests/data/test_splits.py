"""Splits: known answers, ties, and no leakage from the future into training."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.data.splits import cutoff_for_fraction, leave_last_out, split_log, time_split


def time_ordered(events: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(users, times) sorted by time, ties kept in input order (as a loaded log is)."""
    users = np.array([u for u, _ in events], dtype=np.int64)
    times = np.array([t for _, t in events], dtype=np.int64)
    order = np.argsort(times, kind="stable")
    return users[order], times[order]


def test_leave_last_out_known_answer():
    # Rows in time order: user 1 has rows 0, 2, 3, 5; user 2 rows 1, 4; user 3 row 6.
    users = np.array([1, 2, 1, 1, 2, 1, 3])
    split = leave_last_out(users)
    assert split.test.tolist() == [5]
    assert split.valid.tolist() == [3]
    assert split.train.tolist() == [0, 1, 2, 4, 6]
    assert split.summary() == {"kind": "leave-last-out", "train": 5, "valid": 1, "test": 1,
                               "users_train_only": 2}


def test_leave_last_out_breaks_time_ties_by_log_order():
    # User 1's last two events share a time: the later row in the log is the test event.
    users, times = time_ordered([(1, 1), (1, 5), (1, 5), (2, 2)])
    split = leave_last_out(users)
    assert times[split.test].tolist() == [5] and split.test.tolist() == [3]
    assert split.valid.tolist() == [2]
    assert leave_last_out(users).test.tolist() == split.test.tolist()  # deterministic


def test_time_split_and_fraction():
    times = np.array([1, 2, 2, 3, 5, 5, 5, 8, 9, 9])
    split = time_split(times, 5)
    assert split.train.tolist() == [0, 1, 2, 3] and split.test.tolist() == [4, 5, 6, 7, 8, 9]
    assert split.valid.size == 0 and split.summary()["cutoff"] == 5
    assert cutoff_for_fraction(times, 0.2) == 9
    assert cutoff_for_fraction(times, 0.5) == 5  # ties at the cut-off all test
    with pytest.raises(ValueError, match="test_fraction must be between 0 and 1"):
        cutoff_for_fraction(times, 1.0)


def test_split_log_dispatch_and_errors():
    users, times = np.array([1, 1, 1]), np.array([1, 2, 3])
    assert split_log("time", users, times, test_fraction=0.3).test.tolist() == [2]
    assert split_log("time", users, times, cutoff=2).train.tolist() == [0]
    assert split_log("leave-last-out", users, times).test.tolist() == [2]
    with pytest.raises(ValueError, match="split must be one of"):
        split_log("random", users, times)
    with pytest.raises(ValueError, match="needs a cutoff or a test fraction"):
        split_log("time", users, times)
    with pytest.raises(ValueError, match="split part must be train, valid or test"):
        split_log("time", users, times, cutoff=2).part("holdout")


events_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 8)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(events=events_strategy)
def test_leave_last_out_never_trains_on_a_users_future(events):
    users, times = time_ordered(events)
    split = leave_last_out(users)
    parts = np.concatenate([split.train, split.valid, split.test])
    assert sorted(parts.tolist()) == list(range(len(users)))  # disjoint and complete
    for user in np.unique(users):
        rows = np.flatnonzero(users == user)
        if len(rows) >= 3:
            assert split.test[users[split.test] == user].tolist() == [rows[-1]]
            assert split.valid[users[split.valid] == user].tolist() == [rows[-2]]
            train = split.train[users[split.train] == user]
            # Training rows of the user all come earlier in the log, none later in time.
            assert (train < rows[-2]).all() and (times[train] <= times[rows[-2]]).all()
            assert times[rows[-2]] <= times[rows[-1]]
        else:
            assert np.isin(rows, split.train).all()


@settings(max_examples=150, deadline=None)
@given(events=events_strategy, cutoff=st.integers(0, 9))
def test_time_split_never_trains_on_or_after_the_cutoff(events, cutoff):
    _, times = time_ordered(events)
    split = time_split(times, cutoff)
    assert (times[split.train] < cutoff).all() and (times[split.test] >= cutoff).all()
    assert len(split.train) + len(split.test) == len(times)
    if len(split.train) and len(split.test):
        assert split.train.max() < split.test.min()  # every train event precedes every test one


def test_column_split_puts_each_event_in_the_part_its_column_names():
    from twotower.data.splits import column_split, split_log

    parts = np.array(["train", "valid", "train", "test", "valid", "train"])
    split = split_log("column", np.zeros(6), np.arange(6), column="part", parts=parts)
    assert split.train.tolist() == [0, 2, 5] and split.valid.tolist() == [1, 4]
    assert split.test.tolist() == [3] and split.summary()["column"] == "part"
    with pytest.raises(ValueError, match=r"'part' holds \['tset'\] \(first at row 2"):
        column_split(np.array(["train", "valid", "tset"]), "part")
