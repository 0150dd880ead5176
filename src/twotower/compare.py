"""``twotower compare``: correction modes and temperatures side by side, over seeds.

Every (mode, temperature) pair is trained on the same split of the same log with the
same seeds and budget, evaluated over the full corpus, and summarised as the mean over
seeds with the spread (standard deviation) beside it, so a difference can be read
against the noise of training itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from twotower.data.schema import Schema
from twotower.data.sources import load
from twotower.data.splits import split_log
from twotower.experiment import fit, memory_ids, prepare, schema_model_config, score
from twotower.report import RunReport, write_report
from twotower.train import TrainConfig

__all__ = ["compare", "format_comparison", "headline"]

KS: tuple[int, ...] = (10, 50, 100)


def headline(ks: Sequence[int] = KS) -> tuple[str, ...]:
    """The printed columns for cut-offs ``ks``: recall at each, NDCG at the smallest."""
    ks = sorted(set(ks))
    return (*(f"recall@{k}" for k in ks), f"ndcg@{ks[0]}")


HEADLINE: tuple[str, ...] = headline(KS)


def _with_temperature(schema: Schema, temperature: float) -> Schema:
    model = schema.model.model_copy(update={"temperature": temperature})
    return schema.model_copy(update={"model": model})


def compare(schema: Schema, out: str | Path, modes: Sequence[str] = ("none", "streaming"),
            temperatures: Sequence[float] = (0.05,), runs: int = 1,
            train: TrainConfig | None = None, exclude_seen: bool = False,
            progress: bool = False, ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """Train and evaluate every mode x temperature over ``runs`` seeds; returns, per run
    name (``mode`` or ``mode@tau``), the mean of every metric and ``<metric>/std``.

    Metrics are computed at the cut-offs ``ks`` (``recall@K``, ``ndcg@K``, ...)."""
    if schema.split is None:
        raise ValueError("compare needs a split in the schema (split: {kind: time, ...} or "
                         "{kind: leave-last-out})")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be one or more positive cut-offs, got {list(ks)}")
    train = train or TrainConfig()
    out = Path(out)
    interactions = load(schema)
    split = split_log(schema.split.kind, interactions.user, interactions.timestamp,
                      schema.split.cutoff, schema.split.test_fraction)
    ids = memory_ids(interactions)
    results: dict[str, dict[str, float]] = {}
    reports = []
    for temperature in temperatures:
        prepared = prepare(interactions,
                           schema_model_config(_with_temperature(schema, temperature), ids))
        for mode in modes:
            name = mode if len(temperatures) == 1 else f"{mode}@{temperature:g}"
            per_seed, history = [], []
            for seed in range(train.seed, train.seed + runs):
                config = replace(train, correction=mode, seed=seed)
                model_dir = out / "models" / f"{name}-seed{seed}"
                model, _ = fit(prepared, split.train, config, model_dir, progress)
                per_seed.append(score(model, prepared, split.train, split.test, ks,
                                      exclude_seen=exclude_seen))
                if not history:
                    history = [json.loads(line) for line in
                               (model_dir / "metrics.jsonl").read_text().splitlines()]
            results[name] = _mean_and_spread(per_seed)
            reports.append(RunReport(name, {k: v for k, v in results[name].items()
                                            if not k.endswith("/std")}, history))
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    write_report(out / "report", reports, "twotower compare",
                 [f"{len(split.train):,} training and {len(split.test):,} test events "
                  f"({schema.split.kind} split), {runs} seed(s) per run; metrics are means "
                  "over seeds."])
    return results


def _mean_and_spread(per_seed: list[dict[str, float]]) -> dict[str, float]:
    summary: dict[str, float] = {}
    for key in per_seed[0]:
        values = np.array([m[key] for m in per_seed], dtype=np.float64)
        summary[key] = float(values.mean())
        if "/ci_" not in key and key != "queries":
            summary[f"{key}/std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary


def format_comparison(results: dict[str, dict[str, float]],
                      columns: Sequence[str] = HEADLINE) -> str:
    """One row per run: each metric as ``mean ± std`` over seeds."""
    header = ["run", *columns]
    rows = [[name] + [f"{m[c]:.4f} ± {m[f'{c}/std']:.4f}" for c in columns]
            for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
