"""Full-corpus evaluation speed: 100k queries ranked against 1M items, exactly.

Times ``twotower.evaluate.exact_rankings`` + ``retrieval_metrics`` (exact rank of every
positive, top-100 lists, every metric) on random unit vectors. On the first
``--subset`` queries, side by side and interleaved over ``--repeats`` rounds (the cores
are shared, so read the ratios), it also times:

- ``floor``: the bare products, blocked like ``exact_rankings`` (reused cache-sized
  buffers, query blocks split over the threads), nothing else;
- ``old``: the previous implementation, kept below as the baseline (query chunks of
  2^25 scores, a fresh product per chunk, a full comparison pass and ``topk``);
- ``old_floor``: that implementation's products alone (the floor quoted before);
- ``one_worker``: ``exact_rankings`` with a single worker splitting every product over
  the torch threads, instead of query blocks split over the threads.

Run from the repository root:

    PYTHONPATH=src python benchmarks/evaluation/bench_full_corpus.py
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from twotower import evaluate
from twotower.evaluate import Rankings, exact_rankings, retrieval_metrics


def unit(rng: np.random.Generator, n: int, dim: int) -> torch.Tensor:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


@torch.no_grad()
def old_exact_rankings(query_emb: torch.Tensor, item_emb: torch.Tensor,
                       positives: np.ndarray, top_k: int) -> Rankings:
    """The previous ``exact_rankings`` (without exclusions), the baseline."""
    num_queries, num_items = len(query_emb), len(item_emb)
    top_k = min(top_k, num_items)
    chunk = max(1, min(4096, (1 << 25) // max(num_items, 1)))
    ranks = np.empty(num_queries, dtype=np.int64)
    top = np.empty((num_queries, top_k), dtype=np.int64)
    positives_t = torch.from_numpy(np.asarray(positives, dtype=np.int64))
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        scores = query_emb[start:stop] @ item_emb.T
        positive_score = scores.gather(1, positives_t[start:stop, None])
        ranks[start:stop] = ((scores >= positive_score).sum(1) - 1).numpy()
        top[start:stop] = scores.topk(top_k, dim=1).indices.numpy()
    return Rankings(ranks, top)


def old_floor(queries: torch.Tensor, items: torch.Tensor) -> None:
    chunk = max(1, min(4096, (1 << 25) // len(items)))
    for s in range(0, len(queries), chunk):
        queries[s:s + chunk] @ items.T


def blocked_floor(queries: torch.Tensor, items: torch.Tensor) -> None:
    """Products only, in the blocks and threads ``exact_rankings`` uses."""
    query_block, item_block = evaluate._QUERY_BLOCK, evaluate._ITEM_BLOCK

    def products(start: int) -> None:
        out = torch.empty(query_block, item_block)
        query = queries[start:start + query_block]
        for i in range(0, len(items) - item_block + 1, item_block):
            torch.mm(query, items[i:i + item_block].T, out=out[:len(query)])

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            list(pool.map(products, range(0, len(queries), query_block)))
    finally:
        torch.set_num_threads(threads)


def one_worker(queries, items, positives, top_k) -> Rankings:
    evaluate._WORKERS = 1  # private knob: every product split over the torch threads
    try:
        return exact_rankings(queries, items, positives, top_k)
    finally:
        evaluate._WORKERS = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--subset", type=int, default=10_000,
                        help="queries for the side-by-side comparison")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["old", "old_floor", "one_worker", "full"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    items = unit(rng, args.items, args.dim)
    queries = unit(rng, args.queries, args.dim)
    positives = rng.integers(0, args.items, args.queries)
    counts = np.minimum(rng.zipf(1.3, args.items), 10**6).astype(np.int64)

    n = args.subset
    sub_q, sub_p = queries[:n], positives[:n]

    def with_metrics(rankings):
        def run() -> Rankings:
            found = rankings(sub_q, items, sub_p, 100)
            retrieval_metrics(found, sub_p, counts)
            return found
        return run

    runs = {"floor": lambda: blocked_floor(sub_q, items),
            "new": with_metrics(exact_rankings),
            "one_worker": with_metrics(one_worker),
            "old": with_metrics(old_exact_rankings),
            "old_floor": lambda: old_floor(sub_q, items)}
    runs = {name: run for name, run in runs.items() if name not in args.skip}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    found = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            found[name] = run()
            seconds[name].append(time.perf_counter() - started)
            print(name, round(seconds[name][-1], 2), flush=True)
    best = {name: min(times) for name, times in seconds.items()}
    report = {"queries": args.queries, "items": args.items, "dim": args.dim,
              "threads": torch.get_num_threads(), "subset_queries": n,
              "subset_seconds": {name: [round(t, 2) for t in times]
                                 for name, times in seconds.items()},
              "new_over_floor": round(best["new"] / best["floor"], 2)}
    if "old" in best:
        report["old_over_new"] = round(best["old"] / best["new"], 2)
        new, old = found["new"], found["old"]
        report["ranks_differing_from_old"] = int((new.ranks != old.ranks).sum())
        report["top_lists_differing_from_old"] = int((new.top != old.top).any(1).sum())
    if "old_floor" in best:
        report["old_floor_over_floor"] = round(best["old_floor"] / best["floor"], 2)
    if "one_worker" in best:
        report["one_worker_over_new"] = round(best["one_worker"] / best["new"], 2)
    if "full" not in args.skip:
        started = time.perf_counter()
        metrics = retrieval_metrics(exact_rankings(queries, items, positives, 100), positives,
                                    counts)
        report["full_seconds"] = round(time.perf_counter() - started, 1)
        report["recall@100"] = metrics["recall@100"]
    print("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in report.items())
          + "\n}")


if __name__ == "__main__":
    main()
