"""Reading a schema's tables: text (CSV) list columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pcsv

from twotower.data.schema import parse_schema
from twotower.data.sources import read_items


def test_a_csv_id_list_column_is_read_as_lists_of_ids(tmp_path):
    table = pa.table({"item_id": [1, 2, 3, 4], "genres": ["a|b|c", "", None, " d | e|"],
                      "title": ["x|y", "z", "w", "v"]})
    pcsv.write_csv(table, tmp_path / "items.csv")
    schema = parse_schema({
        "events": {"path": "events.csv"}, "items": {"path": str(tmp_path / "items.csv")},
        "query_features": [{"name": "user_id", "kind": "id"}],
        "item_features": [{"name": "item_id", "kind": "id"},
                          {"name": "genres", "kind": "id_list"},
                          {"name": "title", "kind": "id"}]})
    items, _ = read_items(schema)
    assert items.column("genres").to_pylist() == [["a", "b", "c"], [], [], ["d", "e"]]
    assert items.column("title").to_pylist() == ["x|y", "z", "w", "v"]  # an id stays text


def test_a_symlink_loop_in_an_events_directory_is_refused_naming_the_link(tmp_path):
    """pyarrow follows a link to the directory itself and read each file ~40 times over."""
    import pyarrow.parquet as pq
    import pytest

    from twotower.data.sources import events_dataset
    from twotower.follow import _read_partition

    events = tmp_path / "events"
    events.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [5, 6]}),
                   events / "part-0.parquet")
    schema = parse_schema({
        "events": {"path": str(events)}, "items": {"path": "items.parquet"},
        "query_features": [{"name": "user_id", "kind": "id"}],
        "item_features": [{"name": "item_id", "kind": "id"}]})
    assert events_dataset(schema).count_rows() == 2
    assert _read_partition(events).num_rows == 2
    (events / "again").symlink_to(events, target_is_directory=True)
    message = r"part-0\.parquet again, reached through a symbolic link"
    with pytest.raises(ValueError, match=rf"events {events}: .*again.*{message}"):
        events_dataset(schema)
    with pytest.raises(ValueError, match=rf"partition {events}: .*{message}"):
        _read_partition(events)


def test_a_csv_line_over_the_readers_block_is_an_error_naming_the_file(tmp_path):
    """pyarrow's message alone ("straddling object straddles two block boundaries") named
    neither the file nor the cause."""
    import pyarrow.parquet as pq
    import pytest

    from twotower.data.sources import load
    from twotower.data.streaming import EventStream

    events = tmp_path / "events.csv"
    rows = "".join(f"{u},{u % 7},{u}\n" for u in range(100))
    events.write_text("user_id,item_id,timestamp\n" + rows[:40] + "9" * 3_000_000 + ",1,2\n"
                      + rows[40:])
    pq.write_table(pa.table({"item_id": list(range(7))}), tmp_path / "items.parquet")
    schema = parse_schema({
        "events": {"path": str(events)}, "items": {"path": str(tmp_path / "items.parquet")},
        "query_features": [{"name": "user_id", "kind": "id"}],
        "item_features": [{"name": "item_id", "kind": "id"}]})
    message = rf"events {events}.*: cannot read: .*a CSV line longer than 1 MiB"
    with pytest.raises(ValueError, match=message):
        load(schema)
    with pytest.raises(ValueError, match=message):
        EventStream(schema)


def test_a_nul_character_in_an_id_is_an_error_naming_the_row(tmp_path):
    """One NUL in a CSV file turned its whole user column into text: every integer id was
    hashed as text, unlike the integers a client sends, and training went on."""
    import pyarrow.parquet as pq
    import pytest

    from twotower.data.sources import load

    rows = [f"{u},{u % 7},{u}" for u in range(100)]
    rows[37] = rows[37].replace(",", "\0,", 1)
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    pq.write_table(pa.table({"item_id": list(range(7))}), tmp_path / "items.parquet")
    schema = parse_schema({
        "events": {"path": str(events)}, "items": {"path": str(tmp_path / "items.parquet")},
        "query_features": [{"name": "user_id", "kind": "id"}],
        "item_features": [{"name": "item_id", "kind": "id"}]})
    with pytest.raises(ValueError, match=rf"events {events}: column 'user_id' row 37 holds a "
                                         r"NUL character \('37\\x00'\)"):
        load(schema)
