"""From an interaction log to a trained, saved and evaluated model.

The glue the command line and the quickstart share: a default feature layout for a
log (user id and causal watch history on the query side, item id and item features on
the item side, history and item id sharing one table), training on a time range, and
full-corpus evaluation on a later one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from twotower.checkpoint import METRICS, save_model
from twotower.data.history import causal_history
from twotower.data.interactions import HISTORY, Columns, Interactions
from twotower.evaluate import embed, evaluate_retrieval
from twotower.features import EncodedFeatures, FeatureSpec, TableSpec, take_bag
from twotower.frequency import StreamingFrequencyEstimator
from twotower.towers import ModelConfig, TwoTowerModel
from twotower.train import TrainConfig, TrainingData, train

__all__ = ["Prepared", "default_model_config", "fit", "prepare", "score"]


def default_model_config(columns: Columns, item_buckets: int = 1 << 17,
                         user_buckets: int = 1 << 16, feature_buckets: int = 1 << 12,
                         dim: int = 32, hidden: Sequence[int] = (256,), output_dim: int = 64,
                         temperature: float = 0.05) -> ModelConfig:
    """User id + history (query) and item id + item features (item); history shares
    the item id's table, as in the paper."""
    tables = {"user": TableSpec(user_buckets, dim), "item": TableSpec(item_buckets, dim)}
    item_features = [FeatureSpec(columns.item, "id", table="item")]
    for name in columns.item_features:
        tables[name] = TableSpec(feature_buckets, dim)
        item_features.append(FeatureSpec(name, "id"))
    query_features = [FeatureSpec(columns.user, "id", table="user"),
                      FeatureSpec(HISTORY, "id_list", table="item")]
    return ModelConfig(tables, query_features, item_features, list(hidden), list(hidden),
                       output_dim, True, temperature)


@dataclass
class Prepared:
    """A log with its features encoded for one model configuration."""

    interactions: Interactions
    model_config: ModelConfig
    queries: EncodedFeatures
    items: EncodedFeatures

    def training_data(self, rows: np.ndarray) -> TrainingData:
        data = self.interactions
        return TrainingData(self.queries, self.items, data.item_row, data.item, data.reward,
                            rows)


def prepare(interactions: Interactions, model_config: ModelConfig) -> Prepared:
    """Hash every event's query features and every item's features once."""
    queries = EncodedFeatures(model_config.query_features, model_config.tables,
                              interactions.query_columns(), "events")
    items = EncodedFeatures(model_config.item_features, model_config.tables,
                            interactions.item_columns(), "items")
    return Prepared(interactions, model_config, queries, items)


def fit(prepared: Prepared, rows: np.ndarray, config: TrainConfig, out_dir: str | Path,
        progress: bool = True) -> tuple[TwoTowerModel, StreamingFrequencyEstimator]:
    """Train a fresh model on ``rows`` and save it into ``out_dir``."""
    torch.manual_seed(config.seed)
    model = TwoTowerModel(prepared.model_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    estimator = train(model, prepared.training_data(rows), config,
                      metrics_path=out_dir / METRICS, progress=progress)
    save_model(out_dir, model, estimator,
               {"train": asdict(config), "columns": asdict(prepared.interactions.columns)})
    return model, estimator


def score(model: TwoTowerModel, prepared: Prepared, train_rows: np.ndarray,
          test_rows: np.ndarray, ks: Sequence[int] = (10, 50, 100),
          exclude_seen: bool = False) -> dict[str, float]:
    """Full-corpus metrics of ``model`` on the events ``test_rows``.

    Popularity groups come from ``train_rows``; with ``exclude_seen`` every item the
    user interacted with before the event is removed from its ranking.
    """
    data = prepared.interactions
    query_emb = embed(model, prepared.queries, "query", test_rows)
    item_emb = embed(model, prepared.items, "item")
    exclude = None
    if exclude_seen:
        seen = causal_history(data.user, data.timestamp, data.item_row, len(data))
        exclude = take_bag(seen, test_rows)
    return evaluate_retrieval(query_emb, item_emb, data.item_row[test_rows],
                              data.item_counts(train_rows), ks, exclude)

