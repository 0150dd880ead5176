"""Crash and stop tests: SIGKILL mid-run then resume, SIGTERM in a follow, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from tiny_log import TINY as TINY_LOG
from tiny_log import write_log
from twotower.checkpoint import (
    CHECKPOINTS,
    ESTIMATOR,
    LATEST,
    PUBLISHED,
    WEIGHTS,
    load_checkpoint,
    load_model,
)
from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY, SyntheticConfig, generate
from twotower.train import TrainConfig, Trainer, stop_on_signals

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = SyntheticConfig(num_users=200, num_items=500, num_days=3, events_per_day=2000,
                       num_channels=20, num_categories=4)


pytestmark = pytest.mark.usefixtures("one_thread")

# One script for every child process: the tiny log, a tiny model, a slow input if asked.
CHILD = """
import sys, time
import numpy as np, torch
from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer, TrainingData, stop_on_signals

torch.set_num_threads(1)
mode, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
TINY = SyntheticConfig(num_users=200, num_items=500, num_days=3, events_per_day=2000,
                       num_channels=20, num_categories=4)
COLUMNS = dict(item_buckets=1024, user_buckets=256, feature_buckets=64, dim=8, hidden=(16,),
               output_dim=8)
CONFIG = TrainConfig(batch_size=128, epochs=2, estimator_buckets=4096)


class SlowInput(TrainingData):
    def batches(self, batch_size, shuffle_seed=None):
        for rows in super().batches(batch_size, shuffle_seed):
            time.sleep(delay)
            yield rows


if mode == "follow":
    from twotower.data.interactions import Columns
    from twotower.follow import GrowingLog, follow
    torch.manual_seed(0)
    trainer = Trainer(TwoTowerModel(default_model_config(Columns(), **COLUMNS)), CONFIG,
                      out_dir=out, device="cpu", progress=False)
    log = GrowingLog(sys.argv[5], Columns(), trainer.model.config)
    with stop_on_signals(trainer):
        follow(trainer, sys.argv[4], log, poll_seconds=0.1)
    print("stopped", trainer.step, flush=True)
    sys.exit(0)

synthetic = generate(TINY)
interactions = load_interactions(synthetic.events, synthetic.items)
prepared = prepare(interactions, default_model_config(interactions.columns, **COLUMNS))
data = prepared.training_data(np.arange(len(interactions)))
data = SlowInput(data.queries, data.items, data.item_row, data.item_key, data.reward, data.rows)
if mode == "resume":
    trainer = Trainer.resume(out, device="cpu", progress=False, checkpoint_every=3)
else:
    torch.manual_seed(0)
    trainer = Trainer(TwoTowerModel(prepared.model_config), CONFIG, out_dir=out, device="cpu",
                      checkpoint_every=3, progress=False)
trainer.fit(data, "log")
trainer.save()
print("done", trainer.step, flush=True)
"""


# `twotower train` itself, its streamed batches slowed down so that a kill lands mid-run.
CLI_CHILD = """
import sys, time
import torch
from twotower.cli import main
from twotower.data.streaming import StreamingTrainingData

torch.set_num_threads(1)
delay, batches = float(sys.argv[1]), StreamingTrainingData.batches


def slow(self, batch_size, shuffle_seed=None):
    for rows in batches(self, batch_size, shuffle_seed):
        time.sleep(delay)
        yield rows


StreamingTrainingData.batches = slow
sys.exit(main(sys.argv[2:]))
"""


# A model saved into a model directory, paused (to be killed) before its estimator is written.
SAVE_CHILD = """
import sys, time
from pathlib import Path
import numpy as np, safetensors.numpy, torch
from twotower.checkpoint import save_model
from twotower.data.interactions import Columns
from twotower.experiment import default_model_config
from twotower.frequency import StreamingFrequencyEstimator
from twotower.towers import TwoTowerModel

out, seed, paused = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
torch.manual_seed(seed)
model = TwoTowerModel(default_model_config(Columns(), item_buckets=256, user_buckets=64,
                                           feature_buckets=16, dim=4, hidden=(8,), output_dim=4))
estimator = StreamingFrequencyEstimator(512)
estimator.update(np.random.default_rng(seed).integers(0, 100, 64))
if paused:
    def pause(*args, **kwargs):
        Path(paused[0]).touch()
        time.sleep(60)
    safetensors.numpy.save_file = pause
