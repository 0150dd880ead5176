"""A report people would rather look at than read: one self-contained HTML file.

Plots (matplotlib, also saved as PNG beside the HTML and embedded in it, so the file
can be mailed on its own): recall@K per run, recall by item-popularity decile per run,
estimated against true item frequency, and training loss and held-out recall over
steps. A short summary says in words what changed between runs.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twotower.checkpoint import atomic_write

__all__ = ["RunReport", "summarize", "write_report"]


@dataclass
class RunReport:
    """What one training run contributes to a report.

    ``history`` holds the model's metrics log records (training loss by step, and
    evaluation records with ``"event": "eval"``); ``frequency`` is ``(true, estimated)``
    item sampling probabilities, for the runs that have an estimator.
    """

    name: str
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    frequency: tuple[np.ndarray, np.ndarray] | None = None


def _ks(metrics: dict[str, float]) -> list[int]:
    return sorted(int(k.split("@")[1]) for k in metrics
                  if k.startswith("recall@") and "/" not in k)


def summarize(runs: Sequence[RunReport], baseline: str = "none") -> list[str]:
    """Sentences comparing every run with ``baseline`` on the headline metrics."""
    by_name = {run.name: run for run in runs}
    if baseline not in by_name:
        return []
    base = by_name[baseline].metrics
    k = max(_ks(base))
    lines = []
    for run in runs:
        if run.name == baseline:
            continue
        m = run.metrics
        parts = [f"recall@{kk} {m[f'recall@{kk}']:.4f} vs {base[f'recall@{kk}']:.4f} "
                 f"({_relative(m[f'recall@{kk}'], base[f'recall@{kk}'])})" for kk in _ks(m)]
        lines.append(f"{run.name} against {baseline}: " + ", ".join(parts) + ".")
        shifts = [f"{g} {m[f'recall@{k}/{g}'] - base[f'recall@{k}/{g}']:+.4f}"
                  for g in ("head", "torso", "tail") if f"recall@{k}/{g}" in m]
        if shifts:
            lines.append(f"{run.name}: change in recall@{k} by popularity group: "
                         + ", ".join(shifts) + ".")
        for name, what in ((f"coverage@{k}", "catalogue coverage"),
                           (f"novelty@{k}", "novelty (mean -ln p of recommended items)"),
                           (f"popularity@{k}", "mean training count of recommended items")):
            if name in m and name in base:
                lines.append(f"{run.name}: {what} {m[name]:.4g} vs {base[name]:.4g}.")
    return lines


def _relative(value: float, base: float) -> str:
    return f"{(value / base - 1) * 100:+.1f}%" if base > 0 else "n/a"


def _plot_recall(runs: Sequence[RunReport], ax) -> None:
    ks = _ks(runs[0].metrics)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [run.metrics[f"recall@{k}"] for k in ks]
        ax.bar(np.arange(len(ks)) + i * width, values, width, label=run.name)
    ax.set_xticks(np.arange(len(ks)) + width * (len(runs) - 1) / 2, [f"@{k}" for k in ks])
    ax.set_ylabel("recall")
    ax.set_title("Recall@K over the full corpus")
    ax.legend()


def _plot_deciles(runs: Sequence[RunReport], ax) -> None:
    k = max(_ks(runs[0].metrics))
    for run in runs:
        values = [run.metrics.get(f"recall@{k}/decile{d}", math.nan) for d in range(1, 11)]
        ax.plot(range(1, 11), values, marker="o", label=run.name)
    ax.set_xlabel("item popularity decile of the positive (1 = most popular tenth)")
    ax.set_ylabel(f"recall@{k}")
    ax.set_title("Recall by item popularity")
    ax.legend()


def _plot_frequency(runs: Sequence[RunReport], ax) -> None:
    for run in runs:
        if run.frequency is None:
            continue
        true, estimated = run.frequency
        seen = true > 0
        ax.scatter(true[seen], estimated[seen], s=3, alpha=0.3, label=run.name)
        low, high = true[seen].min(), true[seen].max()
        ax.plot([low, high], [low, high], color="black", linewidth=1)
        break  # every run with an estimator saw the same stream: one scatter says it all
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true probability of being in a batch")
    ax.set_ylabel("streaming estimate")
    ax.set_title("Estimated against true item frequency")


def _plot_training(runs: Sequence[RunReport], axes) -> None:
    loss_ax, recall_ax = axes
    for run in runs:
        steps = [r for r in run.history if "loss" in r and r.get("event") is None]
        loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=run.name)
        evals = [r for r in run.history if r.get("event") == "eval" and "step" in r]
        if evals:
            key = next(k for k in evals[-1] if k.startswith("recall@"))
            recall_ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o",
                           label=f"{run.name} {key}")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("Training loss")
    loss_ax.legend()
    recall_ax.set_xlabel("step")
    recall_ax.set_title("Held-out recall over training")
    if recall_ax.has_data():
        recall_ax.legend()
    else:
        recall_ax.text(0.5, 0.5, "no held-out evaluations during training", ha="center",
                       va="center", transform=recall_ax.transAxes)


def _save(fig, path: Path) -> bytes:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    return path.read_bytes()


def _table(runs: Sequence[RunReport]) -> str:
    columns = [c for c in runs[0].metrics if "decile" not in c and "/ci_" not in c]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", *columns])
    rows = []
    for run in runs:
        cells = []
        for c in columns:
            value = run.metrics.get(c, math.nan)
            low, high = run.metrics.get(f"{c}/ci_low"), run.metrics.get(f"{c}/ci_high")
            interval = f"<br><small>[{low:.4f}, {high:.4f}]</small>" if low is not None else ""
            cells.append(f"<td>{value:.4g}{interval}</td>")
        rows.append(f"<tr><td>{html.escape(run.name)}</td>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_report(directory: str | Path, runs: Sequence[RunReport], title: str,
                 notes: Sequence[str] = ()) -> Path:
    """Write ``report.html`` and its PNG plots into ``directory``; returns the HTML's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, draw, shape in (("recall", _plot_recall, (1, 1)),
                              ("deciles", _plot_deciles, (1, 1)),
                              ("frequency", _plot_frequency, (1, 1)),
                              ("training", _plot_training, (1, 2))):
        fig, ax = plt.subplots(*shape, figsize=(6.4 * shape[1], 4.2))
        draw(runs, ax)
        figures[name] = _save(fig, directory / f"{name}.png")
        plt.close(fig)
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"></figure>' for name, data in figures.items())
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in [*notes, *summarize(runs)])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:4px}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1><h2>What changed</h2><ul>{summary}</ul>
<h2>Metrics</h2>{_table(runs)}<h2>Plots</h2>{images}</body></html>
"""
    out = directory / "report.html"
    atomic_write(out, lambda p: p.write_text(page))
    return out
