"""Correction ``none`` against ``streaming`` on real logs, end to end through the CLI.

Run from the repository root, with the data sets in ../shared/data (results in
README.md next to this file):

    PYTHONPATH=src python benchmarks/data/bench_real_data.py [--epochs 1]

For each data set it runs exactly what a user types, for each correction mode:

    twotower train --schema examples/ciao.yaml --out RUN --correction MODE --epochs 1 --quiet
    twotower evaluate RUN --exclude-seen

``ciao`` uses a global time split (the last 10% of events by time test); ``amazon-sports``
per-user leave-last-out, with the items' ``attributes`` as an ``id_list`` feature. The
same protocol, model and constants for both (the CLI and schema defaults, not tuned).
A ``popularity`` row (training counts, the user's earlier items excluded, the same
metric code) gives the floor any model should clear.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from twotower.cli import main as cli
from twotower.data.history import seen_before
from twotower.data.schema import load_schema
from twotower.data.sources import load
from twotower.data.splits import split_log
from twotower.evaluate import evaluate_retrieval

ROOT = Path(__file__).resolve().parents[2]
RUNS = {"ciao": ROOT / "examples" / "ciao.yaml",
        "amazon-sports": ROOT / "examples" / "amazon-sports.yaml"}
COLUMNS = ["recall@10", "recall@50", "recall@100", "ndcg@10", "recall@100/head",
           "recall@100/torso", "recall@100/tail", "coverage@100"]


def command(argv: list[str]) -> tuple[dict, float]:
    """Run ``twotower ARGV``; its JSON output and wall seconds."""
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        if cli(argv) != 0:
            raise SystemExit(f"twotower {' '.join(argv)} failed")
    return json.loads(out.getvalue()), time.perf_counter() - started


def popularity(schema_path: Path) -> dict:
    """Everyone gets the most frequent training items (ties in items-table order)."""
    schema = load_schema(schema_path)
    data = load(schema)
    split = split_log(schema.split.kind, data.user, data.timestamp, schema.split.cutoff,
                      schema.split.test_fraction)
    counts = data.item_counts(split.train)
    score = counts - np.arange(len(counts)) / (len(counts) + 1.0)
    exclude = seen_before(data.user, data.timestamp, data.item_row, split.test)
    return evaluate_retrieval(torch.ones(len(split.test), 1, dtype=torch.float64),
                              torch.from_numpy(score[:, None]),
                              data.item_row[split.test], counts, exclude=exclude)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "twotower-bench-real")
    args = parser.parse_args()
    results = []
    for name, schema in RUNS.items():
        results.append({"data": name, "correction": "(popularity)",
                        "split": {"kind": load_schema(schema).split.kind}, "train_seconds": 0,
                        **popularity(schema)})
        for mode in ("none", "streaming"):
            run = args.out / f"{name}-{mode}"
            trained, train_s = command(["train", "--schema", str(schema), "--out", str(run),
                                        "--correction", mode, "--epochs", str(args.epochs),
                                        "--overwrite", "--quiet"])
            metrics, eval_s = command(["evaluate", str(run), "--exclude-seen"])
            results.append({"data": name, "correction": mode, "split": trained["split"],
                            "report": trained["data"], "train_seconds": round(train_s, 1),
                            "evaluate_seconds": round(eval_s, 1), **metrics})
    lines = ["| data | split | correction | " + " | ".join(COLUMNS) + " | train s |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        cells = [f"{r[c]:.4f}" for c in COLUMNS]
        lines.append(f"| {r['data']} | {r['split']['kind']} | {r['correction']} | "
                     + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    print("\n".join(lines))
    print(json.dumps({"cpus": os.cpu_count(), "epochs": args.epochs, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
