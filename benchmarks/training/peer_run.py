"""What the peers' runners share: their command line, the events file written by
``bench_throughput.py``, the model constants and the result line. Standard library and
numpy only, since each peer runs in its own virtual environment."""

from __future__ import annotations

import argparse
import json

import numpy as np

DIM, HIDDEN, OUTPUT, TEMPERATURE, LR = 32, 256, 64, 0.05, 0.005
COLUMNS = ("user", "history", "item", "channel", "category", "log_q", "reward")


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data")
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 10])
    parser.add_argument("--warm-up", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    return parser.parse_args()


def load(path: str) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """``(table sizes, feature columns)`` of the events file."""
    arrays = np.load(path)
    sizes = {k[len("size_"):]: arrays[k] for k in arrays.files if k.startswith("size_")}
    return sizes, {k: arrays[k] for k in COLUMNS}


def report(framework: str, batch: int, steps: int, threads: int, seconds: float) -> None:
    print(json.dumps({"framework": framework, "batch": batch, "steps": steps,
                      "processes": 1, "threads": threads,
                      "examples_per_second": steps * batch / seconds}), flush=True)
