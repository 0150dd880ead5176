"""Rewrite the results table in ``README.md`` from ``results/results.json``.

The table sits between two marker comments; the rest of the README is written by hand.
A system with no test records on a data set shows "not run" with the reason recorded in
``results/not_run.json`` (``{"dataset/system": "reason"}``), so no cell is ever filled
by anything but a measurement.

    python benchmarks/quality/report.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from prepare import DATASETS
from systems import SYSTEMS, refit_settings

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results" / "results.json"
NOT_RUN = HERE / "results" / "not_run.json"
BEGIN, END = "<!-- results: written by report.py -->", "<!-- /results -->"
METRICS = ("recall@10", "recall@50", "recall@100", "ndcg@10", "tail_recall@50", "coverage@10")


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` in percent (std over seeds); the value alone from one seed."""
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def short(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()
                     if k not in ("model", "logq", "batch_size")) or "-"


def table(records: list[dict], not_run: dict[str, str]) -> str:
    head = ("| data set | system | chosen on valid (valid R@50) | epoch cap | test seeds | "
            "Recall@10 | Recall@50 | Recall@100 | NDCG@10 | tail Recall@50 | coverage@10 | "
            "train s (test) | examples/s |")
    lines = [head, "|" + "---|" * 13]
    for dataset in DATASETS:
        for system in SYSTEMS:
            rows = [r for r in records if r["dataset"] == dataset and r["system"] == system]
            test = [r for r in rows if r["phase"] == "test"]
            valid = [r for r in rows if r["phase"] == "valid"]
            if not test:
                reason = not_run.get(f"{dataset}/{system}", "no results yet")
                if valid:
                    best = max(valid, key=lambda r: r["metrics"]["recall@50"])
                    reason += (f"; valid only, {len(valid)} setting(s): best valid R@50 "
                               f"{100 * best['metrics']['recall@50']:.2f} with "
                               f"{short(best['settings'])}, epoch {best['best_epoch']}")
                lines.append(f"| {dataset} | {system} | not run ({reason}) |" + " |" * 10)
                continue
            # The latest test setting and budget; earlier budgets stay in results.json only.
            chosen, budget = test[-1]["settings"], test[-1]["budget"]
            test = [r for r in test if (r["settings"], r["budget"]) == (chosen, budget)]
            valid = [r for r in valid if r["budget"] == budget]
            best = max((r for r in valid if refit_settings(r) == chosen),
                       key=lambda r: r["metrics"]["recall@50"], default=None)
            valid_r50 = f" ({100 * best['metrics']['recall@50']:.2f})" if best else ""
            cells = [mean_std([r["metrics"][m] for r in test]) for m in METRICS]
            seconds = statistics.mean(r["train_seconds"] for r in test)
            speed = statistics.mean(r["examples_per_second"] for r in test)
            # the driver's --max-epochs (BPR's epochs are scaled up; see systems.py)
            cap = budget["max_epochs"] // SYSTEMS[system].epoch_scale
            lines.append(f"| {dataset} | {system} | {short(chosen)}{valid_r50} | {cap} | "
                         f"{len(test)} | "
                         + " | ".join(cells) + f" | {seconds:.0f} | {speed:,.0f} |")
    commands = sorted({r["command"] for r in records})
    return "\n".join([*lines, "", "Made by:", "", *(f"    {c}" for c in commands)])


def write_readme() -> None:
    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    not_run = json.loads(NOT_RUN.read_text()) if NOT_RUN.exists() else {}
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table(records, not_run) + "\n" + text[end:])


if __name__ == "__main__":
    write_readme()
