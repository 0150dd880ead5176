"""Training throughput against TensorFlow Recommenders and torch-rechub, and 2 processes
against 1, side by side in one run.

Every framework trains the quickstart model (tables of width 32 for user, item, channel and
category, the history mean-pooled from the item table, towers Dense 256 relu -> 64, L2
normalised, temperature 0.05, Adam 0.005) with the logQ-corrected in-batch softmax on the
same synthetic events, at batch 1024 and 4096, and reports examples per second over a fixed
number of steps after a warm-up. The peers get the features already hashed and a static
sampling probability per item (they have no streaming estimator); twotower gathers its
features and runs its estimator inside the timed step. Each peer runs in its own virtual
environment, created here on first use (``benchmarks/training/.venvs``), and the runs are
interleaved round by round, since the machine is shared and noisy; the table shows medians.
Every process gets ``--threads`` threads (default 1: idle OpenMP threads spin and collapse
torch's throughput on a busy machine); twotower also runs with two threads in one process
and as two processes of one thread each.

    PYTHONPATH=src python benchmarks/training/bench_throughput.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
VENVS = HERE / ".venvs"
OURS, TWO_THREADS, TWO = "twotower", "twotower, 2 threads", "twotower, 2 processes"
PEERS = {"TensorFlow Recommenders": ("tfrs", ["tensorflow-cpu", "tensorflow-recommenders"],
                                     "run_tfrs.py"),
         "torch-rechub DSSM": ("rechub", [f"torch=={torch.__version__}", "torch-rechub"],
                               "run_rechub.py")}


def venv_python(name: str, packages: list[str]) -> Path:
    """The interpreter of a peer's own virtual environment, created and filled if missing."""
    where = VENVS / name
    python = where / "bin" / "python"
    if not (where / "ready").exists():
        VENVS.mkdir(parents=True, exist_ok=True)  # inside the tree, git-ignored
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        if subprocess.run(pip + packages).returncode:
            # Our exact torch build may not be on the registry: take its newest torch.
            packages = ["torch" if p.startswith("torch==") else p for p in packages]
            subprocess.run(pip + packages, check=True)
        (where / "ready").write_text(" ".join(packages) + "\n")
    return python


def write_events(path: Path, days: int) -> None:
    """The quickstart model's hashed features of every event, as the peers read them: item
    table rows shifted by one so that 0 pads the history."""
    log = generate(SyntheticConfig(num_days=days))
    interactions = load_interactions(log.events, log.items)
    prepared = prepare(interactions, default_model_config(interactions.columns))
    queries, items, row = prepared.queries.data, prepared.items.data, interactions.item_row
    bag = queries["history"]
    lengths = np.diff(bag.offsets)
    history = np.zeros((len(row), interactions.columns.history_length), dtype=np.int64)
    history[np.repeat(np.arange(len(row)), lengths),
            np.arange(len(bag.values)) - np.repeat(bag.offsets[:-1], lengths)] = bag.values + 1
    frequency = np.bincount(row, minlength=len(interactions.item_keys))[row] / len(row)
    tables = prepared.model_config.tables
    np.savez(path, user=queries["user_id"], history=history, item=items["item_id"][row] + 1,
             channel=items["channel"][row], category=items["category"][row],
             log_q=np.log(frequency).astype(np.float32),
             reward=interactions.reward.astype(np.float32),
             size_user=tables["user"].num_buckets, size_item=tables["item"].num_buckets + 1,
             size_channel=tables["channel"].num_buckets,
             size_category=tables["category"].num_buckets)


def run(command: list[str], env: dict) -> list[dict]:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def table(results: list[dict], batches: list[int]) -> str:
    """Median examples/s per framework and batch, with ratios to the faster peer."""
    median = {(r["framework"], b): statistics.median(
        x["examples_per_second"] for x in results if x["framework"] == r["framework"]
        and x["batch"] == b) for r in results for b in batches}
    frameworks = list(dict.fromkeys(r["framework"] for r in results))
    lines = [f"{'examples/s (median)':28s}" + "".join(f"{f'batch {b}':>14s}" for b in batches)]
    for name in frameworks:
        lines.append(f"{name:28s}" + "".join(f"{median[name, b]:14,.0f}" for b in batches))
    for b in batches:
        peer = max(median[p, b] for p in PEERS if (p, b) in median)
        lines.append(f"batch {b}: twotower / faster peer = {median[OURS, b] / peer:.2f}x; "
                     f"2 processes / 1 = {median[TWO, b] / median[OURS, b]:.2f}x; "
                     f"2 threads / 1 = {median[TWO_THREADS, b] / median[OURS, b]:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--days", type=int, default=4, help="synthetic days of 30,000 events")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--out", help="write every measurement here as JSON")
    args = parser.parse_args()
    batches, steps = ["1024", "4096"], ["30", "10"]
    sizes = ["--batch", *batches, "--steps", *steps, "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "GLOO_SOCKET_IFNAME": "lo"}
    ours = str(HERE / "run_twotower.py")
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.npz"
        write_events(events, args.days)
        commands = {OURS: [sys.executable, ours, "--days", str(args.days), *sizes],
                    TWO_THREADS: [sys.executable, ours, "--label", TWO_THREADS, "--days",
                                  str(args.days), *sizes, "--threads", str(2 * args.threads)],
                    TWO: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", ours, "--label", TWO, "--days", str(args.days),
                          *sizes]}
        for name, (venv, packages, script) in PEERS.items():
            commands[name] = [str(venv_python(venv, packages)), str(HERE / script), str(events),
                              *sizes]
        results = []
        for round_ in range(args.rounds):
            for command in commands.values():
                for result in run(command, env):
                    result["round"] = round_
                    results.append(result)
                    print(json.dumps(result), flush=True)
    print()
    print(table(results, [int(b) for b in batches]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
