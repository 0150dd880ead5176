"""Two gloo processes keep estimator replicas bit-identical to one estimator on the global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from ports import free_port, gloo_group
from twotower.frequency import StreamingFrequencyEstimator, gather_global_ids

WORLD = 2
STEPS = 60


def _local_batch(step: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s ids at ``step``: uneven lengths (sometimes none), repeats, collisions."""
    rng = np.random.default_rng([step, rank])
    return rng.integers(0, 80, size=int(rng.integers(0, 30))).astype(np.int64)


def _estimator() -> StreamingFrequencyEstimator:
    return StreamingFrequencyEstimator(64, num_hashes=2, alpha=0.1, seed=3)


def _replica(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, port, WORLD):
        estimator = _estimator()
        probabilities, gathered = [], []
        for step in range(STEPS):
            local = _local_batch(step, rank)
            gathered.append(gather_global_ids(local)[0])
            probabilities.append(estimator.update_global(local))
        np.savez(Path(out) / f"rank{rank}.npz", probabilities=np.concatenate(probabilities),
                 gathered=np.concatenate(gathered), **estimator.state_dict())



@pytest.mark.slow
def test_replicas_equal_single_process_on_global_batches(tmp_path):
    mp.spawn(_replica, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    single = _estimator()
    expected = {rank: [] for rank in range(WORLD)}
    for step in range(STEPS):
        parts = [_local_batch(step, rank) for rank in range(WORLD)]
        p = single.update_and_probability(np.concatenate(parts))
        start = 0
        for rank, part in enumerate(parts):
            expected[rank].append(p[start:start + part.size])
            start += part.size
    everything = np.concatenate([_local_batch(s, r) for s in range(STEPS) for r in range(WORLD)])

    for rank in range(WORLD):
        saved = np.load(tmp_path / f"rank{rank}.npz")
        assert np.array_equal(saved["gathered"], everything)  # rank order, every step
        for key, value in single.state_dict().items():
            assert saved[key].dtype == value.dtype and np.array_equal(saved[key], value), key
        assert np.array_equal(saved["probabilities"], np.concatenate(expected[rank]))


def test_without_process_group_is_a_world_of_one():
    ids = np.array([5, 3, 5], dtype=np.int64)
    gathered, start = gather_global_ids(ids)
    assert np.array_equal(gathered, ids) and start == 0
    a, b = _estimator(), _estimator()
    assert np.array_equal(a.update_global(ids), b.update_and_probability(ids))
    assert np.array_equal(a.state_dict()["interval"], b.state_dict()["interval"])
