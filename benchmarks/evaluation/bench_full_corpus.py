"""Full-corpus evaluation speed: 100k queries ranked against 1M items, exactly.

Times ``twotower.evaluate.exact_rankings`` + ``retrieval_metrics`` (exact rank of every
positive, top-100 lists, every metric) on random unit vectors, and, side by side on the
same queries, the bare floor of that work: the chunked ``query @ items.T`` products
alone. Run from the repository root:

    PYTHONPATH=src python benchmarks/evaluation/bench_full_corpus.py
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from twotower.evaluate import exact_rankings, retrieval_metrics


def unit(rng: np.random.Generator, n: int, dim: int) -> torch.Tensor:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--floor-queries", type=int, default=10_000,
                        help="queries for the side-by-side ratio against the bare products")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    items = unit(rng, args.items, args.dim)
    queries = unit(rng, args.queries, args.dim)
    positives = rng.integers(0, args.items, args.queries)
    counts = np.minimum(rng.zipf(1.3, args.items), 10**6).astype(np.int64)

    n = args.floor_queries
    chunk = max(1, min(4096, (1 << 25) // args.items))  # the chunk exact_rankings uses
    started = time.perf_counter()
    for s in range(0, n, chunk):
        queries[s:s + chunk] @ items.T
    floor = time.perf_counter() - started
    started = time.perf_counter()
    retrieval_metrics(exact_rankings(queries[:n], items, positives[:n], 100), positives[:n],
                      counts)
    ours_subset = time.perf_counter() - started

    started = time.perf_counter()
    metrics = retrieval_metrics(exact_rankings(queries, items, positives, 100), positives,
                                counts)
    full = time.perf_counter() - started
    print(json.dumps({"queries": args.queries, "items": args.items, "dim": args.dim,
                      "threads": torch.get_num_threads(), "full_seconds": round(full, 1),
                      "subset_queries": n, "subset_seconds": round(ours_subset, 2),
                      "subset_matmul_floor_seconds": round(floor, 2),
                      "subset_ratio_to_floor": round(ours_subset / floor, 2),
                      "recall@100": metrics["recall@100"]}, indent=2))


if __name__ == "__main__":
    main()
