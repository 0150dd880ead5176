"""Optional cleaning of a log: de-duplication, minimum counts, k-core filtering.

Each step is a vectorised mask over the events (a k-core takes a few passes, each a
pair of ``bincount``), and each reports how many events it removed, so nothing leaves
the log without a count. The steps run in a fixed order: duplicates, then users with
too few events, then items with too few, then the k-core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Cleaning", "clean"]


@dataclass(frozen=True)
class Cleaning:
    """Which cleaning steps to run (all off by default).

    ``dedupe`` keeps the first (earliest) event of each (user, item) pair;
    ``min_user_events`` / ``min_item_events`` drop the events of users / items with fewer
    events (one pass each, counted after the steps before); ``k_core`` repeats both
    until every remaining user and item has at least ``k_core`` events.
    """

    dedupe: bool = False
    min_user_events: int = 0
    min_item_events: int = 0
    k_core: int = 0

    def __post_init__(self) -> None:
        for name in ("min_user_events", "min_item_events", "k_core"):
            if getattr(self, name) < 0:
                raise ValueError(f"cleaning: {name} must be >= 0, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return bool(self.dedupe or self.min_user_events > 1 or self.min_item_events > 1
                    or self.k_core > 1)


def _codes(keys: np.ndarray) -> tuple[np.ndarray, int]:
    uniques, codes = np.unique(keys, return_inverse=True)
    return codes.reshape(-1), len(uniques)


def _enough(codes: np.ndarray, size: int, keep: np.ndarray, minimum: int) -> np.ndarray:
    """Events (among ``keep``) whose key has at least ``minimum`` kept events."""
    counts = np.bincount(codes[keep], minlength=size)
    return keep & (counts[codes] >= minimum)


def clean(users: np.ndarray, items: np.ndarray, cleaning: Cleaning) -> tuple[np.ndarray, dict]:
    """``(keep, report)``: a mask of the events to keep and the events each step removed.

    ``users`` and ``items`` are ``[num_events]`` keys in time order (ties in a fixed
    order), so "first" means earliest.
    """
    keep = np.ones(len(users), dtype=bool)
    report: dict[str, int] = {}
    if not cleaning.active:
        return keep, report
    user_codes, num_users = _codes(users)
    item_codes, num_items = _codes(items)
    if cleaning.dedupe:
        pair = user_codes.astype(np.int64) * num_items + item_codes
        _, first = np.unique(pair, return_index=True)
        keep = np.zeros(len(users), dtype=bool)
        keep[first] = True
        report["removed_duplicates"] = int(len(users) - len(first))
    for name, codes, size in (("min_user_events", user_codes, num_users),
                              ("min_item_events", item_codes, num_items)):
        minimum = getattr(cleaning, name)
        if minimum > 1:
            before = int(keep.sum())
            keep = _enough(codes, size, keep, minimum)
            report[f"removed_{name}"] = before - int(keep.sum())
    if cleaning.k_core > 1:
        before = int(keep.sum())
        while True:
            kept = int(keep.sum())
            keep = _enough(user_codes, num_users, keep, cleaning.k_core)
            keep = _enough(item_codes, num_items, keep, cleaning.k_core)
            if int(keep.sum()) == kept:
                break
        report["removed_k_core"] = before - int(keep.sum())
    return keep, report
