"""Cleaning: each step against a plain-Python reference, and every removal counted."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.data.cleaning import Cleaning, clean


def k_core_reference(events: list[tuple[int, int]], k: int) -> list[bool]:
    """Repeatedly drop events of users or items with fewer than k kept events."""
    keep = [True] * len(events)
    while True:
        users = Counter(u for (u, _), kept in zip(events, keep, strict=True) if kept)
        items = Counter(i for (_, i), kept in zip(events, keep, strict=True) if kept)
        new = [kept and users[u] >= k and items[i] >= k
               for (u, i), kept in zip(events, keep, strict=True)]
        if new == keep:
            return keep
        keep = new


def test_nothing_asked_nothing_removed():
    keep, report = clean(np.array([1, 1]), np.array([2, 2]), Cleaning())
    assert keep.tolist() == [True, True] and report == {}
    assert not Cleaning(min_user_events=1, min_item_events=1, k_core=1).active


def test_dedupe_keeps_first_occurrence():
    users = np.array([1, 2, 1, 1, 2, 1])
    items = np.array([5, 5, 6, 5, 5, 7])
    keep, report = clean(users, items, Cleaning(dedupe=True))
    assert keep.tolist() == [True, True, True, False, False, True]
    assert report == {"removed_duplicates": 2}


def test_minimum_counts_are_one_pass_each_in_order():
    # user 3 has one event; after removing it, item 9 has one event left.
    users = np.array([1, 1, 2, 2, 3, 1])
    items = np.array([8, 9, 8, 7, 9, 7])
    keep, report = clean(users, items, Cleaning(min_user_events=2, min_item_events=2))
    assert keep.tolist() == [True, False, True, True, False, True]
    assert report == {"removed_min_user_events": 1, "removed_min_item_events": 1}


def test_k_core_iterates_to_a_fixed_point():
    # A chain: removing user 3 leaves item 12 with one event, which then drops user 2's
    # count below 2, and so on.
    events = [(1, 10), (1, 11), (2, 11), (2, 12), (3, 12), (4, 10), (4, 11)]
    users, items = (np.array(x) for x in zip(*events, strict=True))
    keep, report = clean(users, items, Cleaning(k_core=2))
    assert keep.tolist() == k_core_reference(events, 2)
    assert keep.tolist() == [True, True, False, False, False, True, True]
    assert report == {"removed_k_core": 3}


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=80),
       k=st.integers(2, 4), dedupe=st.booleans())
def test_k_core_matches_reference_and_counts_add_up(events, k, dedupe):
    users = np.array([u for u, _ in events], dtype=np.int64)
    items = np.array([i for _, i in events], dtype=np.int64)
    keep, report = clean(users, items, Cleaning(dedupe=dedupe, k_core=k))
    deduped = list(dict.fromkeys(events)) if dedupe else events
    expected = k_core_reference(deduped, k)
    kept = [e for e, kept in zip(events, keep, strict=True) if kept]
    assert kept == [e for e, kept in zip(deduped, expected, strict=True) if kept]
    assert len(events) - sum(report.values()) == int(keep.sum())
    if kept:
        assert min(Counter(u for u, _ in kept).values()) >= k
        assert min(Counter(i for _, i in kept).values()) >= k


def test_negative_settings_rejected():
    with pytest.raises(ValueError, match="cleaning: k_core must be >= 0, got -2"):
        Cleaning(k_core=-2)
