"""How long preparing a 1M-event log takes: read, check, order, histories, encoding.

Run from the repository root (results in README.md next to this file):

    PYTHONPATH=src python benchmarks/data/bench_prepare.py [--events 1000000]

Writes a synthetic log (50k users, 100k items, power-law popularity) with two history
features (the last 20 item ids and their categories), then times, in this process:
``load`` (read Parquet, check every column, sort by time, build both histories) and
``prepare`` (hash every feature of every event and item), and one full streaming
pass over the same file (record batches of 65,536 events with per-user state).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from synthetic_log import write_log

from twotower.data.schema import load_schema
from twotower.data.sources import load
from twotower.data.streaming import EventStream
from twotower.experiment import memory_ids, prepare, schema_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        schema = load_schema(write_log(Path(tmp), args.events, users=50_000, items=100_000))
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            started = time.perf_counter()
            data = load(schema)
            loaded = time.perf_counter()
            prepare(data, schema_model_config(schema, memory_ids(data)))
            prepared = time.perf_counter()
            streamed = sum(len(p) for p in EventStream(schema).pieces())
            done = time.perf_counter()
            assert streamed == len(data)
            for name, seconds in (("load", loaded - started), ("prepare", prepared - loaded),
                                  ("load+prepare", prepared - started),
                                  ("stream pass", done - prepared)):
                best[name] = min(best.get(name, float("inf")), seconds)
    print(json.dumps({"events": args.events, "cpus": os.cpu_count(),
                      "best_of": args.repeats,
                      "seconds": {k: round(v, 2) for k, v in best.items()}}, indent=2))


if __name__ == "__main__":
    main()