save_model(out, model, estimator, {"seed": seed})
"""


def child(tmp_path: Path, *args: str, script: str = CHILD) -> subprocess.Popen:
    path = tmp_path / f"child-{abs(hash(script))}.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(path), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 60) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out


def latest_step(model_dir: Path) -> int:
    """The step of the latest checkpoint, 0 before the first."""
    pointer = model_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return 0
    return int(pointer.read_text().strip().split("-")[1])


def wait_for(condition, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def assert_same_model(a: Path, b: Path) -> None:
    """Weights and estimator equal bit for bit, and so are the optimizer states."""
    weights_a = safetensors.torch.load_file(str(a / WEIGHTS))
    weights_b = safetensors.torch.load_file(str(b / WEIGHTS))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    estimator_a = safetensors.numpy.load_file(str(a / ESTIMATOR))
    estimator_b = safetensors.numpy.load_file(str(b / ESTIMATOR))
    for key in estimator_a:
        assert np.array_equal(estimator_a[key], estimator_b[key]), key
    state_a, state_b = load_checkpoint(a), load_checkpoint(b)
    assert state_a.state["step"] == state_b.state["step"]
    for opt_a, opt_b in zip(state_a.optimizers, state_b.optimizers, strict=True):
        for index, values in opt_a["state"].items():
            for key, value in values.items():
                other = opt_b["state"][index][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 2 * -(-TINY.num_days * TINY.events_per_day // 128)
    reference = child(tmp_path, "run", str(tmp_path / "reference"), "0")
    killed = child(tmp_path, "run", str(tmp_path / "killed"), "0.05")
    wait_for(lambda: latest_step(tmp_path / "killed") >= 9, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    at_kill = latest_step(tmp_path / "killed")
    assert 9 <= at_kill < steps  # killed mid-run, after some checkpoints
    assert not (tmp_path / "killed" / WEIGHTS).exists()  # the run never finished

    assert finish(child(tmp_path, "resume", str(tmp_path / "killed"), "0")).split() == \
        ["done", str(steps)]
    assert finish(reference).split() == ["done", str(steps)]
    assert_same_model(tmp_path / "reference", tmp_path / "killed")
    lines = [json.loads(x)
             for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r.get("event") == "resume"] == [at_kill]


@pytest.mark.slow
def test_sigkill_mid_streamed_run_then_resume_streams_to_the_same_model(tmp_path):
    schema = write_log(tmp_path / "data")
    events = TINY_LOG.num_days * TINY_LOG.events_per_day
    steps = 2 * -(-events // 128)  # every piece of the stream is cut at whole batches

    def command(out: Path, *flags: str) -> list[str]:
        return ["train", "--schema", str(schema), "--streaming", "--batch-size", "128",
                "--checkpoint-every", "3", "--quiet", *flags, "--out", str(out)]

    reference = child(tmp_path, "0", *command(tmp_path / "reference", "--epochs", "2"),
                      script=CLI_CHILD)
    killed = child(tmp_path, "0.05", *command(tmp_path / "killed", "--epochs", "2"),
                   script=CLI_CHILD)
    wait_for(lambda: latest_step(tmp_path / "killed") >= 9, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    at_kill = latest_step(tmp_path / "killed")
    assert 9 <= at_kill < steps

    # The events in memory are another input than the stream it stopped in: an error
    # naming both, and the checkpoint is left as it was.
    resume = ["train", "--resume", str(tmp_path / "killed"), "--schema", str(schema),
              "--batch-size", "128", "--checkpoint-every", "3", "--quiet"]
    wrong = child(tmp_path, "0", *resume, script=CLI_CHILD)
    err = wrong.communicate(timeout=60)[1]
    assert wrong.returncode == 2, err
    assert "stopped partway through input stream:" in err and "given input events:" in err
    assert latest_step(tmp_path / "killed") == at_kill
    logged = (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert '"event": "eval"' not in logged  # refused before testing on the wrong events

    finish(child(tmp_path, "0", *resume, "--streaming", script=CLI_CHILD))
    finish(reference)
    assert load_checkpoint(tmp_path / "killed").state["step"] == steps
    assert_same_model(tmp_path / "reference", tmp_path / "killed")


def test_sigkill_during_a_save_leaves_the_previous_model_whole(tmp_path):
    model = tmp_path / "model"
    finish(child(tmp_path, str(model), "0", script=SAVE_CHILD))
    before_model, before_estimator, before_config = load_model(model)
    saving = child(tmp_path, str(model), "1", str(tmp_path / "paused"), script=SAVE_CHILD)
    wait_for(lambda: (tmp_path / "paused").exists(), saving)  # weights written, estimator not
    saving.send_signal(signal.SIGKILL)
    saving.communicate(timeout=30)

    after_model, after_estimator, after_config = load_model(model)
    assert after_config["seed"] == before_config["seed"] == 0
    for key, value in before_model.state_dict().items():
        assert torch.equal(after_model.state_dict()[key], value), key
    for key, value in before_estimator.state_dict().items():
        assert np.array_equal(after_estimator.state_dict()[key], value), key
    assert list((model / PUBLISHED).glob(".*"))  # what the killed save left

    Trainer(after_model, TrainConfig(estimator_buckets=64), out_dir=model, device="cpu",
            progress=False)  # the next run removes it
    assert not list((model / PUBLISHED).glob(".*"))
    assert load_model(model)[2]["seed"] == 0


def test_sigterm_stops_after_the_batch_and_resumes_exactly(tmp_path):
    """In process: a SIGTERM during training stops it after the current batch; the final
    checkpoint resumes to the weights of a run never stopped."""
    from twotower.data.interactions import load_interactions
    from twotower.experiment import default_model_config, prepare
    from twotower.towers import TwoTowerModel
    from twotower.train import TrainConfig, Trainer, TrainingData

    synthetic = generate(TINY)
    interactions = load_interactions(synthetic.events, synthetic.items)
    prepared = prepare(interactions, default_model_config(
        interactions.columns, item_buckets=1024, user_buckets=256, feature_buckets=64, dim=8,
        hidden=(16,), output_dim=8))
    rows = np.arange(3000)

    class SignalAt(TrainingData):
        def batches(self, batch_size, shuffle_seed=None):
            for index, batch in enumerate(super().batches(batch_size, shuffle_seed)):
                if index == 7:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    def run(out: Path, data: TrainingData) -> Trainer:
        torch.manual_seed(0)
        trainer = Trainer(TwoTowerModel(prepared.model_config),
                          TrainConfig(batch_size=128, estimator_buckets=4096), out_dir=out,
                          device="cpu", progress=False)
        with stop_on_signals(trainer):
            summary = trainer.fit(data, "log")
        trainer.save()
        return trainer, summary

    _, summary = run(tmp_path / "reference", prepared.training_data(rows))
    assert not summary["stopped"]
    base = prepared.training_data(rows)
    stopped, summary = run(tmp_path / "stopped", SignalAt(
        base.queries, base.items, base.item_row, base.item_key, base.reward, base.rows))
    assert summary["stopped"] and summary["steps"] == 8 and stopped.position.batch == 8
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = Trainer.resume(tmp_path / "stopped", device="cpu", progress=False)
    assert resumed.fit(prepared.training_data(rows), "log")["steps"] == -(-3000 // 128) - 8
    resumed.save()
    assert_same_model(tmp_path / "reference", tmp_path / "stopped")


@pytest.mark.slow
def test_follow_trains_partitions_in_order_waits_and_stops_on_sigterm(tmp_path):
    synthetic = generate(TINY)
    events, items = synthetic.events, synthetic.items
    pq.write_table(items, tmp_path / "items.parquet")
    folder = tmp_path / "log"
    folder.mkdir()
    day = pc.divide(pc.subtract(events.column("timestamp"), EPOCH), SECONDS_PER_DAY)

    def publish(d: int) -> None:  # written under a hidden name, then renamed: atomic
        pq.write_table(events.filter(pc.equal(day, d)), folder / f".day-{d}.parquet")
        os.rename(folder / f".day-{d}.parquet", folder / f"day-{d}.parquet")

    publish(0)
    publish(1)
    out = tmp_path / "model"
    follower = child(tmp_path, "follow", str(out), "0", str(folder),
                     str(tmp_path / "items.parquet"))

    def done() -> list[str]:
        return load_checkpoint(out).state["inputs_done"] if latest_step(out) else []

    wait_for(lambda: done() == ["day-0.parquet", "day-1.parquet"], follower)
    publish(2)  # the next day appears while it waits
    wait_for(lambda: len(done()) == 3, follower)
    follower.send_signal(signal.SIGTERM)
    per_day = [2 * -(-int(pc.sum(pc.equal(day, d)).as_py()) // 128) for d in range(3)]
    steps = sum(per_day)
    assert finish(follower).split() == ["stopped", str(steps)]
    saved = load_checkpoint(out)
    assert saved.state["step"] == steps
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(r["input"], r["step"]) for r in lines if r.get("event") == "eval"]
    assert [name for name, _ in evaluated] == ["day-0.parquet", "day-1.parquet", "day-2.parquet"]
    assert [step for _, step in evaluated] == [0, per_day[0], per_day[0] + per_day[1]]
    trained = [r for r in lines if r.get("event") == "input"]
    assert [r["input"] for r in trained] == ["day-0.parquet", "day-1.parquet", "day-2.parquet"]
    assert [r["step"] for r in trained] == sorted(r["step"] for r in trained)
    assert (out / WEIGHTS).exists()
