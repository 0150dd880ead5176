"""Tests for the paper's simulation: the target, the sampler and the qualitative findings."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from twotower.simulate import (
    format_table,
    inclusion_probability,
    power_law,
    run_simulation,
    sample_batches,
)


def test_batches_are_distinct_items():
    rng = np.random.default_rng(0)
    batches = sample_batches(rng, power_law(50, 1.0), 8, 100)
    assert batches.shape == (100, 8)
    assert all(len(set(row.tolist())) == 8 for row in batches)
    assert batches.min() >= 0 and batches.max() < 50


def test_inclusion_probability_matches_counting_batches():
    rng = np.random.default_rng(1)
    weights = power_law(30, 1.2)
    p, stderr = inclusion_probability(weights, 5, 4000, rng)
    assert p.sum() == pytest.approx(5, rel=1e-3)  # inclusion probabilities sum to B
    assert np.all(np.diff(p) <= 1e-9) and np.all(stderr < 5e-3)
    counted = np.bincount(sample_batches(rng, weights, 5, 40_000).ravel(), minlength=30) / 40_000
    # Counting 40,000 batches has a standard error of at most 0.0025 per item.
    np.testing.assert_allclose(counted, p, atol=0.01)


def test_inclusion_probability_uniform_weights():
    p, _ = inclusion_probability(np.full(10, 0.1), 3, 500, np.random.default_rng(2))
    np.testing.assert_allclose(p, 0.3, rtol=0.03)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("simulate")
    results = run_simulation(out, steps=600, seed=0, target_draws=2000)
    return out, {r.name: r for r in results}


def test_files_and_table(tiny):
    out, results = tiny
    for name in ("errors.csv", "summary.csv", "alpha.png", "hashes.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "errors.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", *results] and len(rows) == 601
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results)
    table = format_table(list(results.values()))
    assert "alpha=0.2" in table and "m=4,H=1000" in table


def test_higher_alpha_recovers_faster_but_settles_higher(tiny):
    _, results = tiny
    fast, slow = results["alpha=0.2"], results["alpha=0.01"]
    assert fast.recovery_steps is not None
    assert slow.recovery_steps is None or slow.recovery_steps > fast.recovery_steps
    # 300 steps are too few for alpha=0.01 to settle; alpha=0.05 settles, below alpha=0.2.
    assert results["alpha=0.05"].before_shift < fast.before_shift


def test_more_hashes_at_equal_memory_when_buckets_suffice(tiny):
    _, results = tiny
    assert results["m=4,H=1000"].final < results["m=2,H=2000"].final \
        < results["m=1,H=4000"].final
