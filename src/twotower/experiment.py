"""From an interaction log to a trained, saved and evaluated model.

The glue the command line and the quickstart share: the model a schema describes (or
a default feature layout for a log: user id and causal watch history on the query
side, item id and item features on the item side, history and item id sharing one
table), training on the training part of a split, in memory or streamed, and
full-corpus evaluation on a later part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from twotower.data.corpus import ItemCorpus
from twotower.data.interactions import HISTORY, Columns, Interactions
from twotower.data.schema import Schema, TableConfig
from twotower.data.streaming import EventStream, StreamingTrainingData
from twotower.evaluate import embed, evaluate_retrieval
from twotower.features import Bag, EncodedFeatures, FeatureSpec, TableSpec, bag_from_arrow
from twotower.frequency import StreamingFrequencyEstimator
from twotower.hashing import to_int64_ids
from twotower.towers import ModelConfig, TwoTowerModel
from twotower.train import TrainConfig, Trainer, TrainingData, fit_and_save
from twotower.validation import Validation

__all__ = ["Prepared", "auto_buckets", "default_model_config", "fit", "fit_stream",
           "memory_ids", "prepare", "schema_model_config", "score", "stream_ids"]

IDS_PER_BUCKET = 0.25  # auto tables: about four buckets per distinct id (few collisions)
MIN_BUCKETS, MAX_BUCKETS = 64, 1 << 20  # a table of 2**20 rows of 32 floats is 128 MiB


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
                      FeatureSpec(HISTORY, "id_list", table="item",
                                  length=columns.history_length or None)]
    return ModelConfig(tables, query_features, item_features, list(hidden), list(hidden),
                       output_dim, True, temperature)


def auto_buckets(distinct: int) -> int:
    """Buckets for ``distinct`` ids: the power of two at or above ``distinct / IDS_PER_BUCKET``,
    within ``[MIN_BUCKETS, MAX_BUCKETS]``."""
    wanted = max(int(np.ceil(distinct / IDS_PER_BUCKET)), 1)
    return int(min(max(1 << (wanted - 1).bit_length(), MIN_BUCKETS), MAX_BUCKETS))


IdSource = Callable[[str, str], np.ndarray]  # (side "items" or "events", column) -> ids


def _flat(values: np.ndarray | Bag) -> np.ndarray:
    return values.values if isinstance(values, Bag) else values


def memory_ids(interactions: Interactions) -> IdSource:
    """Ids of the item and event columns of a log held in memory."""
    corpus = ItemCorpus.from_table(interactions.items, interactions.columns.key)

    def ids(side: str, name: str) -> np.ndarray:
        if side == "items":
            return _flat(corpus.values(name))
        column = interactions.query_columns([name])[name]
        if isinstance(column, pa.ChunkedArray) and (pa.types.is_list(column.type)
                                                    or pa.types.is_large_list(column.type)):
            return bag_from_arrow(column, name).values
        return to_int64_ids(column)

    return ids


def stream_ids(stream: EventStream) -> IdSource:
    """Ids of the item columns (in memory) and event columns (one pass each) of a stream."""
    def ids(side: str, name: str) -> np.ndarray:
        if side == "items":
            return _flat(stream.corpus.values(name))
        return stream.distinct(name)

    return ids


def schema_model_config(schema: Schema, ids: IdSource) -> ModelConfig:
    """The model a schema describes; ``buckets: auto`` tables are sized from the distinct
    ids of every feature that reads them (see :func:`auto_buckets`)."""
    sources: dict[str, list[tuple[str, str]]] = {}
    for feature in schema.item_features:
        if feature.kind != "dense":
            sources.setdefault(feature.table or feature.name, []).append(("items", feature.name))
    for feature in schema.query_features:
        if feature.kind != "dense":
            source = ("items", feature.history) if feature.history else ("events", feature.name)
            sources.setdefault(feature.table or feature.name, []).append(source)
    tables = {}
    for name, reads in sources.items():
        table = schema.tables.get(name, TableConfig())
        buckets = table.buckets
        if buckets == "auto":
            buckets = auto_buckets(len(np.unique(np.concatenate([ids(*s) for s in reads]))))
        tables[name] = TableSpec(buckets, table.dim or schema.model.dim)
    model = schema.model
    keys = {schema.events.item, schema.items.key}
    query = [replace(f.spec(), length=f.length) if f.kind == "id_list" and f.history in keys
             else f.spec() for f in schema.query_features]
    return ModelConfig(tables, query,
                       [f.spec() for f in schema.item_features], list(model.hidden),
                       list(model.hidden), model.output_dim, model.normalize, model.temperature,
                       model.dropout, model.history_dropout)


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
    names = [f.name for f in model_config.query_features]
    queries = EncodedFeatures(model_config.query_features, model_config.tables,
                              interactions.query_columns(names), "events")
    items = EncodedFeatures(model_config.item_features, model_config.tables,
                            interactions.item_columns(), "items")
    return Prepared(interactions, model_config, queries, items)


def _train_and_save(model_config: ModelConfig, data: TrainingData | StreamingTrainingData,
                    config: TrainConfig, out_dir: str | Path, columns: Columns, progress: bool,
                    extra: dict | None, device: str = "auto", checkpoint_every: int = 0,
                    validation: Validation | None = None,
                    ) -> tuple[TwoTowerModel, StreamingFrequencyEstimator]:
    torch.manual_seed(config.seed)
    trainer = Trainer(TwoTowerModel(model_config), config, out_dir=out_dir, device=device,
                      checkpoint_every=checkpoint_every, progress=progress,
                      extra={"columns": asdict(columns), **(extra or {})})
    fit_and_save(trainer, data, validation=validation)
    return trainer.model.eval(), trainer.estimator


def fit(prepared: Prepared, rows: np.ndarray, config: TrainConfig, out_dir: str | Path,
        progress: bool = True, extra: dict | None = None, device: str = "auto",
        checkpoint_every: int = 0, valid_rows: np.ndarray | None = None,
        ) -> tuple[TwoTowerModel, StreamingFrequencyEstimator]:
    """Train a fresh model on ``rows`` and save it into ``out_dir`` (``extra`` goes into its
    config: the schema, the split, the data report), with checkpoints to resume from.

    With ``valid_rows`` (events held out for validation) the model is scored on them after
    every epoch and the best epoch is kept (see :mod:`twotower.validation`)."""
    validation = None
    if valid_rows is not None and len(valid_rows):
        validation = Validation(prepared, rows, valid_rows)
    return _train_and_save(prepared.model_config, prepared.training_data(rows), config, out_dir,
                           prepared.interactions.columns, progress, extra, device,
                           checkpoint_every, validation)


def fit_stream(data: StreamingTrainingData, config: TrainConfig, out_dir: str | Path,
               progress: bool = True, extra: dict | None = None, device: str = "auto",
               checkpoint_every: int = 0) -> tuple[TwoTowerModel, StreamingFrequencyEstimator]:
    """Train a fresh model on a stream of events and save it into ``out_dir``; the whole
    stream is checked first (:meth:`EventStream.check`), so bad input writes nothing."""
    if config.correction == "oracle":
        raise ValueError("correction 'oracle' counts every event's item before training, "
                         "which a stream cannot; use none or streaming, or load in memory")
    data.stream.check()
    return _train_and_save(data.model_config, data, config, out_dir, data.stream.columns,
                           progress, extra, device, checkpoint_every)


def score(model: TwoTowerModel, prepared: Prepared, train_rows: np.ndarray,
          test_rows: np.ndarray, ks: Sequence[int] = (10, 50, 100),
          exclude_seen: bool = False, bootstrap: int = 0,
          item_bias: np.ndarray | None = None) -> dict[str, float]:
    """Full-corpus metrics of ``model`` on the events ``test_rows``.

    Popularity groups come from ``train_rows``; with ``exclude_seen`` every item the
    user interacted with before the event is removed from its ranking (an event whose
    item the user had before is then a miss, as it is at serving); ``bootstrap``
    resamples of the queries give 95% intervals of recall and NDCG. ``item_bias`` (one
    value per item row, such as ``-beta * log p_hat``) is added to every score: one more
    embedding column, 1 on the query side, as the index folds popularity in.
    """
    data = prepared.interactions
    query_emb = embed(model, prepared.queries, "query", test_rows)
    item_emb = embed(model, prepared.items, "item")
    if item_bias is not None:
        bias = torch.as_tensor(item_bias, dtype=item_emb.dtype)[:, None]
        item_emb = torch.cat([item_emb, bias], dim=1)
        query_emb = torch.cat([query_emb, torch.ones(len(query_emb), 1,
                                                     dtype=query_emb.dtype)], dim=1)
    exclude = data.seen_before(test_rows) if exclude_seen else None
    return evaluate_retrieval(query_emb, item_emb, data.item_row[test_rows],
                              data.item_counts(train_rows), ks, exclude, bootstrap)
