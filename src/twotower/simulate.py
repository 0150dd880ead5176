"""``twotower simulate``: the streaming frequency estimator on the paper's simulation.

Yi et al. (RecSys 2019), section 6.1: a corpus of ``M`` items with power-law sampling
weights; every step draws a batch of ``B`` distinct items (weighted, without replacement)
and feeds it to the estimator; the target for item ``i`` is its probability ``p_i`` of being
in a batch. The error at a step is ``sum_i |p_hat_i - p_i| / (2 B)``: the inclusion
probabilities sum to ``B``, so this is the total-variation distance between ``p_hat / B``
and ``p / B``.

Two sets of runs: (a) learning rates ``alpha`` with one hash, the distribution reversed
half-way (item ``i`` takes item ``M - 1 - i``'s weight); (b) ``m`` hashes at the same total
memory ``m * H``, no shift. Results go to ``errors.csv`` (error per step, one column per
run), ``summary.csv`` and ``alpha.png`` / ``hashes.png``.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from twotower.frequency import StreamingFrequencyEstimator

__all__ = ["RunResult", "SimulationConfig", "format_table", "inclusion_probability",
           "power_law", "run_simulation", "sample_batches"]

_SETTLED = 0.2  # settled error: mean over the last fifth of a phase
_WINDOW = 100  # steps averaged when deciding that a run has recovered from the shift
_RECOVERED = 1.1  # recovered: windowed error within 10% of the settled error before the shift


@dataclass(frozen=True)
class SimulationConfig:
    """The paper's setting by default; ``memory`` is the total buckets ``m * H`` of (b)."""

    num_items: int = 1000
    batch_size: int = 128
    exponent: float = 1.0
    steps: int = 10_000
    alphas: tuple[float, ...] = (0.01, 0.05, 0.2)
    num_buckets: int = 5000
    hash_counts: tuple[int, ...] = (1, 2, 4)
    memory: tuple[int, ...] = (1000, 4000)
    hash_alpha: float = 0.05
    target_draws: int = 20_000
    seed: int = 0


@dataclass
class RunResult:
    """One estimator's error per step, and its summary (``None`` where it does not apply)."""

    name: str
    alpha: float
    num_hashes: int
    num_buckets: int
    shift_at: int | None
    errors: np.ndarray = field(repr=False)
    final: float  # settled error at the end
    before_shift: float | None = None
    recovery_steps: int | None = None


def power_law(num_items: int, exponent: float) -> np.ndarray:
    """Sampling weights ``w_i ∝ (i + 1) ** -exponent``, summing to 1."""
    w = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def _race(rng: np.random.Generator, weights: np.ndarray, rows: int) -> np.ndarray:
    """Exponential race: item ``i`` finishes at ``Exp(1) / w_i``; the first ``B`` to finish
    are a weighted sample without replacement (the Gumbel top-k trick in another guise)."""
    return rng.exponential(size=(rows, weights.size)) / weights


def sample_batches(rng: np.random.Generator, weights: np.ndarray, batch_size: int,
                   steps: int, chunk: int = 2000) -> np.ndarray:
    """``[steps, batch_size]`` item indices, each row drawn without replacement."""
    parts = [np.argpartition(_race(rng, weights, min(chunk, steps - start)), batch_size - 1,
                             axis=1)[:, :batch_size] for start in range(0, steps, chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, batch_size), dtype=np.int64)


