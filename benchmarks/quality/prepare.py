"""Turn each shared data set into the protocol's input and split it.

The protocol reads ``events.csv`` (user_id,item_id,timestamp,rating) and ``items.csv``
(item_id + features); the shared logs are Parquet with a different ordering column per
set. Nothing is cleaned here: the protocol is applied to the raw log as given, duplicates
included (their count is reported, since the protocol treats them as events).

    python benchmarks/quality/prepare.py [--datasets amazon-sports ciao] [--work DIR]

Needs pyarrow; without it the script runs itself again in the ``data`` environment.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATASETS = ("amazon-sports", "ciao", "epinions")
# The column that orders a user's events, and the item feature column, per data set.
ORDER_COLUMN = {"amazon-sports": "position", "ciao": "timestamp", "epinions": "period"}
FEATURE_COLUMN = {"amazon-sports": "attributes", "ciao": "category", "epinions": "category"}


def default_paths() -> dict[str, Path]:
    """Shared data and protocol sit beside the repository root (``../shared``)."""
    shared = ROOT.parent / "shared"
    return {"data": shared / "data", "protocol": shared / "protocol", "work": HERE / "work"}


def convert(name: str, source: Path, out: Path) -> dict:
    """Write ``out/events.csv`` and ``out/items.csv``; return counts for the report."""
    import pyarrow.parquet as pq

    events = pq.read_table(source / "events.parquet").to_pydict()
    order = events[ORDER_COLUMN[name]]
    ratings = events.get("rating", [""] * len(order))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "events.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "rating"])
        w.writerows(zip(events["user_id"], events["item_id"], order, ratings, strict=True))
    pairs = set(zip(events["user_id"], events["item_id"], strict=True))

    items = pq.read_table(source / "items.parquet").to_pydict()
    feature = FEATURE_COLUMN[name]
    with open(out / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", feature])
        for item, value in zip(items["item_id"], items[feature], strict=True):
            w.writerow([item, "|".join(map(str, value)) if isinstance(value, list) else value])
    return {"dataset": name, "events": len(order), "users": len(set(events["user_id"])),
            "items_file_rows": len(items["item_id"]), "order_column": ORDER_COLUMN[name],
            "feature_column": feature, "duplicate_user_item_rows": len(order) - len(pairs)}


def prepare(name: str, data: Path, protocol: Path, work: Path, force: bool = False) -> Path | None:
    """Split directory for ``name``, made if missing; ``None`` when the data set is absent."""
    source, out = data / name, work / name
    if not (source / "events.parquet").exists():
        print(f"[prepare] {name}: not found under {source}, skipped", file=sys.stderr)
        return None
    if (out / "split" / "split_meta.json").exists() and not force:
        return out / "split"
    report = convert(name, source, out)
    print(f"[prepare] {name}: {json.dumps(report)}", file=sys.stderr)
    subprocess.run([sys.executable, str(protocol / "protocol.py"), "split", "--data-dir", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    (out / "prepare.json").write_text(json.dumps(report, indent=1) + "\n")
    return out / "split"


def main(argv: list[str] | None = None) -> None:
    paths = default_paths()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--data-dir", type=Path, default=paths["data"])
    ap.add_argument("--protocol-dir", type=Path, default=paths["protocol"])
    ap.add_argument("--work", type=Path, default=paths["work"])
    ap.add_argument("--force", action="store_true", help="convert and split again")
    args = ap.parse_args(argv)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(HERE))
        from venvs import python

        os.execv(python("data"), [python("data"), __file__, *(argv or sys.argv[1:])])
    for name in args.datasets:
        split = prepare(name, args.data_dir, args.protocol_dir, args.work, args.force)
        if split is not None:
            print(f"[prepare] {name}: {split}", file=sys.stderr)


if __name__ == "__main__":
    main()
