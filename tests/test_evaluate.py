"""Tests for full-corpus retrieval metrics against a brute-force numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower import evaluate
from twotower.evaluate import (
    GROUPS,
    MISS,
    Rankings,
    evaluate_retrieval,
    exact_rankings,
    index_rankings,
    popularity_deciles,
    popularity_groups,
    retrieval_metrics,
)
from twotower.features import Bag


def exact_embeddings(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Multiples of 1/64 in [-1, 1]: their inner products are exact in float32 whatever the
    summation order, so torch and numpy see the same scores (and the same ties)."""
    return (rng.integers(-64, 65, size=(n, dim)) / 64).astype(np.float32)


def reference_metrics(query, items, positives, train_counts, ks, exclude_lists) -> dict:
    """Per query: mask excluded items, rank = other items scoring >= the positive (a miss
    when the positive itself is excluded)."""
    scores = query.astype(np.float64) @ items.astype(np.float64).T
    ranks, tops = [], []
    top_k = min(max(ks), len(items))
    for q in range(len(query)):
        row = scores[q].copy()
        excluded = exclude_lists[q] if exclude_lists is not None else []
        for j in excluded:
            row[j] = -np.inf
        ranks.append(MISS if positives[q] in excluded else
                     sum(1 for j in range(len(items)) if j != positives[q]
                         and row[j] >= row[positives[q]]))
        order = np.argsort(-row, kind="stable")
        # The top-k set is only well defined without a tie across its boundary.
        if top_k < len(items):
            assert row[order[top_k - 1]] > row[order[top_k]], "tie at the top-k boundary"
        tops.append(order[:top_k])
    ranks = np.array(ranks)
    groups = popularity_groups(train_counts)[positives]
    out = {"queries": float(len(query))}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(ranks < k))
    for k in ks:
        out[f"ndcg@{k}"] = float(np.mean([1 / math.log2(r + 2) if r < k else 0.0
                                          for r in ranks]))
    for g, name in enumerate(GROUPS):
        mask = groups == g
        out[f"recall@{top_k}/{name}"] = (float(np.mean(ranks[mask] < top_k)) if mask.any()
                                          else float("nan"))
    by_count = sorted(range(len(items)), key=lambda j: (-train_counts[j], j))
    decile = {j: place * 10 // len(items) for place, j in enumerate(by_count)}
    for d in range(10):
        mask = np.array([decile[int(p)] == d for p in positives])
        out[f"recall@{top_k}/decile{d + 1}"] = (float(np.mean(ranks[mask] < top_k))
                                                if mask.any() else float("nan"))
    for k in ks:
        out[f"coverage@{k}"] = len({int(j) for top in tops for j in top[:k]}) / len(items)
    listed = [int(j) for top in tops for j in top]
    total = sum(int(c) for c in train_counts) + len(items)
    out[f"novelty@{top_k}"] = float(np.mean([-math.log((train_counts[j] + 1) / total)
                                             for j in listed]))
    out[f"popularity@{top_k}"] = float(np.mean([train_counts[j] for j in listed]))
    return out


def assert_metrics_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("with_exclude", [False, True])
def test_matches_brute_force(seed, with_exclude):
    rng = np.random.default_rng(seed)
    num_items, num_queries, dim = int(rng.integers(12, 60)), int(rng.integers(1, 40)), 6
    items = (rng.standard_normal((num_items, dim))).astype(np.float32)
    query = (rng.standard_normal((num_queries, dim))).astype(np.float32)
    positives = rng.integers(0, num_items, num_queries)
    train_counts = rng.integers(0, 20, num_items) * (rng.random(num_items) < 0.7)
    ks = (1, 3, 5)
    exclude_lists = None
    exclude = None
    if with_exclude:
        exclude_lists = [rng.integers(0, num_items, int(rng.integers(0, 6))).tolist()
                         for _ in range(num_queries)]
        for q in range(num_queries):  # sometimes the positive itself is listed: a miss
            if rng.random() < 0.3:
                exclude_lists[q].append(int(positives[q]))
        exclude = Bag.from_lists(exclude_lists)
    got = evaluate_retrieval(torch.from_numpy(query), torch.from_numpy(items), positives,
                             train_counts, ks, exclude)
    expected = reference_metrics(query, items, positives, train_counts, ks, exclude_lists)
    assert_metrics_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_ties_are_pessimistic_on_random_exact_scores(seed):
    rng = np.random.default_rng(100 + seed)
    num_items, num_queries = 40, 30
    items = exact_embeddings(rng, num_items, 2)
    items[num_items // 2:] = items[: num_items // 2]  # every item has a duplicate
    items = np.round(items * 2) / 2  # coarse values: many more ties
    query = np.round(exact_embeddings(rng, num_queries, 2) * 2) / 2
    query = query.astype(np.float32)
    positives = rng.integers(0, num_items, num_queries)
    got = evaluate_retrieval(torch.from_numpy(query), torch.from_numpy(items.astype(np.float32)),
                             positives, np.ones(num_items, np.int64), ks=(1, 5, 10))
    scores = query.astype(np.float64) @ items.astype(np.float64).T
    ranks = np.array([(scores[q] >= scores[q, positives[q]]).sum() - 1
                      for q in range(num_queries)])
    assert (ranks >= 1).all()  # the duplicate always ties with the positive
    for k in (1, 5, 10):
        assert got[f"recall@{k}"] == pytest.approx(np.mean(ranks < k), abs=1e-12)
    assert got["recall@1"] == 0.0
    assert got["ndcg@10"] == pytest.approx(
        np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)), abs=1e-12)


