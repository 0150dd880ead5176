"""``twotower evaluate --index``: the same test queries ranked exactly and by the index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tiny_serving import make_model, without_fingerprint
from twotower.checkpoint import load_model
from twotower.cli import main
from twotower.data.interactions import Columns
from twotower.data.schema import Schema
from twotower.data.sources import load
from twotower.data.splits import time_split
from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY, SyntheticConfig, generate, write
from twotower.evaluate import embed
from twotower.experiment import prepare
from twotower.index import index_items

pytestmark = pytest.mark.usefixtures("one_thread")

CUTOFF = str(EPOCH + SECONDS_PER_DAY)  # test on the second day


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(model_dir, events, items)``: a two-day synthetic log and a small random model."""
    root = tmp_path_factory.mktemp("evaluate")
    paths = write(generate(SyntheticConfig(num_users=80, num_items=400, num_days=2,
                                           events_per_day=400)), root / "data")
    return make_model(root / "model"), paths["events"], paths["items"]


def evaluate(setup: tuple[Path, Path, Path], index: Path, *flags: str) -> int:
    model, events, items = setup
    return main(["evaluate", str(model), "--events", str(events), "--items", str(items),
                 "--cutoff", CUTOFF, "--index", str(index), *flags])


@pytest.mark.parametrize("flags", [[], ["--exclude-seen"]])
def test_exact_index_gives_the_exact_metrics_and_both_are_printed(setup, tmp_path, capsys,
                                                                  flags):
    model, _, items = setup
    assert main(["index", str(model), "--items", str(items), "--out", str(tmp_path / "ix"),
                 "--factory", "Flat"]) == 0
    capsys.readouterr()
    assert evaluate(setup, tmp_path / "ix", *flags) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    through_index = metrics.pop("index")
    assert metrics["queries"] == 400 and 0 < metrics["recall@100"] < 1
    assert through_index == pytest.approx(metrics, nan_ok=True)
    row = next(line for line in out.err.splitlines() if line.startswith("recall@100 "))
    assert row.split() == ["recall@100", f"{metrics['recall@100']:.4f}",
                           f"{through_index['recall@100']:.4f}", "+0.0%"]


def test_index_in_another_item_order_is_matched_by_key(setup, tmp_path, capsys):
    model, _, items = setup
    table = pq.read_table(items)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), tmp_path / "reversed.parquet")
    index_items(model, tmp_path / "reversed.parquet", "Flat").save(tmp_path / "ix")
    assert evaluate(setup, tmp_path / "ix", "--exclude-seen") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics.pop("index") == pytest.approx(metrics, nan_ok=True)


def test_index_of_other_items_is_an_error_naming_the_difference(setup, tmp_path, capsys):
    model, _, items = setup
    table = pq.read_table(items)
    key = table.schema.get_field_index("item_id")
    extra = table.slice(0, 3).set_column(key, "item_id", pa.array([10**6, 10**6 + 1, 10**6 + 2]))
    pq.write_table(pa.concat_tables([table.slice(10), extra]), tmp_path / "other.parquet")
    index_items(model, tmp_path / "other.parquet", "Flat").save(tmp_path / "ix")
    assert evaluate(setup, tmp_path / "ix") == 2
    err = capsys.readouterr().err
    assert f"index {tmp_path / 'ix'} holds 393 items and the items table 400" in err
    missing = table.column("item_id").to_pylist()[:5]
    assert f"10 of the table's items are not in the index (for example {missing})" in err
    assert "3 of the index's items are not in the table (for example [1000000, 1000001, " \
           "1000002])" in err


def test_index_of_another_model_is_an_error(setup, tmp_path, capsys):
    _, _, items = setup
    other = make_model(tmp_path / "other", seed=1)
    index_items(other, items, "Flat").save(tmp_path / "ix")
    assert evaluate(setup, tmp_path / "ix") == 2
    assert "was built from another model" in capsys.readouterr().err


def test_index_that_records_no_model_is_an_error(setup, tmp_path, capsys):
    model, _, items = setup
    index_items(model, items, "Flat").save(tmp_path / "ix")
    assert evaluate(setup, without_fingerprint(tmp_path / "ix", tmp_path / "unsigned")) == 2
    assert "records no model fingerprint" in capsys.readouterr().err


def test_an_approximate_index_shows_its_loss(setup, tmp_path, capsys):
    model, _, items = setup
    assert main(["index", str(model), "--items", str(items), "--out", str(tmp_path / "ix"),
                 "--factory", "IVF16,Flat", "--nprobe", "1"]) == 0
    capsys.readouterr()
    assert evaluate(setup, tmp_path / "ix") == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    exact, approximate = metrics["recall@100"], metrics["index"]["recall@100"]
    assert approximate < exact
    row = next(line for line in out.err.splitlines() if line.startswith("recall@100 "))
    assert row.split()[-1] == f"{(approximate / exact - 1) * 100:+.1f}%"


