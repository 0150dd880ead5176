"""Tests for loading and checking an interaction log against its item corpus."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from twotower.data.interactions import Columns, load_interactions
from twotower.hashing import to_int64_ids

NO_FEATURES = Columns(item_features=(), history_length=3)


def items_table() -> pa.Table:
    return pa.table({"item_id": [30, 10, 20, 40],
                     "channel": [1, 1, 2, 2],
                     "category": ["a", "b", "a", "c"]})


def events_table() -> pa.Table:
    # Out of time order, with a tie at t=5 (rows 0 and 3, same user).
    return pa.table({
        "user_id": [1, 2, 1, 1, 2, 1],
        "item_id": [10, 20, 30, 40, 10, 20],
        "timestamp": [5, 1, 2, 5, 3, 9],
        "reward": [1.0, 0.5, 2.0, 1.0, 0.0, 1.5],
    })


def bags(bag) -> list[list[int]]:
    return [bag.values[bag.offsets[i]:bag.offsets[i + 1]].tolist() for i in range(len(bag))]


def test_sorted_by_time_with_rows_and_histories():
    data = load_interactions(events_table(), items_table(), Columns(history_length=3))
    # Time order, ties kept in input order: rows 1 (t1), 2 (t2), 4 (t3), 0 (t5), 3 (t5), 5 (t9).
    assert data.timestamp.tolist() == [1, 2, 3, 5, 5, 9]
    assert data.user.tolist() == [2, 1, 2, 1, 1, 1]
    assert data.item.tolist() == [20, 30, 10, 10, 40, 20]
    assert data.reward.tolist() == [0.5, 2.0, 0.0, 1.0, 1.0, 1.5]
    assert data.reward.dtype == np.float32
    assert len(data) == 6
    # item_row points at the item's row of the items table.
    keys = np.array(items_table().column("item_id").to_pylist())
    assert data.item_row.tolist() == [2, 0, 1, 1, 3, 2]
    assert np.array_equal(keys[data.item_row], data.item)
    assert np.array_equal(data.item_keys, keys)
    # Histories are causal: the two t=5 events of user 1 do not see each other.
    assert bags(data.history) == [[], [], [20], [30], [30], [30, 10, 40]]
    assert data.report == {"events_read": 6, "events_unknown_item": 0, "events_kept": 6}
    assert set(data.item_columns()) == {"item_id", "channel", "category"}
    assert set(data.query_columns()) == {"user_id", "history"}


def test_history_length_cuts_oldest_first():
    data = load_interactions(events_table(), items_table(), Columns(history_length=2))
    assert bags(data.history)[-1] == [10, 40]


def test_string_ids_and_no_reward_column():
    items = pa.table({"item_id": ["x", "y", "z"]})
    events = pa.table({"user_id": ["u", "v", "u"], "item_id": ["z", "x", "y"],
                       "timestamp": [3, 2, 1]})
    data = load_interactions(events, items, Columns(reward=None, item_features=()))
    assert data.item.tolist() == to_int64_ids(["y", "x", "z"]).tolist()
    assert data.item_row.tolist() == [1, 0, 2]
    assert data.reward.tolist() == [1.0, 1.0, 1.0]
    assert bags(data.history)[2] == to_int64_ids(["y"]).tolist()


def test_timestamp_column_type():
    events = events_table().set_column(
        2, "timestamp", pa.array([5, 1, 2, 5, 3, 9], type=pa.timestamp("s")))
    data = load_interactions(events, items_table(), NO_FEATURES)
    assert data.timestamp.tolist() == [1, 2, 3, 5, 5, 9]


def test_parquet_and_csv_files_agree(tmp_path):
    expected = load_interactions(events_table(), items_table())
    pq.write_table(events_table(), tmp_path / "events.parquet")
    pq.write_table(items_table(), tmp_path / "items.parquet")
    pcsv.write_csv(events_table(), tmp_path / "events.csv")
    pcsv.write_csv(items_table(), tmp_path / "items.csv")
    for suffix in ("parquet", "csv"):
        data = load_interactions(tmp_path / f"events.{suffix}", str(tmp_path / f"items.{suffix}"))
        for name in ("user", "item", "item_row", "timestamp", "reward"):
            assert np.array_equal(getattr(data, name), getattr(expected, name)), (suffix, name)
        assert bags(data.history) == bags(expected.history)


# --- errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    pq.write_table(items_table(), tmp_path / "items.parquet")
    with pytest.raises(FileNotFoundError, match=r"events file not found: .*nowhere\.parquet"):
        load_interactions(tmp_path / "nowhere.parquet", tmp_path / "items.parquet")
    with pytest.raises(FileNotFoundError, match="items file not found"):
        load_interactions(events_table(), tmp_path / "nothing.csv")


@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp", "reward"])
def test_missing_event_column_is_named(column):
    events = events_table().drop([column])
    with pytest.raises(KeyError, match=f"events: column '{column}' not found"):
        load_interactions(events, items_table(), NO_FEATURES)


@pytest.mark.parametrize("column", ["item_id", "channel"])
def test_missing_item_column_is_named(column):
    with pytest.raises(KeyError, match=f"items: column '{column}' not found"):
        load_interactions(events_table(), items_table().drop([column]))


def test_missing_column_in_file_names_file(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(events_table().drop(["timestamp"]), path)
    with pytest.raises(KeyError, match=r"events .*events\.parquet: column 'timestamp'"):
        load_interactions(path, items_table(), NO_FEATURES)


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_float_ids_rejected(column):
    events = events_table()
    index = events.column_names.index(column)
    floats = pa.array(np.asarray(events.column(column).to_pylist(), dtype=np.float64))
    with pytest.raises(TypeError, match=f"column '{column}'.*integers or strings"):
        load_interactions(events.set_column(index, column, floats), items_table(), NO_FEATURES)


def test_float_item_keys_rejected():
    items = pa.table({"item_id": [1.0, 2.0]})
    with pytest.raises(TypeError, match="items: column 'item_id'"):
        load_interactions(events_table(), items, NO_FEATURES)


@pytest.mark.parametrize("values", [
    pa.array(["5", "1", "2", "5", "3", "9"]),
    pa.array([5.0, 1.0, 2.0, 5.0, 3.0, 9.0]),
])
def test_non_integer_timestamps_rejected(values):
    events = events_table().set_column(2, "timestamp", values)
    with pytest.raises(TypeError, match="column 'timestamp' must hold integer times"):
        load_interactions(events, items_table(), NO_FEATURES)


@pytest.mark.parametrize("bad, shown", [(float("nan"), "nan"), (-0.5, "-0.5"),
                                        (float("inf"), "inf")])
def test_bad_reward_names_row(bad, shown):
    reward = [1.0, 0.5, 2.0, bad, 0.0, 1.5]
    events = events_table().set_column(3, "reward", pa.array(reward))
    with pytest.raises(ValueError, match=rf"reward column 'reward' has 1 .*first at row 3 "
                                         rf"\({shown}\)"):
        load_interactions(events, items_table(), NO_FEATURES)


def test_null_value_names_column_and_row():
    events = events_table().set_column(0, "user_id", pa.array([1, 2, 1, 1, None, 1]))
    with pytest.raises(ValueError, match=r"column 'user_id' has 1 null value.*first at row 4"):
        load_interactions(events, items_table(), NO_FEATURES)


def test_string_reward_rejected():
    events = events_table().set_column(3, "reward", pa.array(["1"] * 6))
    with pytest.raises(TypeError, match="reward column 'reward' must be numeric"):
        load_interactions(events, items_table(), NO_FEATURES)


@pytest.mark.parametrize("which", ["events", "items"])
def test_empty_file(tmp_path, which):
    tables = {"events": events_table(), "items": items_table()}
    paths = {}
    for name, table in tables.items():
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(table.slice(0, 0) if name == which else table, paths[name])
    with pytest.raises(ValueError, match=f"{which} file .* has no rows"):
        load_interactions(paths["events"], paths["items"])


@pytest.mark.parametrize("which", ["events", "items"])
def test_empty_table(which):
    # An empty in-memory table is as wrong as an empty file and must say so.
    events = events_table().slice(0, 0) if which == "events" else events_table()
    items = items_table().slice(0, 0) if which == "items" else items_table()
    with pytest.raises(ValueError, match=f"{which}.*no rows"):
        load_interactions(events, items)


def test_duplicate_item_keys():
    items = pa.table({"item_id": [10, 20, 10, 30, 40, 30]})
    with pytest.raises(ValueError, match=r"2 duplicate item key\(s\) .*'item_id'.*\[10, 30\]"):
        load_interactions(events_table(), items, NO_FEATURES)


def test_events_with_missing_items_error_by_default():
    items = items_table().filter(pa.array([True, True, True, False]))  # no item 40
    with pytest.raises(ValueError, match=r"1 event\(s\) name an item missing.*first at row 3 "
                                         r"\(item 40\).*missing_items='drop'"):
        load_interactions(events_table(), items)


def test_events_with_missing_items_dropped_and_counted():
    items = pa.table({"item_id": [10, 20]})  # 30 and 40 are missing
    data = load_interactions(events_table(), items, NO_FEATURES, missing_items="drop")
    assert data.report == {"events_read": 6, "events_unknown_item": 2, "events_kept": 4}
    assert data.timestamp.tolist() == [1, 3, 5, 9]
    assert data.item.tolist() == [20, 10, 10, 20]
    assert data.item_row.tolist() == [1, 0, 0, 1]
    assert bags(data.history) == [[], [20], [], [10]]  # dropped events are in no history


def test_split_and_counts():
    data = load_interactions(events_table(), items_table(), NO_FEATURES)
    train, test = data.split_at(5)
    assert train.tolist() == [0, 1, 2] and test.tolist() == [3, 4, 5]
    assert data.item_counts(train).tolist() == [1, 1, 1, 0]
    assert data.item_counts(np.arange(len(data))).tolist() == [1, 2, 2, 1]
    assert data.item_rows(np.array([40, 10])).tolist() == [3, 1]
    with pytest.raises(KeyError):
        data.item_rows(np.array([99]))
