"""Why twotower trailed, row by row: one change at a time on a real log's validation events.

    python benchmarks/quality/ablations.py [--schema examples/amazon-sports.yaml] \
        [--rows time-1-epoch shuffled ...] [--out DIR]

Each row trains with ``twotower train`` on the schema's log with its leave-last-out split
(each user's second-to-last event validates; on amazon-sports these are exactly the
protocol's ``valid`` targets) and reports the best validation recall over the whole
corpus, the epoch it came at and the curve. Rows that train for a fixed number of epochs
(``--epochs N`` with ``patience`` larger than N) show what the old defaults gave. Results
go to ``results/ablations.json``; a row already there is not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results" / "ablations.json"


def no_user(schema: dict) -> None:
    schema["query_features"] = [f for f in schema["query_features"] if f["name"] != "user_id"]


def no_attributes(schema: dict) -> None:
    for side in ("query_features", "item_features"):
        schema[side] = [f for f in schema[side] if "attributes" not in f["name"]]


def history(length: int | None = None, kind: str | None = None):
    def change(schema: dict) -> None:
        for feature in schema["query_features"]:
            if feature["name"] == "history":
                feature.update({k: v for k, v in (("length", length), ("kind", kind)) if v})
    return change


def item_buckets(buckets: int):
    def change(schema: dict) -> None:
        schema.setdefault("tables", {})["item"] = {"buckets": buckets}
    return change


def model(**settings):
    def change(schema: dict) -> None:
        schema.setdefault("model", {}).update(settings)
    return change


# name -> (schema changes, `twotower train` flags); each row changes one thing from the row
# it is compared with in the README.
ROWS = {
    "time-1-epoch": ([], ["--order", "time", "--epochs", "1"]),
    "time-5-epochs": ([], ["--order", "time", "--epochs", "5", "--patience", "99"]),
    "shuffled-5-epochs": ([], ["--epochs", "5", "--patience", "99"]),
    "shuffled-early-stop": ([], []),
    "correction-none": ([], ["--correction", "none"]),
    "correction-oracle": ([], ["--correction", "oracle"]),
    "item-buckets-2^20": ([item_buckets(1 << 20)], []),
    "no-normalize": ([model(normalize=False)], []),
    "no-attributes": ([no_attributes], []),
    "history-50": ([history(50)], []),
    "batch-256": ([], ["--batch-size", "256"]),
    "lr-0.02": ([], ["--lr", "0.02"]),
    "temperature-0.1": ([model(temperature=0.1)], []),
    "no-mlp": ([model(hidden=[])], []),
    "sequence-encoder": ([history(kind="sequence")], []),
    "no-user-id": ([no_user], []),
    "no-user-id-sequence": ([no_user, history(kind="sequence")], []),
    "no-user-id-dropout-0.2": ([no_user, model(dropout=0.2)], []),
    "no-user-id-mixed-1024": ([no_user], ["--mixed-negatives", "1024"]),
}


def run(name: str, schema_path: Path, out: Path) -> dict:
    changes, flags = ROWS[name]
    schema = yaml.safe_load(schema_path.read_text())
    for part in ("events", "items"):
        schema[part]["path"] = str((schema_path.parent / schema[part]["path"]).resolve())
    # The rows were measured before dropout 0.2 became the schema's default: every row
    # starts from dropout 0 unless it sets its own.
    schema.setdefault("model", {}).setdefault("dropout", 0.0)
    for change in changes:
        change(schema)
    schema["split"] = {"kind": "leave-last-out"}
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "schema.yaml").write_text(yaml.safe_dump(schema))
    model_dir = run_dir / "model"
    command = [sys.executable, "-m", "twotower", "train", "--schema",
               str(run_dir / "schema.yaml"), "--out", str(model_dir), "--overwrite",
               "--epochs", "30", "--patience", "3", "--quiet", *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if r.get("event") == "validation"]
    best = max(curve, key=lambda r: r["recall@50"])
    return {"row": name, "schema": str(schema_path.relative_to(ROOT)), "flags": flags,
            "best_epoch": best["epoch"], "epochs": len(curve), "seconds": round(seconds),
            **{k: v for k, v in best.items() if k.startswith(("recall@", "ndcg@"))},
            "curve": [round(r["recall@50"], 4) for r in curve]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schema", type=Path, default=ROOT / "examples" / "amazon-sports.yaml")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "twotower-ablations")
    args = ap.parse_args()
    events = yaml.safe_load(args.schema.read_text())["events"]["path"]
    if not (args.schema.parent / events).exists():
        print(f"skipped: {args.schema} reads {events}, which is not here", file=sys.stderr)
        return
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for name in args.rows:
        if any(r["row"] == name and r["schema"] == str(args.schema.resolve().relative_to(ROOT))
               for r in done):
            continue
        record = run(name, args.schema.resolve(), args.out)
        done.append(record)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(done, indent=1) + "\n")
        print(f"{name:26s} recall@50 {record['recall@50']:.4f} (epoch {record['best_epoch']}) "
              f"{record['curve']}", flush=True)


if __name__ == "__main__":
    main()
