"""Causal history features: for every event, the user's last items before it.

Built for the whole log at once with sorts and index arithmetic (no per-event loop):
events are ordered by (user, time, arrival), and an event's history is the slice of its
user's items that ends where its own (user, time) group starts, so events at the same
instant never see each other, or, with ``ordered`` ties, where the event itself stands,
so each sees those that came before it in the log. :class:`HistoryState` does the same for
a log that arrives in time-ordered pieces (record batches), carrying each user's tail
from piece to piece.

Which to use is the log's meaning of a tie. A log with coarse timestamps (a ratings log
with many ratings in the same second) keeps its order in the file, and a query at
serving holds every event before it, tied ones included: ``ordered`` trains on the
histories it will be served. Events that really happen at once (the items of one
basket) must not see each other: the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twotower.features import Bag, take_bag

__all__ = ["HistoryFeature", "HistoryState", "causal_history", "history_of", "last_n",
           "seen_before"]


@dataclass(frozen=True)
class HistoryFeature:
    """A query feature made of the user's past: ``column`` of the ``length`` newest items
    before the event (``column`` is the item key or any item-table column)."""

    name: str
    column: str
    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"history feature {self.name!r}: length must be >= 1, "
                             f"got {self.length}")


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """For sorted keys, the position where each row's run of equal keys begins."""
    n = len(keys[0])
    changed = np.zeros(n, dtype=bool)
    changed[:1] = True
    for key in keys:
        changed[1:] |= key[1:] != key[:-1]
    starts = np.flatnonzero(changed)
    return np.repeat(starts, np.diff(np.append(starts, n)))


def _history_ends(sorted_users: np.ndarray, sorted_times: np.ndarray,
                  ordered: bool) -> np.ndarray:
    """For events sorted by (user, time, arrival), where each one's history ends: at its
    own position (``ordered`` ties) or where its (user, time) group starts."""
    if ordered:
        return np.arange(len(sorted_users))
    return _group_starts(sorted_users, sorted_times)


def causal_history(users: np.ndarray, timestamps: np.ndarray, items: np.ndarray,
                   length: int, ordered: bool = False) -> Bag:
    """The last ``length`` items of each event's user before it: with a strictly earlier
    timestamp, or with ``ordered`` also those at the same time that come earlier in the
    input.

    Args:
        users, timestamps, items: ``[num_events]`` arrays, in any order.
        length: the most items a history keeps (the newest ones).
        ordered: whether events of one user at one instant see the earlier ones.

    Returns:
        A :class:`Bag` with one bag per event, in the events' order, oldest item first.
    """
    if length < 0:
        raise ValueError(f"history length must be >= 0, got {length}")
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))
    sorted_users, sorted_times = users[order], timestamps[order]
    user_start = _group_starts(sorted_users)
    end = _history_ends(sorted_users, sorted_times, ordered)
    start = np.maximum(end - length, user_start)
    lengths = end - start
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    in_sorted_order = Bag(items[order][index], offsets)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return take_bag(in_sorted_order, position)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(starts[i], ends[i])`` over ``i``, without a loop."""
    lengths = ends - starts
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])


def last_n(bag: Bag, n: int) -> Bag:
    """The last (newest) ``n`` ids of every bag."""
    lengths = np.minimum(np.diff(bag.offsets), n)
    offsets = np.zeros(len(bag) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = _ranges(bag.offsets[1:] - lengths, bag.offsets[1:])
    return Bag(bag.values[index], offsets, None if bag.weights is None else bag.weights[index])


def history_of(rows: Bag, values: np.ndarray | Bag) -> Bag:
    """A history of item rows turned into a history of an item attribute.

    ``values`` is one id per item row (``[num_items]``), or a :class:`Bag` per item row
    (for example an item's categories); then each event's bag is the concatenation of
    its history items' bags, oldest first.
    """
    if not isinstance(values, Bag):
        return Bag(values[rows.values], rows.offsets)
    per_item = take_bag(values, rows.values)
    return Bag(per_item.values, per_item.offsets[rows.offsets])


def seen_before(users: np.ndarray, timestamps: np.ndarray, items: np.ndarray,
                rows: np.ndarray, ordered: bool = False) -> Bag:
    """For events ``rows`` only, every item of the user before the event (as
    :func:`causal_history` has it, ``ordered`` ties included).

    The unbounded history, but gathered for the selected events alone, so a test set of
    one event per user costs one pass over the log rather than the square of it.
    """
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    sorted_users, sorted_times = users[order], timestamps[order]
    at = position[np.asarray(rows, dtype=np.int64)]
    start = _group_starts(sorted_users)[at]
    end = _history_ends(sorted_users, sorted_times, ordered)[at]
    offsets = np.zeros(len(at) + 1, dtype=np.int64)
    np.cumsum(end - start, out=offsets[1:])
    return Bag(items[order][_ranges(start, end)], offsets)


def _tails(users: np.ndarray, timestamps: np.ndarray, items: np.ndarray,
           length: int, ordered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user, what a later event can still see: the last ``length`` events (without
    ``ordered`` ties: the last ``length`` before the user's latest time and the last
    ``length`` at it); sorted by (user, time, arrival)."""
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))
    users, timestamps, items = users[order], timestamps[order], items[order]
    changed = np.ones(n, dtype=bool)
    changed[1:] = users[1:] != users[:-1]
    group = np.cumsum(changed) - 1
    ends = np.append(np.flatnonzero(changed)[1:], n)[group]
    position = np.arange(n)
    if ordered:
        keep = ends - 1 - position < length
    else:
        at_latest = timestamps == timestamps[ends - 1]
        latest_start = ends - np.bincount(group, weights=at_latest).astype(np.int64)[group]
        keep = np.where(at_latest, ends - 1 - position, latest_start - 1 - position) < length
    return users[keep], timestamps[keep], items[keep]


