"""Causal history features: for every event, the user's last items strictly before it.

Built for the whole log at once with sorts and index arithmetic (no per-event loop):
events are ordered by (user, time), and an event's history is the slice of its user's
items that ends where its own (user, time) group starts, so events at the same instant
never see each other.
"""

from __future__ import annotations

import numpy as np

from twotower.features import Bag, take_bag

__all__ = ["causal_history"]


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """For sorted keys, the position where each row's run of equal keys begins."""
    n = len(keys[0])
    changed = np.zeros(n, dtype=bool)
    changed[:1] = True
    for key in keys:
        changed[1:] |= key[1:] != key[:-1]
    starts = np.flatnonzero(changed)
    return np.repeat(starts, np.diff(np.append(starts, n)))


def causal_history(users: np.ndarray, timestamps: np.ndarray, items: np.ndarray,
                   length: int) -> Bag:
    """The last ``length`` items of each event's user with a strictly earlier timestamp.

    Args:
        users, timestamps, items: ``[num_events]`` arrays, in any order.
        length: the most items a history keeps (the newest ones).

    Returns:
        A :class:`Bag` with one bag per event, in the events' order, oldest item first.
        Among events of one user at one instant, history follows input order for earlier
        instants only.
    """
    if length < 0:
        raise ValueError(f"history length must be >= 0, got {length}")
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))
    sorted_users, sorted_times = users[order], timestamps[order]
    user_start = _group_starts(sorted_users)
    end = _group_starts(sorted_users, sorted_times)
    start = np.maximum(end - length, user_start)
    lengths = end - start
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    in_sorted_order = Bag(items[order][index], offsets)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return take_bag(in_sorted_order, position)
