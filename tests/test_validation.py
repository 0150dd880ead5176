"""Validation every epoch: early-stopping bookkeeping, the best epoch kept, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twotower.checkpoint import load_checkpoint, load_model
from twotower.cli import main
from twotower.data.interactions import load_interactions
from twotower.data.splits import split_log
from twotower.data.synthetic import SyntheticConfig, generate, write
from twotower.experiment import default_model_config, fit, prepare
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer, TrainingData, TrainingStopped, fit_and_save
from twotower.validation import EarlyStopping, Validation

TINY = SyntheticConfig(num_users=100, num_items=200, num_days=2, events_per_day=500,
                       num_channels=10, num_categories=4)
# On TINY with these settings validation recall@50 peaks at epoch 3 and then drops for
# two epochs, so a patience of 2 stops the run after epoch 5.
CONFIG = TrainConfig(batch_size=64, epochs=10, patience=2, shuffle=True, learning_rate=0.05,
                     estimator_buckets=1024)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- EarlyStopping by hand -------------------------------------------------------------

def test_early_stopping_bookkeeping_by_hand():
    stopping = EarlyStopping(patience=2)
    assert (stopping.best_epoch, stopping.best_value, stopping.waited) == (-1, -np.inf, 0)
    assert stopping.update(0, 10, 0.2) and not stopping.done
    assert stopping.update(1, 20, 0.3) and not stopping.done
    assert (stopping.best_epoch, stopping.best_step, stopping.best_value) == (1, 20, 0.3)
    assert not stopping.update(2, 30, 0.3)  # equal is no improvement
    assert stopping.waited == 1 and not stopping.done
    assert stopping.update(3, 40, 0.31)  # a new best resets the wait
    assert stopping.waited == 0 and stopping.best_epoch == 3
    assert not stopping.update(4, 50, 0.1)
    assert not stopping.done
    assert not stopping.update(5, 60, 0.2)
    assert stopping.done and stopping.waited == 2
    assert (stopping.best_epoch, stopping.best_step, stopping.best_value) == (3, 40, 0.31)


def test_patience_one_stops_at_the_first_epoch_without_improvement():
    stopping = EarlyStopping(metric="ndcg@10", patience=1)
    assert stopping.update(0, 1, 0.5)
    assert not stopping.update(1, 2, 0.4)
    assert stopping.done


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_score_is_an_error(value):
    stopping = EarlyStopping()
    stopping.update(0, 1, 0.5)
    with pytest.raises(ValueError, match=r"validation recall@50 is .* after epoch 2"):
        stopping.update(1, 2, value)
    assert stopping.best_epoch == 0 and stopping.waited == 0  # left as it was


@pytest.mark.parametrize("patience", [0, -1])
def test_patience_below_one_is_an_error(patience):
    with pytest.raises(ValueError, match="patience must be >= 1"):
        EarlyStopping(patience=patience)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        TrainConfig(patience=patience)


def test_early_stopping_state_round_trips_through_json():
    stopping = EarlyStopping(patience=4)
    stopping.update(0, 7, 0.25)
    stopping.update(1, 14, 0.125)
    again = EarlyStopping(**json.loads(json.dumps(stopping.state_dict())))
    assert again == stopping


def test_validation_needs_events():
    with pytest.raises(ValueError, match="at least one validation event"):
        Validation(None, np.arange(3), np.zeros(0, np.int64))


# --- training with validation -----------------------------------------------------------

@pytest.fixture(scope="module")
def log():
    synthetic = generate(TINY)
    interactions = load_interactions(synthetic.events, synthetic.items)
    prepared = prepare(interactions, default_model_config(
        interactions.columns, item_buckets=256, user_buckets=64, feature_buckets=32, dim=4,
        hidden=(8,), output_dim=4))
    return prepared, split_log("leave-last-out", interactions.user, interactions.timestamp)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name


def records(path, event=None) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [r for r in lines if event is None or r.get("event") == event]


def test_fit_validates_every_epoch_stops_at_patience_and_keeps_the_best(log, tmp_path):
    prepared, split = log
    model, _ = fit(prepared, split.train, CONFIG, tmp_path, progress=False,
                   valid_rows=split.valid)
    per_epoch = -(-len(split.train) // CONFIG.batch_size)
    validations = records(tmp_path / "metrics.jsonl", "validation")
    [summary] = records(tmp_path / "metrics.jsonl", "input")
    epochs = len(validations)
    assert [r["epoch"] for r in validations] == list(range(1, epochs + 1))
    assert [r["step"] for r in validations] == [per_epoch * e for e in range(1, epochs + 1)]
    assert summary["steps"] == per_epoch * epochs
    values = [r["recall@50"] for r in validations]
    best = int(np.argmax(values))  # the first of equal bests
    assert epochs < CONFIG.epochs and summary["early_stopped"]
    assert epochs == best + 1 + CONFIG.patience  # patience epochs after the best, no more
    assert all(v <= values[best] for v in values[best + 1:])
    assert summary["best_epoch"] == best + 1 == validations[-1]["best_epoch"]
    assert summary["recall@50"] == values[best]

    # The published model is the best epoch's: scored again, it gives the logged value.
    validation = Validation(prepared, split.train, split.valid)
    saved, _, config = load_model(tmp_path)
    assert validation.score(saved) == {k: v for k, v in validations[best].items()
                                       if k.startswith(("recall@", "ndcg@"))}
    assert_same_weights(model, saved)
    assert config["train"]["patience"] == 2
    assert_same_weights(load_checkpoint(tmp_path).model, saved)  # so does the checkpoint


def test_without_valid_rows_nothing_is_validated(log, tmp_path):
    prepared, split = log
    fit(prepared, split.train, TrainConfig(batch_size=64, epochs=2, estimator_buckets=1024),
        tmp_path, progress=False, valid_rows=np.zeros(0, np.int64))
    assert records(tmp_path / "metrics.jsonl", "validation") == []
    assert load_checkpoint(tmp_path).best is None  # nothing to keep
    [summary] = records(tmp_path / "metrics.jsonl", "input")
    assert "best_epoch" not in summary and summary["steps"] == 2 * -(-len(split.train) // 64)


class StopAt(TrainingData):
    """Asks ``trainer`` to stop after batch ``index`` of epoch ``epoch`` (0-based)."""

    trainer: Trainer
    at: tuple[int, int]

    def batches(self, batch_size, shuffle_seed=None):
        self.epoch = getattr(self, "epoch", -1) + 1
        for index, rows in enumerate(super().batches(batch_size, shuffle_seed)):
            if (self.epoch, index) == self.at:
                self.trainer.stop_requested = True
            yield rows


def new_trainer(prepared, out_dir) -> Trainer:
    torch.manual_seed(0)
    return Trainer(TwoTowerModel(prepared.model_config), CONFIG, out_dir=out_dir,
                   device="cpu", progress=False)


def reference_and_stopped(log, tmp_path, at) -> tuple[Validation, Trainer, dict, Trainer]:
    """``(validation, reference trainer, its summary, trainer stopped at (epoch, batch))``:
    an uninterrupted run with validation, and the same run stopped by a signal at ``at``
    (``at`` may be a function of the reference summary)."""
    prepared, split = log
    validation = Validation(prepared, split.train, split.valid)
    reference = new_trainer(prepared, tmp_path / "reference")
    expected = fit_and_save(reference, prepared.training_data(split.train),
                            validation=validation)
    stopped = new_trainer(prepared, tmp_path / "stopped")
    base = prepared.training_data(split.train)
    data = StopAt(base.queries, base.items, base.item_row, base.item_key, base.reward,
                  base.rows)
    data.trainer, data.at = stopped, at(expected) if callable(at) else at
    with pytest.raises(TrainingStopped):
        fit_and_save(stopped, data, validation=validation)
    return validation, reference, expected, stopped


@pytest.mark.parametrize("at", [(1, 3), (3, 5)])  # before the best epoch, and after it
def test_stopped_and_resumed_keeps_the_early_stopping_state_and_the_best_epoch(log, tmp_path,
                                                                               at):
    prepared, split = log
    validation, reference, expected, stopped = reference_and_stopped(log, tmp_path, at)
    state = load_checkpoint(tmp_path / "stopped").state["early_stopping"]
    assert state == stopped.early_stopping.state_dict()
    assert state["best_epoch"] == (expected["best_epoch"] - 1 if at[0] > 2 else at[0] - 1)
    resumed = Trainer.resume(tmp_path / "stopped", device="cpu", progress=False)
    assert resumed.early_stopping == stopped.early_stopping
    summary = fit_and_save(resumed, prepared.training_data(split.train), validation=validation)
    assert {k: summary[k] for k in ("best_epoch", "recall@50", "early_stopped", "step")} == \
        {k: expected[k] for k in ("best_epoch", "recall@50", "early_stopped", "step")}
    assert resumed.early_stopping == reference.early_stopping
    assert_same_weights(reference.model, load_model(tmp_path / "stopped")[0])
    assert_same_weights(reference.model, resumed.model)


def test_cli_train_with_leave_last_out_validates_and_stops(tmp_path, capsys):
    paths = write(generate(TINY), tmp_path / "data")
    out = tmp_path / "model"
    assert main(["train", "--events", str(paths["events"]), "--items", str(paths["items"]),
                 "--out", str(out), "--split", "leave-last-out", "--epochs", "10",
                 "--patience", "1", "--batch-size", "64", "--lr", "0.05", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"]["kind"] == "leave-last-out" and printed["split"]["valid"] > 0
    validations = records(out / "metrics.jsonl", "validation")
    [summary] = records(out / "metrics.jsonl", "input")
    assert summary["early_stopped"] and len(validations) < 10
    values = [r["recall@50"] for r in validations]
    assert len(validations) == int(np.argmax(values)) + 2  # patience 1
    assert summary["best_epoch"] == int(np.argmax(values)) + 1
    _, _, config = load_model(out)
    assert config["train"]["patience"] == 1 and config["train"]["shuffle"]


def test_each_input_validates_from_a_fresh_start(log, tmp_path):
    """A trainer that goes on to a second input with validation judges that input's epochs
    alone: the first input's best score and wait neither stop it nor bring back the first
    input's weights."""
    prepared, split = log
    trainer = new_trainer(prepared, tmp_path)
    first = trainer.fit(prepared.training_data(split.train), "first",
                        Validation(prepared, split.train, split.valid))
    assert first["early_stopped"]
    # The next log has a corpus ten times larger: its recall@50 is far below the first's.
    synthetic = generate(SyntheticConfig(num_users=100, num_items=2000, num_days=1,
                                         events_per_day=800, new_item_fraction=0.0, seed=1))
    interactions = load_interactions(synthetic.events, synthetic.items)
    later = prepare(interactions, prepared.model_config)
    parts = split_log("leave-last-out", interactions.user, interactions.timestamp)
    validation = Validation(later, parts.train, parts.valid)
    assert validation.score(trainer.model)["recall@50"] < first["recall@50"]
    second = trainer.fit(later.training_data(parts.train), "second", validation)
    epochs = [r for r in records(tmp_path / "metrics.jsonl", "validation")
              if r["step"] > first["step"]]
    values = [r["recall@50"] for r in epochs]
    assert len(epochs) >= 1 + CONFIG.patience
    assert second["best_epoch"] == 1 + int(np.argmax(values))
    assert second["recall@50"] == max(values)
    assert validation.score(trainer.model)["recall@50"] == max(values)  # its own best kept


def test_resumed_into_another_directory_keeps_the_best_epoch(log, tmp_path):
    """The best weights travel in the checkpoint, so a run resumed with another out_dir
    (where no best model was ever published) still ends with them."""
    prepared, split = log
    validation, reference, expected, _ = reference_and_stopped(
        log, tmp_path, lambda summary: (summary["best_epoch"], 2))  # after the best epoch
    best = load_checkpoint(tmp_path / "stopped").best
    published = load_model(tmp_path / "stopped")[0].state_dict()  # the best epoch's model
    assert best.keys() == published.keys()
    assert all(torch.equal(value, published[key]) for key, value in best.items())
    resumed = Trainer.resume(tmp_path / "stopped", out_dir=tmp_path / "elsewhere",
                             device="cpu", progress=False)
    summary = fit_and_save(resumed, prepared.training_data(split.train), validation=validation)
    assert summary["best_epoch"] == expected["best_epoch"]
    assert_same_weights(reference.model, resumed.model)
    assert_same_weights(reference.model, load_model(tmp_path / "elsewhere")[0])


def test_public_names():
    import twotower.validation

    assert twotower.validation.__all__ == ["EarlyStopping", "Validation"]
