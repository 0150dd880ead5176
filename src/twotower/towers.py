"""The query tower, the item tower and the two-tower model that owns their tables.

Each tower is an embedding front (one pooled vector per feature, dense values as they
are) followed by a ReLU MLP and, by default, L2 normalisation. The embedding tables
belong to the model, not to a tower, so a watch history in the query tower and the
item id in the item tower can read the same table, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from twotower.features import FeatureSpec, TableSpec
from twotower.sequence import SequenceEncoder

__all__ = ["ModelConfig", "Tower", "TwoTowerModel"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`TwoTowerModel` (stored as JSON)."""

    tables: dict[str, TableSpec]
    query_features: list[FeatureSpec]
    item_features: list[FeatureSpec]
    query_hidden: list[int] = field(default_factory=lambda: [256])
    item_hidden: list[int] = field(default_factory=lambda: [256])
    output_dim: int = 64
    normalize: bool = True
    temperature: float = 0.05
    dropout: float = 0.0
    history_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        for name in ("dropout", "history_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        # A zero width makes a tower whose output ignores its input (it trains, uselessly).
        for side, widths in (("query_hidden", self.query_hidden),
                             ("item_hidden", self.item_hidden), ("output_dim", [self.output_dim])):
            if any(w < 1 for w in widths):
                raise ValueError(f"{side}: every width must be >= 1, got {widths}")
        for side, features in (("query", self.query_features), ("item", self.item_features)):
            if not features:
                raise ValueError(f"the {side} tower needs at least one feature")
            seen = [f.name for f in features]
            if len(set(seen)) != len(seen):
                raise ValueError(f"the {side} tower lists a feature twice: {seen}")
        for spec in (f for f in self.query_features + self.item_features if f.kind != "dense"):
            if spec.table_name not in self.tables:
                raise ValueError(f"feature {spec.name!r} uses undefined table "
                                 f"{spec.table_name!r}; tables: {sorted(self.tables)}")

    def to_dict(self) -> dict:
        return {
            "tables": {k: {"num_buckets": t.num_buckets, "dim": t.dim}
                       for k, t in self.tables.items()},
            "query_features": [f.to_dict() for f in self.query_features],
            "item_features": [f.to_dict() for f in self.item_features],
            "query_hidden": list(self.query_hidden),
            "item_hidden": list(self.item_hidden),
            "output_dim": self.output_dim,
            "normalize": self.normalize,
            "temperature": self.temperature,
            "dropout": self.dropout,
            "history_dropout": self.history_dropout,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelConfig:
        data = dict(data)
        data["tables"] = {k: TableSpec(**v) for k, v in data["tables"].items()}
        data["query_features"] = [FeatureSpec(**f) for f in data["query_features"]]
        data["item_features"] = [FeatureSpec(**f) for f in data["item_features"]]
        return cls(**data)


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """Embedding front + ReLU MLP: ``[batch] features -> [batch, output_dim]``.

    ``dropout`` applies to the embedding front during training (and inside sequence
    encoders): hashed id tables memorise a fixed log within a few epochs otherwise.
    """

    def __init__(self, features: Sequence[FeatureSpec], tables: Mapping[str, TableSpec],
                 hidden: Sequence[int], output_dim: int, normalize: bool,
                 dropout: float = 0.0, list_dropout: float = 0.0) -> None:
        super().__init__()
        self.features = list(features)
        self.normalize = normalize
        self.list_dropout = list_dropout
        in_dim = sum(f.width if f.kind == "dense" else tables[f.table_name].dim
                     for f in self.features)
        self.sequences = nn.ModuleDict({
            f.name: SequenceEncoder(tables[f.table_name].dim, f.length, dropout=dropout)
            for f in self.features if f.kind == "sequence"})
        self.dropout = nn.Dropout(dropout)
        self.mlp = _mlp(in_dim, hidden, output_dim)

    def forward(self, batch: Mapping[str, object], tables: nn.ModuleDict) -> torch.Tensor:
        parts = []
        for spec in self.features:
            value = batch[spec.name]
            if spec.kind == "dense":
                parts.append(value)
            elif spec.kind == "id":
                table = tables[spec.table_name]
                parts.append(F.embedding(value, table.weight, sparse=table.sparse))
            elif spec.kind == "sequence":
                ids, mask = value
                table = tables[spec.table_name]
                # Only the real ids are looked up: a padded slot names no table row (a
                # sparse optimizer moves every row a gradient names, even by a zero one).
                found = F.embedding(ids[mask], table.weight, sparse=table.sparse)
                items = found.new_zeros(*ids.shape, found.shape[1]).index_put((mask,), found)
                parts.append(self.sequences[spec.name](items, mask))
            else:
                values, offsets, weights = value
                if self.training and self.list_dropout:
                    weights = _drop_ids(weights, offsets, self.list_dropout)
                parts.append(tables[spec.table_name](values, offsets, per_sample_weights=weights))
        out = self.mlp(self.dropout(torch.cat(parts, dim=1)))
        return F.normalize(out, dim=1) if self.normalize else out


def _drop_ids(weights: torch.Tensor, offsets: torch.Tensor, rate: float) -> torch.Tensor:
    """Leave each id of a bag out of its pool with probability ``rate``, rescaling the
    rest so a bag's weights keep their sum; a bag that would lose every id keeps them all.
    On short, sparse histories the same few ids would otherwise make the same query."""
    bag = torch.searchsorted(offsets, torch.arange(len(weights), device=weights.device),
                             right=True) - 1
    keep = torch.rand_like(weights) >= rate
    total = weights.new_zeros(len(offsets)).index_add_(0, bag, weights)
    left = weights.new_zeros(len(offsets)).index_add_(0, bag, weights * keep)
    keep |= (left == 0)[bag]
    return weights * keep * torch.where(left > 0, total / left, 1.0)[bag]


def _table(name: str, spec: TableSpec) -> nn.EmbeddingBag:
    """An embedding table; one too large for memory is an error naming it and its size
    (``buckets: 10000000000000`` in a schema was a traceback from torch's allocator)."""
    try:
        return nn.EmbeddingBag(spec.num_buckets, spec.dim, mode="sum")
    except (RuntimeError, MemoryError) as error:  # torch: RuntimeError "can't allocate"
        if isinstance(error, RuntimeError) and "alloc" not in str(error):
            raise
        size = spec.num_buckets * spec.dim * 4
        raise ValueError(f"table {name!r}: {spec.num_buckets:,} buckets x {spec.dim} dims "
                         f"({size / 2**30:,.1f} GiB) do not fit in memory; give it fewer "
                         "buckets (or `buckets: auto`)") from None


class TwoTowerModel(nn.Module):
    """Query and item towers over shared, hashed embedding tables.

    ``query(batch)`` gives ``[num_queries, output_dim]``, ``item(batch)`` gives
    ``[num_items, output_dim]``; the serving score is their plain inner product.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tables = nn.ModuleDict({name: _table(name, t) for name, t in config.tables.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
        self.query_tower = Tower(config.query_features, config.tables, config.query_hidden,
                                 config.output_dim, config.normalize, config.dropout,
                                 config.history_dropout)
        self.item_tower = Tower(config.item_features, config.tables, config.item_hidden,
                                config.output_dim, config.normalize, config.dropout)

    def set_sparse(self, sparse: bool) -> None:
        """Give the tables sparse gradients (only the rows a batch touches) or dense ones."""
        for table in self.tables.values():
            table.sparse = sparse

    def query(self, batch: Mapping[str, object]) -> torch.Tensor:
        return self.query_tower(batch, self.tables)

    def item(self, batch: Mapping[str, object]) -> torch.Tensor:
        return self.item_tower(batch, self.tables)
