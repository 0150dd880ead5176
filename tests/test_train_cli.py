"""`twotower train` as a user runs it: options checked first, runs that never mix, resumes
that go on where they should."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from test_resume import assert_same_model
from tiny_log import write_log
from twotower.checkpoint import WEIGHTS, checkpoint_dirs, load_checkpoint, load_model
from twotower.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def schema(tmp_path: Path) -> Path:
    return write_log(tmp_path / "data")


def train(schema: Path, out: Path, *flags: str) -> int:
    return main(["train", "--schema", str(schema), "--out", str(out), "--batch-size", "128",
                 "--quiet", *flags])


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"),
                                         ("--temperature", "nan"), ("--temperature", "inf"),
                                         ("--test-fraction", "1.5"), ("--batch-size", "1"),
                                         ("--poll", "-inf"), ("--epochs", "0")])
def test_a_bad_number_is_refused_before_anything_is_read(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--schema", str(tmp_path / "missing.yaml"), "--out",
              str(tmp_path / "m"), f"{flag}={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and "missing.yaml" not in err
    assert not (tmp_path / "m").exists()


def test_a_loss_that_becomes_nan_stops_naming_the_step_and_keeps_the_last_checkpoint(
        schema, tmp_path, capsys):
    out = tmp_path / "m"  # a valid but absurd temperature: the scores overflow in a few steps
    assert train(schema, out, "--temperature", "1e-30", "--checkpoint-every", "1") == 2
    err = capsys.readouterr().err
    step = int(re.search(r"became (?:nan|inf|non-finite) at step (\d+)", err).group(1))
    latest = load_checkpoint(out)
    assert latest.state["step"] == step - 1 and str(latest.path) in err
    assert all(torch.isfinite(p).all() for p in latest.model.parameters())
    assert not (out / "config.json").exists()  # no model was published


def steps_of(out: Path) -> list[int]:
    return [load_checkpoint(p).state["step"] for p in checkpoint_dirs(out)]


def test_a_new_run_into_a_directory_holding_a_run_is_refused_unless_overwritten(
        schema, tmp_path, capsys):
    out = tmp_path / "m"
    assert train(schema, out, "--epochs", "4", "--checkpoint-every", "10") == 0
    weights = (out / WEIGHTS).read_bytes()
    before = steps_of(out)
    capsys.readouterr()
    assert train(schema, out, "--checkpoint-every", "4") == 2
    err = capsys.readouterr().err
    assert f"--resume {out}" in err and "--overwrite" in err
    assert steps_of(out) == before and (out / WEIGHTS).read_bytes() == weights  # untouched
    assert load_checkpoint(out).state["step"] == before[-1]

    assert train(schema, out, "--checkpoint-every", "4", "--overwrite") == 0
    steps = load_checkpoint(out).state["step"]  # LATEST names a checkpoint that exists
    assert steps < before[-1] and steps_of(out)[-1] == steps
    assert all(s <= steps for s in steps_of(out))  # nothing of the old run is left
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in metrics) == steps


def test_a_bad_row_late_in_a_stream_stops_the_run_before_anything_is_written(
        schema, tmp_path, capsys):
    last = schema.parent / "events" / "part-1.parquet"
    events = pq.read_table(last)
    reward = events.column("reward").to_numpy().copy()
    reward[-3] = -1.0  # far past the first checkpoint's worth of events
    pq.write_table(events.set_column(events.schema.get_field_index("reward"), "reward",
                                     pa.array(reward)), last, row_group_size=500)
    out = tmp_path / "m"
    assert train(schema, out, "--streaming", "--checkpoint-every", "2") == 2
    err = capsys.readouterr().err
    assert "part-1.parquet" in err and f"row {len(reward) - 3}" in err and "reward" in err
    assert not out.exists()


def test_resume_with_more_epochs_trains_on_to_the_model_of_a_longer_run(schema, tmp_path,
                                                                        capsys):
    assert train(schema, tmp_path / "two", "--epochs", "2") == 0
    assert train(schema, tmp_path / "one", "--epochs", "1") == 0
    one_epoch = load_checkpoint(tmp_path / "one").state["step"]
    resume = ["train", "--resume", str(tmp_path / "one"), "--schema", str(schema), "--quiet"]
    assert main([*resume, "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "one").state["step"] == 2 * one_epoch
    assert_same_model(tmp_path / "two", tmp_path / "one")

    capsys.readouterr()
    assert main([*resume, "--epochs", "2"]) == 0  # nothing left: said, and nothing changes
    assert "nothing left to do" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "one").state["step"] == 2 * one_epoch


def test_a_checkpoint_is_read_wherever_a_model_directory_is(schema, tmp_path, capsys):
    from twotower.index import ItemIndex
    from twotower.recommend import Recommender

    out = tmp_path / "m"
    assert train(schema, out, "--checkpoint-every", "5") == 0
    step = checkpoint_dirs(out)[0]
    saved = load_checkpoint(step)
    model, estimator, config = load_model(step)
    assert config["train"]["batch_size"] == 128
    assert config["schema"] == saved.state["extra"]["schema"]
    assert estimator.step == saved.state["step"]
    for key, value in saved.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)

    items = str(schema.parent / "items.parquet")
    assert main(["index", str(step), "--items", items, "--out", str(tmp_path / "ix")]) == 0
    assert len(ItemIndex.load(tmp_path / "ix")) == pq.read_table(items).num_rows
    Recommender.load(step, tmp_path / "ix")  # the index was built from this checkpoint
    capsys.readouterr()
    assert main(["evaluate", str(step), "--split", "time", "--test-fraction", "0.2"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] > 0


def test_threads_are_one_by_default_and_the_user_sets_them(schema, tmp_path):
    few = ["--split", "time", "--test-fraction", "0.9"]  # a few steps are enough
    torch.set_num_threads(2)
    assert train(schema, tmp_path / "a", *few) == 0
    assert torch.get_num_threads() == 1
    assert train(schema, tmp_path / "b", *few, "--threads", "2") == 0
    assert torch.get_num_threads() == 2
    with pytest.raises(SystemExit):
        train(schema, tmp_path / "c", "--threads", "0")


def test_more_epochs_on_a_validated_run_go_on_validating_as_a_longer_run(schema, tmp_path):
    split = ["--split", "leave-last-out"]
    assert train(schema, tmp_path / "four", *split, "--patience", "5", "--epochs", "4") == 0
    assert train(schema, tmp_path / "two", *split, "--patience", "5", "--epochs", "2") == 0
    assert main(["train", "--resume", str(tmp_path / "two"), "--schema", str(schema),
                 "--quiet", *split, "--epochs", "4"]) == 0
    assert_same_model(tmp_path / "four", tmp_path / "two")  # the best epoch of four, kept
    logged = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if r.get("event") == "validation"] == [1, 2, 3, 4]


def test_a_second_trainer_on_a_directory_being_written_stops_at_once(schema, tmp_path,
                                                                     capsys):
    """Two trainers on one --out both ran to the end, their metrics logs interleaved in one
    file; with --overwrite the second would remove the first one's run under it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "OMP_NUM_THREADS": "1"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "twotower", "train", "--follow", str(schema.parent / "events"),
         "--items", str(schema.parent / "items.parquet"), "--out", str(out), "--poll", "0.1",
         "--batch-size", "128", "--quiet"], env=env)
    try:
        for _ in range(600):  # until it has trained on both files and waits for more
            if len(checkpoint_dirs(out) if out.exists() else []) == 2 or follower.poll():
                break
            time.sleep(0.1)
        assert follower.poll() is None and len(checkpoint_dirs(out)) == 2
        written = sorted(p.name for p in out.iterdir())
        metrics = (out / "metrics.jsonl").read_bytes()
        capsys.readouterr()
        for flags in ((), ("--overwrite",)):
            assert train(schema, out, "--epochs", "1", *flags) == 2
            err = capsys.readouterr().err
            assert f"{out} is being written by another training run" in err
            assert sorted(p.name for p in out.iterdir()) == written
            assert (out / "metrics.jsonl").read_bytes() == metrics
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(timeout=60)
    assert train(schema, out, "--epochs", "1", "--overwrite") == 0  # the lock was let go


def test_a_run_that_fails_before_writing_leaves_no_directory_or_lock(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--events", str(tmp_path / "none.parquet"), "--items",
                 str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
    assert "none.parquet" in capsys.readouterr().err and not out.exists()
