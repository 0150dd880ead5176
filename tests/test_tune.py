"""``twotower tune``: every setting of a grid trained with early stopping on validation
events, ranked by validation recall, the best run kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tiny_log import write_log
from twotower.checkpoint import load_model
from twotower.cli import main
from twotower.tune import parse_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_grid_reads_values_and_names_bad_entries():
    assert parse_grid(["lr=0.005,0.02", "dropout=0,0.2", "batch_size=256"]) == {
        "lr": [0.005, 0.02], "dropout": [0.0, 0.2], "batch_size": [256]}
    assert parse_grid(["without=-,user_id,user_id+history", "sequence=-,history"]) == {
        "without": ["-", "user_id", "user_id+history"], "sequence": ["-", "history"]}
    for bad, message in [("lr", "NAME=V1,V2"), ("speed=1,2", "NAME=V1,V2"),
                         ("batch_size=1.5", "batch_size takes int"), ("lr=", "NAME=V1,V2")]:
        with pytest.raises(ValueError, match=message):
            parse_grid([bad])


def test_tune_trains_every_setting_and_keeps_the_best(tmp_path: Path, capsys):
    schema = write_log(tmp_path / "data")
    out = tmp_path / "tune"
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(out), "--grid", "lr=0.001,0.01", "dropout=0,0.3", "--epochs", "3",
                 "--quiet"]) == 0
    rows = json.loads((out / "tuning.json").read_text())
    assert sorted((r["lr"], r["dropout"]) for r in rows) == [
        (0.001, 0.0), (0.001, 0.3), (0.01, 0.0), (0.01, 0.3)]
    scores = [r["recall@50"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:  # each row is its run's best validation record
        records = [json.loads(x) for x in
                   (out / row["run"] / "metrics.jsonl").read_text().splitlines()]
        best = max(r["recall@50"] for r in records if r.get("event") == "validation")
        assert row["recall@50"] == best and 1 <= row["best_epoch"] <= 3
        _, _, config = load_model(out / row["run"])
        assert config["train"]["learning_rate"] == row["lr"]
        assert config["schema"]["model"]["dropout"] == row["dropout"]
    best, _, _ = load_model(out / "best")
    winner, _, _ = load_model(out / rows[0]["run"])
    for name, value in best.state_dict().items():
        assert torch.equal(value, winner.state_dict()[name])
    printed = capsys.readouterr().out
    assert f"best: {out / 'best'} ({rows[0]['run']}" in printed
    # A second tune never writes over the first one's runs.
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(out), "--grid", "lr=0.001", "--quiet"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_tune_needs_validation_events(tmp_path: Path, capsys):
    schema = write_log(tmp_path / "data")
    assert main(["tune", "--schema", str(schema), "--split", "time", "--test-fraction", "0.2",
                 "--out", str(tmp_path / "tune"), "--grid", "lr=0.001"]) == 2
    assert "validation events" in capsys.readouterr().err


def test_tune_can_leave_query_features_out(tmp_path: Path, capsys):
    schema = write_log(tmp_path / "data")
    out = tmp_path / "tune"
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(out), "--grid", "without=-,user_id", "--epochs", "2", "--quiet"]) == 0
    rows = {r["without"]: r for r in json.loads((out / "tuning.json").read_text())}
    for without, query in [("-", ["user_id", "history"]), ("user_id", ["history"])]:
        model, _, config = load_model(out / rows[without]["run"])
        assert [f["name"] for f in config["schema"]["query_features"]] == query
        assert [f.name for f in model.query_tower.features] == query
    # Names are checked against the schema before anything trains.
    for bad, message in [("without=user", "'user'] not among"),
                         ("without=user_id+history", "leaves the query no feature")]:
        assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                     str(tmp_path / bad), "--grid", bad, "--quiet"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / bad / "run-0").exists()


def test_tune_can_read_the_history_in_order(tmp_path: Path, capsys):
    schema = write_log(tmp_path / "data")
    out = tmp_path / "tune"
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(out), "--grid", "sequence=-,history", "without=-,user_id", "--epochs", "2",
                 "--quiet"]) == 0
    rows = json.loads((out / "tuning.json").read_text())
    assert sorted((r["sequence"], r["without"]) for r in rows) == [
        ("-", "-"), ("-", "user_id"), ("history", "-"), ("history", "user_id")]
    for row in rows:
        model, _, config = load_model(out / row["run"])
        kinds = {f["name"]: f["kind"] for f in config["schema"]["query_features"]}
        assert kinds["history"] == ("sequence" if row["sequence"] == "history" else "id_list")
        assert ("user_id" in kinds) == (row["without"] == "-")
        assert list(model.query_tower.sequences) == (
            ["history"] if row["sequence"] == "history" else [])
    # Only histories of the item column can be sequences, and the error says which are.
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(tmp_path / "bad"), "--grid", "sequence=user_id", "--quiet"]) == 2
    assert "['user_id'] not among the schema's histories of 'item_id' ['history']" in \
        capsys.readouterr().err


def test_a_bad_grid_fails_before_the_log_is_read(tmp_path: Path, capsys):
    """A typo in the grid costs nothing on a large log: the grid is checked against the
    schema first (here the log is not even there)."""
    schema = write_log(tmp_path / "data")
    for part in (tmp_path / "data").glob("events*"):
        shutil.rmtree(part) if part.is_dir() else part.unlink()
    for bad, message in [("without=user", "'user'] not among"),
                         ("lr=0.01,-1", "learning_rate must be above 0")]:
        assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                     str(tmp_path / "tune"), "--grid", bad, "--quiet"]) == 2
        assert message in capsys.readouterr().err
    # The same command with a good grid does reach the log, and says it is missing.
    assert main(["tune", "--schema", str(schema), "--split", "leave-last-out", "--out",
                 str(tmp_path / "tune"), "--grid", "lr=0.01", "--quiet"]) == 2
    assert "events" in capsys.readouterr().err
