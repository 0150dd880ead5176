"""Two systems' Recall@K compared user by user, with the standard error of the
difference, overall and split by whether the target shares its timestamp with the user's
previous event.

    python benchmarks/quality/paired.py ml-100k \
        --a twotower/test-...-seed0 twotower/test-...-seed1 twotower/test-...-seed2 \
        --b recbole-sasrec/test-...-seed0 recbole-sasrec/test-...-seed1 ... [--phase test]

Runs are directories under ``work/DATASET/runs/`` holding ``predictions.jsonl``; each
side's hit for a user is the mean over its runs (seeds). Two systems scored on the same
users differ by far less noise than each has alone, so the paired standard error says
whether a gap of a point or two is real. The split by ties shows where a gap comes from
on a log with coarse timestamps: the protocol orders a user's events at one time by item
id, so which of two tied events is the target is the id's choice, not the user's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from by_popularity import read_csv

HERE = Path(__file__).resolve().parent


def hits(runs: Path, names: list[str], targets: dict[str, str], k: int) -> dict[str, float]:
    """Per target user, the fraction of ``names``' predictions with the target in the top k."""
    total = dict.fromkeys(targets, 0.0)
    for name in names:
        with open(runs / name / "predictions.jsonl") as f:
            top = {(p := json.loads(line))["user_id"]: set(p["items"][:k]) for line in f}
        for user, item in targets.items():
            total[user] += item in top.get(user, ())
    return {user: h / len(names) for user, h in total.items()}


def tied_users(split: Path, phase: str) -> set[str]:
    """Users whose target has the same timestamp as their newest fitted event."""
    fitted = ["train.csv"] + (["valid.csv"] if phase == "test" else [])
    newest: dict[str, float] = {}
    for name in fitted:
        for r in read_csv(split / name):
            newest[r["user_id"]] = max(newest.get(r["user_id"], -math.inf), float(r["timestamp"]))
    return {r["user_id"] for r in read_csv(split / f"{phase}.csv")
            if float(r["timestamp"]) == newest.get(r["user_id"])}


def row(label: str, users: list[str], a: dict[str, float], b: dict[str, float]) -> str:
    diff = [a[u] - b[u] for u in users]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
    mean_a, mean_b = (statistics.mean(x[u] for u in users) for x in (a, b))
    return (f"| {label} | {len(users)} | {mean_a:.4f} | {mean_b:.4f} | "
            f"{statistics.mean(diff):+.4f} ± {se:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--a", nargs="+", required=True, help="system A's run directories")
    ap.add_argument("--b", nargs="+", required=True, help="system B's run directories")
    ap.add_argument("--phase", choices=["valid", "test"], default="test")
    ap.add_argument("-k", type=int, default=50)
    args = ap.parse_args()
    split, runs = (HERE / "work" / args.dataset / p for p in ("split", "runs"))
    targets = {r["user_id"]: r["item_id"] for r in read_csv(split / f"{args.phase}.csv")}
    a, b = (hits(runs, names, targets, args.k) for names in (args.a, args.b))
    tied = tied_users(split, args.phase)
    print(f"| targets | users | A R@{args.k} | B R@{args.k} | A - B ± paired SE |")
    print("|---|---|---|---|---|")
    groups = {"all": list(targets),
              "tied with the previous event": [u for u in targets if u in tied],
              "later than it": [u for u in targets if u not in tied]}
    for label, users in groups.items():
        if users:  # a log without ties (positions for times) has no tied group
            print(row(label, users, a, b))


if __name__ == "__main__":
    main()
