"""Shuffled epochs: every row once per epoch, a fresh order per epoch, resumable exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_log import tiny_prepared
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer, TrainingData

TINY = SyntheticConfig(num_users=100, num_items=200, num_days=2, events_per_day=500,
                       num_channels=10, num_categories=4)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared():
    return tiny_prepared(TINY)


def tiny_data(rows: np.ndarray) -> TrainingData:
    """A TrainingData holding only row indices: ``batches`` reads nothing else."""
    return TrainingData(None, None, None, None, None, rows)


class Recorded(TrainingData):
    """Training data that remembers the batches the trainer stepped on, per epoch seed, and
    asks its trainer to stop after batch ``stop_at`` of epoch ``stop_epoch``."""

    trainer: Trainer | None = None
    stop_at: tuple[int, int] | None = None

    def batches(self, batch_size, shuffle_seed=None):
        self.seen = getattr(self, "seen", [])
        epoch = len(self.seen)
        self.seen.append([])
        for index, rows in enumerate(super().batches(batch_size, shuffle_seed)):
            self.seen[-1].append(rows)
            if self.stop_at == (epoch, index):
                self.trainer.stop_requested = True
            yield rows


def recorded(data: TrainingData) -> Recorded:
    return Recorded(data.queries, data.items, data.item_row, data.item_key, data.reward,
                    data.rows)


def new_trainer(prepared, out_dir=None, **config) -> Trainer:
    torch.manual_seed(0)
    return Trainer(TwoTowerModel(prepared.model_config),
                   TrainConfig(batch_size=64, estimator_buckets=1024, **config),
                   out_dir=out_dir, device="cpu", progress=False)


@pytest.mark.parametrize("n, batch_size", [(11, 3), (12, 4), (100, 7), (5, 5)])
def test_a_shuffled_epoch_holds_every_row_once(n, batch_size):
    rows = np.arange(100, 100 + n)
    batches = list(tiny_data(rows).batches(batch_size, (0, 0)))
    assert all(2 <= len(b) <= batch_size for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == rows.tolist()


def test_a_last_batch_of_one_row_is_dropped_shuffled_or_not():
    rows = np.arange(7)
    for seed in (None, (0, 0), (0, 1)):
        batches = list(tiny_data(rows).batches(3, seed))
        assert [len(b) for b in batches] == [3, 3]
        assert len(set(np.concatenate(batches).tolist())) == 6


def test_time_order_without_a_seed():
    rows = np.array([5, 3, 9, 1, 7, 2, 8])
    batches = list(tiny_data(rows).batches(3))
    assert [b.tolist() for b in batches] == [[5, 3, 9], [1, 7, 2]]  # the lone 8 is dropped


def test_orders_differ_between_epochs_and_repeat_for_the_same_seed():
    data = tiny_data(np.arange(50))

    def order(seed):
        return np.concatenate(list(data.batches(8, seed))).tolist()

    assert order((0, 0)) == order((0, 0))
    assert order((3, 1)) == order((3, 1))
    orders = {tuple(order((seed, epoch))) for seed in range(3) for epoch in range(3)}
    assert len(orders) == 9
    assert tuple(range(50)) not in orders


def test_trainer_batches_are_shuffled_per_epoch_or_in_time_order(prepared):
    data = prepared.training_data(np.arange(len(prepared.interactions)))
    shuffled = new_trainer(prepared, shuffle=True, seed=4)
    in_time = new_trainer(prepared)
    for epoch in range(2):
        batches = [rows for _, rows in shuffled._batches(data, epoch)]
        assert [b.tolist() for b in batches] == \
            [b.tolist() for b in data.batches(64, (4, epoch))]
        assert [i for i, _ in in_time._batches(data, epoch)] == list(range(len(batches)))
        time_order = np.concatenate([rows for _, rows in in_time._batches(data, epoch)])
        assert time_order.tolist() == data.rows[:len(time_order)].tolist()


def test_fit_steps_on_every_row_once_per_epoch_in_a_new_order(prepared):
    rows = np.arange(len(prepared.interactions))
    assert len(rows) % 64 not in (1,)  # no row is dropped
    data = recorded(prepared.training_data(rows))
    trainer = new_trainer(prepared, shuffle=True, epochs=3)
    summary = trainer.fit(data, "log")
    assert summary["steps"] == 3 * -(-len(rows) // 64) == trainer.step
    orders = [np.concatenate(epoch) for epoch in data.seen]
    assert len(orders) == 3
    for order in orders:
        assert sorted(order.tolist()) == rows.tolist()
    assert len({tuple(o.tolist()) for o in orders}) == 3
    assert all(not np.array_equal(o, rows) for o in orders)


def test_fit_in_time_order_without_shuffle(prepared):
    rows = np.arange(len(prepared.interactions))
    data = recorded(prepared.training_data(rows))
    new_trainer(prepared, epochs=2).fit(data, "log")
    for epoch in data.seen:
        assert np.concatenate(epoch).tolist() == rows.tolist()


@pytest.mark.parametrize("stop_at", [(0, 4), (1, 0), (1, 9)])
def test_stopped_mid_epoch_and_resumed_equals_an_uninterrupted_run(prepared, tmp_path,
                                                                   stop_at):
    rows = np.arange(len(prepared.interactions))
    reference = new_trainer(prepared, tmp_path / "reference", shuffle=True, epochs=2)
    reference.fit(prepared.training_data(rows), "log")

    stopped = new_trainer(prepared, tmp_path / "stopped", shuffle=True, epochs=2)
    data = recorded(prepared.training_data(rows))
    data.trainer, data.stop_at = stopped, stop_at
    summary = stopped.fit(data, "log")
    assert summary["stopped"]
    assert (stopped.position.epoch, stopped.position.batch) == (stop_at[0], stop_at[1] + 1)
    stopped.save()

    resumed = Trainer.resume(tmp_path / "stopped", device="cpu", progress=False)
    assert resumed.config.shuffle
    rest = recorded(prepared.training_data(rows))
    assert not resumed.fit(rest, "log")["stopped"]
    # The batches of the stopped epoch are the uninterrupted epoch's: first part, then rest.
    first = data.seen[stop_at[0]]
    resumed_epoch = rest.seen[0][stop_at[1] + 1:]
    epoch_rows = np.concatenate(first + resumed_epoch)
    assert sorted(epoch_rows.tolist()) == rows.tolist()
    assert resumed.step == reference.step
    for (name, a), (_, b) in zip(reference.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for opt_a, opt_b in zip(reference.optimizers, resumed.optimizers, strict=True):
        for index, values in opt_a.state_dict()["state"].items():
            for key, value in values.items():
                other = opt_b.state_dict()["state"][index][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    for key, value in reference.estimator.state_dict().items():
        assert np.array_equal(value, resumed.estimator.state_dict()[key]), key


def test_an_epoch_stopped_midway_goes_on_only_in_its_own_order(prepared, tmp_path):
    rows = np.arange(len(prepared.interactions))
    stopped = new_trainer(prepared, tmp_path, shuffle=True, epochs=2)
    data = recorded(prepared.training_data(rows))
    data.trainer, data.stop_at = stopped, (0, 3)
    assert stopped.fit(data, "log")["stopped"]
    stopped.save()
    assert stopped.position.shuffled
    in_time = Trainer.resume(tmp_path, device="cpu", progress=False, shuffle=False)
    with pytest.raises(ValueError, match=r"stopped 4 batches into epoch 1 in shuffled order; "
                                         r"go on in shuffled order"):
        in_time.fit(prepared.training_data(rows), "log")
    assert in_time.step == stopped.step  # refused before any step
    # Nor does it start on another input before this one is finished: that would leave
    # the stopped epoch half trained, so it is an error naming both inputs.
    with pytest.raises(ValueError, match=r"stopped partway through input log .* given "
                                         r"input other"):
        in_time.fit(prepared.training_data(rows[:300]), "other")
    assert in_time.step == stopped.step


def test_cli_resume_trains_new_events_in_time_order_unless_told(tmp_path, capsys):
    from twotower.checkpoint import load_checkpoint, load_model
    from twotower.cli import main
    from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY, write

    paths = write(generate(TINY), tmp_path / "data")
    common = ["--events", str(paths["events"]), "--items", str(paths["items"]), "--quiet",
              "--batch-size", "64"]
    model = tmp_path / "model"
    assert main(["train", *common, "--out", str(model), "--until",
                 str(EPOCH + SECONDS_PER_DAY)]) == 0
    assert load_model(model)[2]["train"]["shuffle"]  # a new model: shuffled epochs
    assert main(["train", "--resume", str(model), *common]) == 0
    assert not load_model(model)[2]["train"]["shuffle"]  # new events: time order
    assert not load_checkpoint(model).state["position"]["shuffled"]
    assert main(["train", "--resume", str(model), *common, "--order", "shuffled",
                 "--epochs", "2"]) == 0
    assert load_model(model)[2]["train"]["shuffle"]
    capsys.readouterr()


def test_resume_is_exact_with_dropout_and_mixed_negatives(prepared, tmp_path):
    """Dropout draws from torch's RNG and mixed negatives from the seed and step: both are
    in the checkpoint, so a stopped and resumed run still equals an uninterrupted one."""
    from dataclasses import replace

    model_config = replace(prepared.model_config, dropout=0.3)
    rows = np.arange(len(prepared.interactions))
    config = TrainConfig(batch_size=64, estimator_buckets=1024, shuffle=True, epochs=2,
                         mixed_negatives=16)

    def trainer(out):
        torch.manual_seed(0)
        return Trainer(TwoTowerModel(model_config), config, out_dir=out, device="cpu",
                       progress=False)

    reference = trainer(tmp_path / "reference")
    reference.fit(prepared.training_data(rows), "log")
    stopped = trainer(tmp_path / "stopped")
    data = recorded(prepared.training_data(rows))
    data.trainer, data.stop_at = stopped, (0, 6)
    assert stopped.fit(data, "log")["stopped"]
    stopped.save()
    torch.manual_seed(123)  # whatever the process did meanwhile
    resumed = Trainer.resume(tmp_path / "stopped", device="cpu", progress=False)
    resumed.fit(prepared.training_data(rows), "log")
    state = resumed.model.state_dict()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    # And dropout did act: the same run without it ends elsewhere.
    torch.manual_seed(0)  # the same initial weights: dropout has none
    plain = Trainer(TwoTowerModel(prepared.model_config), config, device="cpu",
                    progress=False)
    plain.fit(prepared.training_data(rows), "log")
    assert not torch.equal(plain.model.query_tower.mlp[0].weight,
                           reference.model.query_tower.mlp[0].weight)


def test_a_checkpoint_without_the_positions_order_takes_the_runs(prepared, tmp_path):
    """Checkpoints written before Position recorded its order: the run's order it was."""
    import json

    from twotower.checkpoint import CHECKPOINTS, LATEST, MANIFEST, STATE, sha256_of

    rows = np.arange(len(prepared.interactions))
    stopped = new_trainer(prepared, tmp_path, shuffle=True, epochs=2)
    data = recorded(prepared.training_data(rows))
    data.trainer, data.stop_at = stopped, (0, 2)
    stopped.fit(data, "log")
    where = stopped.save()
    assert where.parent == tmp_path / CHECKPOINTS
    assert (tmp_path / CHECKPOINTS / LATEST).read_text().strip() == where.name
    state = json.loads((where / STATE).read_text())
    del state["position"]["shuffled"]
    (where / STATE).write_text(json.dumps(state))
    manifest = json.loads((where / MANIFEST).read_text())
    manifest["files"][STATE] = {"bytes": (where / STATE).stat().st_size,
                                "sha256": sha256_of(where / STATE)}
    (where / MANIFEST).write_text(json.dumps(manifest))
    resumed = Trainer.resume(tmp_path, device="cpu", progress=False)
    assert resumed.position.shuffled and resumed.position.batch == 3
    assert not resumed.fit(prepared.training_data(rows), "log")["stopped"]
