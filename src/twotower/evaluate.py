"""Full-corpus retrieval metrics, exactly (batched matrix products) or through an index.

Every test query is scored against every item of the corpus; the rank of its positive
item is the number of other items scoring at least as high (ties count against the
model). Recall@K is the share of queries whose positive ranks below K; NDCG@K weighs
that rank by ``1 / log2(rank + 2)``. Through an index, the rank is the positive's place
in the index's top-K list (past the list: a miss), so exact and approximate figures
come from the same metric code and their difference is the index's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from twotower.features import Bag, EncodedFeatures
from twotower.towers import TwoTowerModel

__all__ = ["GROUPS", "Rankings", "embed", "evaluate_retrieval", "exact_rankings",
           "index_rankings", "popularity_deciles", "popularity_groups", "retrieval_metrics"]

GROUPS: tuple[str, ...] = ("head", "torso", "tail")
HEADLINE: tuple[str, ...] = ("recall", "ndcg")


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


def popularity_deciles(train_counts: np.ndarray) -> np.ndarray:
    """``[num_items]`` decile of each item by training count: 0 = the most popular tenth."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    deciles = np.empty(len(order), dtype=np.int64)
    deciles[order] = np.arange(len(order)) * 10 // max(len(order), 1)
    return deciles


@dataclass
class Rankings:
    """Where each query's positive ranks (``[num_queries]``) and its top list
    (``[num_queries, top_k]`` item rows, -1 where a list is short)."""

    ranks: np.ndarray
    top: np.ndarray


