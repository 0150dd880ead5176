"""Two gloo processes train as one process on the same global batches."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ports import free_port, gloo_group
from twotower.checkpoint import load_checkpoint
from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.distributed import World, launch, pick_device, shard
from twotower.experiment import default_model_config, prepare
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer

WORLD = 2
BATCH = 63  # odd: the workers' slices differ in size
ROWS = 600  # and the last batch is short
TINY = SyntheticConfig(num_users=200, num_items=500, num_days=1, events_per_day=ROWS,
                       num_channels=20, num_categories=4, new_item_fraction=0.0)


def _prepared():
    synthetic = generate(TINY)
    interactions = load_interactions(synthetic.events, synthetic.items)
    return prepare(interactions, default_model_config(
        interactions.columns, item_buckets=1024, user_buckets=256, feature_buckets=64, dim=8,
        hidden=(16,), output_dim=8))


def _trainer(prepared, out_dir: Path | None = None, **options) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(batch_size=BATCH, estimator_buckets=4096, log_every=3, **options)
    return Trainer(TwoTowerModel(prepared.model_config), config, out_dir=out_dir, device="cpu",
                   progress=False)


def _first_step(trainer: Trainer, prepared) -> dict[str, np.ndarray]:
    """Loss and gradients of one step on the first global batch (before the update)."""
    data = prepared.training_data(np.arange(ROWS))
    rows = next(data.batches(BATCH))
    loss, _ = trainer._reduce(trainer._step(data, rows, None))
    grads = {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy().copy()
             for name, p in trainer.model.named_parameters()}
    return {"loss": np.array(loss), **grads}


def _run(trainer: Trainer, prepared) -> dict[str, np.ndarray]:
    trainer.fit(prepared.training_data(np.arange(ROWS)), "log")
    weights = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}
    return {**weights, **{f"estimator.{k}": v for k, v in trainer.estimator.state_dict().items()}}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, port, WORLD):
        prepared = _prepared()
        for correction in ("streaming", "none"):
            step = _first_step(_trainer(prepared, correction=correction), prepared)
            np.savez(Path(out) / f"step-{correction}-{rank}.npz", **step)
        trainer = _trainer(prepared, Path(out) / "model")
        np.savez(Path(out) / f"run-{rank}.npz", **_run(trainer, prepared))
        trainer.save()
        assert (trainer.checkpoint() is None) == (rank != 0)



@pytest.mark.slow
def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    prepared = _prepared()

    # One step: the loss and every gradient of the global batch, on every worker.
    for correction in ("streaming", "none"):
        single = _first_step(_trainer(prepared, correction=correction), prepared)
        for rank in range(WORLD):
            workers = np.load(tmp_path / f"step-{correction}-{rank}.npz")
            assert set(workers) == set(single)
            for key, value in single.items():
                np.testing.assert_allclose(workers[key], value, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{correction} {key} rank {rank}")
            assert np.abs(single["tables.item.weight"]).sum() > 0

    # A whole run: replicas identical bit for bit, and equal to one process within float
    # tolerance; the estimator exactly.
    single = _run(_trainer(prepared), prepared)
    runs = [np.load(tmp_path / f"run-{rank}.npz") for rank in range(WORLD)]
    for key, value in single.items():
        assert np.array_equal(runs[0][key], runs[1][key]), key
        if key.startswith("estimator."):
            assert np.array_equal(runs[0][key], value), key
        else:
            np.testing.assert_allclose(runs[0][key], value, rtol=1e-4, atol=1e-5, err_msg=key)

    # Only rank 0 wrote: one checkpoint series, each metrics record once.
    saved = load_checkpoint(tmp_path / "model")
    assert saved.state["step"] == -(-ROWS // BATCH)
    lines = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "event" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == saved.state["step"]


def test_shards_are_contiguous_in_rank_order():
    rows = np.arange(10, 15)
    parts = [shard(rows, World(rank, 2)) for rank in range(2)]
    assert [(list(r), start) for r, start in parts] == [([10, 11, 12], 0), ([13, 14], 3)]
    assert list(shard(rows, World())[0]) == list(rows)


@pytest.mark.parametrize("flag", [["--nproc", "2"], ["--nproc=2"]])
def test_launch_starts_torchrun_without_the_nproc_flag(monkeypatch, flag):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append(command) or 0)
    assert launch(["train", *flag, "--out", "m"], 2) == 0
    assert calls[0][1:] == ["-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", "-m", "twotower", "train", "--out", "m"]


def test_device_is_chosen_automatically_and_can_be_overridden():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
