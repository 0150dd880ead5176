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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from twotower.features import Bag, EncodedFeatures
from twotower.towers import TwoTowerModel

__all__ = ["GROUPS", "MISS", "Rankings", "embed", "evaluate_retrieval", "exact_rankings",
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


# The rank of a positive that no list can hold (it was excluded): past every K.
MISS = np.iinfo(np.int64).max // 2


def _excluded_pairs(exclude: Bag, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(query offset, item row) pairs to drop for queries ``start:stop``.

    A query's own positive is dropped too when it is listed (a user's repeat of an item
    seen before): a recommender that excludes what the user has seen can never return
    it, so it counts as a miss, as serving with the same exclusions would have it."""
    lengths = np.diff(exclude.offsets[start:stop + 1])
    rows = np.repeat(np.arange(stop - start), lengths)
    return rows, exclude.values[exclude.offsets[start]:exclude.offsets[stop]]


def _positive_excluded(rows: np.ndarray, cols: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Per query of a block (``positives`` its positives), whether its positive is among
    its excluded (row, column) pairs."""
    excluded = np.zeros(len(positives), dtype=bool)
    excluded[rows[cols == positives[rows]]] = True
    return excluded


# Exact rankings stream the items through one reused score buffer per thread, block by
# block, so that every pass over the scores (products, rank count, top-k gate) reads a
# buffer that is still in cache and nothing large is allocated per block.
_QUERY_BLOCK = 512  # queries scored together
_ITEM_BLOCK = 2048  # items per block: a [512, 2048] float32 buffer is 4 MiB
_GROUP = 64  # items per group of the top-k gate; divides _ITEM_BLOCK
_MAX_LISTED = 1 << 22  # top-list entries per query block: fewer queries when top_k is huge
_WORKERS: int | None = None  # threads splitting the query blocks; None: torch's thread count


class _RunningTop:
    """The best ``k`` scores and items so far of each query of a block.

    Scores only matter if they beat a query's current k-th best (``threshold``), so
    per item block only groups of ``_GROUP`` items whose best score does are kept. They
    wait in ``pending`` and are merged, element by element, once there are a quarter as
    many groups as list entries: each merge re-sorts every list it touches, and the
    k-th best rises slowly, so a stale threshold lets few more scores in.
    """

    def __init__(self, num_queries: int, k: int, dtype: torch.dtype):
        self.k = k
        self.values = torch.full((num_queries, k), -torch.inf, dtype=dtype)
        self.items = torch.full((num_queries, k), -1, dtype=torch.int64)
        self.threshold = torch.full((num_queries,), -torch.inf, dtype=dtype)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.capacity = num_queries * max(1, k // 4)  # pending groups that start a merge
        self.started = False

    def offer(self, groups: torch.Tensor, first_group: int) -> None:
        """Keep the groups of ``groups`` (``[num_queries, n, _GROUP]`` scores of groups
        ``first_group...``) whose best score beats the query's threshold."""
        if not self.started:
            self.started = True
            if groups[0].numel() >= self.k:  # every score beats -inf: one topk is cheaper
                best = groups.flatten(1).topk(self.k, dim=1)
                self.values, self.items = best.values, best.indices + first_group * _GROUP
                self.threshold = self.values[:, -1].clone()
                return
        per_row = groups.shape[1]
        hit = (groups.amax(2) > self.threshold[:, None]).view(-1).nonzero().squeeze(1)
        if len(hit):  # index_select copies whole groups: much faster than groups[rows, cols]
            self.pending.append((hit // per_row, hit % per_row + first_group,
                                 groups.reshape(-1, _GROUP).index_select(0, hit)))
            if sum(len(r) for r, _, _ in self.pending) >= self.capacity:
                self.merge()

    def merge(self) -> None:
        """Fold the pending scores above the thresholds into the top lists."""
        if not self.pending:
            return
        rows, group_ids, scores = (torch.cat(parts) for parts in zip(*self.pending, strict=True))
        self.pending = []
        hit, col = (scores > self.threshold[rows, None]).nonzero(as_tuple=True)
        if not len(hit):
            return
        rows, order = rows[hit].sort(stable=True)
        values = scores[hit, col][order]
        items = (group_ids[hit] * _GROUP + col)[order]
        # A table with one row per touched query: its current list, then its candidates.
        touched = torch.unique_consecutive(rows)
        local = torch.searchsorted(touched, rows)
        place = torch.arange(len(rows)) - torch.searchsorted(rows, rows)  # within its query
        width = self.k + int(place.max()) + 1
        table = torch.full((len(touched), width), -torch.inf, dtype=values.dtype)
        table_items = torch.full((len(touched), width), -1, dtype=torch.int64)
        table[:, :self.k], table_items[:, :self.k] = self.values[touched], self.items[touched]
        table[local, self.k + place], table_items[local, self.k + place] = values, items
        best = table.topk(self.k, dim=1)
        self.values[touched] = best.values
        self.items[touched] = table_items.gather(1, best.indices)
        self.threshold[touched] = best.values[:, -1]


def _rank_query_block(query: torch.Tensor, item_emb: torch.Tensor, tail: torch.Tensor,
                      positive_emb: torch.Tensor, top_k: int,
                      excluded: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ranks and top lists of ``query`` (``[b, dim]``) over every item, one item block
    at a time.

    Every product has the same shape ``[b, block]`` (``tail``: the last, partial item
    block padded with zeros; ``positive_emb``: the block of the queries' positives), so
    a positive and any item with the same embedding get the same score, bit for bit,
    and tie. Products of other shapes can round differently (BLAS kernels change with
    the shape; on MKL a width that is not a multiple of 8 even rounds some columns of
    one product differently), which would break ties at random.
    """
    num_items, block = len(item_emb), len(tail)
    scores = torch.empty(len(query), block, dtype=query.dtype)
    torch.mm(query, positive_emb.T, out=scores)
    positive_score = scores.diagonal()[:, None].clone()
    rows, cols = (torch.from_numpy(x) for x in excluded)  # sorted by column
    bounds = np.searchsorted(excluded[1], np.arange(0, num_items + block, block))
    at_least_positive = torch.zeros(len(query), dtype=torch.float64)
    best = _RunningTop(len(query), top_k, query.dtype)
    for n, start in enumerate(range(0, num_items, block)):
        items = item_emb[start:start + block]
        torch.mm(query, (items if len(items) == block else tail).T, out=scores)
        scores[:, len(items):] = -torch.inf
        if bounds[n] < bounds[n + 1]:
            dropped = slice(bounds[n], bounds[n + 1])
            scores[rows[dropped], cols[dropped] - start] = -torch.inf
        if top_k:
            best.offer(scores.view(len(query), -1, _GROUP), start // _GROUP)
        at_least_positive += scores.ge_(positive_score).sum(1)  # scores: now 0/1
    best.merge()
    top = torch.where(best.values > -torch.inf, best.items, -1)  # short list: -1
    return at_least_positive.long().numpy() - 1, top.numpy()


@torch.no_grad()
def exact_rankings(query_emb: torch.Tensor, item_emb: torch.Tensor, positives: np.ndarray,
                   top_k: int, exclude: Bag | None = None) -> Rankings:
    """Brute-force ranks and top lists over every item, exactly.

    A top list with fewer than ``top_k`` items left after exclusions ends in -1 (as
    through an index), never in an excluded item.

    Query blocks are split over torch's threads, each scoring with one thread: cheaper
    than splitting every small product in two, and a core busy with something else slows
    only its own blocks instead of stalling both at every product. Memory beyond the
    inputs and outputs: per thread ``O(query_block * (item_block + 16 * top_k))`` floats,
    a peak of about 25 MiB at the defaults and top_k = 100.
    """
    num_queries, num_items = len(query_emb), len(item_emb)
    top_k = min(top_k, num_items)
    positives = np.asarray(positives, dtype=np.int64)
    query_emb, item_emb = query_emb.detach().contiguous(), item_emb.detach().contiguous()
    workers = max(1, min(_WORKERS or torch.get_num_threads(), num_queries))
    block = min(_ITEM_BLOCK, -(-max(num_items, 1) // _GROUP) * _GROUP)
    # Query blocks no wider than an item block (the positives' block has a row per
    # query), enough of them for every worker, and top lists of bounded size.
    query_block = max(1, min(_QUERY_BLOCK, block, -(-num_queries // workers),
                             _MAX_LISTED // max(top_k, 1)))
    tail = item_emb.new_zeros(block, item_emb.shape[1])
    tail[:num_items % block] = item_emb[num_items - num_items % block:]
    ranks = np.empty(num_queries, dtype=np.int64)
    top = np.empty((num_queries, top_k), dtype=np.int64)

    def rank(start: int) -> None:
        stop = min(start + query_block, num_queries)
        positive_emb = item_emb.new_zeros(block, item_emb.shape[1])
        positive_emb[:stop - start] = item_emb[torch.from_numpy(positives[start:stop])]
        rows, cols = (_excluded_pairs(exclude, start, stop) if exclude is not None
                      else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        order = np.argsort(cols, kind="stable")
        with torch.no_grad():  # grad mode is per thread
            ranks[start:stop], top[start:stop] = _rank_query_block(
                query_emb[start:stop], item_emb, tail, positive_emb, top_k,
                (rows[order], cols[order]))
        ranks[start:stop][_positive_excluded(rows, cols, positives[start:stop])] = MISS

    starts = range(0, num_queries, query_block)
    if workers == 1:
        for start in starts:
            rank(start)
        return Rankings(ranks, top)
    threads = torch.get_num_threads()
    try:  # torch.set_num_threads(1) in a worker sets that thread's OpenMP/MKL count
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            list(pool.map(rank, starts))
    finally:
        torch.set_num_threads(threads)  # and a process-wide default: put it back
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
        rows, cols = _excluded_pairs(exclude, 0, len(positives))
        n = len(index)  # (query, row) pairs as one int64 each, for one vectorised lookup
        dropped = np.isin(np.arange(len(found))[:, None] * n + found, rows * n + cols)
        dropped &= found >= 0
        order = np.argsort(dropped, axis=1, kind="stable")
        found = np.where(np.take_along_axis(dropped, order, 1), -1,
                         np.take_along_axis(found, order, 1))
    found = found[:, :top_k]
    hit = found == np.asarray(positives)[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), MISS)
    return Rankings(ranks, found)


def _bootstrap(values: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over query resamples (drawn a
    few at a time: ``draws`` full resamples of every query at once would not fit)."""
    n = len(values)
    per_chunk = max(1, (1 << 22) // n)
    means = np.concatenate([
        values[rng.integers(0, n, size=(min(per_chunk, draws - done), n))].mean(axis=1)
        for done in range(0, draws, per_chunk)])
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
            user already saw); a query whose own positive is dropped is a miss.
    """
    rankings = exact_rankings(query_emb, item_emb, positives, max(ks), exclude)
    return retrieval_metrics(rankings, positives, train_counts, ks, bootstrap)
