"""The HTML report, and ``twotower report`` over model directories continued day by day."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import matplotlib
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from twotower.cli import main
from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY, SyntheticConfig, generate, write
from twotower.report import per_day, run_from_model_dir

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(plain, continued)``: a model trained on day 0, and the same model then resumed on
    days 1 and 2 (each tested before it is trained on)."""
    root = tmp_path_factory.mktemp("report")
    paths = write(generate(SyntheticConfig(num_users=80, num_items=300, num_days=3,
                                           events_per_day=400)), root / "data")
    events, items = pq.read_table(paths["events"]), str(paths["items"])
    plain, continued = root / "plain", root / "continued"
    assert main(["train", "--events", str(paths["events"]), "--items", items, "--out",
                 str(plain), "--until", str(EPOCH + SECONDS_PER_DAY), "--batch-size", "128",
                 "--quiet"]) == 0
    shutil.copytree(plain, continued)
    for day in (1, 2):
        pq.write_table(events.filter(pc.equal(events["day"], day)), root / f"day{day}.parquet")
        assert main(["train", "--resume", str(continued), "--events",
                     str(root / f"day{day}.parquet"), "--items", items, "--quiet"]) == 0
    return plain, continued


def read_log(model: Path) -> list[dict]:
    return [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]


def test_per_day_keeps_the_last_test_and_averages_the_loss_over_steps():
    history = [{"event": "eval", "input": "d1", "held_out": "before", "recall@10": 0.1},
               {"event": "input", "input": "d1", "steps": 3, "loss": 2.0},
               {"event": "eval", "input": "d2", "held_out": "before", "recall@10": 0.2},
               {"event": "input", "input": "d2", "steps": 1, "loss": 9.0, "stopped": True},
               {"event": "eval", "input": "d2", "held_out": "before", "recall@10": 0.3},
               {"event": "input", "input": "d2", "steps": 3, "loss": 1.0},
               {"event": "input", "input": "d2", "skipped": True},
               {"event": "eval", "input": "last", "recall@10": 0.9}]  # not held out
    days = per_day(history)
    assert [(d["input"], d["recall@10"]) for d in days] == [("d1", 0.1), ("d2", 0.3)]
    assert [d["training_loss"] for d in days] == [2.0, pytest.approx((9 + 3) / 4)]


def test_report_of_a_continued_model_plots_held_out_recall_by_day(models, tmp_path, capsys):
    _, continued = models
    assert main(["report", str(continued), "--out", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    days_png = (tmp_path / "days.png").read_bytes()
    assert base64.b64encode(days_png).decode() in page  # embedded, so the page stands alone

    log = read_log(continued)
    tests = [r for r in log if r.get("held_out")]
    trained = [r for r in log if r.get("event") == "input"][1:]  # after day 0's plain training
    assert len(tests) == 2 and [r["input"] for r in tests] == [r["input"] for r in trained]
    for test, train in zip(tests, trained, strict=True):
        for value in (test["recall@10"], test["recall@100"], train["loss"]):
            assert f"<td>{value:.4g}</td>" in page
    # The metrics table shows the last day's held-out metrics.
    table = page[page.index("<h2>Metrics</h2>"):page.index("<h2>Plots</h2>")]
    assert f"<td>continued</td><td>{tests[-1]['queries']:,.0f}</td><td>" \
           f"{tests[-1]['recall@10']:.4g}</td>" in table

    # The by-day figure plots exactly those values, day 1 and day 2.
    import matplotlib.pyplot as plt

    from twotower.report import _plot_days

    run, _ = run_from_model_dir(continued)
    fig, axes = plt.subplots(1, 2)
    _plot_days([run], axes)
    lines = {line.get_label(): line for line in axes[0].lines}
    for k in (10, 50, 100):
        assert list(lines[f"continued recall@{k}"].get_xdata()) == [1, 2]
        assert list(lines[f"continued recall@{k}"].get_ydata()) == [r[f"recall@{k}"]
                                                                   for r in tests]
    assert list(axes[1].lines[0].get_ydata()) == [r["loss"] for r in trained]
    plt.close(fig)


def test_model_without_per_day_entries_still_gets_a_report(models, tmp_path):
    plain, continued = models
    assert main(["report", str(plain), "--out", str(tmp_path / "one")]) == 0
    page = (tmp_path / "one" / "report.html").read_text()
    assert (tmp_path / "one" / "training.png").exists()
    assert not (tmp_path / "one" / "days.png").exists()
    assert "plain: no evaluation record in its metrics.jsonl" in page
    assert "No days plot: no run has held-out evaluations by day" in page
    assert "No frequency plot" in page and "No recall plot" in page

    assert main(["report", str(plain), str(continued), "--out", str(tmp_path / "two")]) == 0
    page = (tmp_path / "two" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # recall, deciles, training, days
    assert "<h3>continued</h3>" in page and "<h3>plain</h3>" not in page


def test_bad_model_directories_are_clear_errors(models, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert f"{tmp_path / 'nope'} is not a model directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    with open(broken / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    lines = len((broken / "metrics.jsonl").read_text().splitlines())
    assert main(["report", str(broken), "--out", str(tmp_path / "r")]) == 2
    assert f"{broken / 'metrics.jsonl'}, line {lines}: not a JSON record" in \
        capsys.readouterr().err