def test_small_known_example_with_ties():
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # Query 0, positive 0: item 1 ties -> rank 1. Query 1, positive 1: item 0 ties -> rank 1.
    # Query 2, positive 2: items 0, 1, 3 score higher -> rank 3. Query 3, positive 2: rank 0.
    positives = np.array([0, 1, 2, 2])
    got = evaluate_retrieval(query, items, positives, np.array([5, 1, 1, 0]), ks=(1, 2, 3))
    assert got["queries"] == 4.0
    assert got["recall@1"] == 0.25
    assert got["recall@2"] == 0.75
    assert got["recall@3"] == 0.75
    # Ranks 1, 1, 3, 0: NDCG@3 counts all but rank 3.
    expected_ndcg = (1 / math.log2(3) + 1 / math.log2(3) + 1) / 4
    assert got["ndcg@3"] == pytest.approx(expected_ndcg, abs=1e-12)



def test_exclude_known_example():
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    items = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    positives = np.array([2, 1])
    # Query 0 excludes items 0 and 2, its positive: a miss at every K.
    # Query 1 excludes items 0, 0 (repeat) and 3 -> rank 0.
    exclude = Bag.from_lists([[0, 2], [0, 0, 3]])
    got = evaluate_retrieval(query, items, positives, np.ones(4, np.int64), ks=(1, 2),
                             exclude=exclude)
    assert got["recall@1"] == 0.5
    assert got["recall@2"] == 0.5
    kept = evaluate_retrieval(query, items, positives, np.ones(4, np.int64), ks=(1, 2),
                              exclude=Bag.from_lists([[0], [0, 0, 3]]))
    assert kept["recall@1"] == 0.5 and kept["recall@2"] == 1.0  # item 2 ranks second
    no_exclude = evaluate_retrieval(query, items, positives, np.ones(4, np.int64), ks=(1, 2))
    assert no_exclude["recall@1"] == 0.0 and no_exclude["recall@2"] == 0.5


