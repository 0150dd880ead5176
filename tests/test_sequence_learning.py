"""On a log whose next item follows from the newest one, reading the history in order
(`kind: sequence`) must beat a mean over it: what the sequence kind is for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from twotower.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS, USERS, EVENTS, SUCCESSORS = 200, 800, 12, 3


def markov_log(folder: Path) -> Path:
    """Each item has three random successors; a user starts at a random item and moves to
    one of its successors each event, so the next item depends on the newest alone, while
    the set of items seen names many items' successors."""
    rng = np.random.default_rng(0)
    successors = rng.integers(ITEMS, size=(ITEMS, SUCCESSORS))
    users, items, times = [], [], []
    for user in range(USERS):
        item = int(rng.integers(ITEMS))
        for t in range(EVENTS):
            users.append(f"u{user}")
            items.append(f"i{item}")
            times.append(user * EVENTS + t)
            item = int(successors[item, rng.integers(SUCCESSORS)])
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}),
                   folder / "events.parquet")
    pq.write_table(pa.table({"item_id": [f"i{i}" for i in range(ITEMS)]}),
                   folder / "items.parquet")
    schema = {
        "events": {"path": "events.parquet"},
        "items": {"path": "items.parquet"},
        "query_features": [{"name": "history", "kind": "id_list", "history": "item_id",
                            "length": 8, "table": "item"}],
        "item_features": [{"name": "item_id", "kind": "id", "table": "item"}],
        "tables": {"item": {"buckets": 256}},
        "model": {"dim": 16, "hidden": [32], "output_dim": 16, "history_dropout": 0.0},
    }
    (folder / "schema.yaml").write_text(yaml.safe_dump(schema))
    return folder / "schema.yaml"


def test_a_sequence_history_learns_what_comes_after_the_newest_item(tmp_path: Path):
    schema = markov_log(tmp_path / "data")
    out = tmp_path / "tune"
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(out), "--grid", "sequence=-,history", "--epochs", "15",
                 "--batch-size", "128", "--lr", "0.01", "--quiet"]) == 0
    rows = {r["sequence"]: r for r in json.loads((out / "tuning.json").read_text())}
    assert rows["history"]["recall@10"] > 1.5 * rows["-"]["recall@10"]
