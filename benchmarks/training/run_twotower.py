"""twotower's side of ``bench_throughput.py``: training examples per second of
:class:`twotower.train.Trainer` on the quickstart model (one process, or several under
``torchrun``). Prints one JSON line per batch size (the main process only)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.distributed import init_from_env, leave
from twotower.experiment import default_model_config, prepare
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 10])
    parser.add_argument("--warm-up", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--label", default="twotower")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    world = init_from_env("cpu")
    log = generate(SyntheticConfig(num_days=args.days))
    interactions = load_interactions(log.events, log.items)
    prepared = prepare(interactions, default_model_config(interactions.columns))
    for batch, steps in zip(args.batch, args.steps, strict=True):
        torch.manual_seed(0)
        trainer = Trainer(TwoTowerModel(prepared.model_config), TrainConfig(batch_size=batch),
                          device="cpu", progress=False)
        warm_up = np.arange(args.warm_up * batch)
        timed = np.arange(args.warm_up * batch, (args.warm_up + steps) * batch)
        trainer.fit(prepared.training_data(warm_up), "warm-up")
        summary = trainer.fit(prepared.training_data(timed), "timed")
        if world.main:
            print(json.dumps({"framework": args.label, "batch": batch, "steps": steps,
                              "processes": world.size, "threads": torch.get_num_threads(),
                              "examples_per_second": steps * batch / summary["seconds"]}),
                  flush=True)
    leave()


if __name__ == "__main__":
    main()