class HistoryState:
    """Causal history of a log that arrives in time-ordered pieces (record batches).

    Every piece is joined to the carried tails of its users (see :func:`_tails`), its
    histories come from :func:`causal_history` on that join, and the tails are replaced.
    The result equals :func:`causal_history` over the whole log; the work per piece is
    proportional to the piece and the stored tails (at most ``2 * length`` rows a user),
    never to the log. Pieces must not go back in time: the caller checks that.
    """

    def __init__(self, length: int, ordered: bool = False) -> None:
        if length < 0:
            raise ValueError(f"history length must be >= 0, got {length}")
        self.length = length
        self.ordered = ordered
        empty = np.zeros(0, dtype=np.int64)
        # Tails of every user seen so far, sorted by (user, time, arrival).
        self.users, self.timestamps, self.items = empty, empty, empty

    def extend(self, users: np.ndarray, timestamps: np.ndarray, items: np.ndarray) -> Bag:
        """Histories (``length`` newest items before each event) of the next piece."""
        keys = np.unique(users)
        carried = _ranges(np.searchsorted(self.users, keys, "left"),
                          np.searchsorted(self.users, keys, "right"))
        joined_users = np.concatenate([self.users[carried], users])
        joined_times = np.concatenate([self.timestamps[carried], timestamps])
        joined_items = np.concatenate([self.items[carried], items])
        history = take_bag(causal_history(joined_users, joined_times, joined_items, self.length,
                                          self.ordered),
                           np.arange(len(carried), len(joined_users)))
        keep = np.ones(len(self.users), dtype=bool)
        keep[carried] = False
        old = self.users[keep], self.timestamps[keep], self.items[keep]
        new = _tails(joined_users, joined_times, joined_items, self.length, self.ordered)
        # Old and new tails are each sorted by user, and no user is in both: merge them.
        at = np.searchsorted(old[0], new[0]) + np.arange(len(new[0]))
        slots = np.ones(len(old[0]) + len(new[0]), dtype=bool)
        slots[at] = False
        merged = []
        for old_part, new_part in zip(old, new, strict=True):
            out = np.empty(len(slots), dtype=np.int64)
            out[at], out[slots] = new_part, old_part
            merged.append(out)
        self.users, self.timestamps, self.items = merged
        return history
