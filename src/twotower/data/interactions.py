"""An interaction log and its item corpus, validated, in time order, with histories.

Events (one row per training example) name a user, an item, a time and optionally a
reward; items (one row per corpus item) name the item and its features. Loading checks
both and says what is wrong and where; it never drops a row silently: every removed
event is counted in :attr:`Interactions.report`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twotower.data import checks
from twotower.data.cleaning import Cleaning, clean
from twotower.data.corpus import ItemCorpus
from twotower.data.history import HistoryFeature, causal_history, history_of, last_n, seen_before
from twotower.data.splits import time_split
from twotower.features import Bag

__all__ = ["HISTORY", "LIST_SEPARATOR", "Columns", "Interactions", "item_columns",
           "lists_from_text", "load_interactions", "read_table", "unknown_items"]

HISTORY = "history"
Ties = Literal["simultaneous", "ordered"]
TIES: tuple[str, ...] = get_args(Ties)
MISSING_ITEMS: tuple[str, ...] = ("error", "drop")


@dataclass(frozen=True)
class Columns:
    """Which columns of the events and items tables mean what.

    ``item`` names the item column of the events and ``item_key`` the key column of the
    items table (default: the same name). ``history_length`` is the length of the default
    ``history`` query feature (the keys of the user's last items); a schema's history
    features may use any length up to it. ``ties``: whether a user's events at the same
    time see each other in file order (``ordered``) or not at all (``simultaneous``;
    :mod:`twotower.data.history` says when to use which).
    """

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    reward: str | None = "reward"
    item_features: tuple[str, ...] = ("channel", "category")
    history_length: int = 20
    item_key: str | None = None
    ties: Ties = "simultaneous"

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties!r}")

    @property
    def ordered(self) -> bool:
        """Whether events at the same time see the earlier ones in the log."""
        return self.ties == "ordered"

    @property
    def key(self) -> str:
        """The items table's key column."""
        return self.item_key or self.item


@dataclass
class Interactions:
    """Events in time order (ties kept in file order) and the item corpus.

    ``item_row[e]`` is the row of event ``e``'s item in ``items``; ``history_rows`` holds,
    per event, the item rows of the user's last ``columns.history_length`` items before it
    (``history`` the same as item keys). ``context`` holds further query features by name:
    event columns and history features of a schema.
    """

    columns: Columns
    user: np.ndarray
    item: np.ndarray
    item_row: np.ndarray
    timestamp: np.ndarray
    reward: np.ndarray
    history_rows: Bag
    items: pa.Table
    item_keys: np.ndarray
    report: dict = field(default_factory=dict)
    context: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item)

    @cached_property
    def history(self) -> Bag:
        """Per event, the keys of the user's last items before it (oldest first)."""
        return history_of(self.history_rows, self.item_keys)

    def seen_before(self, rows: np.ndarray) -> Bag:
        """For events ``rows``, the item rows of everything their user had before them
        (the items an evaluation excludes), ties as the histories have them."""
        return seen_before(self.user, self.timestamp, self.item_row, rows, self.columns.ordered)

    def query_columns(self, names: Iterable[str] | None = None) -> dict[str, object]:
        """The raw query features of every event, by feature name (default: all)."""
        available = [self.columns.user, HISTORY, *self.context]
        wanted = available if names is None else [n for n in names if n in available]
        return {name: self._query_column(name) for name in wanted}

    def _query_column(self, name: str) -> object:
        if name in self.context:
            return self.context[name]
        return self.user if name == self.columns.user else self.history

    def item_columns(self) -> dict[str, object]:
        """The raw item features of every corpus item, by feature name."""
        return item_columns(self.columns, self.items, self.item_keys)

    def split_at(self, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
        """Global time split: rows before ``cutoff`` train, rows at or after it test."""
        split = time_split(self.timestamp, cutoff)
        return split.train, split.test

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


def item_columns(columns: Columns, items: pa.Table, keys: np.ndarray) -> dict[str, object]:
    """The item key and item feature columns of the items table, by feature name."""
    found: dict[str, object] = {columns.key: keys}
    for name in columns.item_features:
        if name != columns.key:
            found[name] = items.column(name)
    return found


LIST_SEPARATOR = "|"  # how a text (CSV) column spells a list of ids: "a|b|c"


def lists_from_text(table: pa.Table, names: Iterable[str]) -> pa.Table:
    """``table`` with its text columns among ``names`` as lists of ids: CSV has no list
    type, so ``"a|b|c"`` holds the ids ``a``, ``b`` and ``c`` (an empty cell holds none)."""
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        lists = pc.split_pattern(pc.fill_null(column, ""), LIST_SEPARATOR).combine_chunks()
        ids = pc.utf8_trim_whitespace(lists.flatten())
        keep = pc.not_equal(ids, "")
        counts = np.bincount(pc.list_parent_indices(lists).filter(keep).to_numpy(),
                             minlength=len(lists))
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
        table = table.set_column(table.column_names.index(name), name,
                                 pa.ListArray.from_arrays(offsets, ids.filter(keep)))
    return table


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


def unknown_items(known: np.ndarray, item: np.ndarray, missing_items: str, where: str,
                  first_row: int = 0) -> int:
    """Count events whose item is not in the corpus; raise if ``missing_items`` is error."""
    if missing_items not in MISSING_ITEMS:
        raise ValueError(f"missing_items must be one of {MISSING_ITEMS}, got {missing_items!r}")
    count = int((~known).sum())
    if count and missing_items == "error":
        row = int(np.argmin(known))
        raise ValueError(f"{where}: {count} event(s) name an item missing from the items "
                         f"table, first at row {first_row + row} (item {int(item[row])}); "
                         "add the items, or pass missing_items='drop' (schema: "
                         "`missing_items: drop`, CLI: --drop-unknown-items) to skip and "
                         "count them")
    return count


def history_features(history_rows: Bag, corpus: ItemCorpus,
                     histories: Sequence[HistoryFeature], where: str) -> dict[str, Bag]:
    """Each history feature's bags: its item column over the newest ``length`` history items."""
    return {h.name: history_of(last_n(history_rows, h.length),
                               corpus.values(h.column, f"{where} (history feature {h.name!r})"))
            for h in histories}


def load_interactions(events: str | Path | pa.Table, items: str | Path | pa.Table,
                      columns: Columns | None = None, missing_items: str = "error",
                      cleaning: Cleaning | None = None,
                      histories: Sequence[HistoryFeature] = (),
                      context: Sequence[str] = (),
                      where: tuple[str, str] | None = None) -> Interactions:
    """Load, check, clean and order an interaction log against its item corpus.

    Args:
        events, items: Parquet/CSV paths or Arrow tables.
        missing_items: what to do with events whose item is not in the items table:
            ``"error"`` (default) or ``"drop"`` (dropped rows are counted in ``report``).
        cleaning: optional de-duplication, minimum counts and k-core (counted too).
        histories: history features to build (any length up to ``history_length``).
        context: further event columns to keep as query features, by name.
        where: how messages name the events and items (default: their paths).
    """
    columns = columns or Columns()
    where_events, where_items = where or (
        f"events {events}" if not isinstance(events, pa.Table) else "events",
        f"items {items}" if not isinstance(items, pa.Table) else "items")
    events = events if isinstance(events, pa.Table) else read_table(events, "events")
    items = items if isinstance(items, pa.Table) else read_table(items, "items")

    corpus = ItemCorpus.from_table(items, columns.key, where_items)
    checks.check_columns(columns.item_features, items.column_names, where_items)
    if events.num_rows == 0:
        raise ValueError(f"{where_events} has no rows")
    user = checks.ids(events, columns.user, where_events)
    item = checks.ids(events, columns.item, where_events)
    timestamp = checks.times(events, columns.timestamp, where_events)
    reward = checks.rewards(events, columns.reward, where_events)
    for name in context:
        checks.check_columns([name], events.column_names, where_events)
        if not pa.types.is_list(events.schema.field(name).type):
            checks.column(events, name, where_events)  # nulls; an empty list is a fine bag
    too_long = [h.name for h in histories if h.length > columns.history_length]
    if too_long:
        raise ValueError(f"history features {too_long} are longer than history_length "
                         f"{columns.history_length}")

    item_row, known = corpus.lookup(item)
    report = {"events_read": len(item),
              "events_unknown_item": unknown_items(known, item, missing_items, where_events)}
    rows = np.flatnonzero(known)
    rows = rows[np.argsort(timestamp[rows], kind="stable")]
    keep, cleaned = clean(user[rows], item[rows], cleaning or Cleaning())
    rows = rows[keep]
    report.update(cleaned)
    report["events_kept"] = len(rows)

    user, item, timestamp = user[rows], item[rows], timestamp[rows]
    history_rows = causal_history(user, timestamp, item_row[rows], columns.history_length,
                                  columns.ordered)
    extra = {name: events.column(name).take(pa.array(rows)) for name in context}
    extra.update(history_features(history_rows, corpus, histories, where_items))
    return Interactions(columns, user, item, item_row[rows], timestamp, reward[rows],
                        history_rows, items, corpus.keys, report, extra)
