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
