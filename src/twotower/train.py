"""The training loop: time-ordered batches, corrected in-batch softmax, metrics log.

Examples are consumed in time order, as the paper's trainer consumes its daily logs;
at every step the estimator sees the batch's items first and then gives their
sampling probabilities (read after update, so every batch item has been seen once).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from twotower.features import EncodedFeatures
from twotower.frequency import StreamingFrequencyEstimator
from twotower.loss import in_batch_softmax_loss
from twotower.towers import TwoTowerModel

__all__ = ["CORRECTIONS", "TrainConfig", "TrainingData", "make_optimizers", "oracle_log_q",
           "train"]

Correction = Literal["none", "streaming", "oracle"]
CORRECTIONS: tuple[str, ...] = ("none", "streaming", "oracle")


@dataclass
class TrainConfig:
    """How to train; stored with the model."""

    batch_size: int = 1024
    epochs: int = 1
    learning_rate: float = 0.005
    correction: Correction = "streaming"
    estimator_buckets: int = 1 << 20
    estimator_hashes: int = 1
    estimator_alpha: float = 0.01
    remove_accidental_hits: bool = True
    sparse: bool = True
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got "
                             f"{self.batch_size}")
        if self.epochs < 1 or self.learning_rate <= 0:
            raise ValueError("epochs must be >= 1 and learning_rate > 0")

    def make_estimator(self) -> StreamingFrequencyEstimator:
        return StreamingFrequencyEstimator(self.estimator_buckets, self.estimator_hashes,
                                           self.estimator_alpha)


@dataclass
class TrainingData:
    """Encoded features and targets of the training events, in time order.

    ``rows`` selects the training events (indices into ``queries``); ``item_row[e]`` is
    event ``e``'s row in ``items``, ``item_key[e]`` its item key, ``reward[e]`` its weight.
    """

    queries: EncodedFeatures
    items: EncodedFeatures
    item_row: np.ndarray
    item_key: np.ndarray
    reward: np.ndarray
    rows: np.ndarray

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive batches of event indices; a last batch under 2 events is dropped."""
        for start in range(0, len(self.rows), batch_size):
            batch = self.rows[start:start + batch_size]
            if len(batch) >= 2:
                yield batch


def oracle_log_q(data: TrainingData, batch_size: int) -> np.ndarray:
    """``[num_items]`` log of each item's exact probability of being in a batch.

    With frequency ``f`` over the training events, an item is in a batch of ``B``
    independent draws with probability ``1 - (1 - f)^B``: the quantity the streaming
    estimator tracks, counted exactly (a reference, not a production mode).
    """
    counts = np.bincount(data.item_row[data.rows], minlength=len(data.items))
    freq = counts / max(len(data.rows), 1)
    p = -np.expm1(batch_size * np.log1p(-np.minimum(freq, 1 - 1e-12)))
    return np.log(np.maximum(p, 1e-12))


def make_optimizers(model: TwoTowerModel, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam for the towers; for the tables, lazy (sparse) Adam on the rows a batch touches.

    With ``config.sparse`` a step costs the same whatever the table size, because
    only touched rows get gradients and optimizer updates.
    """
    model.set_sparse(config.sparse)
    tables = list(model.tables.parameters())
    dense = [p for name, p in model.named_parameters() if not name.startswith("tables.")]
    if not config.sparse:
        return [torch.optim.Adam(tables + dense, lr=config.learning_rate)]
    return [torch.optim.SparseAdam(tables, lr=config.learning_rate),
            torch.optim.Adam(dense, lr=config.learning_rate)]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(model: TwoTowerModel, data: TrainingData, config: TrainConfig,
          estimator: StreamingFrequencyEstimator | None = None,
          metrics_path: str | Path | None = None, progress: bool = True,
          device: str = "auto") -> StreamingFrequencyEstimator:
    """Train ``model`` on ``data``; returns the frequency estimator (new or continued).

    The estimator runs in every correction mode, so a model trained without correction
    still carries item frequencies for serving and reports.
    """
    torch.manual_seed(config.seed)
    dev = _device(device)
    model.to(dev).train()
    estimator = estimator or config.make_estimator()
    optimizers = make_optimizers(model, config)
    oracle = oracle_log_q(data, config.batch_size) if config.correction == "oracle" else None
    log = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 - closed below
    steps_per_epoch = -(-len(data.rows) // config.batch_size)
    bar = tqdm(total=steps_per_epoch * config.epochs, disable=not progress, unit="step",
               mininterval=1.0,
               desc=f"train[{config.correction}]")
    started, examples, running = time.perf_counter(), 0, []
    try:
        for epoch in range(config.epochs):
            for rows in data.batches(config.batch_size):
                keys = data.item_key[rows]
                probability = estimator.update_and_probability(keys)
                log_q = None
                if config.correction == "streaming":
                    log_q = torch.from_numpy(np.log(probability)).to(dev)
                elif config.correction == "oracle":
                    log_q = torch.from_numpy(oracle[data.item_row[rows]]).to(dev)
                query = model.query(data.queries.take(rows, dev))
                item = model.item(data.items.take(data.item_row[rows], dev))
                loss = in_batch_softmax_loss(
                    query, item, torch.from_numpy(keys).to(dev), log_q,
                    torch.from_numpy(data.reward[rows]).to(dev), model.config.temperature,
                    config.remove_accidental_hits)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                examples += len(rows)
                running.append(loss.item())
                bar.update(1)
                if estimator.step % config.log_every == 0:
                    record = {"step": estimator.step, "epoch": epoch,
                              "loss": float(np.mean(running)), "examples": examples,
                              "seconds": round(time.perf_counter() - started, 3)}
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if log:
                        log.write(json.dumps(record) + "\n")
                    running = []
        if log and running:
            log.write(json.dumps({"step": estimator.step, "epoch": config.epochs - 1,
                                  "loss": float(np.mean(running)), "examples": examples,
                                  "seconds": round(time.perf_counter() - started, 3)}) + "\n")
    finally:
        bar.close()
        if log:
            log.close()
    model.eval()
    return estimator
