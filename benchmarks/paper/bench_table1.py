"""Table 1 of Yi et al. (RecSys 2019) on our logs: plain-sfx against correct-sfx.

Run from the repository root (results and discussion in README.md next to this file):

    PYTHONPATH=src python benchmarks/paper/bench_table1.py [--runs 3] [--out DIR]

For each data set, ``twotower.compare.compare`` trains correction ``none`` (the paper's
plain-sfx) and ``streaming`` (correct-sfx) at temperatures 0.05, 0.07 and 0.14 with the
same split, seeds and budget, and evaluates Recall@10/50/100/300 over the full corpus:

- ``synthetic``: the quickstart's YouTube-like log (its default size); train on days
  0..12, test on day 13 (the quickstart's split).
- ``ciao`` (``examples/ciao.yaml``) and ``amazon-sports`` (``examples/amazon-sports.yaml``),
  read from ``../shared/data``, with the user's earlier items excluded from each ranking
  (the protocol of ``benchmarks/data``). Skipped, with a message, where the data is absent.

Everything else is the project's defaults (model, batch 1024, Adam 0.005, one epoch);
nothing is tuned. Writes ``table1.json`` (mean and std over seeds per cell), ``table1.md``
and each data set's full ``compare`` output (``<set>.json``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from twotower.compare import compare
from twotower.data.interactions import Columns
from twotower.data.schema import Schema, SplitConfig, load_schema
from twotower.data.sources import load
from twotower.data.splits import split_log
from twotower.data.synthetic import EPOCH, SECONDS_PER_DAY, SyntheticConfig, generate, write
from twotower.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
REAL = {"ciao": ROOT / "examples" / "ciao.yaml",
        "amazon-sports": ROOT / "examples" / "amazon-sports.yaml"}
TEMPERATURES = (0.05, 0.07, 0.14)
KS = (10, 50, 100, 300)
METHODS = {"none": "plain-sfx", "streaming": "correct-sfx"}


def synthetic_schema(data_dir: Path) -> Schema:
    """The quickstart's log and feature layout, split at the start of its last day."""
    config = SyntheticConfig()
    paths = write(generate(config), data_dir)
    schema = Schema.from_columns(Columns(), str(paths["events"]), str(paths["items"]))
    cutoff = EPOCH + (config.num_days - 1) * SECONDS_PER_DAY
    return schema.model_copy(update={"split": SplitConfig(kind="time", cutoff=cutoff)})


def describe(schema: Schema) -> dict:
    """Split sizes and how cold the test events are (items or users unseen in training)."""
    data = load(schema)
    split = split_log(schema.split.kind, data.user, data.timestamp, schema.split.cutoff,
                      schema.split.test_fraction)
    seen_items = data.item_counts(split.train) > 0
    test_users = data.user[split.test]
    return {"split": schema.split.kind, "train_events": len(split.train),
            "test_events": len(split.test), "items": len(data.item_keys),
            "test_on_unseen_items": float(np.mean(~seen_items[data.item_row[split.test]])),
            "test_by_unseen_users": float(np.mean(~np.isin(test_users,
                                                           data.user[split.train])))}


def table(cells: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown in the paper's layout: one row per method and temperature."""
    lines = ["| Method | " + " | ".join(f"Recall@{k}" for k in KS) + " |",
             "|---|" + "---|" * len(KS)]
    for row, metrics in cells.items():
        values = [f"{metrics[f'recall@{k}']['mean']:.4f} ± {metrics[f'recall@{k}']['std']:.4f}"
                  for k in KS]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def run(name: str, schema: Schema, exclude_seen: bool, args: argparse.Namespace,
        work: Path) -> dict:
    """One data set: every method x temperature over ``args.runs`` seeds."""
    started = time.perf_counter()
    results = compare(schema, work / name, tuple(METHODS), TEMPERATURES, args.runs,
                      TrainConfig(epochs=args.epochs), exclude_seen, ks=KS)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    cells = {f"{method} τ = {t:g}": {f"recall@{k}": {
                 "mean": results[f"{mode}@{t:g}"][f"recall@{k}"],
                 "std": results[f"{mode}@{t:g}"][f"recall@{k}/std"]} for k in KS}
             for mode, method in METHODS.items() for t in TEMPERATURES}
    return {"protocol": {**describe(schema), "exclude_seen": exclude_seen},
            "seconds": round(time.perf_counter() - started), "cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/paper/results"))
    parser.add_argument("--runs", type=int, default=3, help="seeds per cell")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sets", nargs="+", choices=["synthetic", *REAL],
                        default=["synthetic", *REAL])
    args = parser.parse_args()
    torch.set_num_threads(1)  # the numbers were taken on 2 shared cores, one thread
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"runs": args.runs, "epochs": args.epochs, "temperatures": TEMPERATURES,
              "ks": KS, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "sets": {}}
    markdown = []
    with tempfile.TemporaryDirectory() as tmp:  # models and the synthetic log: bulky
        work = Path(tmp)
        for name in args.sets:
            if name == "synthetic":
                schema, exclude_seen = synthetic_schema(work / "synthetic-data"), False
            else:
                schema, exclude_seen = load_schema(REAL[name]), True
                if not Path(schema.events.path).exists():
                    print(f"skipping {name}: {schema.events.path} is absent (the real data "
                          "sets live in ../shared/data beside the repository root)")
                    continue
            report["sets"][name] = result = run(name, schema, exclude_seen, args, work)
            markdown.append(f"### {name} ({result['protocol']['split']} split, "
                            f"{args.runs} seeds, {result['seconds']} s)\n\n"
                            f"{table(result['cells'])}\n")
            print(markdown[-1], flush=True)
            (args.out / "table1.json").write_text(json.dumps(report, indent=2))
    (args.out / "table1.md").write_text("\n".join(markdown))


if __name__ == "__main__":
    main()