def test_coverage_known_example():
    # Every query prefers item 0 then item 1: the top-1 lists cover 1 item of 4, top-2 2.
    query = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.1]])
    items = torch.tensor([[4.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    got = evaluate_retrieval(query, items, np.array([0, 1, 2]), np.ones(4, np.int64),
                             ks=(1, 2))
    assert got["coverage@1"] == 0.25
    assert got["coverage@2"] == 0.5


def test_many_chunks_match_brute_force():
    # Default block sizes: several query blocks and item blocks, the last one partial.
    rng = np.random.default_rng(7)
    num_items, num_queries, dim = 20_000, 1_700, 4
    items = exact_embeddings(rng, num_items, dim)
    query = exact_embeddings(rng, num_queries, dim)
    positives = rng.integers(0, num_items, num_queries)
    exclude_lists = [rng.integers(0, num_items, int(rng.integers(0, 4))).tolist()
                     + ([int(positives[q])] if q % 5 == 0 else [])
                     for q in range(num_queries)]
    got = evaluate_retrieval(torch.from_numpy(query), torch.from_numpy(items), positives,
                             np.ones(num_items, np.int64), ks=(10,),
                             exclude=Bag.from_lists(exclude_lists))
    scores = query @ items.T  # exact in float32
    rows = np.repeat(np.arange(num_queries), [len(x) for x in exclude_lists])
    cols = np.array([j for x in exclude_lists for j in x], dtype=np.int64)
    keep = cols != positives[rows]
    scores[rows[keep], cols[keep]] = -np.inf
    positive = scores[np.arange(num_queries), positives]
    ranks = (scores >= positive[:, None]).sum(1) - 1
    assert got["recall@10"] == pytest.approx(np.mean(ranks < 10), abs=1e-12)
    assert got["ndcg@10"] == pytest.approx(
        np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)), abs=1e-12)


def test_popularity_groups_known_example():
    counts = np.array([10, 0, 40, 20, 10, 20, 0])
    # By count: item 2 (40), 3 (20), 5 (20), 0 (10), 4 (10), then the unseen 1 and 6.
    # Share of events before each: 0, .4, .6, .8, .9 -> head, torso, torso, tail, tail.
    assert popularity_groups(counts).tolist() == [2, 2, 0, 1, 2, 1, 2]
    # One item with almost every event is the whole head; unseen items are always tail.
    assert popularity_groups(np.array([1, 100, 1, 0])).tolist() == [2, 0, 2, 2]
    assert popularity_groups(np.zeros(3, np.int64)).tolist() == [2, 2, 2]
    assert popularity_groups(np.array([3, 3, 3, 3, 3, 3, 3, 3, 3])).tolist() == [
        0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_popularity_deciles_known_example():
    counts = np.array([0, 5, 9, 1, 9, 3, 0, 7, 2, 4, 8, 6, 1, 0, 0, 2, 3, 5, 1, 0])
    deciles = popularity_deciles(counts)
    # 20 items: two per decile, by count descending, ties in item order.
    assert deciles[[2, 4]].tolist() == [0, 0] and deciles[[10, 7]].tolist() == [1, 1]
    assert np.bincount(deciles).tolist() == [2] * 10


@pytest.mark.parametrize("with_exclude", [False, True])
def test_index_path_equals_exact_path_with_an_exact_index(with_exclude):
    from twotower.index import ItemIndex

    rng = np.random.default_rng(3)
    num_items, num_queries, dim = 300, 50, 8
    items = exact_embeddings(rng, num_items, dim)
    query = exact_embeddings(rng, num_queries, dim)
    positives = rng.integers(0, num_items, num_queries)
    exclude = Bag.from_lists([rng.integers(0, num_items, 5).tolist()
                              for _ in range(num_queries)]) if with_exclude else None
    index = ItemIndex.build(items, np.arange(num_items) + 1000, "Flat")
    counts = rng.integers(0, 9, num_items)
    exact = exact_rankings(torch.from_numpy(query), torch.from_numpy(items), positives, 20,
                           exclude)
    through = index_rankings(index, query, positives, 20, exclude)
    hit = exact.ranks < 20
    assert np.array_equal(through.ranks < 20, hit)
    assert np.array_equal(through.ranks[hit], exact.ranks[hit])
    assert retrieval_metrics(through, positives, counts, (5, 20)) == pytest.approx(
        retrieval_metrics(exact, positives, counts, (5, 20)), nan_ok=True)


def test_bootstrap_interval_brackets_the_mean():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 40, 500)
    rankings = Rankings(ranks, np.zeros((500, 10), np.int64))
    got = retrieval_metrics(rankings, np.zeros(500, np.int64), np.ones(50), (10,),
                            bootstrap=200)
    assert got["recall@10/ci_low"] < got["recall@10"] < got["recall@10/ci_high"]
    assert got["recall@10/ci_high"] - got["recall@10/ci_low"] < 0.15


# exact_rankings against a full sort, over shapes that cross every block boundary.

def brute_force_rankings(query, items, positives, exclude_lists):
    """``(scores, ranks)``: float64 scores with excluded items at -inf, and per query the
    number of other items scoring at least the positive (a miss when it is excluded)."""
    scores = query.astype(np.float64) @ items.astype(np.float64).T
    positive = scores[np.arange(len(query)), positives]
    for q, excluded in enumerate(exclude_lists):
        for j in excluded:
            scores[q, j] = -np.inf
    ranks = (scores >= positive[:, None]).sum(1) - 1
    seen = [positives[q] in excluded for q, excluded in enumerate(exclude_lists)]
    return scores, np.where(seen, MISS, ranks)


def assert_exact(got: Rankings, query, items, positives, top_k, exclude_lists) -> None:
    """Ranks equal the brute force's; each top list is the best ``top_k`` by a full sort,
    best first, up to ties (which tied items fill the last places is arbitrary), and ends
    in -1 where fewer items than ``top_k`` are left after exclusions."""
    scores, ranks = brute_force_rankings(query, items, positives, exclude_lists)
    np.testing.assert_array_equal(got.ranks, ranks)
    width = min(top_k, len(items))
    assert got.top.shape == (len(query), width)
    for q in range(len(query)):
        allowed = np.sort(scores[q][scores[q] > -np.inf])[::-1][:width]
        listed = got.top[q, :len(allowed)]
        assert (got.top[q, len(allowed):] == -1).all(), q
        assert len(set(listed.tolist())) == len(listed) and (listed >= 0).all(), q
        np.testing.assert_array_equal(scores[q, listed], allowed)


def tie_heavy_embeddings(rng: np.random.Generator, n: int, dim: int, levels: int) -> np.ndarray:
    """Values in {-1, ..., 1} in steps of ``1 / levels``: inner products exact in float32,
    and with few levels many items tie."""
    return (rng.integers(-levels, levels + 1, size=(n, dim)) / levels).astype(np.float32)


def run_exact(query, items, positives, top_k, exclude_lists, query_block=512,
              item_block=2048, workers=None, max_listed=1 << 22) -> Rankings:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "_QUERY_BLOCK", query_block)
        patch.setattr(evaluate, "_ITEM_BLOCK", item_block)
        patch.setattr(evaluate, "_WORKERS", workers)
        patch.setattr(evaluate, "_MAX_LISTED", max_listed)
        return exact_rankings(torch.from_numpy(query), torch.from_numpy(items), positives,
                              top_k, Bag.from_lists(exclude_lists))


