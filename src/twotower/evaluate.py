"""Full-corpus retrieval metrics, computed exactly with batched matrix products.

Every test query is scored against every item of the corpus; the rank of its positive
item is the number of other items scoring at least as high (ties count against the
model). Recall@K is the share of queries whose positive ranks below K, NDCG@10 weighs
that rank by ``1 / log2(rank + 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from twotower.features import Bag, EncodedFeatures
from twotower.towers import TwoTowerModel

__all__ = ["GROUPS", "embed", "evaluate_retrieval", "popularity_groups"]

GROUPS: tuple[str, ...] = ("head", "torso", "tail")


@torch.no_grad()
def embed(model: TwoTowerModel, features: EncodedFeatures, side: str,
          rows: np.ndarray | None = None, batch_size: int = 8192) -> torch.Tensor:
    """``[len(rows), output_dim]`` embeddings of ``rows`` (default: all), by the ``side`` tower."""
    model.eval()
    tower = model.query if side == "query" else model.item
    device = next(model.parameters()).device
    rows = np.arange(len(features)) if rows is None else np.asarray(rows)
    parts = [tower(features.take(rows[s:s + batch_size], device)).float().cpu()
             for s in range(0, len(rows), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, model.config.output_dim)


def popularity_groups(train_counts: np.ndarray) -> np.ndarray:
    """``[num_items]`` group of each item: 0 head, 1 torso, 2 tail.

    Items are ranked by training count; the head is the most popular items that hold
    the first third of training events, the torso the next third, the tail the rest
    (including items never seen in training).
    """
    order = np.argsort(-train_counts, kind="stable")
    total = max(int(train_counts.sum()), 1)
    share_before = (np.cumsum(train_counts[order]) - train_counts[order]) / total
    groups = np.full(len(train_counts), 2, dtype=np.int64)
    groups[order] = np.where(share_before < 1 / 3, 0, np.where(share_before < 2 / 3, 1, 2))
    groups[train_counts == 0] = 2
    return groups


@torch.no_grad()
def evaluate_retrieval(query_emb: torch.Tensor, item_emb: torch.Tensor, positives: np.ndarray,
                       train_counts: np.ndarray, ks: Sequence[int] = (10, 50, 100),
                       exclude: Bag | None = None) -> dict[str, float]:
    """Recall@K, NDCG@10, recall by popularity group and coverage over the full corpus.

    Args:
        query_emb: ``[num_queries, dim]``; item_emb: ``[num_items, dim]``.
        positives: ``[num_queries]`` row of each query's positive item in ``item_emb``.
        train_counts: ``[num_items]`` training events per item (for head/torso/tail).
        exclude: per query, item rows to drop from its ranking (for example items the
            user already saw); a query's own positive is never dropped.
    """
    num_queries, num_items = len(query_emb), len(item_emb)
    ks = sorted(set(ks))
    top_k = min(max(ks), num_items)
    chunk = max(1, min(4096, (1 << 25) // max(num_items, 1)))
    ranks = np.empty(num_queries, dtype=np.int64)
    top = np.empty((num_queries, top_k), dtype=np.int64)
    positives_t = torch.from_numpy(np.asarray(positives, dtype=np.int64))
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        scores = query_emb[start:stop] @ item_emb.T
        if exclude is not None:
            lengths = np.diff(exclude.offsets[start:stop + 1])
            rows = np.repeat(np.arange(stop - start), lengths)
            cols = exclude.values[exclude.offsets[start]:exclude.offsets[stop]]
            keep = cols != positives[start:stop][rows]
            scores[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep])] = -torch.inf
        positive_score = scores.gather(1, positives_t[start:stop, None])
        ranks[start:stop] = ((scores >= positive_score).sum(1) - 1).numpy()
        top[start:stop] = scores.topk(top_k, dim=1).indices.numpy()

    metrics: dict[str, float] = {"queries": float(num_queries)}
    for k in ks:
        metrics[f"recall@{k}"] = float(np.mean(ranks < k))
    metrics["ndcg@10"] = float(np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)))
    groups = popularity_groups(np.asarray(train_counts))[positives]
    for g, name in enumerate(GROUPS):
        hits = ranks[groups == g] < top_k
        metrics[f"recall@{top_k}/{name}"] = float(hits.mean()) if len(hits) else float("nan")
    for k in ks:
        metrics[f"coverage@{k}"] = len(np.unique(top[:, :k])) / max(num_items, 1)
    return metrics
