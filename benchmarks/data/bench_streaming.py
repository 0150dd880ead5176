"""Peak memory of training from a stream: a 20M-event Parquet log under 4 GB of RSS.

Run from the repository root (results in README.md next to this file):

    PYTHONPATH=src python benchmarks/data/bench_streaming.py [--events 20000000]

Writes a synthetic log (``--users`` users, ``--items`` items, power-law popularity, two
history features of length 20) once into ``--workdir``, then runs ``twotower train
--streaming`` on it in a fresh process and reports that process's peak resident memory
(``ru_maxrss``) and wall time; a trace of its RSS and training step every 10 s goes
to ``--workdir``. For scale, the same is measured side by side on smaller
``--small`` logs (1M and 2M events): streamed, and loaded in memory (without
``--streaming``), so the table shows what grows with the log and what does not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from synthetic_log import write_log

# Runs the CLI in the child and reports the child's own peak RSS (KiB on Linux).
CHILD = """
import json, resource, sys
from twotower.cli import main
code = main(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"code": code, "peak_rss_kib": peak}))
"""


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS so far) of a process, in KiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines)
            if k in ("VmRSS", "VmHWM")}


def run(schema: Path, out: Path, streaming: bool, batch_size: int) -> dict:
    """Train in a child process; every 10 s, append its RSS and progress to a trace."""
    shutil.rmtree(out, ignore_errors=True)
    report, trace = out.with_suffix(".json"), out.with_suffix(".trace.jsonl")
    argv = ["train", "--schema", str(schema), "--out", str(out), "--correction", "streaming",
            "--batch-size", str(batch_size), "--quiet", *(["--streaming"] if streaming else [])]
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(report), *argv],
                             stdout=subprocess.PIPE, text=True)
    with open(trace, "w") as log:
        while child.poll() is None:
            with contextlib.suppress(OSError):
                metrics = out / "metrics.jsonl"
                step = json.loads(metrics.read_text().splitlines()[-1])["step"] \
                    if metrics.exists() and metrics.stat().st_size else 0
                log.write(json.dumps({"seconds": round(time.perf_counter() - started),
                                      "step": step, **_status(child.pid)}) + "\n")
                log.flush()
            time.sleep(10)
    printed = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"twotower {' '.join(argv)} failed")
    seconds = time.perf_counter() - started
    child = json.loads(report.read_text())
    return {"streaming": streaming, "events": json.loads(printed)["trained_on"],
            "peak_rss_gib": round(child["peak_rss_kib"] / 2**20, 2),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--small", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "twotower-bench-streaming")
    args = parser.parse_args()
    logs = {}
    for events in (args.events, *args.small):
        directory = args.workdir / f"log-{events}"
        if not (directory / "schema.yaml").exists():
            write_log(directory, events, args.users, args.items)
        logs[events] = directory / "schema.yaml"
        size = (directory / "events.parquet").stat().st_size
        rows = pq.ParquetFile(directory / "events.parquet").metadata.num_rows
        print(f"{rows:,} events, {size / 2**20:.0f} MiB Parquet", file=sys.stderr)
    results = [run(logs[args.events], args.workdir / f"model-{args.events}-stream", True,
                   args.batch_size)]
    for events in args.small:
        for streaming in (True, False):
            out = args.workdir / f"model-{events}-{'stream' if streaming else 'memory'}"
            results.append(run(logs[events], out, streaming, args.batch_size))
    print(json.dumps({"cpus": os.cpu_count(), "users": args.users, "items": args.items,
                      "batch_size": args.batch_size, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
