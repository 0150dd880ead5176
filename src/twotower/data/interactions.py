"""An interaction log and its item corpus, validated, in time order, with histories.

Events (one row per training example) name a user, an item, a time and optionally a
reward; items (one row per corpus item) name the item and its features. Loading checks
both and says what is wrong and where; it never drops a row silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twotower.data.history import causal_history
from twotower.features import Bag
from twotower.hashing import to_int64_ids

__all__ = ["Columns", "Interactions", "load_interactions", "read_table"]

HISTORY = "history"


@dataclass(frozen=True)
class Columns:
    """Which columns of the events and items tables mean what."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    reward: str | None = "reward"
    item_features: tuple[str, ...] = ("channel", "category")
    history_length: int = 20


@dataclass
class Interactions:
    """Events in time order (ties kept in file order) and the item corpus.

    ``item_row[e]`` is the row of event ``e``'s item in ``items``; ``history`` holds,
    per event, the keys of the user's last items strictly before it.
    """

    columns: Columns
    user: np.ndarray
    item: np.ndarray
    item_row: np.ndarray
    timestamp: np.ndarray
    reward: np.ndarray
    history: Bag
    items: pa.Table
    item_keys: np.ndarray
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item)

    def query_columns(self) -> dict[str, object]:
        """The raw query features of every event, by feature name."""
        return {self.columns.user: self.user, HISTORY: self.history}

    def item_columns(self) -> dict[str, object]:
        """The raw item features of every corpus item, by feature name."""
        columns: dict[str, object] = {self.columns.item: self.item_keys}
        for name in self.columns.item_features:
            columns[name] = self.items.column(name)
        return columns

    def split_at(self, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
        """Global time split: rows before ``cutoff`` train, rows at or after it test."""
        rows = np.arange(len(self))
        before = self.timestamp < cutoff
        return rows[before], rows[~before]

    def item_rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows in ``items`` of the item ``keys`` (which must all be in the corpus)."""
        order = np.argsort(self.item_keys, kind="stable")
        position = np.searchsorted(self.item_keys, keys, sorter=order)
        rows = order[np.minimum(position, len(order) - 1)]
        if not np.array_equal(self.item_keys[rows], keys):
            raise KeyError("some keys are not in the items table")
        return rows

    def item_counts(self, rows: np.ndarray) -> np.ndarray:
        """``[num_items]`` number of events of each corpus item among ``rows``."""
        return np.bincount(self.item_row[rows], minlength=len(self.item_keys))


def read_table(path: str | Path, what: str) -> pa.Table:
    """Read a Parquet or CSV file, with an error that names the file if it cannot."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    else:
        table = pq.read_table(path)
    if table.num_rows == 0:
        raise ValueError(f"{what} file {path} has no rows")
    return table


def _column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise KeyError(f"{where}: column {name!r} not found; columns are {table.column_names}")
    column = table.column(name)
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{where}: column {name!r} has {column.null_count} null value(s), "
                         f"first at row {first}")
    return column


def _ids(table: pa.Table, name: str, where: str) -> np.ndarray:
    try:
        return to_int64_ids(_column(table, name, where))
    except TypeError as error:
        raise TypeError(f"{where}: column {name!r}: {error}") from None


def _timestamps(table: pa.Table, name: str, where: str) -> np.ndarray:
    column = _column(table, name, where)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = pc.cast(column, pa.int64()) if pa.types.is_timestamp(column.type) else \
            pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    elif not pa.types.is_integer(column.type):
        raise TypeError(f"{where}: column {name!r} must hold integer times or timestamps, "
                        f"got {column.type}")
    return column.to_numpy().astype(np.int64)


def _rewards(table: pa.Table, name: str | None, where: str) -> np.ndarray:
    if name is None:
        return np.ones(table.num_rows, dtype=np.float32)
    column = _column(table, name, where)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise TypeError(f"{where}: reward column {name!r} must be numeric, got {column.type}")
    reward = column.to_numpy().astype(np.float32)
    bad = ~np.isfinite(reward) | (reward < 0)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"{where}: reward column {name!r} has {int(bad.sum())} NaN, infinite "
                         f"or negative value(s), first at row {first} ({reward[first]})")
    return reward


def load_interactions(events: str | Path | pa.Table, items: str | Path | pa.Table,
                      columns: Columns | None = None,
                      missing_items: str = "error") -> Interactions:
    """Load, check and order an interaction log against its item corpus.

    Args:
        events, items: Parquet/CSV paths or Arrow tables.
        missing_items: what to do with events whose item is not in the items table:
            ``"error"`` (default) or ``"drop"`` (dropped rows are counted in ``report``).
    """
    columns = columns or Columns()
    where_events = f"events {events}" if not isinstance(events, pa.Table) else "events"
    where_items = f"items {items}" if not isinstance(items, pa.Table) else "items"
    events = events if isinstance(events, pa.Table) else read_table(events, "events")
    items = items if isinstance(items, pa.Table) else read_table(items, "items")

    item_keys = _ids(items, columns.item, where_items)
    unique_keys, first, counts = np.unique(item_keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = unique_keys[counts > 1]
        raise ValueError(f"{where_items}: {len(dup)} duplicate item key(s) in column "
                         f"{columns.item!r}, for example {dup[:5].tolist()}")
    for name in columns.item_features:
        _column(items, name, where_items)

    user = _ids(events, columns.user, where_events)
    item = _ids(events, columns.item, where_events)
    timestamp = _timestamps(events, columns.timestamp, where_events)
    reward = _rewards(events, columns.reward, where_events)

    position = np.clip(np.searchsorted(unique_keys, item), 0, len(unique_keys) - 1)
    known = unique_keys[position] == item
    report = {"events_read": len(item), "events_unknown_item": int((~known).sum())}
    if not known.all():
        if missing_items != "drop":
            rows = np.flatnonzero(~known)
            raise ValueError(f"{where_events}: {len(rows)} event(s) name an item missing from "
                             f"the items table, first at row {int(rows[0])} (item "
                             f"{int(item[rows[0]])}); pass missing_items='drop' to skip them")
        user, item, timestamp, reward = user[known], item[known], timestamp[known], reward[known]
        position = position[known]
    item_row = first[position]

    order = np.argsort(timestamp, kind="stable")
    user, item, timestamp, reward = user[order], item[order], timestamp[order], reward[order]
    history = causal_history(user, timestamp, item, columns.history_length)
    report["events_kept"] = len(item)
    return Interactions(columns, user, item, item_row[order], timestamp, reward, history,
                        items, item_keys, report)
