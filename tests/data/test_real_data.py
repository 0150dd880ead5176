"""The example schemas on the real data sets in ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twotower.cli import main
from twotower.data.history import causal_history
from twotower.data.schema import load_schema
from twotower.data.sources import load
from twotower.data.splits import split_log

ROOT = Path(__file__).parents[2]
DATA = ROOT / ".." / "shared" / "data"
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data sets not found in {DATA} (../shared/data beside the "
                              "project root); they are not part of the project")


def assert_causal(users: np.ndarray, times: np.ndarray, length: int) -> None:
    """Every history entry is an earlier event of the same user, never itself or later."""
    bag = causal_history(users, times, np.arange(len(users)), length)
    event = np.repeat(np.arange(len(users)), np.diff(bag.offsets))
    assert (users[bag.values] == users[event]).all()
    assert (times[bag.values] < times[event]).all()


def split_of(schema, data):
    return split_log(schema.split.kind, data.user, data.timestamp, schema.split.cutoff,
                     schema.split.test_fraction)


def test_ciao_time_split():
    schema = load_schema(EXAMPLES / "ciao.yaml")
    data = load(schema)
    assert data.report == {"events_read": 284086, "events_unknown_item": 0,
                           "removed_duplicates": 1436, "events_kept": 282650}
    assert (np.diff(data.timestamp) >= 0).all()
    assert_causal(data.user, data.timestamp, 20)
    split = split_of(schema, data)
    assert data.timestamp[split.train].max() < data.timestamp[split.test].min()
    assert 0.1 <= len(split.test) / len(data) < 0.12
    categories = data.query_columns(["history_category"])["history_category"]
    assert np.array_equal(np.diff(categories.offsets), np.diff(data.history.offsets))


def test_amazon_sports_leave_last_out_with_attributes():
    schema = load_schema(EXAMPLES / "amazon-sports.yaml")
    data = load(schema)
    assert data.report["events_kept"] == 296337
    assert_causal(data.user, data.timestamp, 20)
    split = split_of(schema, data)
    users = np.unique(data.user)
    assert len(split.test) == len(split.valid) == len(users) == 35598
    # The test event is each user's largest position; validation the one before it.
    last = np.full(users.max() + 1, -1)
    np.maximum.at(last, data.user, data.timestamp)
    assert (data.timestamp[split.test] == last[data.user[split.test]]).all()
    assert (data.timestamp[split.valid] == last[data.user[split.valid]] - 1).all()
    attributes = data.item_columns()["attributes"]
    assert attributes.type.value_type.bit_width == 64
    history = data.query_columns(["history_attributes"])["history_attributes"]
    assert len(history) == len(data) and history.values.size > len(data)


def test_epinions_coarse_periods_tie_within_a_period():
    schema = load_schema(EXAMPLES / "ciao.yaml").model_copy()
    schema = schema.model_copy(update={
        "events": schema.events.model_copy(update={
            "path": str(DATA / "epinions" / "events.parquet"), "time": "period"}),
        "items": schema.items.model_copy(update={"path": str(DATA / "epinions" /
                                                            "items.parquet")})})
    data = load(schema)
    assert data.report["events_kept"] == 922267 - data.report["removed_duplicates"]
    first = data.timestamp == data.timestamp.min()
    assert np.diff(data.history.offsets)[first].sum() == 0  # period 1 sees no history


@pytest.mark.slow
def test_amazon_sports_end_to_end(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["train", "--schema", str(EXAMPLES / "amazon-sports.yaml"), "--out", str(model),
                 "--batch-size", "2048", "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["trained_on"] == 296337 - 2 * 35598
    assert main(["evaluate", str(model), "--on", "valid", "--exclude-seen"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["queries"] == 35598 and metrics["recall@100"] > 0.01
