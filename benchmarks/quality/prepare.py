"""Turn each data set into the protocol's input and split it.

The protocol reads ``events.csv`` (user_id,item_id,timestamp,rating) and ``items.csv``
(item_id + features); the shared logs are Parquet with a different ordering column per
set. MovieLens 100K (``ml-100k``) is not among them: it comes with RecBole's package (its
``dataset_example/ml-100k``, tab-separated), so it is read from the ``recbole``
environment (``venvs.py``). Nothing is cleaned here: the protocol is applied to the raw
log as given, duplicates included (their count is reported, since the protocol treats
them as events).

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

from venvs import python

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATASETS = ("amazon-sports", "ciao", "epinions", "ml-100k")
# The column that orders a user's events, and the item feature column, per data set.
ORDER_COLUMN = {"amazon-sports": "position", "ciao": "timestamp", "epinions": "period",
                "ml-100k": "timestamp"}
FEATURE_COLUMN = {"amazon-sports": "attributes", "ciao": "category", "epinions": "category",
                  "ml-100k": "genres"}


def default_paths() -> dict[str, Path]:
    """Shared data and protocol sit beside the repository root (``../shared``)."""
    shared = ROOT.parent / "shared"
    return {"data": shared / "data", "protocol": shared / "protocol", "work": HERE / "work"}


def recbole_example(name: str) -> Path:
    """RecBole's copy of a data set (``dataset_example/NAME``), found without importing
    RecBole (which imports torch)."""
    code = ("import importlib.util; "
            "print(importlib.util.find_spec('recbole').submodule_search_locations[0])")
    package = subprocess.run([python("recbole"), "-c", code], check=True, capture_output=True,
                             text=True).stdout.strip()
    return Path(package) / "dataset_example" / name


def read_atomic(path: Path) -> dict[str, list[str]]:
    """A RecBole atomic file (tab-separated, header ``name:type``) as columns of text."""
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    names = [field.partition(":")[0] for field in rows[0]]
    return {n: [row[i] if i < len(row) else "" for row in rows[1:]] for i, n in enumerate(names)}


def movielens_tables(source: Path) -> tuple[dict[str, list], dict[str, list]]:
    """MovieLens 100K's ratings and movies as columns; a movie's genres become a list."""
    inter = read_atomic(source / "ml-100k.inter")
    events = {"user_id": inter["user_id"], "item_id": inter["item_id"],
              "timestamp": [int(float(t)) for t in inter["timestamp"]], "rating": inter["rating"]}
    movies = read_atomic(source / "ml-100k.item")
    items = {"item_id": movies["item_id"], "genres": [c.split() for c in movies["class"]]}
    return events, items


# Data sets read from RecBole's package, not from the shared data, with their readers.
PACKAGED = {"ml-100k": movielens_tables}


def read_tables(name: str, source: Path) -> tuple[dict[str, list], dict[str, list]]:
    """A data set's events and items as columns (the shared ones from Parquet)."""
    if name in PACKAGED:
        return PACKAGED[name](source)
    import pyarrow.parquet as pq

    return (pq.read_table(source / "events.parquet").to_pydict(),
            pq.read_table(source / "items.parquet").to_pydict())


def convert(name: str, source: Path, out: Path) -> dict:
    """Write ``out/events.csv`` and ``out/items.csv``; return counts for the report."""
    events, items = read_tables(name, source)
    order = events[ORDER_COLUMN[name]]
    ratings = events.get("rating", [""] * len(order))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "events.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "rating"])
        w.writerows(zip(events["user_id"], events["item_id"], order, ratings, strict=True))
    pairs = set(zip(events["user_id"], events["item_id"], strict=True))

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
    out = work / name
    if (out / "split" / "split_meta.json").exists() and not force:
        return out / "split"
    source = recbole_example(name) if name in PACKAGED else data / name
    if name not in PACKAGED and not (source / "events.parquet").exists():
        print(f"[prepare] {name}: not found under {source}, skipped", file=sys.stderr)
        return None
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
        os.execv(python("data"), [python("data"), __file__, *(argv or sys.argv[1:])])
    for name in args.datasets:
        split = prepare(name, args.data_dir, args.protocol_dir, args.work, args.force)
        if split is not None:
            print(f"[prepare] {name}: {split}", file=sys.stderr)


if __name__ == "__main__":
    main()
