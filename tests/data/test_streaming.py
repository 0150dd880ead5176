"""Streaming input: record batches give exactly what the in-memory loader gives."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.cli import main
from twotower.data.history import HistoryState, causal_history
from twotower.data.schema import load_schema
from twotower.data.sources import load
from twotower.data.splits import cutoff_for_fraction
from twotower.data.streaming import EventStream, StreamingTrainingData
from twotower.experiment import (
    fit_stream,
    memory_ids,
    prepare,
    schema_model_config,
    stream_ids,
)
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, train


def as_lists(bag) -> list[list[int]]:
    return [bag.values[bag.offsets[i]:bag.offsets[i + 1]].tolist() for i in range(len(bag))]


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), max_size=50),
       cuts=st.lists(st.integers(0, 50), max_size=6), length=st.integers(0, 5),
       ordered=st.booleans())
def test_history_state_equals_whole_log_history(events, cuts, length, ordered):
    events = sorted(events, key=lambda e: e[1])  # time order, ties in list order
    users = np.array([u for u, _ in events], dtype=np.int64)
    times = np.array([t for _, t in events], dtype=np.int64)
    items = np.arange(len(events), dtype=np.int64)  # item e is event e
    bounds = sorted({0, len(events), *(c for c in cuts if c <= len(events))})
    state, got = HistoryState(length, ordered), []
    for start, stop in itertools.pairwise(bounds):
        got += as_lists(state.extend(users[start:stop], times[start:stop], items[start:stop]))
    assert got == as_lists(causal_history(users, times, items, length, ordered))
    for e, bag in enumerate(got):  # never itself or later; a same-time event only if ordered
        assert all(users[f] == users[e] and (times[f] < times[e] or (ordered and f < e))
                   for f in bag)
    # What is carried is bounded by the history length, not by the log.
    assert all(np.sum(state.users == u) <= 2 * length for u in np.unique(users))


def random_log(rng: np.random.Generator, n: int, num_items: int = 60) -> tuple[pa.Table, pa.Table]:
    events = pa.table({
        "user_id": rng.integers(0, 25, n),
        "item_id": rng.integers(0, num_items + 3, n),  # a few unknown items
        "timestamp": np.sort(rng.integers(0, n // 3, n)),  # many ties
        "watch": rng.random(n).astype(np.float32),
        "device": rng.choice(["phone", "tv", "web"], n),
    })
    items = pa.table({"item_id": np.arange(num_items), "category": np.arange(num_items) % 4,
                      "tags": [[int(i % 3), int(i % 5) + 10] for i in range(num_items)]})
    return events, items


SCHEMA = {
    "events": {"path": "events", "reward": "watch"},
    "items": {"path": "items.parquet"},
    "query_features": [
        {"name": "user_id", "kind": "id", "table": "user"},
        {"name": "device", "kind": "id"},
        {"name": "history", "kind": "id_list", "history": "item_id", "length": 6,
         "table": "item"},
        {"name": "history_tags", "kind": "id_list", "history": "tags", "length": 2},
    ],
    "item_features": [{"name": "item_id", "kind": "id", "table": "item"},
                      {"name": "category", "kind": "id"},
                      {"name": "tags", "kind": "id_list"}],
    "model": {"dim": 4, "hidden": [8], "output_dim": 4},
}


def write_log(tmp_path: Path, events: pa.Table, items: pa.Table, files: int = 3,
              schema: dict | None = None) -> Path:
    """Events over several Parquet files (sorted by name and time) of small row groups."""
    (tmp_path / "events").mkdir()
    bounds = np.linspace(0, events.num_rows, files + 1).astype(int)
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(events.slice(start, stop - start), tmp_path / "events" / f"part-{i}.parquet",
                       row_group_size=37)
    pq.write_table(items, tmp_path / "items.parquet")
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump({**SCHEMA, "missing_items": "drop", **(schema or {})}))
    return path


def concatenated(pieces, name):
    return np.concatenate([getattr(p, name) for p in pieces])


@pytest.mark.parametrize("cleaning", [{}, {"dedupe": True, "k_core": 2}])
def test_stream_equals_in_memory_load(tmp_path, cleaning):
    events, items = random_log(np.random.default_rng(1), 900)
    schema = load_schema(write_log(tmp_path, events, items, schema={"cleaning": cleaning}))
    memory = load(schema)
    stream = EventStream(schema, batch_rows=50)
    pieces = list(stream.pieces(multiple_of=16, piece_rows=100))
    assert all(len(p) % 16 == 0 for p in pieces[:-1]) and len(pieces) > 3
    for name in ("user", "item", "item_row", "timestamp", "reward"):
        assert np.array_equal(concatenated(pieces, name), getattr(memory, name)), name
    for name in ("history", "history_tags"):
        streamed = [b for p in pieces for b in as_lists(p.query_columns([name])[name])]
        assert streamed == as_lists(memory.query_columns([name])[name]), name
    devices = [d for p in pieces for d in p.query_columns(["device"])["device"].to_pylist()]
    assert devices == memory.query_columns(["device"])["device"].to_pylist()
    assert stream.report == memory.report
    assert stream.report["events_unknown_item"] > 0
    if cleaning:
        assert stream.report["removed_duplicates"] > 0


def test_until_stops_at_the_cutoff(tmp_path):
    events, items = random_log(np.random.default_rng(2), 500)
    schema = load_schema(write_log(tmp_path, events, items))
    memory = load(schema)
    cutoff = int(memory.timestamp[300])
    stream = EventStream(schema, until=cutoff, batch_rows=40)
    streamed = concatenated(list(stream.pieces(piece_rows=64)), "timestamp")
    assert np.array_equal(streamed, memory.timestamp[memory.timestamp < cutoff])
    assert stream.count() == int((events.column("timestamp").to_numpy() < cutoff).sum())


def test_training_from_a_stream_equals_training_in_memory(tmp_path):
    events, items = random_log(np.random.default_rng(3), 700)
    schema = load_schema(write_log(tmp_path, events, items))
    memory = load(schema)
    model_config = schema_model_config(schema, memory_ids(memory))
    config = TrainConfig(batch_size=32, epochs=2, correction="streaming", log_every=5)
    prepared = prepare(memory, model_config)
    models = []
    for data in (prepared.training_data(np.arange(len(memory))),
                 StreamingTrainingData(EventStream(schema, batch_rows=45), model_config,
                                       piece_rows=100)):
        torch.manual_seed(0)
        model = TwoTowerModel(model_config)
        estimator = train(model, data, config, progress=False)
        models.append((model, estimator))
    (first, estimator_a), (second, estimator_b) = models
    assert estimator_a.step == estimator_b.step == 2 * (len(memory) // 32 + 1)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_batch_back_in_time_is_an_error_naming_file_and_row(tmp_path):
    events, items = random_log(np.random.default_rng(4), 300)
    times = events.column("timestamp").to_numpy().copy()
    times[250] = times[249] - 1
    events = events.set_column(2, "timestamp", pa.array(times))
    schema = load_schema(write_log(tmp_path, events, items, files=2))
    with pytest.raises(ValueError, match=r"events .*part-1\.parquet: row 100 goes back in time "
                                         r"\(timestamp \d+ after \d+\).*sort the files by time"):
        list(EventStream(schema, batch_rows=64).pieces())


def test_unknown_items_can_fail_with_the_file_row(tmp_path):
    events, items = random_log(np.random.default_rng(5), 300)
    schema = load_schema(write_log(tmp_path, events, items, files=2,
                                   schema={"missing_items": "error"}))
    first = int(np.flatnonzero(events.column("item_id").to_numpy() >= 60)[0])
    file, row = (0, first) if first < 150 else (1, first - 150)
    with pytest.raises(ValueError, match=rf"part-{file}\.parquet: \d+ event\(s\) name an item "
                                         rf"missing .*first at row {row} "):
        list(EventStream(schema, batch_rows=1000).pieces())


def test_oracle_needs_the_whole_log(tmp_path):
    events, items = random_log(np.random.default_rng(6), 100)
    schema = load_schema(write_log(tmp_path, events, items))
    data = StreamingTrainingData(EventStream(schema), schema_model_config(
        schema, memory_ids(load(schema))))
    with pytest.raises(ValueError, match="correction 'oracle' counts every event's item"):
        fit_stream(data, TrainConfig(correction="oracle"), tmp_path / "m", progress=False)


def test_cli_streaming_train_then_evaluate(tmp_path, capsys):
    events, items = random_log(np.random.default_rng(7), 2000)
    path = write_log(tmp_path, events, items,
                     schema={"split": {"kind": "time", "test_fraction": 0.25},
                             "cleaning": {"dedupe": True}})
    model = tmp_path / "m"
    assert main(["train", "--schema", str(path), "--out", str(model), "--streaming",
                 "--batch-size", "64", "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    memory = load(load_schema(path))
    cutoff = trained["split"]["cutoff"]
    assert cutoff == cutoff_for_fraction(memory.timestamp, 0.25)  # placed as in memory
    assert trained["trained_on"] == int((memory.timestamp < cutoff).sum())
    assert trained["data"]["events_unknown_item"] > 0
    assert trained["data"]["stopped_at"] == cutoff
    assert main(["evaluate", str(model)]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == int((memory.timestamp >= cutoff).sum())
    assert main(["train", "--schema", str(path), "--out", str(tmp_path / "x"), "--streaming",
                 "--split", "leave-last-out"]) == 2
    assert "a leave-last-out split needs the whole log" in capsys.readouterr().err


def test_a_sequence_feature_trains_the_same_from_a_stream_and_in_memory(tmp_path):
    events, items = random_log(np.random.default_rng(4), 500)
    query = [dict(f, kind="sequence", length=4) if f["name"] == "history" else f
             for f in SCHEMA["query_features"] if f["name"] != "history_tags"]
    schema = load_schema(write_log(tmp_path, events, items, schema={"query_features": query}))
    memory = load(schema)
    model_config = schema_model_config(schema, memory_ids(memory))
    [spec] = [f for f in model_config.query_features if f.name == "history"]
    assert (spec.kind, spec.length) == ("sequence", 4)
    prepared = prepare(memory, model_config)
    _, mask = prepared.queries.take(np.arange(len(memory)))["history"]
    histories = as_lists(memory.query_columns(["history"])["history"])
    assert mask.sum(dim=1).tolist() == [min(len(h), 4) for h in histories]
    config = TrainConfig(batch_size=32, epochs=2, log_every=5)
    models = []
    for data in (prepared.training_data(np.arange(len(memory))),
                 StreamingTrainingData(EventStream(schema, batch_rows=45), model_config,
                                       piece_rows=100)):
        torch.manual_seed(0)
        model = TwoTowerModel(model_config)
        train(model, data, config, progress=False)
        models.append(model.state_dict())
    for name, value in models[0].items():
        torch.testing.assert_close(value, models[1][name], rtol=0, atol=0, msg=name)


def test_streaming_batches_shuffle_within_each_piece(tmp_path):
    events, items = random_log(np.random.default_rng(5), 600)
    schema = load_schema(write_log(tmp_path, events, items))
    model_config = schema_model_config(schema, memory_ids(load(schema)))
    data = StreamingTrainingData(EventStream(schema, batch_rows=45), model_config,
                                 piece_rows=100)

    def pieces(seed) -> list[list[tuple[int, float]]]:
        """Per piece, the (item row, reward) of every event in the order batched."""
        out, current = [], None
        for rows in data.batches(16, seed):
            assert len(rows) >= 2
            if data.queries is not current:
                current = data.queries
                out.append([])
            out[-1] += list(zip(data.item_row[rows].tolist(), data.reward[rows].tolist(),
                                strict=True))
        return out

    in_time = pieces(None)
    assert len(in_time) > 3
    shuffled = pieces((0, 0))
    assert len(shuffled) == len(in_time)
    for a, b in zip(in_time, shuffled, strict=True):
        assert sorted(a) == sorted(b)  # the same events in each piece
    assert shuffled != in_time
    assert pieces((0, 0)) == shuffled and pieces((0, 1)) != shuffled


def test_a_bad_row_at_the_end_of_a_stream_is_found_before_anything_is_written(tmp_path):
    events, items = random_log(np.random.default_rng(8), 900)
    watch = events.column("watch").to_numpy().copy()
    watch[-1] = -0.5
    events = events.set_column(events.schema.get_field_index("watch"), "watch", pa.array(watch))
    schema = load_schema(write_log(tmp_path, events, items))
    stream = EventStream(schema, batch_rows=50)
    data = StreamingTrainingData(stream, schema_model_config(schema, stream_ids(stream)),
                                 piece_rows=64)  # many pieces: training starts early
    with pytest.raises(ValueError, match=r"part-2\.parquet.*row 299"):
        fit_stream(data, TrainConfig(batch_size=32), tmp_path / "m", progress=False,
                   checkpoint_every=2)
    assert not (tmp_path / "m").exists()
