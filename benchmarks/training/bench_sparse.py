"""Step time against table size: sparse updates (lazy Adam) versus dense Adam.

The quickstart model (dim 32, towers [256] -> 64, batch 1024) with its user and item
tables at 2**16 and at 2**22 buckets each. With sparse gradients a step touches only the
rows of its batch, so its time should not grow with the table; with dense gradients Adam
walks every row of every table each step. Configurations are interleaved round by round
(the machine is shared and noisy) and each reports its median step time.

    PYTHONPATH=src python benchmarks/training/bench_sparse.py [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict

import numpy as np
import torch
from step_timing import interleaved_step_times

from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer

BATCH = 1024


def trainers(interactions, sizes: list[int], dense: bool) -> dict[str, tuple[Trainer, object]]:
    """One trainer (with its prepared data) per table size and gradient kind."""
    made = {}
    kinds = [("sparse", True)] + ([("dense", False)] if dense else [])
    for buckets in sizes:
        config = default_model_config(interactions.columns, item_buckets=buckets,
                                      user_buckets=buckets)
        prepared = prepare(interactions, config)
        for kind, sparse in kinds:
            torch.manual_seed(0)
            train_config = TrainConfig(batch_size=BATCH, sparse=sparse, log_every=10**9)
            made[f"{kind} 2^{buckets.bit_length() - 1}"] = (
                Trainer(TwoTowerModel(config), train_config, device="cpu", progress=False),
                prepared)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (idle OpenMP threads spin on a busy machine)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    synth = SyntheticConfig(num_days=2)
    log = generate(synth)
    interactions = load_interactions(log.events, log.items)
    runs = trainers(interactions, [1 << 16, 1 << 22], dense=not args.no_dense)
    warm_up, rows = np.arange(3 * BATCH), np.arange(3 * BATCH, (3 + args.steps) * BATCH)
    times = interleaved_step_times(runs, warm_up, rows, args.rounds)

    results = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nmedian step time, batch {BATCH}, quickstart model, user and item tables at N "
          "buckets each:")
    for kind in ("sparse", "dense"):
        small, large = results.get(f"{kind} 2^16"), results.get(f"{kind} 2^22")
        if small is not None:
            print(f"  {kind:6s}  2^16: {1000 * small:8.1f} ms   2^22: {1000 * large:8.1f} ms   "
                  f"ratio 2^22/2^16: {large / small:5.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"median_seconds_per_step": results, "per_round": times,
                       "synthetic": asdict(synth), "batch": BATCH,
                       "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
