"""Training step time with torch's SparseAdam against twotower's LazyAdam on the tables.

Two trainers with the same seed on the same synthetic log, one with each optimizer for
its embedding tables (the towers keep Adam), step in turn, round by round (the machine
is shared and noisy); each reports its median step time, and their weights must come
out equal bit for bit, since the two optimizers compute the same update. Run at the
quickstart's shape and at a longer history (50 items, as the quality benchmark's
queries). Then the optimizer step alone at a large catalogue's shape: a table of
300,000 rows of 32, a batch of 1,024 histories of 50 rows drawn with Zipf-like
popularity (tens of thousands of distinct rows a step); and the test after every step
that no touched weight became NaN or infinite, elementwise against the sum-first test
the trainer uses (``train._finite_after_step``).

    PYTHONPATH=src python benchmarks/training/bench_lazy_adam.py [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from step_timing import interleaved_step_times
from torch import nn

from twotower.data.interactions import Columns, load_interactions
from twotower.data.synthetic import SyntheticConfig, generate
from twotower.experiment import default_model_config, prepare
from twotower.lazy_adam import LazyAdam
from twotower.towers import TwoTowerModel
from twotower.train import TrainConfig, Trainer, _finite_after_step

BATCH = 1024


def pair(log, history: int) -> dict[str, tuple[Trainer, object]]:
    """Two identical trainers, the first with torch's SparseAdam on its tables."""
    interactions = load_interactions(log.events, log.items, Columns(history_length=history))
    config = default_model_config(interactions.columns)
    prepared = prepare(interactions, config)
    made = {}
    for name in ("SparseAdam", "LazyAdam"):
        torch.manual_seed(0)
        trainer = Trainer(TwoTowerModel(config), TrainConfig(batch_size=BATCH, log_every=10**9),
                          device="cpu", progress=False)
        if name == "SparseAdam":
            trainer.optimizers[0] = torch.optim.SparseAdam(
                list(trainer.model.tables.parameters()), lr=trainer.config.learning_rate)
        made[f"history {history:2d} {name}"] = (trainer, prepared)
    return made


def optimizer_only(rounds: int, steps: int) -> dict[str, float]:
    """Median seconds of one optimizer step on a 300,000 x 32 table, each optimizer in turn,
    and of each finiteness test of the rows the last step touched."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 300_001) ** 0.8
    batches = [torch.from_numpy(rng.choice(300_000, (BATCH, 50), p=weights / weights.sum()))
               for _ in range(steps)]
    tables, optimizers = {}, {}
    for name, kind in (("SparseAdam", torch.optim.SparseAdam), ("LazyAdam", LazyAdam)):
        torch.manual_seed(0)
        tables[name] = nn.EmbeddingBag(300_000, 32, mode="sum", sparse=True)
        optimizers[name] = kind(tables[name].parameters(), lr=0.005)
    times: dict[str, list[float]] = {name: [] for name in tables}
    for _ in range(rounds):
        for name, table in tables.items():
            for ids in batches:
                optimizers[name].zero_grad(set_to_none=True)
                table(ids).sum().backward()
                started = time.perf_counter()
                optimizers[name].step()
                times[name].append(time.perf_counter() - started)
    if not torch.equal(tables["SparseAdam"].weight, tables["LazyAdam"].weight):
        raise SystemExit("the two optimizers gave different weights")
    model = nn.Module()
    model.table = tables["LazyAdam"]
    touched = model.table.weight.grad._indices()[0]
    checks = {"elementwise": lambda: bool(torch.isfinite(
                  model.table.weight.detach().index_select(0, touched)).all()),
              "sum-first": lambda: _finite_after_step(model)}
    for _ in range(rounds):
        for name, check in checks.items():
            started = time.perf_counter()
            for _ in range(steps):
                assert check()
            times.setdefault(name, []).append((time.perf_counter() - started) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # 14 days: about 80 events a user, so the timed batches (the log's last) have full
    # histories; 200,000 items, so their rows are mostly distinct, as on a large catalogue.
    log = generate(SyntheticConfig(num_days=14, num_items=200_000))
    runs = {**pair(log, 20), **pair(log, 50)}
    end = log.events.num_rows
    warm_up = np.arange(end - (3 + args.steps) * BATCH, end - args.steps * BATCH)
    rows = np.arange(end - args.steps * BATCH, end)
    times = interleaved_step_times(runs, warm_up, rows, args.rounds)

    medians = {name: statistics.median(t) for name, t in times.items()}
    names = list(runs)
    print(f"\nmedian step time, batch {BATCH}, one thread:")
    for sparse, lazy in zip(names[::2], names[1::2], strict=True):
        same = all(torch.equal(a, b) for a, b in zip(runs[sparse][0].model.parameters(),
                                                     runs[lazy][0].model.parameters(), strict=True))
        print(f"  {sparse[:10]}: SparseAdam {1000 * medians[sparse]:7.1f} ms, LazyAdam "
              f"{1000 * medians[lazy]:7.1f} ms, ratio {medians[sparse] / medians[lazy]:.2f}; "
              f"weights equal: {same}")
        if not same:
            raise SystemExit("the two optimizers gave different weights")
    alone = optimizer_only(args.rounds, args.steps)
    print(f"  optimizer step alone, 300,000 x 32 table: SparseAdam "
          f"{1000 * alone['SparseAdam']:7.1f} ms, LazyAdam {1000 * alone['LazyAdam']:7.1f} ms, "
          f"ratio {alone['SparseAdam'] / alone['LazyAdam']:.2f}; weights equal: True")
    print(f"  finiteness test of the touched rows: elementwise {1000 * alone['elementwise']:.2f} "
          f"ms, sum-first {1000 * alone['sum-first']:.2f} ms, "
          f"ratio {alone['elementwise'] / alone['sum-first']:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"median_seconds_per_step": medians, "per_round": times,
                       "optimizer_step_alone": alone,
                       "batch": BATCH, "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
