"""Tests for the model directory: save/load round trips, corrupt files, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from twotower.checkpoint import (
    CONFIG,
    ESTIMATOR,
    WEIGHTS,
    atomic_write,
    load_model,
    save_model,
)
from twotower.features import EncodedFeatures, FeatureSpec, TableSpec
from twotower.frequency import StreamingFrequencyEstimator
from twotower.loss import in_batch_softmax_loss
from twotower.towers import ModelConfig, TwoTowerModel

CONFIG_ = ModelConfig(
    tables={"item": TableSpec(97, 4), "user": TableSpec(31, 3)},
    query_features=[FeatureSpec("user_id", "id", table="user"),
                    FeatureSpec("history", "id_list", table="item"),
                    FeatureSpec("age", "dense")],
    item_features=[FeatureSpec("item_id", "id", table="item")],
    query_hidden=[8], item_hidden=[6], output_dim=5, temperature=0.2,
)


def features(n: int = 16) -> tuple[EncodedFeatures, EncodedFeatures, np.ndarray]:
    rng = np.random.default_rng(0)
    item_ids = rng.integers(0, 40, n)
    queries = EncodedFeatures(CONFIG_.query_features, CONFIG_.tables, {
        "user_id": rng.integers(0, 10, n),
        "history": [rng.integers(0, 40, int(k)).tolist() for k in rng.integers(0, 4, n)],
        "age": rng.random(n),
    })
    items = EncodedFeatures(CONFIG_.item_features, CONFIG_.tables, {"item_id": item_ids})
    return queries, items, item_ids


def trained() -> tuple[TwoTowerModel, StreamingFrequencyEstimator]:
    torch.manual_seed(0)
    model = TwoTowerModel(CONFIG_)
    estimator = StreamingFrequencyEstimator(64, num_hashes=2, alpha=0.1, seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    queries, items, item_ids = features()
    for step in range(4):
        rows = np.arange(step * 4, step * 4 + 8) % len(item_ids)
        estimator.update(item_ids[rows])
        log_q = torch.from_numpy(np.log(estimator.probability(item_ids[rows])))
        loss = in_batch_softmax_loss(model.query(queries.take(rows)),
                                     model.item(items.take(rows)),
                                     torch.from_numpy(item_ids[rows]), log_q,
                                     temperature=CONFIG_.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, estimator


@torch.no_grad()
def embeddings(model: TwoTowerModel) -> tuple[torch.Tensor, torch.Tensor]:
    queries, items, _ = features()
    rows = np.arange(len(queries))
    return model.query(queries.take(rows)), model.item(items.take(rows))


def test_round_trip_identical(tmp_path):
    model, estimator = trained()
    fresh = TwoTowerModel(CONFIG_)
    assert not torch.equal(embeddings(fresh)[0], embeddings(model)[0])  # training did something
    directory = save_model(tmp_path / "model", model, estimator, extra={"train": {"epochs": 1}})
    loaded, loaded_estimator, config = load_model(directory)
    assert not loaded.training
    assert loaded.config == model.config
    for a, b in zip(embeddings(model), embeddings(loaded), strict=True):
        assert torch.equal(a, b)
    state, loaded_state = estimator.state_dict(), loaded_estimator.state_dict()
    assert set(state) == set(loaded_state)
    for key in state:
        assert loaded_state[key].dtype == state[key].dtype, key
        assert np.array_equal(loaded_state[key], state[key]), key
    assert loaded_estimator.step == estimator.step == 4
    probe = np.arange(-5, 50)
    assert np.array_equal(loaded_estimator.probability(probe), estimator.probability(probe))
    # The estimator keeps going exactly as the original would.
    estimator.update([1, 2, 3])
    loaded_estimator.update([1, 2, 3])
    assert np.array_equal(loaded_estimator.probability(probe), estimator.probability(probe))
    assert config["model"] == model.config.to_dict()
    assert config["train"] == {"epochs": 1}
    assert "twotower" in config["versions"]
    assert all(k in state for k in ("last_step", "interval"))


def test_round_trip_without_estimator(tmp_path):
    model, _ = trained()
    save_model(tmp_path, model, None)
    assert not (tmp_path / ESTIMATOR).exists()
    loaded, estimator, _ = load_model(tmp_path)
    assert estimator is None
    assert torch.equal(embeddings(model)[1], embeddings(loaded)[1])


def test_files_are_safetensors_and_json_not_pickle(tmp_path):
    model, estimator = trained()
    save_model(tmp_path, model, estimator)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG, WEIGHTS, ESTIMATOR])
    json.loads((tmp_path / CONFIG).read_text())
    tensors = safetensors.torch.load_file(str(tmp_path / WEIGHTS))
    assert set(tensors) == set(model.state_dict())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_raise_value_error(tmp_path, damage):
    model, estimator = trained()
    save_model(tmp_path, model, estimator)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"cannot read weights .*{WEIGHTS}"):
        load_model(tmp_path)


def test_missing_weights_raise_value_error(tmp_path):
    model, _ = trained()
    save_model(tmp_path, model, None)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(ValueError, match=f"cannot read weights .*{WEIGHTS}"):
        load_model(tmp_path)


def test_weights_of_another_model_raise_value_error(tmp_path):
    # A weights file that is valid safetensors but does not fit the config is as corrupt
    # for this directory as a truncated one: it must get the same clear error.
    model, _ = trained()
    save_model(tmp_path, model, None)
    other = ModelConfig.from_dict({**CONFIG_.to_dict(), "output_dim": 7})
    tensors = {k: v.contiguous() for k, v in TwoTowerModel(other).state_dict().items()}
    safetensors.torch.save_file(tensors, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match=WEIGHTS):
        load_model(tmp_path)


def test_corrupt_estimator_raises_value_error(tmp_path):
    model, estimator = trained()
    save_model(tmp_path, model, estimator)
    path = tmp_path / ESTIMATOR
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=ESTIMATOR):
        load_model(tmp_path)


def test_bad_config_raises_value_error(tmp_path):
    model, _ = trained()
    save_model(tmp_path, model, None)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid model config"):
        load_model(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"versions": {}}))
    with pytest.raises(ValueError, match="not a valid model config"):
        load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)  # exists, but holds no config


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_write_writes_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda p: p.write_text("one"))
    assert target.read_text() == "one"
    atomic_write(target, lambda p: p.write_text("two"))
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def failing(path):
        path.write_text("half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]

    # Also when there was no old file: nothing is created.
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.txt", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_atomic_write_gives_files_the_usual_mode(tmp_path):
    import os

    from twotower.checkpoint import atomic_write

    atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_fresh_directory_has_the_usual_mode(tmp_path):
    import os

    from twotower.checkpoint import fresh_directory

    made = fresh_directory(tmp_path, ".x.")
    mask = os.umask(0)
    os.umask(mask)
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o777 & ~mask


def _checkpoints(directory, steps=(1, 2)) -> list:
    """Training checkpoints of the trained model at ``steps``, written as the trainer does."""
    from twotower.checkpoint import save_checkpoint

    model, estimator = trained()
    optimizer = torch.optim.Adam(model.parameters())
    return [save_checkpoint(directory, model, estimator, [optimizer], {"step": step})
            for step in steps]


def test_checkpoint_and_model_files_get_the_usual_mode(tmp_path):
    import os

    model, estimator = trained()
    save_model(tmp_path, model, estimator)
    _checkpoints(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {WEIGHTS, ESTIMATOR, "training.safetensors", CONFIG}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == \
        {p.name: oct(0o666 & ~mask) for p in files}


def test_missing_or_unreadable_latest_names_the_complete_checkpoints(tmp_path):
    from twotower.checkpoint import CHECKPOINTS, LATEST, CheckpointError, load_checkpoint

    first, second = _checkpoints(tmp_path)
    latest = tmp_path / CHECKPOINTS / LATEST
    for damage in (b"\xff\xfe\x00step", b"../../elsewhere\n", None):
        if damage is None:
            latest.unlink()
        else:
            latest.write_bytes(damage)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(tmp_path)
        message = str(error.value)
        assert str(first) in message and str(second) in message and "train a new" not in message
        assert "codec" not in message
    assert load_checkpoint(second).state["step"] == 2


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_checkpoint import _checkpoints
from twotower.checkpoint import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))
try:
    _checkpoints(Path({directory!r}), steps=(3,))
except CheckpointError as error:
    print(error)
"""


def test_a_checkpoint_that_cannot_be_written_says_the_last_one_is_intact(tmp_path):
    """A real failed write (the file-size limit makes the kernel refuse it, as a full disk
    would), in a child process so the limit stays there."""
    import subprocess
    import sys
    from pathlib import Path

    from twotower.checkpoint import CHECKPOINTS, load_checkpoint

    _, second = _checkpoints(tmp_path)
    script = _FULL_DISK.format(tests=str(Path(__file__).parent), directory=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "could not write checkpoint" in done.stdout and "step-000000000003" in done.stdout
    assert f"the last complete checkpoint, {second}, is intact" in done.stdout
    assert "Traceback" not in done.stderr
    assert load_checkpoint(tmp_path).path == second
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == \
        ["LATEST", "step-000000000001", "step-000000000002"]
