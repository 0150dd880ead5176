"""Tests for the trainer: sparse updates, checkpoints, continuing on the next day's log."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from twotower.checkpoint import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    TRAINING,
    WEIGHTS,
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    load_model,
)
from twotower.data.interactions import load_interactions
from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY, SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare
from twotower.follow import train_day
from twotower.frequency import StreamingFrequencyEstimator
from twotower.loss import in_batch_softmax_loss
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer, train

TINY = SyntheticConfig(num_users=200, num_items=500, num_days=3, events_per_day=2000,
                       num_channels=20, num_categories=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def log():
    """The tiny log, prepared, and its rows of each day."""
    synthetic = generate(TINY)
    interactions = load_interactions(synthetic.events, synthetic.items)
    config = default_model_config(interactions.columns, item_buckets=1024, user_buckets=256,
                                  feature_buckets=64, dim=8, hidden=(16,), output_dim=8)
    prepared = prepare(interactions, config)
    day = (interactions.timestamp - EPOCH) // SECONDS_PER_DAY
    return prepared, [np.flatnonzero(day == d) for d in range(TINY.num_days)]


def new_trainer(prepared, out_dir=None, **options) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(batch_size=128, estimator_buckets=4096, log_every=5,
                         **options.pop("config", {}))
    return Trainer(TwoTowerModel(prepared.model_config), config, out_dir=out_dir, device="cpu",
                   progress=False, **options)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_function_keeps_its_contract(log, tmp_path):
    prepared, days = log
    torch.manual_seed(0)
    model = TwoTowerModel(prepared.model_config)
    estimator = train(model, prepared.training_data(days[0]), TrainConfig(batch_size=128),
                      metrics_path=tmp_path / "metrics.jsonl", progress=False, device="cpu")
    assert isinstance(estimator, StreamingFrequencyEstimator)
    assert estimator.step == -(-len(days[0]) // 128)
    assert not model.training
    lines = records(tmp_path / "metrics.jsonl")
    assert lines[-1]["event"] == "input" and lines[-1]["steps"] == estimator.step


def test_sparse_step_updates_only_the_rows_the_batch_touches(log):
    prepared, days = log
    trainer = new_trainer(prepared)
    rows = days[0][:16]
    before = {n: t.weight.detach().clone() for n, t in trainer.model.tables.items()}
    trainer.fit(prepared.training_data(rows))
    item_rows = prepared.interactions.item_row[rows]
    history = prepared.queries.data["history"]
    touched = {
        "user": prepared.queries.data["user_id"][rows],
        "item": np.concatenate([prepared.items.data["item_id"][item_rows],
                                *(history.values[history.offsets[r]:history.offsets[r + 1]]
                                  for r in rows)]),
        "channel": prepared.items.data["channel"][item_rows],
        "category": prepared.items.data["category"][item_rows],
    }
    for name, table in trainer.model.tables.items():
        changed = (table.weight.detach() != before[name]).any(dim=1).numpy()
        expected = np.zeros(len(changed), dtype=bool)
        expected[touched[name]] = True
        assert table.weight.grad is None or table.weight.grad.is_sparse
        assert np.array_equal(changed, expected), name


def test_continue_on_day_three(log, tmp_path):
    """Days 1-2, then a resumed run on day 3: step, estimator and metrics carry on."""
    prepared, days = log
    first = new_trainer(prepared, tmp_path)
    first.fit(prepared.training_data(np.concatenate(days[:2])))
    first.save()
    steps_12 = first.step
    assert steps_12 == -(-(len(days[0]) + len(days[1])) // 128)

    resumed = Trainer.resume(tmp_path, device="cpu", progress=False)
    assert resumed.step == steps_12
    summary = train_day(resumed, prepared, np.concatenate(days[:2]), days[2], "day-3")
    resumed.save()
    steps_3 = -(-len(days[2]) // 128)
    assert summary["steps"] == steps_3 and resumed.step == steps_12 + steps_3

    # The estimator went on from its state: the same as one fed every batch in order.
    reference = TrainConfig(estimator_buckets=4096).make_estimator()
    for rows in (np.concatenate(days[:2]), days[2]):
        for start in range(0, len(rows), 128):
            reference.update(prepared.interactions.item[rows[start:start + 128]])
    _, estimator, config = load_model(tmp_path)
    for key, value in reference.state_dict().items():
        assert np.array_equal(estimator.state_dict()[key], value), key
    # Optimizer state went on too (lazy Adam counts its steps).
    saved = load_checkpoint(tmp_path)
    assert saved.optimizers[0]["state"][0]["step"] == steps_12 + steps_3
    assert saved.state["inputs_done"][-1] == "day-3" and len(saved.state["inputs_done"]) == 2
    assert config["train"]["batch_size"] == 128

    lines = records(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in lines if "loss" in r and "event" not in r]
    assert steps == sorted(steps) and steps[-1] == steps_12 + steps_3
    assert [r["step"] for r in lines if r.get("event") == "resume"] == [steps_12]
    evaluated = [r for r in lines if r.get("event") == "eval"]
    assert [(r["input"], r["step"]) for r in evaluated] == [("day-3", steps_12)]
    assert 0 <= evaluated[0]["recall@100"] <= 1 and evaluated[0]["queries"] == len(days[2])
    day3 = [r for r in lines if r.get("event") == "input"][-1]
    assert day3["input"] == "day-3" and day3["step"] == steps_12 + steps_3
    assert np.isfinite(day3["loss"])

    # The same input again is already done: nothing to train.
    assert resumed.fit(prepared.training_data(days[2]), "day-3")["skipped"]


def test_resume_refuses_changes_that_do_not_fit_the_state(log, tmp_path):
    prepared, days = log
    trainer = new_trainer(prepared, tmp_path)
    trainer.fit(prepared.training_data(days[0][:256]))
    trainer.checkpoint()
    with pytest.raises(ValueError, match="batch_size"):
        Trainer.resume(tmp_path, device="cpu", batch_size=64)
    assert Trainer.resume(tmp_path, device="cpu", epochs=3).config.epochs == 3


@pytest.fixture
def checkpointed(log, tmp_path):
    prepared, days = log
    trainer = new_trainer(prepared, tmp_path, checkpoint_every=2)
    trainer.fit(prepared.training_data(days[0][:640]))
    trainer.checkpoint()
    return tmp_path, trainer


def test_checkpoints_are_kept_two_and_pointed_to(checkpointed):
    directory, trainer = checkpointed
    kept = checkpoint_dirs(directory)
    assert [p.name for p in kept] == ["step-000000000004", "step-000000000005"]
    assert (directory / CHECKPOINTS / LATEST).read_text().strip() == kept[-1].name
    saved = load_checkpoint(directory)
    assert saved.state["step"] == trainer.step == 5
    assert saved.state["position"]["batch"] == 5
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(saved.model.state_dict()[key], value)
    assert not list((directory / CHECKPOINTS).glob(".*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_an_error_never_loaded(checkpointed, damage):
    directory, _ = checkpointed
    latest = checkpoint_dirs(directory)[-1]
    path = latest / (TRAINING if damage != "flip" else WEIGHTS)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
        match = "truncated"
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        match = "sha256"
    elif damage == "delete":
        path.unlink()
        match = "missing"
    else:
        (latest / MANIFEST).unlink()
        match = "no manifest"
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(directory)
    assert str(latest) in str(error.value) and "step-000000000004" in str(error.value)
    with pytest.raises(CheckpointError):
        Trainer.resume(directory, device="cpu")
    # The earlier checkpoint, named explicitly, still loads.
    assert load_checkpoint(checkpoint_dirs(directory)[0]).state["step"] == 4


def test_directory_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_checkpoint(tmp_path)


def test_optimizer_state_round_trips_exactly(checkpointed):
    directory, trainer = checkpointed
    saved = load_checkpoint(directory)
    for optimizer, state in zip(trainer.optimizers, saved.optimizers, strict=True):
        mine = optimizer.state_dict()
        assert state["param_groups"] == mine["param_groups"]
        for index, values in mine["state"].items():
            for key, value in values.items():
                other = state["state"][index][key]
                assert torch.equal(other, value) if torch.is_tensor(value) else other == value
    names = safetensors.torch.load_file(str(checkpoint_dirs(directory)[-1] / TRAINING))
    assert "rng.torch" in names


def test_step_counts_repeated_items_once_with_the_gradients_of_every_copy(log):
    # The trainer passes each distinct item of a batch once, with its count; the gradients
    # must be those of the in-batch softmax over every example's own item column.
    prepared, days = log
    trainer = new_trainer(prepared)
    data = prepared.training_data(days[0][:128])
    rows = data.rows
    assert len(np.unique(data.item_row[rows])) < len(rows)  # the batch repeats items
    model = copy.deepcopy(trainer.model)
    estimator = copy.deepcopy(trainer.estimator)
    trainer.fit(data)
    keys = data.item_key[rows]
    log_q = torch.from_numpy(np.log(estimator.update_and_probability(keys)))
    loss = in_batch_softmax_loss(
        model.query(data.queries.take(rows, "cpu")),
        model.item(data.items.take(data.item_row[rows], "cpu")), torch.from_numpy(keys),
        log_q, torch.from_numpy(data.reward[rows]), model.config.temperature)
    loss.backward()
    for (name, expected), got in zip(model.named_parameters(), trainer.model.parameters(),
                                     strict=True):
        torch.testing.assert_close(got.grad.to_dense(), expected.grad.to_dense(),
                                   rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