def _excluded_pairs(exclude: Bag, positives: np.ndarray, start: int,
                    stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(query offset, item row) pairs to drop for queries ``start:stop``, positives kept."""
    lengths = np.diff(exclude.offsets[start:stop + 1])
    rows = np.repeat(np.arange(stop - start), lengths)
    cols = exclude.values[exclude.offsets[start]:exclude.offsets[stop]]
    keep = cols != positives[start:stop][rows]
    return rows[keep], cols[keep]


@torch.no_grad()
def exact_rankings(query_emb: torch.Tensor, item_emb: torch.Tensor, positives: np.ndarray,
                   top_k: int, exclude: Bag | None = None) -> Rankings:
    """Brute-force ranks over every item, in query chunks that bound memory."""
    num_queries, num_items = len(query_emb), len(item_emb)
    top_k = min(top_k, num_items)
    chunk = max(1, min(4096, (1 << 25) // max(num_items, 1)))
    ranks = np.empty(num_queries, dtype=np.int64)
    top = np.empty((num_queries, top_k), dtype=np.int64)
    positives_t = torch.from_numpy(np.asarray(positives, dtype=np.int64))
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        scores = query_emb[start:stop] @ item_emb.T
        if exclude is not None:
            rows, cols = _excluded_pairs(exclude, positives, start, stop)
            scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        positive_score = scores.gather(1, positives_t[start:stop, None])
        ranks[start:stop] = ((scores >= positive_score).sum(1) - 1).numpy()
        top[start:stop] = scores.topk(top_k, dim=1).indices.numpy()
    return Rankings(ranks, top)


def index_rankings(index: object, query_emb: np.ndarray, positives: np.ndarray, top_k: int,
                   exclude: Bag | None = None) -> Rankings:
    """Ranks read off an index's top lists (rows, as ``index.search_rows`` returns them).

    With exclusions the index is asked for ``top_k`` plus the longest exclusion list, and
    the excluded rows are removed before the list is cut to ``top_k``.
    """
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    extra = int(np.diff(exclude.offsets).max(initial=0)) if exclude is not None else 0
    _, found = index.search_rows(query_emb, top_k + extra)
    if exclude is not None and extra:
        rows, cols = _excluded_pairs(exclude, positives, 0, len(positives))
        n = len(index)  # (query, row) pairs as one int64 each, for one vectorised lookup
        dropped = np.isin(np.arange(len(found))[:, None] * n + found, rows * n + cols)
        dropped &= found >= 0
        order = np.argsort(dropped, axis=1, kind="stable")
        found = np.where(np.take_along_axis(dropped, order, 1), -1,
                         np.take_along_axis(found, order, 1))
    found = found[:, :top_k]
    hit = found == np.asarray(positives)[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max // 2)
    return Rankings(ranks, found)


def _bootstrap(values: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over query resamples."""
    counts = rng.multinomial(len(values), np.full(len(values), 1 / len(values)), size=draws)
    means = counts @ values / len(values)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def retrieval_metrics(rankings: Rankings, positives: np.ndarray, train_counts: np.ndarray,
                      ks: Sequence[int] = (10, 50, 100), bootstrap: int = 0,
                      seed: int = 0) -> dict[str, float]:
    """Every metric of a set of rankings.

    ``recall@K``, ``ndcg@K``; ``recall@Kmax/head|torso|tail`` and ``recall@Kmax/decile1..10``
    (by the positive's training popularity, decile 1 the most popular tenth of items);
    ``coverage@K`` (share of the corpus in any top-K list); ``novelty@Kmax`` (mean
    ``-ln p`` of recommended items, ``p`` the add-one smoothed training frequency) and
    ``popularity@Kmax`` (mean training count of recommended items). With ``bootstrap``
    resamples, ``recall@K/ci_low|ci_high`` and ``ndcg@K/...`` give 95% intervals.
    """
    ranks, top = rankings.ranks, rankings.top
    counts = np.asarray(train_counts)
    num_items = len(counts)
    ks = sorted(set(ks))
    top_k = min(max(ks), num_items)
    metrics: dict[str, float] = {"queries": float(len(ranks))}
    per_query: dict[str, np.ndarray] = {}
    for k in ks:
        per_query[f"recall@{k}"] = (ranks < k).astype(np.float64)
        per_query[f"ndcg@{k}"] = np.where(ranks < k, 1 / np.log2(np.minimum(ranks, k) + 2), 0.0)
    metrics.update({name: float(v.mean()) for name, v in per_query.items()})
    hits = ranks < top_k
    for label, group, names in (
            ("", popularity_groups(counts)[positives], GROUPS),
            ("decile", popularity_deciles(counts)[positives], range(1, 11))):
        for g, name in enumerate(names):
            mine = hits[group == g]
            metrics[f"recall@{top_k}/{label}{name}"] = float(mine.mean()) if len(mine) \
                else float("nan")
    listed = top[top >= 0]
    for k in ks:
        column = top[:, :k]
        metrics[f"coverage@{k}"] = len(np.unique(column[column >= 0])) / max(num_items, 1)
    smoothed = (counts + 1.0) / (counts.sum(dtype=np.float64) + num_items)
    metrics[f"novelty@{top_k}"] = float(-np.log(smoothed[listed]).mean()) if listed.size \
        else float("nan")
    metrics[f"popularity@{top_k}"] = float(counts[listed].mean()) if listed.size \
        else float("nan")
    if bootstrap and len(ranks):
        rng = np.random.default_rng(seed)
        for name, values in per_query.items():
            if name.split("@")[0] in HEADLINE:
                metrics[f"{name}/ci_low"], metrics[f"{name}/ci_high"] = \
                    _bootstrap(values, bootstrap, rng)
    return metrics


def evaluate_retrieval(query_emb: torch.Tensor, item_emb: torch.Tensor, positives: np.ndarray,
                       train_counts: np.ndarray, ks: Sequence[int] = (10, 50, 100),
                       exclude: Bag | None = None, bootstrap: int = 0) -> dict[str, float]:
    """Exact metrics over the full corpus (see :func:`retrieval_metrics`).

    Args:
        query_emb: ``[num_queries, dim]``; item_emb: ``[num_items, dim]``.
        positives: ``[num_queries]`` row of each query's positive item in ``item_emb``.
        train_counts: ``[num_items]`` training events per item (popularity groups).
        exclude: per query, item rows to drop from its ranking (for example items the
            user already saw); a query's own positive is never dropped.
    """
    rankings = exact_rankings(query_emb, item_emb, positives, max(ks), exclude)
    return retrieval_metrics(rankings, positives, train_counts, ks, bootstrap)
