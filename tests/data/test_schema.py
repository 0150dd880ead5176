"""The schema file: validation messages, what it builds, and bad input end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import yaml

from twotower.cli import main
from twotower.data.checks import MissingColumnError
from twotower.data.interactions import Columns
from twotower.data.schema import Schema, SchemaError, load_schema, parse_schema
from twotower.data.sources import load
from twotower.experiment import auto_buckets, memory_ids, schema_model_config
from twotower.hashing import to_int64_ids


def events_table() -> pa.Table:
    return pa.table({
        "user_id": [1, 2, 1, 1, 2, 1, 3],
        "item_id": [10, 20, 30, 40, 10, 20, 30],
        "timestamp": [5, 1, 2, 5, 3, 9, 4],
        "watch": [1.0, 0.5, 2.0, 1.0, 0.0, 1.5, 1.0],
        "device": ["a", "b", "a", "a", "b", "a", "c"],
    })


def items_table() -> pa.Table:
    return pa.table({"item_id": [30, 10, 20, 40],
                     "category": [1, 1, 2, 2],
                     "tags": [[7, 8], [8], [], [9, 7]]})


SCHEMA = {
    "events": {"path": "events.parquet", "user": "user_id", "item": "item_id",
               "time": "timestamp", "reward": "watch"},
    "items": {"path": "items.parquet", "key": "item_id"},
    "query_features": [
        {"name": "user_id", "kind": "id", "table": "user"},
        {"name": "device", "kind": "id"},
        {"name": "history", "kind": "id_list", "history": "item_id", "length": 3,
         "table": "item"},
        {"name": "history_tags", "kind": "id_list", "history": "tags", "length": 2,
         "table": "tag"},
    ],
    "item_features": [
        {"name": "item_id", "kind": "id", "table": "item"},
        {"name": "category", "kind": "id"},
        {"name": "tags", "kind": "id_list", "table": "tag"},
    ],
    "tables": {"item": {"buckets": 1000, "dim": 8}},
    "model": {"dim": 4, "hidden": [16], "output_dim": 8},
}


def write(tmp_path: Path, schema: dict | None = None, events: pa.Table | None = None,
          items: pa.Table | None = None) -> Path:
    pq.write_table(events_table() if events is None else events, tmp_path / "events.parquet")
    pq.write_table(items_table() if items is None else items, tmp_path / "items.parquet")
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(SCHEMA if schema is None else schema))
    return path


def with_changes(**changes) -> dict:
    return json.loads(json.dumps({**SCHEMA, **changes}))


def as_lists(bag) -> list[list[int]]:
    return [bag.values[bag.offsets[i]:bag.offsets[i + 1]].tolist() for i in range(len(bag))]


# --- what a schema builds ------------------------------------------------------------------


def test_load_resolves_paths_and_builds_columns(tmp_path):
    schema = load_schema(write(tmp_path))
    assert schema.events.path == str((tmp_path / "events.parquet").resolve())
    assert schema.columns() == Columns("user_id", "item_id", "timestamp", "watch",
                                       ("item_id", "category", "tags"), 3)
    assert [(h.name, h.column, h.length) for h in schema.histories()] == [
        ("history", "item_id", 3), ("history_tags", "tags", 2)]
    assert schema.context() == ["device"]


def test_histories_of_keys_and_of_list_attributes(tmp_path):
    data = load(load_schema(write(tmp_path)))
    # Time order: (u2,20,t1) (u1,30,t2) (u2,10,t3) (u3,30,t4) (u1,10,t5) (u1,40,t5) (u1,20,t9)
    assert data.item.tolist() == [20, 30, 10, 30, 10, 40, 20]
    history = data.query_columns(["history"])["history"]
    assert as_lists(history) == [[], [], [20], [], [30], [30], [30, 10, 40]]
    # Tags of the last two items: 30 -> [7, 8], 10 -> [8], 40 -> [9, 7].
    tags = data.query_columns(["history_tags"])["history_tags"]
    assert as_lists(tags) == [[], [], [], [], [7, 8], [7, 8], [8, 9, 7]]
    assert data.query_columns(["device"])["device"].to_pylist() == list("babcaaa")


def test_columns_name_an_unknown_ties_value():
    with pytest.raises(ValueError, match=r"ties must be one of \('simultaneous', 'ordered'\), "
                                         r"got 'random'"):
        Columns(ties="random")


def test_ordered_ties_let_an_event_see_those_before_it_at_its_time(tmp_path):
    schema = with_changes(events={**SCHEMA["events"], "ties": "ordered"})
    data = load(load_schema(write(tmp_path, schema)))
    assert data.columns.ties == "ordered"
    # u1's items 10 and 40 share t5: 40 (later in the file) now sees 10.
    assert as_lists(data.query_columns(["history"])["history"]) == [
        [], [], [20], [], [30], [30, 10], [30, 10, 40]]
    # An evaluation excludes what the histories hold: 40's exclusions include 10.
    expected = data.item_rows(np.array([30, 10])).tolist()
    assert as_lists(data.seen_before(np.array([5]))) == [expected]


def test_model_config_shares_tables_and_sizes_auto_ones(tmp_path):
    schema = load_schema(write(tmp_path))
    data = load(schema)
    config = schema_model_config(schema, memory_ids(data))
    assert set(config.tables) == {"user", "device", "item", "tag", "category"}
    assert config.tables["item"].num_buckets == 1000 and config.tables["item"].dim == 8
    assert config.tables["user"].num_buckets == auto_buckets(3) == 64
    assert config.tables["tag"].dim == 4
    assert [f.table_name for f in config.query_features] == ["user", "device", "item", "tag"]
    assert config.output_dim == 8 and config.query_hidden == [16]


def test_auto_buckets_is_a_bounded_power_of_two():
    assert auto_buckets(0) == 64
    assert auto_buckets(1000) == 4096
    assert auto_buckets(1025) == 8192
    assert auto_buckets(10**9) == 1 << 20


def test_from_columns_is_the_default_layout(tmp_path):
    schema = Schema.from_columns(Columns(item_features=("category",), history_length=5),
                                 str(tmp_path / "e.parquet"), str(tmp_path / "i.parquet"))
    assert [f.name for f in schema.query_features] == ["user_id", "history"]
    assert [f.name for f in schema.item_features] == ["item_id", "category"]
    assert schema.missing_items == "error" and schema.columns().history_length == 5


def test_round_trips_through_json(tmp_path):
    schema = load_schema(write(tmp_path))
    assert parse_schema(json.loads(json.dumps(schema.model_dump(mode="json")))) == schema


# --- schema errors name the field -------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"query_features": [{"name": "user_id", "kind": "ids"}]},
     r"query_features\[0\] \('user_id'\)\.kind: Input should be 'id', 'id_list', "
     r"'sequence' or 'dense' \(got 'ids'\)"),
    ({"items": {"path": "items.parquet", "kye": "item_id"}},
     r"items\.kye: Extra inputs are not permitted"),
    ({"query_features": [{"name": "h", "kind": "id_list", "history": "item_id"}]},
     r"query_features\[0\] \('h'\): a history feature needs a length"),
    ({"query_features": [{"name": "h", "kind": "id", "history": "item_id", "length": 2}]},
     r"kind must be id_list or sequence, got id"),
    ({"query_features": [{"name": "device", "kind": "id", "length": 2}]},
     r"length is only for history features"),
    ({"query_features": [{"name": "item_id", "kind": "id"}]},
     r"'item_id' is the event's item \(the answer\)"),
    ({"item_features": [{"name": "h", "kind": "id_list", "history": "tags", "length": 2}]},
     r"histories are query features"),
    ({"query_features": [{"name": "u", "kind": "id"}, {"name": "u", "kind": "dense"}]},
     r"query_features: feature name\(s\) \['u'\] appear more than once"),
    ({"tables": {"nothing": {"buckets": 10}}}, r"tables \['nothing'\] are not used"),
    ({"tables": {"item": {"buckets": 0}}}, r"tables\.item: buckets must be >= 1 or auto"),
    ({"model": {"temperature": 0}}, r"model\.temperature: Input should be greater than 0"),
    ({"model": {"hidden": [16, 0]}},
     r"model\.hidden\[1\]: Input should be greater than or equal to 1 \(got 0\)"),
    ({"model": {"hidden": [-3]}}, r"model\.hidden\[0\]: Input should be greater than or equal"),
    ({"split": {"kind": "time"}}, r"split: a time split needs exactly one of cutoff or"),
    ({"split": {"kind": "leave-last-out", "cutoff": 3}}, r"takes no cutoff"),
    ({"split": {"kind": "random"}},
     r"split\.kind: Input should be 'time', 'leave-last-out' or 'column'"),
    ({"split": {"kind": "column"}}, r"a column split names its column"),
    ({"cleaning": {"k_core": -1}}, r"cleaning\.k_core: Input should be greater than or equal"),
    ({"missing_items": "ignore"}, r"missing_items: Input should be 'error' or 'drop'"),
    ({"events": {**SCHEMA["events"], "ties": "random"}},
     r"events\.ties: Input should be 'simultaneous' or 'ordered'"),
    ({"events": {"user": "user_id"}}, r"give events\.path and items\.path"),
    ({"query_features": []}, r"query_features: List should have at least 1 item"),
])
def test_invalid_schema_names_field_and_problem(tmp_path, changes, message):
    path = write(tmp_path, with_changes(**changes))
    with pytest.raises(SchemaError, match=message) as error:
        load_schema(path)
    assert str(path) in str(error.value)


def test_a_nul_in_a_path_is_a_schema_error_naming_the_field(tmp_path, capsys):
    path = write(tmp_path, with_changes(events={**SCHEMA["events"], "path": "ev\0.parquet"}))
    assert main(["train", "--schema", str(path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "events.path: a path cannot contain a NUL character" in err
    assert main(["train", "--events", "ev\0.parquet", "--items", "items.parquet",
                 "--out", str(tmp_path / "m")]) == 2
    assert "events.path: a path cannot contain a NUL character" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_several_problems_are_listed_together(tmp_path):
    path = write(tmp_path, with_changes(query_features=[{"name": "a", "kind": "nope"}],
                                        model={"dim": 0}))
    with pytest.raises(SchemaError, match=r"2 problem\(s\)"):
        load_schema(path)


def test_not_a_mapping_or_not_yaml(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SchemaError, match="a schema is a mapping of fields"):
        load_schema(path)
    path.write_text("events: [unclosed\n")
    with pytest.raises(SchemaError, match="not valid YAML"):
        load_schema(path)
    with pytest.raises(FileNotFoundError, match="schema file not found"):
        load_schema(tmp_path / "missing.yaml")


# --- bad data: clear errors, nothing dropped silently ------------------------------------


def test_missing_events_file(tmp_path):
    schema = load_schema(write(tmp_path, with_changes(
        events={**SCHEMA["events"], "path": "nowhere.parquet"})))
    with pytest.raises(FileNotFoundError, match=r"events file not found: .*nowhere\.parquet"):
        load(schema)


def test_misspelled_column_gets_a_suggestion(tmp_path):
    schema = load_schema(write(tmp_path, with_changes(
        events={**SCHEMA["events"], "time": "timestmp"})))
    with pytest.raises(MissingColumnError, match=r"events .*events\.parquet: column 'timestmp' "
                                                 r"not found; did you mean 'timestamp'\?"):
        load(schema)


def test_missing_item_feature_column(tmp_path):
    schema = load_schema(write(tmp_path, items=items_table().drop(["category"])))
    with pytest.raises(MissingColumnError, match=r"items .*items\.parquet: column 'category'"):
        load(schema)


def test_missing_history_column_is_named_with_its_feature(tmp_path):
    changes = with_changes()
    changes["query_features"][3]["history"] = "tag"
    with pytest.raises(MissingColumnError, match=r"history feature 'history_tags'.*column 'tag' "
                                                 r"not found; did you mean 'tags'\?"):
        load(load_schema(write(tmp_path, changes)))


@pytest.mark.parametrize("column, kind, values, message", [
    ("device", "dense", None, r"column 'device' \(feature 'device', kind dense\) must hold "
                              r"numbers, got string"),
    ("device", "id_list", None, r"must hold lists of integers or strings, got string"),
    ("device", "id", [0.5] * 7, r"must hold integers or strings, got double"),
])
def test_wrong_column_type_for_kind(tmp_path, column, kind, values, message):
    events = events_table()
    if values is not None:
        events = events.set_column(events.column_names.index(column), column, pa.array(values))
    changes = with_changes()
    changes["query_features"][1] = {"name": column, "kind": kind}
    with pytest.raises(TypeError, match=message):
        load(load_schema(write(tmp_path, changes, events=events)))


def test_float_timestamps_rejected(tmp_path):
    events = events_table().set_column(2, "timestamp", pa.array([5.0, 1, 2, 5, 3, 9, 4]))
    with pytest.raises(TypeError, match="column 'timestamp' must hold integer times"):
        load(load_schema(write(tmp_path, events=events)))


@pytest.mark.parametrize("bad, shown", [(float("nan"), "nan"), (-1.0, "-1.0")])
def test_nan_or_negative_reward_names_row(tmp_path, bad, shown):
    events = events_table().set_column(3, "watch", pa.array([1.0, 0.5, 2.0, 1.0, bad, 1.5, 1.0]))
    with pytest.raises(ValueError, match=rf"events .*events\.parquet: reward column 'watch' "
                                         rf"has 1 .*first at row 4 \({shown}\)"):
        load(load_schema(write(tmp_path, events=events)))


@pytest.mark.parametrize("which", ["events", "items"])
def test_empty_table(tmp_path, which):
    tables = {"events": events_table(), "items": items_table()}
    tables[which] = tables[which].slice(0, 0)
    with pytest.raises(ValueError, match=rf"{which} file .*{which}\.parquet has no rows"):
        load(load_schema(write(tmp_path, **tables)))


def test_duplicate_item_keys(tmp_path):
    items = pa.table({"item_id": [30, 10, 20, 40, 10], "category": [1, 1, 2, 2, 3],
                      "tags": pa.array([[], [], [], [], []], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match=r"items .*: 1 duplicate item key\(s\) in column "
                                         r"'item_id', for example \[10\]"):
        load(load_schema(write(tmp_path, items=items)))


def test_unknown_items_are_dropped_and_counted_by_default(tmp_path):
    items = items_table().slice(0, 3)  # no item 40
    data = load(load_schema(write(tmp_path, items=items)))
    assert data.report == {"events_read": 7, "events_unknown_item": 1, "events_kept": 6}
    assert 40 not in data.item.tolist()


def test_unknown_items_can_fail(tmp_path):
    path = write(tmp_path, with_changes(missing_items="error"), items=items_table().slice(0, 3))
    with pytest.raises(ValueError, match=r"1 event\(s\) name an item missing from the items "
                                         r"table, first at row 3 \(item 40\)"):
        load(load_schema(path))


def test_unknown_feature_kind_in_cli(tmp_path, capsys):
    changes = with_changes()
    changes["item_features"][1]["kind"] = "categorical"
    path = write(tmp_path, changes)
    assert main(["train", "--schema", str(path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert ("item_features[1] ('category').kind: Input should be 'id', 'id_list', 'sequence' "
            "or 'dense'") in err
    assert "(got 'categorical')" in err and not (tmp_path / "m").exists()


def test_cleaning_counts_are_reported(tmp_path):
    events = pa.concat_tables([events_table(), events_table().slice(0, 2)])
    data = load(load_schema(write(tmp_path, with_changes(
        cleaning={"dedupe": True, "min_user_events": 2}), events=events)))
    assert data.report == {"events_read": 9, "events_unknown_item": 0, "removed_duplicates": 2,
                           "removed_min_user_events": 1, "events_kept": 6}


def test_csv_events_and_string_ids(tmp_path):
    events = events_table().set_column(0, "user_id", pa.array(list("xyxxyxz")))
    pcsv.write_csv(events, tmp_path / "events.csv")
    path = write(tmp_path, with_changes(events={**SCHEMA["events"], "path": "events.csv"}))
    data = load(load_schema(path))
    assert data.user.tolist() == to_int64_ids(list("yxyzxxx")).tolist()


# --- command line -----------------------------------------------------------------------------


def test_train_and_evaluate_with_a_schema(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 3000
    events = pa.table({"user_id": rng.integers(0, 50, n), "item_id": rng.integers(0, 200, n),
                       "timestamp": np.sort(rng.integers(0, 10_000, n)),
                       "watch": rng.random(n), "device": rng.choice(list("abc"), n)})
    items = pa.table({"item_id": np.arange(200), "category": np.arange(200) % 7,
                      "tags": [[int(i % 5), int(i % 3) + 10] for i in range(200)]})
    path = write(tmp_path, with_changes(split={"kind": "time", "test_fraction": 0.2}),
                 events=events, items=items)
    model = tmp_path / "m"
    assert main(["train", "--schema", str(path), "--out", str(model), "--batch-size", "64",
                 "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["split"]["kind"] == "time" and trained["split"]["test"] >= 600
    assert trained["trained_on"] == trained["split"]["train"]
    config = json.loads((model / "config.json").read_text())
    assert config["schema"]["query_features"][3]["history"] == "tags"
    assert config["split"]["cutoff"] == trained["split"]["cutoff"]
    assert set(config["columns"]) >= {"user", "item", "timestamp", "reward", "item_features",
                                      "history_length"}
    # evaluate reads the schema and the split from the model directory.
    assert main(["evaluate", str(model)]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert metrics["queries"] == trained["split"]["test"]
    assert json.loads(captured.err)["split"]["cutoff"] == trained["split"]["cutoff"]
    # ... or a split given on the command line.
    assert main(["evaluate", str(model), "--split", "leave-last-out", "--on", "valid",
                 "--exclude-seen"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 50


def test_items_key_may_be_named_differently_from_the_events_item(tmp_path):
    events = events_table().rename_columns(["user_id", "movie", "timestamp", "watch", "device"])
    items = items_table().rename_columns(["id", "category", "tags"])
    changes = with_changes(events={**SCHEMA["events"], "item": "movie"},
                           items={"path": "items.parquet", "key": "id"})
    changes["query_features"][2]["history"] = "id"
    changes["item_features"][0]["name"] = "id"
    schema = load_schema(write(tmp_path, changes, events=events, items=items))
    assert schema.columns().item == "movie" and schema.columns().key == "id"
    data = load(schema)
    assert as_lists(data.query_columns(["history"])["history"])[-1] == [30, 10, 40]
    assert set(data.item_columns()) == {"id", "category", "tags"}
    config = schema_model_config(schema, memory_ids(data))
    assert [f.name for f in config.item_features] == ["id", "category", "tags"]
