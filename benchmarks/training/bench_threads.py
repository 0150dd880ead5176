"""Step time against torch threads: what `twotower train --threads` should default to.

The quickstart model (dim 32, towers [256] -> 64, batch 1024, sparse tables) trained with
1, 2, ... threads up to the machine's cores. The thread counts are interleaved round by
round in one process (the machine is shared and noisy) and each reports its median step
time; the ratio to one thread is what to read.

    PYTHONPATH=src python benchmarks/training/bench_threads.py [--rounds 5] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer

BATCH = 1024


def thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself."""
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return sorted({*counts, cores})


def step_times(trainer: Trainer, data, batches: list[np.ndarray]) -> list[float]:
    times = []
    for rows in batches:
        started = time.perf_counter()
        trainer._step(data, rows, None)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    load = [round(x, 2) for x in os.getloadavg()]  # other jobs on the cores: a busy machine
    log = generate(SyntheticConfig(num_days=2))
    interactions = load_interactions(log.events, log.items)
    prepared = prepare(interactions, default_model_config(interactions.columns))
    data = prepared.training_data(np.arange(len(interactions)))
    batches = list(data.batches(BATCH))[:args.steps + 2]
    trainers = {}
    for threads in thread_counts(cores):
        torch.manual_seed(0)
        trainers[threads] = Trainer(TwoTowerModel(prepared.model_config),
                                    TrainConfig(batch_size=BATCH), device="cpu", progress=False)
    times: dict[int, list[float]] = {threads: [] for threads in trainers}
    for _ in range(args.rounds):
        for threads, trainer in trainers.items():
            torch.set_num_threads(threads)
            measured = step_times(trainer, data, batches)
            times[threads] += measured[2:]  # two warm-up steps per round
    base = statistics.median(times[1])
    results = {"machine": {"cores": cores, "processor": platform.processor(),
                           "torch": torch.__version__, "load_average_before": load,
                           "load_average_after": [round(x, 2) for x in os.getloadavg()]},
               "batch_size": BATCH, "rounds": args.rounds, "steps": args.steps,
               "median_step_ms": {t: round(1000 * statistics.median(v), 2)
                                  for t, v in times.items()},
               "speedup_over_one_thread": {t: round(base / statistics.median(v), 3)
                                           for t, v in times.items()}}
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