def test_chosen_cut_offs_with_bootstrap_intervals(setup, capsys):
    model, events, items = setup
    assert main(["evaluate", str(model), "--events", str(events), "--items", str(items),
                 "--cutoff", CUTOFF, "--ks", "5", "20", "--bootstrap", "200"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert "recall@10" not in metrics and "coverage@20" in metrics
    for name in ("recall@5", "recall@20", "ndcg@5", "ndcg@20"):
        assert metrics[f"{name}/ci_low"] <= metrics[name] <= metrics[f"{name}/ci_high"]
        assert metrics[f"{name}/ci_low"] < metrics[f"{name}/ci_high"]


@pytest.mark.parametrize("flags", [["--ks", "0"], ["--bootstrap", "-1"]])
def test_bad_cut_off_or_resample_count_is_refused(setup, capsys, flags):
    model, events, items = setup
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(model), "--events", str(events), "--items", str(items), *flags])
    assert exit_.value.code == 2
    assert "must be at least" in capsys.readouterr().err


def test_a_split_flag_is_never_ignored(setup, tmp_path, capsys):
    _, events, items = setup
    data = ["--events", str(events), "--items", str(items)]
    assert main(["train", *data, "--test-fraction", "0.5", "--out", str(tmp_path / "m"),
                 "--batch-size", "128", "--quiet"]) == 0  # a time split, as with --cutoff
    split = json.loads((tmp_path / "m" / "config.json").read_text())["split"]
    assert split["kind"] == "time" and split["test_fraction"] == 0.5
    capsys.readouterr()
    for flags in (["--split", "leave-last-out", "--test-fraction", "0.5"],
                  ["--split", "none", "--cutoff", CUTOFF]):
        assert main(["train", *data, *flags, "--out", str(tmp_path / "n"), "--quiet"]) == 2
        assert "are for a time split" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_evaluating_on_other_events_than_training_read_is_not_warned_about(setup, tmp_path,
                                                                         capsys):
    """A model trained on all of one events file, evaluated with a split of the same file,
    may have trained on the test events (a warning); on another file it cannot."""
    _, events, items = setup
    day_one = tmp_path / "day1.parquet"
    table = pq.read_table(events)
    pq.write_table(table.filter(pc.less(table.column("timestamp"), int(CUTOFF))),
                   day_one)
    model = tmp_path / "model"
    assert main(["train", "--events", str(day_one), "--items", str(items), "--out", str(model),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(model), "--events", str(events), "--cutoff", CUTOFF,
                 "--bootstrap", "0"]) == 0
    assert "warning" not in json.loads(capsys.readouterr().err.splitlines()[-1])
    assert main(["evaluate", str(model), "--events", str(day_one), "--split",
                 "leave-last-out", "--bootstrap", "0"]) == 0
    assert "may have been trained on" in json.loads(capsys.readouterr().err.splitlines()[-1])[
        "warning"]


def test_popularity_penalty_ranks_by_score_minus_beta_log_p(setup, capsys):
    """Recall@10 under ``--popularity-penalty`` against a brute-force ranking."""
    model_dir, events, items = setup
    flags = ["evaluate", str(model_dir), "--events", str(events), "--items", str(items),
             "--cutoff", CUTOFF, "--bootstrap", "0", "--ks", "10"]
    assert main(flags) == 0
    plain = json.loads(capsys.readouterr().out)
    beta = -0.5  # strongly towards popular items, so the ranking must change
    assert main([*flags, "--popularity-penalty", str(beta)]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    assert json.loads(out.err.splitlines()[0])["popularity_penalty"] == beta

    model, estimator, config = load_model(model_dir)
    columns = Columns(**{**config["columns"],
                         "item_features": tuple(config["columns"]["item_features"])})
    interactions = load(Schema.from_columns(columns, str(events), str(items)))
    test = time_split(interactions.timestamp, int(CUTOFF)).part("test")
    prepared = prepare(interactions, model.config)
    u = embed(model, prepared.queries, "query", test).double().numpy()
    v = embed(model, prepared.items, "item").double().numpy()
    scores = u @ v.T - beta * np.log(estimator.probability(interactions.item_keys))[None, :]
    positives = interactions.item_row[test]
    rank = (scores > scores[np.arange(len(u)), positives][:, None]).sum(axis=1)
    assert got["recall@10"] == pytest.approx(float(np.mean(rank < 10)))
    assert got["recall@10"] != pytest.approx(plain["recall@10"])


def test_popularity_penalty_is_exact_only(setup, tmp_path, capsys):
    model_dir, events, items = setup
    assert main(["evaluate", str(model_dir), "--events", str(events), "--items", str(items),
                 "--cutoff", CUTOFF, "--popularity-penalty", "0.1",
                 "--index", str(tmp_path / "ix")]) != 0
    assert "without --index" in capsys.readouterr().err
