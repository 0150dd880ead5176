"""Column checks shared by every reader: each error names where, which column, which row.

``where`` is a short description of the table (``"events data/events.parquet"``) and
``first_row`` the number of the table's first row in its file (record batches of a
stream start past 0), so a message always points at a row a user can look up.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.hashing import to_int64_ids

__all__ = ["MissingColumnError", "check_columns", "column", "ids", "rewards", "times"]


class MissingColumnError(KeyError):
    """A column a schema names is not in the table (a ``KeyError`` with a readable text)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_columns(names: Sequence[str], available: Sequence[str], where: str) -> None:
    """Raise :class:`MissingColumnError` for the first of ``names`` not in ``available``."""
    for name in names:
        if name not in available:
            hint = _suggest(name, available)
            raise MissingColumnError(f"{where}: column {name!r} not found{hint}; "
                                     f"columns are {list(available)}")


def column(table: pa.Table | pa.RecordBatch, name: str, where: str,
           first_row: int = 0) -> pa.ChunkedArray | pa.Array:
    """Column ``name``, which must exist and hold no nulls."""
    check_columns([name], table.column_names, where)
    values = table.column(name)
    if values.null_count:
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        first = first_row + int(np.flatnonzero(nulls)[0])
        raise ValueError(f"{where}: column {name!r} has {values.null_count} null value(s), "
                         f"first at row {first}")
    return values


def _no_nul(values: pa.ChunkedArray | pa.Array, name: str, where: str, first_row: int) -> None:
    """A NUL character is in no real id, and one in a CSV file turned its whole column into
    text: every user's integer id was then hashed as text, unlike the integers a client
    sends, and training went on with nothing said."""
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return
    found = pc.match_substring(values, "\x00").to_numpy(zero_copy_only=False)
    if found.any():
        row = int(np.flatnonzero(found)[0])
        raise ValueError(f"{where}: column {name!r} row {first_row + row} holds a NUL "
                         f"character ({values[row].as_py()!r}): a damaged file? Remove it")


def ids(table: pa.Table | pa.RecordBatch, name: str, where: str, first_row: int = 0) -> np.ndarray:
    """An id column (integers or strings, no NUL characters) as ``int64`` keys."""
    values = column(table, name, where, first_row)
    _no_nul(values, name, where, first_row)
    try:
        return to_int64_ids(values)
    except TypeError as error:
        raise TypeError(f"{where}: column {name!r}: {error}") from None


def times(table: pa.Table | pa.RecordBatch, name: str, where: str,
          first_row: int = 0) -> np.ndarray:
    """A time or ordering column as ``int64`` (timestamps in their unit, dates in seconds)."""
    values = column(table, name, where, first_row)
    if pa.types.is_date(values.type):
        values = pc.cast(values, pa.timestamp("s"))
    if pa.types.is_timestamp(values.type):
        values = pc.cast(values, pa.int64())
    elif not pa.types.is_integer(values.type):
        raise TypeError(f"{where}: column {name!r} must hold integer times or timestamps "
                        f"(an ordering such as a position works too), got {values.type}")
    return values.to_numpy().astype(np.int64)


def rewards(table: pa.Table | pa.RecordBatch, name: str | None, where: str,
            first_row: int = 0) -> np.ndarray:
    """The reward column as ``float32`` (all ones without one); finite and >= 0."""
    if name is None:
        return np.ones(table.num_rows, dtype=np.float32)
    values = column(table, name, where, first_row)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise TypeError(f"{where}: reward column {name!r} must be numeric, got {values.type}")
    reward = values.to_numpy().astype(np.float32)
    bad = ~np.isfinite(reward) | (reward < 0)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"{where}: reward column {name!r} has {int(bad.sum())} NaN, infinite "
                         f"or negative value(s), first at row {first_row + first} "
                         f"({reward[first]}); fix or drop those rows")
    return reward
