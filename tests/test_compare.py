"""``twotower compare``: modes x temperatures over seeds, mean and spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twotower.cli import main
from twotower.data.synthetic import SyntheticConfig, generate, write

SCHEMA = """
events: {path: events.parquet, user: user_id, item: item_id, time: timestamp, reward: reward}
items: {path: items.parquet, key: item_id}
query_features:
  - {name: user_id, kind: id, table: user}
  - {name: history, kind: id_list, history: item_id, length: 10, table: item}
item_features:
  - {name: item_id, kind: id, table: item}
  - {name: channel, kind: id}
model: {dim: 8, hidden: [16], output_dim: 8}
split: {kind: time, test_fraction: 0.2}
"""


def write_log(directory: Path, num_users: int, events_per_day: int) -> None:
    """A small synthetic log of 300 items over 3 days and its schema, into ``directory``."""
    write(generate(SyntheticConfig(num_users=num_users, num_items=300, num_days=3,
                                   events_per_day=events_per_day, num_channels=10,
                                   num_categories=3)), directory)
    (directory / "schema.yaml").write_text(SCHEMA)


def test_compare_gives_mean_and_spread_per_mode_and_temperature(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_log(tmp_path, num_users=100, events_per_day=800)
    out = tmp_path / "cmp"
    assert main(["compare", "--schema", str(tmp_path / "schema.yaml"), "--out", str(out),
                 "--modes", "none", "streaming", "--temperatures", "0.05", "0.1",
                 "--runs", "2", "--batch-size", "128", "--quiet"]) == 0
    results = json.loads((out / "comparison.json").read_text())
    assert list(results) == ["none@0.05", "streaming@0.05", "none@0.1", "streaming@0.1"]
    for metrics in results.values():
        assert 0 <= metrics["recall@10"] <= metrics["recall@100"] <= 1
        assert metrics["recall@10/std"] >= 0
    # Two seeds really are two trainings: their models differ.
    seeds = sorted(p.name for p in (out / "models").iterdir())
    assert seeds[:2] == ["none@0.05-seed0", "none@0.05-seed1"]
    assert (out / "models" / "none@0.05-seed0" / "model.safetensors").read_bytes() != \
        (out / "models" / "none@0.05-seed1" / "model.safetensors").read_bytes()
    printed = capsys.readouterr().out
    assert "streaming@0.1" in printed and "±" in printed
    assert (out / "report" / "report.html").exists()


def test_compare_needs_a_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "schema.yaml").write_text(SCHEMA.replace("split: {kind: time, "
                                                         "test_fraction: 0.2}", ""))
    (tmp_path / "events.parquet").write_bytes(b"")
    assert main(["compare", "--schema", str(tmp_path / "schema.yaml"), "--out",
                 str(tmp_path / "cmp")]) == 2
    assert "needs a split" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_compare_evaluates_at_the_chosen_ks(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    write_log(tmp_path, num_users=60, events_per_day=400)
    out = tmp_path / "cmp"
    assert main(["compare", "--schema", str(tmp_path / "schema.yaml"), "--out", str(out),
                 "--modes", "none", "streaming", "--ks", "5", "50", "20", "300",
                 "--runs", "2", "--batch-size", "128", "--quiet"]) == 0
    results = json.loads((out / "comparison.json").read_text())
    for metrics in results.values():
        assert "recall@10" not in metrics
        assert 0 <= metrics["recall@5"] <= metrics["recall@20"] <= metrics["recall@50"] <= 1
        assert metrics["ndcg@5"] <= metrics["recall@5"]
        # The corpus holds 300 items, so every positive ranks within the first 300.
        assert metrics["recall@300"] == 1.0 and metrics["recall@300/std"] == 0.0
        assert all(metrics[f"recall@{k}/std"] >= 0 for k in (5, 20, 50))
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["run", "recall@5", "recall@20", "recall@50", "recall@300", "ndcg@5"]


def test_compare_rejects_a_cut_off_below_one(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    (tmp_path / "events.parquet").write_bytes(b"")
    assert main(["compare", "--schema", str(tmp_path / "schema.yaml"), "--out",
                 str(tmp_path / "cmp"), "--ks", "0", "10"]) == 2
    assert "ks must be" in capsys.readouterr().err
