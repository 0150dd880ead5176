"""The item corpus: every item the index will hold, checked once, looked up by key.

The items table is small next to the events (one row per item), so it is always held
in memory; events, in memory or streamed, are matched against it by key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from twotower.data import checks
from twotower.features import Bag, bag_from_arrow

__all__ = ["ItemCorpus"]


@dataclass(frozen=True)
class ItemCorpus:
    """The items table with its keys; ``lookup`` maps event item keys to table rows."""

    table: pa.Table
    key_column: str
    keys: np.ndarray
    _sorted_keys: np.ndarray
    _sorted_rows: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table, key: str, where: str = "items") -> ItemCorpus:
        """Check the key column (present, no nulls, ids, unique) and index it."""
        if table.num_rows == 0:
            raise ValueError(f"{where} has no rows; the items table must list every item")
        keys = checks.ids(table, key, where)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        repeated = sorted_keys[1:] == sorted_keys[:-1]
        if repeated.any():
            dup = np.unique(sorted_keys[1:][repeated])
            raise ValueError(f"{where}: {len(dup)} duplicate item key(s) in column {key!r}, "
                             f"for example {dup[:5].tolist()}; keep one row per item")
        return cls(table, key, keys, sorted_keys, order)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, known)``: the table row of each key, and whether the key is an item.

        ``rows`` is only meaningful where ``known`` is true.
        """
        position = np.searchsorted(self._sorted_keys, keys)
        position = np.minimum(position, len(self._sorted_keys) - 1)
        known = self._sorted_keys[position] == keys
        return self._sorted_rows[position], known

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys``, which must all be items."""
        rows, known = self.lookup(keys)
        if not known.all():
            raise KeyError(f"{int((~known).sum())} key(s) are not in the items table, "
                           f"for example {keys[~known][:5].tolist()}")
        return rows

    def values(self, name: str, where: str = "items") -> np.ndarray | Bag:
        """Column ``name`` per item row: ``int64`` ids, or a :class:`Bag` for a list column."""
        if name == self.key_column:
            return self.keys
        checks.check_columns([name], self.table.column_names, where)
        values = self.table.column(name)
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            return bag_from_arrow(values, name)
        return checks.ids(self.table, name, where)
