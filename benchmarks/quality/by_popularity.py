"""Recall@K of runs' predictions by how popular each target item was, to see where one
system wins and another loses (the head or the tail of the catalogue).

    python benchmarks/quality/by_popularity.py amazon-sports \
        twotower/test-mixed_negatives1024-dropout0.2-epochs16-seed0 \
        recbole-sasrec/test-learning_rate0.003-dropout0.2-epochs20-seed0 [--phase test]

Each run is a directory under ``work/DATASET/runs/`` holding ``predictions.jsonl``. A
target's popularity is its number of events in the data the phase fits on (train in
``valid``; train and valid in ``test``), as the protocol's tail metric counts them.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDGES = (5, 20, 100)  # buckets: fewer than 5 events, 5-19, 20-99, 100 or more


def bucket_name(index: int) -> str:
    low = (0, *EDGES)[index]
    return f"{low}+" if index == len(EDGES) else f"{low}-{EDGES[index] - 1}"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("runs", nargs="+", help="run directories under work/DATASET/runs/")
    ap.add_argument("--phase", choices=["valid", "test"], default="test")
    ap.add_argument("-k", type=int, default=50)
    args = ap.parse_args()
    split = HERE / "work" / args.dataset / "split"
    fitted = ["train.csv"] + (["valid.csv"] if args.phase == "test" else [])
    counts = Counter(r["item_id"] for name in fitted for r in read_csv(split / name))
    targets = {r["user_id"]: r["item_id"] for r in read_csv(split / f"{args.phase}.csv")}
    runs = HERE / "work" / args.dataset / "runs"
    top = []
    for run in args.runs:
        with open(runs / run / "predictions.jsonl") as f:
            top.append({(p := json.loads(line))["user_id"]: set(p["items"][:args.k])
                        for line in f})
    sizes, hits = Counter(), [Counter() for _ in args.runs]
    for user, item in targets.items():
        b = bisect.bisect_right(EDGES, counts[item])
        sizes[b] += 1
        for h, predicted in zip(hits, top, strict=True):
            h[b] += item in predicted.get(user, ())
    print("| target's events | targets | " + " | ".join(f"R@{args.k} {r}" for r in args.runs)
          + " |")
    print("|---|---|" + "---|" * len(args.runs))
    for b in sorted(sizes):
        print(f"| {bucket_name(b)} | {sizes[b]} | "
              + " | ".join(f"{h[b] / sizes[b]:.4f}" for h in hits) + " |")


if __name__ == "__main__":
    main()
