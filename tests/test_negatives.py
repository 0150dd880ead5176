"""Mixed negatives: uniform draws from the corpus, their probabilities, and the step's loss."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ports import free_port, gloo_group
from tiny_log import tiny_prepared
from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare
from twotower.loss import in_batch_softmax_loss
from twotower.negatives import uniform_negatives
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer

TINY = SyntheticConfig(num_users=100, num_items=200, num_days=1, events_per_day=400,
                       num_channels=10, num_categories=4, new_item_fraction=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniform_negatives_by_hand():
    rows, counts, log_q = uniform_negatives(4, 3, np.random.default_rng(0))
    assert log_q == pytest.approx(math.log(1 - (3 / 4) ** 3), rel=1e-12)  # log(37/64)
    assert counts.sum() == 3 and (counts >= 1).all()
    assert np.array_equal(rows, np.unique(rows)) and ((rows >= 0) & (rows < 4)).all()
    # The rows and counts are those of the draws themselves.
    draws = np.random.default_rng(0).integers(4, size=3)
    assert dict(zip(rows.tolist(), counts.tolist(), strict=True)) == \
        {int(r): int((draws == r).sum()) for r in np.unique(draws)}


@pytest.mark.parametrize("num_items, count", [(1, 5), (2, 1), (7, 40), (10**6, 3),
                                              (10**9, 1)])
def test_uniform_negatives_probability_and_ranges(num_items, count):
    rows, counts, log_q = uniform_negatives(num_items, count, np.random.default_rng(1))
    assert counts.sum() == count and len(rows) == len(counts) <= min(count, num_items)
    assert ((rows >= 0) & (rows < num_items)).all()
    assert rows.dtype.kind == "i" and counts.dtype.kind == "i"
    expected = 0.0 if num_items == 1 else math.log(1 - (1 - 1 / num_items) ** count)
    assert log_q == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert math.isfinite(log_q) and log_q <= 0.0
    if num_items > 10**5:  # tiny probabilities, computed without cancellation
        assert log_q == pytest.approx(math.log(count / num_items), rel=1e-3)


@pytest.mark.parametrize("num_items, count", [(0, 3), (5, 0), (-1, 2)])
def test_uniform_negatives_refuse_an_empty_corpus_or_count(num_items, count):
    with pytest.raises(ValueError, match="need a corpus and a count >= 1"):
        uniform_negatives(num_items, count, np.random.default_rng(0))


def test_inclusion_frequency_matches_the_probability():
    num_items, count, draws = 10, 5, 20000
    rng = np.random.default_rng(123)
    included = np.zeros(num_items)
    for _ in range(draws):
        rows, _, log_q = uniform_negatives(num_items, count, rng)
        included[rows] += 1
    frequency = included / draws
    # exp(log_q) = 1 - 0.9^5 = 0.40951; the standard error over 20000 draws is 0.0035.
    assert math.exp(log_q) == pytest.approx(0.40951)
    np.testing.assert_allclose(frequency, math.exp(log_q), atol=0.015)


@pytest.fixture(scope="module")
def prepared():
    return tiny_prepared(TINY)


def new_trainer(prepared, **options) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(batch_size=64, estimator_buckets=1024, seed=5, **options)
    return Trainer(TwoTowerModel(prepared.model_config), config, device="cpu", progress=False)


@pytest.mark.parametrize("correction", ["streaming", "none"])
def test_step_loss_equals_the_loss_over_explicit_candidates(prepared, correction):
    """One step with mixed negatives against the in-batch softmax over every event's item
    and every draw as a column of its own, each with its own log q."""
    trainer = new_trainer(prepared, mixed_negatives=30, correction=correction)
    data = prepared.training_data(np.arange(len(prepared.interactions)))
    rows = data.rows[:64]
    model = copy.deepcopy(trainer.model)
    estimator = copy.deepcopy(trainer.estimator)
    loss = trainer._step(data, rows, None)

    probability = estimator.update_and_probability(data.item_key[rows])
    num_items = len(data.items)
    draws = np.random.default_rng((5, estimator.step)).integers(num_items, size=30)
    candidates = np.concatenate([data.item_row[rows], draws])
    log_q = None
    if correction == "streaming":
        log_q = torch.from_numpy(np.concatenate([
            np.log(probability),
            np.full(30, math.log(1 - (1 - 1 / num_items) ** 30))]))
    assert len(np.intersect1d(draws, data.item_row[rows])) > 0  # accidental hits happen
    expected = in_batch_softmax_loss(
        model.query(data.queries.take(rows)), model.item(data.items.take(candidates)),
        torch.from_numpy(candidates), log_q, torch.from_numpy(data.reward[rows]),
        model.config.temperature, positives=torch.arange(len(rows)))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    expected.backward()
    for (name, want), got in zip(model.named_parameters(), trainer.model.parameters(),
                                 strict=True):
        torch.testing.assert_close(got.grad.to_dense(), want.grad.to_dense(), rtol=1e-4,
                                   atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    # Without mixed negatives the same step is a different (smaller) softmax.
    plain = new_trainer(prepared, correction=correction)._step(data, rows, None)
    assert not torch.allclose(plain, loss)


def test_a_run_with_mixed_negatives_repeats_exactly(prepared):
    data = prepared.training_data(np.arange(len(prepared.interactions)))
    losses = []
    for _ in range(2):
        trainer = new_trainer(prepared, mixed_negatives=8, epochs=1)
        trainer.fit(data, "log")
        losses.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*losses, strict=True):
        assert torch.equal(a, b)


def test_mixed_negatives_below_zero_are_an_error():
    with pytest.raises(ValueError, match="mixed_negatives must be >= 0, got -1"):
        TrainConfig(mixed_negatives=-1)


def _distributed_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, port, 2):
        prepared = _prepared_small()
        new_trainer(prepared)  # without mixed negatives a distributed trainer is fine
        try:
            new_trainer(prepared, mixed_negatives=4)
        except ValueError as error:
            (Path(out) / f"error-{rank}.txt").write_text(str(error))


def _prepared_small():
    synthetic = generate(SyntheticConfig(num_users=20, num_items=30, num_days=1,
                                         events_per_day=50, new_item_fraction=0.0))
    interactions = load_interactions(synthetic.events, synthetic.items)
    return prepare(interactions, default_model_config(
        interactions.columns, item_buckets=64, user_buckets=16, feature_buckets=8, dim=4,
        hidden=(4,), output_dim=4))


@pytest.mark.slow
def test_a_distributed_run_refuses_mixed_negatives(tmp_path):
    mp.spawn(_distributed_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert "mixed negatives are sampled in one process only" in message
        assert "--nproc 1" in message and "--mixed-negatives" in message


def test_public_names():
    import twotower.negatives

    assert twotower.negatives.__all__ == ["uniform_negatives"]
