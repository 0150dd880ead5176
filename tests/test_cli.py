"""The command line, called through ``main([...])`` as a user would type it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from twotower.checkpoint import load_model
from twotower.cli import main
from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY
from twotower.index import ItemIndex


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    assert main(["quickstart", "--small", "--out", str(out), "--quiet"]) == 0
    return out


def test_quickstart_trains_all_modes_and_correction_helps(quickstart: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    results = json.loads((quickstart / "results.json").read_text())
    assert list(results) == ["none", "streaming", "oracle"]
    for metrics in results.values():
        assert 0 <= metrics["recall@10"] <= metrics["recall@50"] <= metrics["recall@100"] <= 1
    # The paper's finding on a skewed log: correcting for sampling bias beats plain softmax.
    assert results["streaming"]["recall@10"] > results["none"]["recall@10"] + 0.05
    assert results["oracle"]["recall@10"] > results["none"]["recall@10"] + 0.05
    for mode in results:
        _, estimator, config = load_model(quickstart / "models" / mode)
        assert config["train"]["correction"] == mode
        assert estimator is not None and estimator.step > 0
        lines = (quickstart / "models" / mode / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["loss"] > 0 and json.loads(lines[-1])["event"] == "eval"
    report = (quickstart / "report" / "report.html").read_text()
    assert "streaming against none: recall@10" in report
    assert report.count("data:image/png;base64,") == 4  # self-contained: plots embedded
    index = ItemIndex.load(quickstart / "index")
    assert len(index) == pq.read_table(quickstart / "data" / "items.parquet").num_rows


def test_train_evaluate_index_commands(quickstart: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    events, items = quickstart / "data" / "events.parquet", quickstart / "data" / "items.parquet"
    cutoff = str(EPOCH + 3 * SECONDS_PER_DAY)
    data = ["--events", str(events), "--items", str(items)]
    assert main(["train", *data, "--out", str(tmp_path / "m"), "--until", cutoff,
                 "--batch-size", "256", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m"), *data, "--cutoff", cutoff]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["queries"] == 4000 and 0 < metrics["recall@100"] <= 1
    assert main(["index", str(tmp_path / "m"), "--items", str(items),
                 "--out", str(tmp_path / "ix")]) == 0
    assert len(ItemIndex.load(tmp_path / "ix")) == pq.read_table(items).num_rows


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--events", str(tmp_path / "nope.parquet"), "--items",
                 str(tmp_path / "items.parquet"), "--out", str(tmp_path / "m")])
    assert code == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_simulate_command_writes_table_and_plots(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--steps", "400"]) == 0
    assert "alpha=0.2" in capsys.readouterr().out
    for name in ("errors.csv", "summary.csv", "alpha.png", "hashes.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_train_then_resume_on_the_next_day(quickstart: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    import pyarrow.compute as pc

    events = pq.read_table(quickstart / "data" / "events.parquet")
    items = str(quickstart / "data" / "items.parquet")
    day3 = tmp_path / "day3.parquet"
    pq.write_table(events.filter(pc.equal(events["day"], 3)), day3)
    model = tmp_path / "m"
    assert main(["train", "--events", str(quickstart / "data" / "events.parquet"), "--items",
                 items, "--out", str(model), "--until", str(EPOCH + 3 * SECONDS_PER_DAY),
                 "--batch-size", "256", "--quiet"]) == 0
    _, before, _ = load_model(model)
    lines_before = len((model / "metrics.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["train", "--resume", str(model), "--events", str(day3), "--items", items,
                 "--quiet"]) == 0
    _, after, _ = load_model(model)
    assert after.step == before.step + -(-4000 // 256)
    records = [json.loads(x) for x in (model / "metrics.jsonl").read_text().splitlines()]
    assert len(records) > lines_before
    assert any(r.get("event") == "eval" for r in records[lines_before:])


def test_a_barely_trained_model_is_warned_about(quickstart: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """A loss that ends where it started (a learning rate far too small) gets a warning that
    says what to do; a model that learned does not."""
    data = quickstart / "data"
    common = ["train", "--events", str(data / "events.parquet"), "--items",
              str(data / "items.parquet"), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "still"), "--lr", "1e-7"]) == 0
    assert "the training loss barely moved" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "moved"), "--epochs", "3"]) == 0
    assert "barely moved" not in capsys.readouterr().err


def test_default_epochs_are_a_few_or_chosen_by_validation(quickstart: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Without validation events a new model trains a fixed few epochs; with them, early
    stopping chooses within the most epochs."""
    from twotower.cli import EPOCHS, EPOCHS_VALIDATED

    data = quickstart / "data"
    common = ["train", "--events", str(data / "events.parquet"), "--items",
              str(data / "items.parquet"), "--quiet", "--batch-size", "512"]
    assert main([*common, "--out", str(tmp_path / "fixed")]) == 0
    records = [json.loads(x) for x in (tmp_path / "fixed" / "metrics.jsonl").read_text()
               .splitlines()]
    [summary] = [r for r in records if r.get("event") == "input"]
    events = pq.read_table(data / "events.parquet").num_rows
    assert summary["steps"] == EPOCHS * -(-events // 512)
    assert not any(r.get("event") == "validation" for r in records)
    assert main([*common, "--out", str(tmp_path / "chosen"), "--split", "leave-last-out",
                 "--patience", "1"]) == 0
    records = [json.loads(x) for x in (tmp_path / "chosen" / "metrics.jsonl").read_text()
               .splitlines()]
    epochs = [r["epoch"] for r in records if r.get("event") == "validation"]
    [summary] = [r for r in records if r.get("event") == "input"]
    assert epochs == list(range(1, len(epochs) + 1)) and 1 < len(epochs) < EPOCHS_VALIDATED
    assert summary["early_stopped"] and summary["best_epoch"] == len(epochs) - 1
