"""Validation during training: full-corpus recall on held-out events after every epoch.

On a fixed log a two-tower model first learns and then overfits (hashed id tables
memorise the training events), and where the turn comes depends on the log. So when a
split holds validation events, the trainer scores them after every epoch, keeps the
weights of the best epoch and stops once ``patience`` epochs in a row did not beat it.
:class:`EarlyStopping` is that bookkeeping alone (stored in checkpoints, so a resumed
run remembers its best epoch); :class:`Validation` is the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from twotower.evaluate import embed, evaluate_retrieval
from twotower.towers import TwoTowerModel

__all__ = ["EarlyStopping", "Validation"]


@dataclass
class EarlyStopping:
    """The best epoch so far by ``metric`` (higher is better), and when to stop.

    ``update`` takes an epoch's score and says whether it is a new best; ``done`` is true
    once ``patience`` epochs in a row did not improve on the best.
    """

    metric: str = "recall@50"
    patience: int = 3
    best_value: float = float("-inf")
    best_epoch: int = -1
    best_step: int = 0
    waited: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {self.patience}")

    def update(self, epoch: int, step: int, value: float) -> bool:
        if not np.isfinite(value):
            raise ValueError(f"validation {self.metric} is {value} after epoch {epoch + 1}")
        if value > self.best_value:
            self.best_value, self.best_epoch, self.best_step, self.waited = value, epoch, step, 0
            return True
        self.waited += 1
        return False

    @property
    def done(self) -> bool:
        return self.waited >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)


class Validation:
    """Scores a model on validation events against the whole corpus.

    ``score(model)`` returns recall and NDCG at ``ks`` (and the early-stopping
    ``metric``), ranking every corpus item for each validation event with the items its
    user interacted with before it excluded, as ``twotower evaluate --exclude-seen`` does.
    """

    def __init__(self, prepared, train_rows: np.ndarray, valid_rows: np.ndarray,
                 ks: Sequence[int] = (10, 50, 100), exclude_seen: bool = True) -> None:
        if len(valid_rows) == 0:
            raise ValueError("validation needs at least one validation event")
        data = prepared.interactions
        self.prepared, self.valid_rows, self.ks = prepared, valid_rows, tuple(ks)
        # What does not change from epoch to epoch is found once: the ranked item of each
        # event, the training counts and each event's excluded items.
        self.positives = data.item_row[valid_rows]
        self.train_counts = data.item_counts(train_rows)
        self.exclude = data.seen_before(valid_rows) if exclude_seen else None

    def score(self, model: TwoTowerModel) -> dict[str, float]:
        query_emb = embed(model, self.prepared.queries, "query", self.valid_rows)
        item_emb = embed(model, self.prepared.items, "item")
        metrics = evaluate_retrieval(query_emb, item_emb, self.positives, self.train_counts,
                                     self.ks, self.exclude)
        return {k: float(v) for k, v in metrics.items()
                if k.split("@")[0] in ("recall", "ndcg") and "/" not in k}
