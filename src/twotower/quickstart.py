"""``twotower quickstart``: the whole method on a synthetic log, in a few minutes.

Generates a YouTube-like log, trains the same model with correction ``none``,
``streaming`` and ``oracle`` (same seed, same budget), evaluates each over the full
corpus on the last day, indexes the streaming model's items and prints top-10
recommendations for a few users.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from twotower.data.interactions import load_interactions
from twotower.data.synthetic import SyntheticConfig, generate, write
from twotower.evaluate import GROUPS, embed
from twotower.experiment import default_model_config, fit, prepare, score
from twotower.index import ItemIndex, index_items
from twotower.report import RunReport, write_report
from twotower.train import CORRECTIONS, TrainConfig, oracle_log_q

__all__ = ["format_table", "run_quickstart"]

SMALL = SyntheticConfig(num_users=400, num_items=2000, num_days=4, events_per_day=4000,
                        num_channels=60, num_categories=8)


def format_table(results: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    """Metrics of several runs as an aligned text table, one row per run."""
    header = ["mode", *columns]
    rows = [[name] + [f"{metrics[c]:.4f}" for c in columns] for name, metrics in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_quickstart(out: str | Path = "twotower-quickstart", small: bool = False, seed: int = 0,
                   progress: bool = True, echo=print) -> dict[str, dict[str, float]]:
    """Run the quickstart into ``out``; returns the metrics of each correction mode."""
    started = time.perf_counter()
    out = Path(out).resolve()
    synth = SMALL if small else SyntheticConfig()
    synth = SyntheticConfig(**{**asdict(synth), "seed": seed})
    echo(f"twotower quickstart: writing everything under {out}")
    log = generate(synth)
    paths = write(log, out / "data")
    echo(f"synthetic log: {log.events.num_rows:,} events, {synth.num_users:,} users, "
         f"{synth.num_items:,} items over {synth.num_days} days -> {out / 'data'}")

    interactions = load_interactions(paths["events"], paths["items"])
    cutoff = int(interactions.timestamp.min() // 86400 * 86400 + (synth.num_days - 1) * 86400)
    train_rows, test_rows = interactions.split_at(cutoff)
    prepared = prepare(interactions, default_model_config(interactions.columns))
    echo(f"train on days 0-{synth.num_days - 2} ({len(train_rows):,} events), test on day "
         f"{synth.num_days - 1} ({len(test_rows):,} events) against all "
         f"{len(interactions.item_keys):,} items")

    results: dict[str, dict[str, float]] = {}
    models, reports = {}, []
    for mode in CORRECTIONS:
        config = TrainConfig(correction=mode, seed=seed,
                             batch_size=256 if small else 1024)
        model, estimator = fit(prepared, train_rows, config, out / "models" / mode, progress)
        results[mode] = score(model, prepared, train_rows, test_rows)
        models[mode] = model
        log = out / "models" / mode / "metrics.jsonl"
        with open(log, "a") as f:
            f.write(json.dumps({"event": "eval", "split": "last_day", "step": estimator.step,
                                **results[mode]}) + "\n")
        true_p = np.exp(oracle_log_q(prepared.training_data(train_rows), config.batch_size))
        true_p[interactions.item_counts(train_rows) == 0] = 0.0  # never sampled: not plotted
        reports.append(RunReport(
            mode, results[mode], [json.loads(line) for line in log.read_text().splitlines()],
            (true_p, estimator.probability(interactions.item_keys))
            if mode == "streaming" else None))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = write_report(out / "report", reports, "twotower quickstart: correction none, "
                          "streaming and oracle on a synthetic YouTube-like log",
                          [f"Trained on {len(train_rows):,} events, evaluated on the "
                           f"{len(test_rows):,} events of the last day against all "
                           f"{len(interactions.item_keys):,} items."])

    columns = ["recall@10", "recall@50", "recall@100", "ndcg@10",
               *(f"recall@100/{g}" for g in GROUPS), "coverage@100"]
    echo("\nFull-corpus retrieval on the held-out last day (higher is better):")
    echo(format_table(results, columns))

    model = models["streaming"]
    index = index_items(out / "models" / "streaming", paths["items"])
    index.save(out / "index")
    _show_recommendations(model, prepared, index, test_rows, echo)
    echo(f"\nreport: {report}")
    echo(f"models: {out / 'models'}  index: {out / 'index'}  metrics: {out / 'results.json'}")
    echo(f"done in {time.perf_counter() - started:.0f} s")
    return results


def _show_recommendations(model, prepared, index: ItemIndex, test_rows: np.ndarray,
                          echo) -> None:
    """Top-10 for the three most active users of the test day, marking items they watched."""
    data = prepared.interactions
    users, counts = np.unique(data.user[test_rows], return_counts=True)
    channel = data.items.column("channel").to_numpy()
    for user in users[np.argsort(-counts, kind="stable")[:3]]:
        mine = test_rows[data.user[test_rows] == user]
        first = mine[:1]
        watched = set(data.item[mine].tolist())
        _, keys = index.search(embed(model, prepared.queries, "query", first).numpy(), 10)
        rows = data.item_rows(keys[0])
        echo(f"\nuser {user}: top-10 at their first event of the test day "
             f"(* = watched that day)")
        for rank, (key, row) in enumerate(zip(keys[0], rows, strict=True), 1):
            mark = "*" if key in watched else " "
            echo(f"  {rank:2d}. {mark} item {key}  channel {channel[row]}")
