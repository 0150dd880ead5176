"""Train / validation / test splits that never let a model see its own future.

Both work on a log already in time order with ties in a fixed order (the order
:func:`twotower.data.interactions.load_interactions` gives), so a split is a pure
function of the data: the same log always splits the same way.

- :func:`time_split`: one global cut-off; events before it train, events at or after
  it test (the streaming setting of the paper: train on days 1..D, test on D+1).
- :func:`leave_last_out`: per user, the last event tests and the second-to-last
  validates; users with fewer than three events train only.
- :func:`column_split`: the log says itself: a column of ``train``, ``valid`` and
  ``test`` (a split made elsewhere, for example by a benchmark's protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PARTS", "SPLITS", "Split", "column_split", "cutoff_for_fraction", "leave_last_out",
           "split_log", "time_split"]

SPLITS: tuple[str, ...] = ("time", "leave-last-out", "column")
PARTS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class Split:
    """Row indices (into the time-ordered log) of each part, each in time order."""

    kind: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    info: dict = field(default_factory=dict)

    def part(self, name: str) -> np.ndarray:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split part must be train, valid or test, got {name!r}")
        return getattr(self, name)

    def summary(self) -> dict:
        """Sizes and parameters, for reports."""
        return {"kind": self.kind, "train": len(self.train), "valid": len(self.valid),
                "test": len(self.test), **self.info}


def cutoff_for_fraction(timestamps: np.ndarray, test_fraction: float) -> int:
    """The cut-off that puts about the last ``test_fraction`` of events in the test set.

    It is the time of the first test event in time order; events tied with it test too,
    so the test share can be a little larger than asked.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if len(timestamps) == 0:
        raise ValueError("cannot split an empty log")
    ordered = np.sort(timestamps)
    return int(ordered[min(int(len(ordered) * (1 - test_fraction)), len(ordered) - 1)])


def time_split(timestamps: np.ndarray, cutoff: int) -> Split:
    """Events with ``timestamp < cutoff`` train, the rest test (no validation part)."""
    rows = np.arange(len(timestamps))
    before = timestamps < cutoff
    return Split("time", rows[before], np.zeros(0, dtype=np.int64), rows[~before],
                 {"cutoff": int(cutoff)})


def leave_last_out(users: np.ndarray) -> Split:
    """Per user: last event test, second-to-last validation, the rest train.

    ``users`` is ``[num_events]`` in time order; "last" is last in that order, so ties
    in time are broken by the log's fixed tie order. Users with fewer than three events
    have all their events in training (counted in ``info``).
    """
    n = len(users)
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    ends = np.append(np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1, n)
    starts = np.append(0, ends[:-1])
    eligible = (ends - starts) >= 3
    test = np.sort(order[ends[eligible] - 1])
    valid = np.sort(order[ends[eligible] - 2])
    is_train = np.ones(n, dtype=bool)
    is_train[test] = False
    is_train[valid] = False
    return Split("leave-last-out", np.flatnonzero(is_train), valid, test,
                 {"users_train_only": int((~eligible).sum()) if n else 0})


def column_split(parts: np.ndarray, column: str) -> Split:
    """Each event in the part its ``column`` value names: ``train``, ``valid`` or ``test``."""
    parts = np.asarray(parts).astype(str)
    unknown = sorted(str(v) for v in set(np.unique(parts)) - set(PARTS))
    if unknown:
        row = int(np.flatnonzero(~np.isin(parts, PARTS))[0])
        raise ValueError(f"split column {column!r} holds {unknown[:5]} (first at row {row} in "
                         f"time order); its values must be one of {PARTS}")
    train, valid, test = (np.flatnonzero(parts == name) for name in PARTS)
    return Split("column", train, valid, test, {"column": column})


def split_log(kind: str, users: np.ndarray, timestamps: np.ndarray, cutoff: int | None = None,
              test_fraction: float | None = None, column: str | None = None,
              parts: np.ndarray | None = None) -> Split:
    """The split ``kind`` of a time-ordered log: ``"time"`` at ``cutoff`` (or at the cut-off
    of ``test_fraction``), ``"leave-last-out"``, or ``"column"`` by the events' ``parts``
    (the values of the split column ``column``)."""
    if kind == "leave-last-out":
        return leave_last_out(users)
    if kind == "column":
        if column is None or parts is None:
            raise ValueError("a column split needs the split column and its values")
        return column_split(parts, column)
    if kind != "time":
        raise ValueError(f"split must be one of {SPLITS}, got {kind!r}")
    if cutoff is None:
        if test_fraction is None:
            raise ValueError("a time split needs a cutoff or a test fraction")
        cutoff = cutoff_for_fraction(timestamps, test_fraction)
    return time_split(timestamps, cutoff)
