"""Throughput of the streaming frequency estimator, side by side with its baselines.

Part 1, per (batch size, buckets H, hashes m), in one run and interleaved step by step:

- ``estimator``: ``StreamingFrequencyEstimator.update_and_probability(ids)`` (hashing,
  per-step de-duplication, update and read, bit-identical to the loop);
- ``floor``: a bare numpy gather of ``A`` and ``B``, the update arithmetic and a scatter
  back, over the same bucket indices, already hashed: the memory-bound floor of this work;
- two loops, Algorithm 2/3 as written, a Python loop over the batch's distinct ids: the
  ``reference loop`` hashes each id with the library's numpy hash, as the reference loop in
  the tests does; the ``python loop`` hashes with splitmix64 in pure Python, about as fast
  as a Python loop gets. Both are timed on the first ``--loop-ids`` ids of each batch and
  extrapolated per id (whole batches would take too long).

Ratios are medians of per-step ratios (estimator / floor, loop / estimator), so they hold
when the machine's speed drifts. Ids are power-law (Zipf, exponent 1.2: repeats, like a
real log) except one row of all-distinct uniform ids, the estimator's worst case.

Part 2: the estimator's share of a quickstart-sized training step (``default_model_config``,
batch 4096, CPU), steps with and without the estimator's calls interleaved on the same
batches.

    PYTHONPATH=src python benchmarks/frequency/bench_estimator.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from twotower.frequency import StreamingFrequencyEstimator
from twotower.hashing import hash_buckets, seed_for

_MASK = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _numpy_bucket(y: int, seed: int, num_buckets: int) -> int:
    return int(hash_buckets(np.array([y], dtype=np.int64), num_buckets, seed)[0])


def _python_bucket(y: int, seed: int, num_buckets: int) -> int:
    return _splitmix64((y & _MASK) ^ seed) % num_buckets


class LoopEstimator:
    """Algorithms 2 and 3 as a plain per-item loop (same hashes, state and reads).

    ``bucket`` is the library's numpy hash called per id, as the reference loop in the
    tests does, or the same splitmix64 in pure Python (a loop tuned as far as it goes).
    """

    def __init__(self, num_buckets: int, num_hashes: int, alpha: float,
                 bucket: Callable[[int, int, int], int]) -> None:
        self.num_buckets, self.alpha, self.bucket = num_buckets, alpha, bucket
        self.seeds = [seed_for(f"frequency/{i}") for i in range(num_hashes)]
        self.last = np.zeros((num_hashes, num_buckets), dtype=np.int64)
        self.interval = np.zeros((num_hashes, num_buckets), dtype=np.float64)
        self.step = 0

    def update_and_probability(self, ids: np.ndarray) -> list[float]:
        t = self.step = self.step + 1
        keep, alpha = 1.0 - self.alpha, self.alpha
        buckets = {}
        for y in ids.tolist():
            if y in buckets:
                continue
            buckets[y] = row = [self.bucket(y, s, self.num_buckets) for s in self.seeds]
            for i, b in enumerate(row):
                last = self.last[i, b]
                self.interval[i, b] = (keep * self.interval[i, b] + alpha * (t - last)
                                       if last > 0 else float(t))
                self.last[i, b] = t
        return [1.0 / max(max(float(self.interval[i, b]) for i, b in enumerate(buckets[y])), 1.0)
                for y in ids.tolist()]


class Floor:
    """Gather ``A`` and ``B`` at the given (already hashed) buckets, update, scatter back."""

    def __init__(self, num_buckets: int, num_hashes: int, alpha: float) -> None:
        self.num_hashes, self.alpha = num_hashes, alpha
        self.last = np.ones(num_hashes * num_buckets, dtype=np.int64)  # ones: pages touched
        self.interval = np.ones(num_hashes * num_buckets, dtype=np.float64)
        self.step = 0

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        t = self.step = self.step + 1
        new = (1.0 - self.alpha) * self.interval[flat] + self.alpha * (t - self.last[flat])
        self.interval[flat] = new
        self.last[flat] = t
        return 1.0 / np.maximum(new.reshape(self.num_hashes, -1).max(axis=0), 1.0)


def _time(fn: Callable[[np.ndarray], object], arg: np.ndarray) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


@dataclass
class Row:
    ids: str
    batch: int
    log2_buckets: int
    hashes: int
    ids_per_s: dict[str, float]  # per method
    vs_floor: float  # estimator time / floor time
    vs_loops: dict[str, float]  # loop time / estimator time, per loop


def _batches(kind: str, batch: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "zipf":
        return [rng.zipf(1.2, size=batch).astype(np.int64) for _ in range(count)]
    return [rng.integers(0, 2**62, size=batch) for _ in range(count)]


def throughput(kind: str, batch: int, log2_buckets: int, hashes: int, loop_ids: int,
               seconds: float, rng: np.random.Generator) -> Row:
    """Interleave the estimator, the floor and both loops step by step on the same batches."""
    buckets, alpha = 1 << log2_buckets, 0.01
    estimator = StreamingFrequencyEstimator(buckets, hashes, alpha)
    # A fresh estimator's state is untouched zero pages; copying it in touches them all,
    # as a long-running estimator's would be.
    estimator.load_state_dict(estimator.state_dict())
    floor = Floor(buckets, hashes, alpha)
    loops = {"reference loop": LoopEstimator(buckets, hashes, alpha, _numpy_bucket),
             "python loop": LoopEstimator(buckets, hashes, alpha, _python_bucket)}
    pool = _batches(kind, batch, 16, rng)
    offsets = (np.arange(hashes, dtype=np.int64) * buckets)[:, None]
    flats = [(estimator.buckets(ids) + offsets).ravel() for ids in pool]
    sub = pool[0][:loop_ids]
    expected = StreamingFrequencyEstimator(buckets, hashes, alpha).update_and_probability(sub)
    for loop in loops.values():  # the loops compute what the estimator computes
        assert loop.update_and_probability(sub) == expected.tolist()
    share = batch / min(loop_ids, batch)
    times: dict[str, list[float]] = {k: [] for k in ["estimator", "floor", *loops]}
    spent, rounds = 0.0, 0
    while rounds < 5 or (spent < seconds and rounds < 400):
        ids, flat = pool[rounds % len(pool)], flats[rounds % len(pool)]
        times["estimator"].append(_time(estimator.update_and_probability, ids))
        times["floor"].append(_time(floor, flat))
        for name, loop in loops.items():
            times[name].append(_time(loop.update_and_probability, ids[:loop_ids]))
        spent += sum(t[-1] for t in times.values())
        rounds += 1
    t = {k: np.array(v) * (share if k in loops else 1.0) for k, v in times.items()}
    return Row(kind, batch, log2_buckets, hashes,
               {k: batch / float(np.median(v)) for k, v in t.items()},
               float(np.median(t["estimator"] / t["floor"])),
               {k: float(np.median(t[k] / t["estimator"])) for k in loops})


def training_overhead(steps: int, batch: int = 4096, device: str = "cpu") -> dict[str, float]:
    """Median step time of each variant and the estimator's share, on quickstart data."""
    from twotower.data.interactions import load_interactions
    from twotower.data.synthetic import SyntheticConfig, generate
    from twotower.experiment import default_model_config, prepare
    from twotower.loss import in_batch_softmax_loss
    from twotower.towers import TwoTowerModel
    from twotower.train import TrainConfig

    log = generate(SyntheticConfig(num_days=3))
    interactions = load_interactions(log.events, log.items)
    prepared = prepare(interactions, default_model_config(interactions.columns))
    data = prepared.training_data(np.arange(len(interactions)))
    torch.manual_seed(0)
    dev = torch.device(device)
    model = TwoTowerModel(prepared.model_config).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    config = TrainConfig(batch_size=batch)
    estimators = {"two calls": config.make_estimator(), "fused": config.make_estimator()}
    for est in estimators.values():  # touch the state's pages, as in a long run
        est.load_state_dict(est.state_dict())

    def estimate(variant: str, keys: np.ndarray) -> torch.Tensor:
        if variant == "none":  # same loss work, a constant correction
            return torch.zeros(len(keys), dtype=torch.float64, device=dev)
        est = estimators[variant]
        if variant == "two calls":  # what the training loop calls today
            est.update(keys)
            p = est.probability(keys)
        else:
            p = est.update_and_probability(keys)
        return torch.from_numpy(np.log(p)).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(variant: str, rows: np.ndarray) -> tuple[float, float]:
        sync()
        started = time.perf_counter()
        keys = data.item_key[rows]
        log_q = estimate(variant, keys)
        sync()
        estimated = time.perf_counter()
        query = model.query(data.queries.take(rows, dev))
        item = model.item(data.items.take(data.item_row[rows], dev))
        loss = in_batch_softmax_loss(query, item, torch.from_numpy(keys).to(dev), log_q,
                                     torch.from_numpy(data.reward[rows]).to(dev),
                                     model.config.temperature, True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - started, estimated - started

    variants = ("none", "two calls", "fused")
    batches = list(data.batches(batch))[:-1]
    times = {v: [] for v in variants}
    for s in range(steps + 2):
        rows = batches[s % len(batches)]
        for v in variants[s % 3:] + variants[:s % 3]:  # rotate the order every step
            times[v].append(step(v, rows))
    result = {}
    for v in variants:
        total, est = np.array(times[v][2:]).T  # two warm-up steps
        result[f"{v}: step ms"] = 1e3 * float(np.median(total))
        result[f"{v}: estimator ms"] = 1e3 * float(np.median(est))
    base = np.array(times["none"][2:])[:, 0]
    for v in variants[1:]:
        total, est = np.array(times[v][2:]).T
        result[f"{v}: step / none"] = float(np.median(total / base))
        result[f"{v}: estimator share"] = float(np.median(est / total))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 8192, 65536])
    parser.add_argument("--log2-buckets", type=int, nargs="+", default=[16, 20, 22, 24])
    parser.add_argument("--hashes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--loop-ids", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=1.0, help="per configuration")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="for the training step")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    configs = [("zipf", b, h, m) for b in args.batches for h in args.log2_buckets
               for m in args.hashes] + [("uniform", 8192, 22, 1)]
    print("| ids | batch | H | m | estimator ids/s | floor ids/s | reference loop ids/s "
          "| python loop ids/s | estimator / floor | reference loop / estimator "
          "| python loop / estimator |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, batch, log2_buckets, hashes in configs:
        r = throughput(kind, batch, log2_buckets, hashes, args.loop_ids, args.seconds, rng)
        speeds = " | ".join(f"{r.ids_per_s[k]:.3g}" for k in
                            ("estimator", "floor", "reference loop", "python loop"))
        print(f"| {r.ids} | {r.batch} | 2^{r.log2_buckets} | {r.hashes} | {speeds} "
              f"| {r.vs_floor:.2f} | {r.vs_loops['reference loop']:.0f} "
              f"| {r.vs_loops['python loop']:.0f} |", flush=True)
    if args.train_steps:
        print(f"\nTraining step on {args.device}, batch 4096, {args.train_steps} interleaved "
              "steps per variant:")
        for key, value in training_overhead(args.train_steps, device=args.device).items():
            print(f"  {key}: {value:.4g}")


if __name__ == "__main__":
    main()