def inclusion_probability(weights: np.ndarray, batch_size: int, draws: int,
                          rng: np.random.Generator,
                          chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Each item's probability of being in a batch, and the standard error of that value.

    Rao-Blackwellised Monte Carlo over the exponential race: given the other items' times,
    item ``i`` is in the batch iff its time is below the ``B``-th smallest of theirs, ``T``,
    which has probability ``1 - exp(-w_i T)``; averaging that instead of a 0/1 count makes
    the standard error a few 1e-4 at 20,000 draws (exact, not an approximation, as
    ``draws`` grows).
    """
    total = np.zeros(weights.size)
    squares = np.zeros(weights.size)
    done = 0
    while done < draws:
        times = _race(rng, weights, min(chunk, draws - done))
        kth = np.partition(times, [batch_size - 1, batch_size], axis=1)
        in_batch = times <= kth[:, batch_size - 1:batch_size]
        # For an item in the batch, the B-th smallest of the others is the (B+1)-th overall.
        others = np.where(in_batch, kth[:, batch_size:batch_size + 1],
                          kth[:, batch_size - 1:batch_size])
        p = -np.expm1(-weights * others)
        total += p.sum(axis=0)
        squares += (p * p).sum(axis=0)
        done += times.shape[0]
    mean = total / draws
    stderr = np.sqrt(np.maximum(squares / draws - mean * mean, 0.0) / draws)
    return mean, stderr


def _track(estimator: StreamingFrequencyEstimator, batches: np.ndarray, target: np.ndarray,
           shift_at: int | None) -> np.ndarray:
    """Error after every step; the true ``p`` is ``target``, reversed from ``shift_at`` on."""
    items = np.arange(target.size, dtype=np.int64)
    errors = np.empty(len(batches))
    for t, batch in enumerate(batches):
        estimator.update(batch)
        p = target[::-1] if shift_at is not None and t >= shift_at else target
        errors[t] = np.abs(estimator.probability(items) - p).sum() / (2 * batches.shape[1])
    return errors


def _settled(errors: np.ndarray) -> float:
    return float(errors[-max(1, int(len(errors) * _SETTLED)):].mean())


def _recovery(errors: np.ndarray, level: float) -> int | None:
    """Steps after the shift until the mean error over the next ``_WINDOW`` steps is within
    10% of ``level`` (the settled error before the shift); ``None`` if that never happens."""
    window = min(_WINDOW, len(errors))
    sums = np.cumsum(np.concatenate([[0.0], errors]))
    windowed = (sums[window:] - sums[:-window]) / window
    hit = np.flatnonzero(windowed <= _RECOVERED * level)
    return int(hit[0]) if hit.size else None


def run_simulation(out_dir: str | Path, steps: int = 10_000, seed: int = 0,
                   **overrides: object) -> list[RunResult]:
    """Run (a) and (b), write ``errors.csv``, ``summary.csv`` and the plots into ``out_dir``.

    ``overrides`` replace fields of :class:`SimulationConfig`.
    """
    if importlib.util.find_spec("matplotlib") is None:  # fail before the runs, not after
        raise ImportError("twotower simulate draws its plots with matplotlib: "
                          "pip install matplotlib")
    config = replace(SimulationConfig(), steps=steps, seed=seed, **overrides)
    if config.steps < 4:
        raise ValueError(f"steps must be >= 4 (a shift needs two phases), got {config.steps}")
    rng = np.random.default_rng(config.seed)
    weights = power_law(config.num_items, config.exponent)
    target, _ = inclusion_probability(weights, config.batch_size, config.target_draws, rng)
    half = config.steps // 2
    shifted = np.concatenate([sample_batches(rng, weights, config.batch_size, half),
                              sample_batches(rng, weights[::-1], config.batch_size,
                                             config.steps - half)])
    steady = sample_batches(rng, weights, config.batch_size, config.steps)

    results = []
    for alpha in config.alphas:
        estimator = StreamingFrequencyEstimator(config.num_buckets, 1, alpha, config.seed)
        errors = _track(estimator, shifted, target, half)
        before = _settled(errors[:half])
        results.append(RunResult(f"alpha={alpha:g}", alpha, 1, config.num_buckets, half, errors,
                                 _settled(errors[half:]), before,
                                 _recovery(errors[half:], before)))
    for memory in config.memory:
        for m in config.hash_counts:
            estimator = StreamingFrequencyEstimator(memory // m, m, config.hash_alpha,
                                                    config.seed)
            errors = _track(estimator, steady, target, None)
            results.append(RunResult(f"m={m},H={memory // m}", config.hash_alpha, m,
                                     memory // m, None, errors, _settled(errors)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(results, out)
    _plot(results, out)
    return results


def _write_csv(results: list[RunResult], out: Path) -> None:
    with open(out / "errors.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *(r.name for r in results)])
        for t, row in enumerate(np.stack([r.errors for r in results], axis=1), 1):
            writer.writerow([t, *(f"{e:.6g}" for e in row)])
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "alpha", "num_hashes", "buckets_per_hash", "memory_buckets",
                         "shift_at", "settled_before_shift", "recovery_steps", "final_error"])
        for r in results:
            writer.writerow([r.name, r.alpha, r.num_hashes, r.num_buckets,
                             r.num_hashes * r.num_buckets, _blank(r.shift_at),
                             _blank(r.before_shift), _blank(r.recovery_steps), r.final])


def _blank(value: object) -> object:
    return "" if value is None else value


def _plot(results: list[RunResult], out: Path) -> None:
    """``alpha.png`` (runs with a shift) and ``hashes.png`` (one panel per memory size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifted = [r for r in results if r.shift_at is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in shifted:
        ax.plot(np.arange(1, len(r.errors) + 1), r.errors, lw=0.8, label=r.name)
    if shifted:
        ax.axvline(shifted[0].shift_at, color="grey", ls="--", lw=0.8, label="shift")
    ax.set(xlabel="step", ylabel="error", yscale="log",
           title="Learning rate: distribution reversed half-way (m=1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=120)
    plt.close(fig)

    memories = sorted({r.num_hashes * r.num_buckets for r in results if r.shift_at is None})
    fig, axes = plt.subplots(1, max(1, len(memories)), figsize=(5 * max(1, len(memories)), 4),
                             squeeze=False)
    for ax, memory in zip(axes[0], memories, strict=False):
        for r in results:
            if r.shift_at is None and r.num_hashes * r.num_buckets == memory:
                ax.plot(np.arange(1, len(r.errors) + 1), r.errors, lw=0.8, label=r.name)
        ax.set(xlabel="step", ylabel="error", yscale="log",
               title=f"Multiple hashings, {memory} buckets in all")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hashes.png", dpi=120)
    plt.close(fig)


def format_table(results: list[RunResult]) -> str:
    """The runs as an aligned text table: settled errors and steps to recover from the shift."""
    header = ["run", "alpha", "m", "H", "memory", "before shift", "recovery steps", "final"]
    rows = []
    for r in results:
        recovery = "-" if r.shift_at is None else (
            f">{len(r.errors) - r.shift_at}" if r.recovery_steps is None
            else str(r.recovery_steps))
        rows.append([r.name, f"{r.alpha:g}", str(r.num_hashes), str(r.num_buckets),
                     str(r.num_hashes * r.num_buckets),
                     "-" if r.before_shift is None else f"{r.before_shift:.4f}",
                     recovery, f"{r.final:.4f}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