@settings(max_examples=150, deadline=None)
@given(num_items=st.integers(1, 300), num_queries=st.integers(1, 40),
       dim=st.integers(1, 6), levels=st.sampled_from([1, 2, 64]),
       top_k=st.integers(0, 320), max_excluded=st.integers(0, 300),
       query_block=st.sampled_from([1, 3, 64, 256]), item_block=st.sampled_from([64, 128]),
       workers=st.sampled_from([1, 2, 3]), max_listed=st.sampled_from([1 << 22, 100]),
       seed=st.integers(0, 2**32 - 1))
def test_exact_rankings_match_a_full_sort(num_items, num_queries, dim, levels, top_k,
                                          max_excluded, query_block, item_block, workers,
                                          max_listed, seed):
    rng = np.random.default_rng(seed)
    items = tie_heavy_embeddings(rng, num_items, dim, levels)
    query = tie_heavy_embeddings(rng, num_queries, dim, levels)
    positives = rng.integers(0, num_items, num_queries)
    # Exclusion lists with repeats, the query's own positive (a miss) and other queries'
    # positives; long enough, at times, to leave fewer than top_k items.
    exclude_lists = [rng.integers(0, num_items, int(rng.integers(0, max_excluded + 1))).tolist()
                     + rng.choice(positives, int(rng.integers(0, 3))).tolist()
                     for _ in range(num_queries)]
    got = run_exact(query, items, positives, top_k, exclude_lists, query_block, item_block,
                    workers, max_listed)
    assert_exact(got, query, items, positives, top_k, exclude_lists)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("num_items", "top_k"), [
    (1, 10),  # a single item: every list is just it
    (5, 10),  # top_k larger than the corpus
    (63, 62), (64, 64), (65, 64), (129, 100),  # around the group and block sizes
    (300, 0),  # ranks only
])
def test_exact_rankings_edge_shapes(num_items, top_k, workers):
    rng = np.random.default_rng(num_items)
    items = tie_heavy_embeddings(rng, num_items, 3, 2)
    query = tie_heavy_embeddings(rng, 9, 3, 2)
    positives = rng.integers(0, num_items, 9)
    exclude_lists = [[] for _ in range(9)]
    # everything but the positive: a short list
    exclude_lists[0] = [j for j in range(num_items) if j != positives[0]]
    exclude_lists[1] = [int(positives[2])] * 3  # another query's positive
    exclude_lists[2] = list(range(num_items))  # everything: an empty list and a miss
    got = run_exact(query, items, positives, top_k, exclude_lists, query_block=4,
                    item_block=64, workers=workers)
    assert_exact(got, query, items, positives, top_k, exclude_lists)
    if top_k:
        assert got.top[0].tolist() == [positives[0]] + [-1] * (got.top.shape[1] - 1)
        assert (got.top[2] == -1).all()
    assert got.ranks[0] == 0 and got.ranks[2] == MISS


