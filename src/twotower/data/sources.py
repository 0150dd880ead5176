"""A schema's tables on disk: found, checked against the features, read whole.

Events and items are a Parquet or CSV file each, or a directory of them (read as one
pyarrow dataset), or a MovieLens directory. Every column a schema names is checked
before any row is read: present (with a suggestion for a misspelling) and of a type
its feature kind can use.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from twotower.data import checks
from twotower.data.interactions import Interactions, lists_from_text, load_interactions
from twotower.data.schema import FeatureConfig, Schema

__all__ = ["check_features", "event_columns", "events_dataset", "load", "read_items",
           "read_tables", "refuse_repeated_files"]


def refuse_repeated_files(dataset: ds.Dataset, location: Path, what: str) -> ds.Dataset:
    """``dataset``, once no file of it is another one reached again through a link.

    pyarrow follows symbolic links inside a directory: a link to the directory itself
    (or to a parent) made it read the same files some forty times over, and training went
    on, silently, on every event forty times.
    """
    seen: dict[str, str] = {}
    for name in dataset.files:
        real = os.path.realpath(name)
        if real in seen:
            raise ValueError(f"{what} {location}: {name} is {seen[real]} again, reached "
                             "through a symbolic link (a loop or a second link to the same "
                             "file): its rows would be read twice; remove the link")
        seen[real] = name
    return dataset


def _dataset(path: str, what: str) -> ds.Dataset:
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"{what} file not found: {location}")
    files = sorted(location.rglob("*")) if location.is_dir() else [location]
    suffixes = {f.suffix for f in files if f.is_file() and not f.name.startswith((".", "_"))}
    if location.is_dir() and not suffixes & {".parquet", ".csv"}:
        raise FileNotFoundError(f"{what} directory {location} holds no .parquet or .csv files")
    file_format = "csv" if (".csv" in suffixes and ".parquet" not in suffixes) else "parquet"
    try:
        dataset = ds.dataset(str(location), format=file_format)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{what} {location}: cannot read as {file_format}: {error}") from None
    try:
        rows = dataset.count_rows()  # reads a CSV file whole
    except (pa.ArrowInvalid, OSError) as error:
        raise unreadable(error, f"{what} {location}") from None
    if rows == 0:
        raise ValueError(f"{what} file {location} has no rows")
    return refuse_repeated_files(dataset, location, what)


def unreadable(error: Exception, where: str) -> ValueError:
    """The error for a table pyarrow cannot read, naming it: pyarrow's own message names
    neither the file nor the cause of the commonest case, a CSV line over its 1 MiB block
    ("straddling object straddles two block boundaries")."""
    hint = " (a CSV line longer than 1 MiB: a quote left open, or not a CSV file?)" \
        if "straddl" in str(error) else ""
    return ValueError(f"{where}: cannot read: {error}{hint}")


def read_whole(dataset: ds.Dataset, where: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of ``dataset`` (``columns`` only, if given); an unreadable file is an error
    naming ``where``."""
    try:
        return dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise unreadable(error, where) from None


def events_dataset(schema: Schema) -> ds.Dataset:
    """The events as a pyarrow dataset (for reading in record batches)."""
    if schema.movielens is not None:
        raise ValueError("MovieLens files are text; read them in memory, or convert them to "
                         "Parquet first to stream them")
    return _dataset(schema.events.path, "events")


def event_columns(schema: Schema) -> list[str]:
    """Every events column the schema reads."""
    roles = [schema.events.user, schema.events.item, schema.events.time, schema.events.reward]
    return list(dict.fromkeys([c for c in roles if c is not None] + schema.context()))


_KINDS = {
    "id": ("integers or strings", lambda t: pa.types.is_integer(t) or pa.types.is_string(t)
           or pa.types.is_large_string(t) or pa.types.is_binary(t)),
    "id_list": ("lists of integers or strings",
                lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t))
                and _KINDS["id"][1](t.value_type)),
    "dense": ("numbers", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)
              or pa.types.is_boolean(t)),
}


def _check_kind(schema: pa.Schema, column: str, kind: str, feature: str, where: str) -> None:
    checks.check_columns([column], schema.names, where)
    expected, accepts = _KINDS[kind]
    found = schema.field(column).type
    if not accepts(found):
        raise TypeError(f"{where}: column {column!r} (feature {feature!r}, kind {kind}) must "
                        f"hold {expected}, got {found}; fix the column or the feature's kind")


def _history_kind(items: pa.Schema, feature: FeatureConfig) -> str:
    found = items.field(feature.history).type if feature.history in items.names else None
    is_list = found is not None and (pa.types.is_list(found) or pa.types.is_large_list(found))
    return "id_list" if is_list else "id"


def check_features(schema: Schema, events: pa.Schema, items: pa.Schema, where_events: str,
                   where_items: str) -> None:
    """Every column the features read exists and suits the feature's kind."""
    checks.check_columns(event_columns(schema), events.names, where_events)
    checks.check_columns([schema.items.key], items.names, where_items)
    for feature in schema.item_features:
        _check_kind(items, feature.name, feature.kind, feature.name, where_items)
    for feature in schema.query_features:
        if feature.history is not None:
            kind = _history_kind(items, feature)
            if feature.kind == "sequence" and kind == "id_list":
                raise TypeError(f"{where_items}: sequence feature {feature.name!r} reads "
                                f"{feature.history!r}, a list column; a sequence is one id per "
                                "item (use kind id_list for a bag of the items' lists)")
            _check_kind(items, feature.history, kind, feature.name,
                        f"{where_items} (history feature {feature.name!r})")
        elif feature.name != schema.events.user:
            _check_kind(events, feature.name, feature.kind, feature.name, where_events)


def read_items(schema: Schema) -> tuple[pa.Table, str]:
    """The whole items table of a file-based schema and how messages name it."""
    where = f"items {schema.items.path}"
    items = read_whole(_dataset(schema.items.path, "items"), where)
    lists = [f.name for f in schema.item_features if f.kind == "id_list"]
    return lists_from_text(items, lists), where


def read_tables(schema: Schema) -> tuple[pa.Table, pa.Table, str, str]:
    """``(events, items, where_events, where_items)``: the events columns the schema reads
    and the whole items table, with the names messages use for them."""
    if schema.movielens is not None:
        from twotower.data.movielens import read_movielens

        events, items, _ = read_movielens(schema.movielens)
        where = f"{schema.movielens} (MovieLens)"
        checks.check_columns(event_columns(schema), events.column_names, f"events {where}")
        return events.select(event_columns(schema)), items, f"events {where}", f"items {where}"
    dataset = _dataset(schema.events.path, "events")
    items, where_items = read_items(schema)
    where = f"events {schema.events.path}"
    checks.check_columns(event_columns(schema), dataset.schema.names, where)
    return read_whole(dataset, where, event_columns(schema)), items, where, where_items


def load(schema: Schema) -> Interactions:
    """Read, check, clean and order a schema's log, with its history features, in memory."""
    events, items, where_events, where_items = read_tables(schema)
    check_features(schema, events.schema, items.schema, where_events, where_items)
    return load_interactions(events, items, schema.columns(), schema.missing_items,
                             schema.cleaning_steps(), schema.histories(), schema.context(),
                             where=(where_events, where_items))