@pytest.mark.parametrize("item_block", [64, 2048])
def test_copies_of_the_positive_tie_in_every_block(item_block):
    # Scores of random floats are rounded, and a product's rounding can depend on its
    # shape; copies of the positive spread over every item block, the padded last one
    # included, must still score exactly as the positive does, so each costs a place.
    rng = np.random.default_rng(11)
    num_items, num_queries, dim, copies = 1000, 37, 24, 6
    items = rng.standard_normal((num_items, dim)).astype(np.float32)
    query = rng.standard_normal((num_queries, dim)).astype(np.float32)
    positives = np.full(num_queries, 7)
    spots = np.linspace(0, num_items - 1, copies + 1).astype(np.int64)[1:]
    items[spots] = items[7]
    scores = query.astype(np.float64) @ items.astype(np.float64).T
    others = np.setdiff1d(np.arange(num_items), np.append(spots, 7))
    gap = np.abs(scores[:, others] - scores[:, [7]])
    assert gap.min() > 1e-4  # no near tie among distinct items: the float64 count is exact
    got = run_exact(query, items, positives, 0, [[] for _ in range(num_queries)],
                    query_block=16, item_block=item_block, workers=2)
    expected = (scores[:, others] > scores[:, [7]]).sum(1) + copies
    np.testing.assert_array_equal(got.ranks, expected)


def test_exact_rankings_leave_torch_threads_and_grad_alone():
    threads = torch.get_num_threads()
    rng = np.random.default_rng(5)
    items = torch.from_numpy(tie_heavy_embeddings(rng, 500, 4, 64)).requires_grad_()
    query = torch.from_numpy(tie_heavy_embeddings(rng, 600, 4, 64))
    got = exact_rankings(query, items, rng.integers(0, 500, 600), 10)
    assert torch.get_num_threads() == threads
    assert got.ranks.shape == (600,) and got.top.shape == (600, 10)
