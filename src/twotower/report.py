"""A report people would rather look at than read: one self-contained HTML file.

Plots (matplotlib, also saved as PNG beside the HTML and embedded in it, so the file
can be mailed on its own): recall@K per run, recall by item-popularity decile per run,
estimated against true item frequency, training loss and held-out recall over steps,
and, for runs continued day by day (``train --resume``, ``--follow``), held-out recall
and training loss by day. A plot whose data no run has is left out, with a line saying
why. A short summary says in words what changed between runs.

:func:`report_model_dirs` builds the report from model directories alone (their
metrics logs), for ``twotower report``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twotower.checkpoint import CONFIG, METRICS, atomic_write

__all__ = ["RunReport", "per_day", "report_model_dirs", "run_from_model_dir", "summarize",
           "write_report"]


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


def per_day(history: Sequence[dict]) -> list[dict]:
    """The days a run was tested on before training on each, in order: each day's
    held-out evaluation record (``input`` names the day), with ``training_loss``, the mean
    loss of the steps then trained on that day, where logged.

    A day tested twice (a run killed between testing and its checkpoint, then restarted)
    keeps its last test; its loss is averaged over every pass logged for it.
    """
    days: dict[str, dict] = {}
    trained: dict[str, tuple[float, int]] = {}
    for record in history:
        name = record.get("input")
        if record.get("event") == "eval" and "held_out" in record:
            days[name] = dict(record)
        elif record.get("event") == "input" and name in days and record.get("steps"):
            total, steps = trained.get(name, (0.0, 0))
            trained[name] = (total + record["loss"] * record["steps"], steps + record["steps"])
            days[name]["training_loss"] = trained[name][0] / trained[name][1]
    return list(days.values())


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
        steps = [r for r in run.history if _is_step(r)]
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
    _legend_or_note(recall_ax, "no held-out evaluations during training")


def _plot_days(runs: Sequence[RunReport], axes) -> None:
    from matplotlib.ticker import MaxNLocator

    recall_ax, loss_ax = axes
    names = list(dict.fromkeys(d["input"] for run in runs for d in per_day(run.history)))
    for run in runs:
        days = per_day(run.history)
        x = [names.index(d["input"]) + 1 for d in days]  # runs on the same days line up
        for k in _ks(days[-1]):
            recall_ax.plot(x, [d.get(f"recall@{k}", math.nan) for d in days], marker="o",
                           label=f"{run.name} recall@{k}")
        losses = [(xx, d["training_loss"]) for xx, d in zip(x, days, strict=True)
                  if "training_loss" in d]
        if losses:
            loss_ax.plot(*zip(*losses, strict=True), marker="o", label=run.name)
    for ax in axes:
        ax.set_xlabel("day, in training order (named in the table below)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    recall_ax.set_ylabel("recall")
    recall_ax.set_title("Held-out recall by day (tested before training on it)")
    recall_ax.legend()
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("Training loss by day (mean over its steps)")
    _legend_or_note(loss_ax, "no per-day training loss in the log")


def _legend_or_note(ax, note: str) -> None:
    """A legend for what was drawn, or ``note`` saying why nothing was."""
    if ax.has_data():
        ax.legend()
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def _is_step(record: dict) -> bool:
    return "loss" in record and record.get("event") is None


@dataclass(frozen=True)
class _Panel:
    """One figure: drawn from the runs that have its data, else left out, ``needs``
    saying what was missing."""

    name: str
    draw: Callable[[Sequence[RunReport], object], None]
    columns: int
    has: Callable[[RunReport], bool]
    needs: str


PANELS: tuple[_Panel, ...] = (
    _Panel("recall", _plot_recall, 1, lambda r: bool(_ks(r.metrics)), "full-corpus metrics"),
    _Panel("deciles", _plot_deciles, 1, lambda r: any("/decile" in k for k in r.metrics),
           "recall by item-popularity decile"),
    _Panel("frequency", _plot_frequency, 1, lambda r: r.frequency is not None,
           "true item frequencies to set the estimates against (they are counted from the "
           "training log, which a model directory does not keep)"),
    _Panel("training", _plot_training, 2, lambda r: any(map(_is_step, r.history)),
           "a training loss log"),
    _Panel("days", _plot_days, 2, lambda r: bool(per_day(r.history)),
           "held-out evaluations by day (`twotower train --resume` and `--follow` test each "
           "day before training on it)"),
)


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
            shown = f"{value:,.0f}" if c == "queries" else f"{value:.4g}"
            cells.append(f"<td>{shown}{interval}</td>")
        rows.append(f"<tr><td>{html.escape(run.name)}</td>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _day_tables(runs: Sequence[RunReport]) -> str:
    """Per run with held-out days, one row per day: the figures the by-day plot draws."""
    parts = []
    for run in runs:
        days = per_day(run.history)
        if not days:
            continue
        columns = [*(f"{m}@{k}" for m in ("recall", "ndcg") for k in _ks(days[-1])),
                   "training_loss"]
        head = "".join(f"<th>{c.replace('_', ' ')}</th>"
                       for c in ["day", "input", "step", "queries", *columns])
        rows = "".join(
            f"<tr><td>{i}</td><td>{html.escape(str(d['input']))}</td><td>{d.get('step', '')}"
            f"</td><td>{int(d.get('queries', 0)):,}</td>"
            + "".join(f"<td>{d.get(c, math.nan):.4g}</td>" for c in columns) + "</tr>"
            for i, d in enumerate(days, 1))
        parts.append(f"<h3>{html.escape(run.name)}</h3><table><tr>{head}</tr>{rows}</table>")
    return "".join(parts)


def write_report(directory: str | Path, runs: Sequence[RunReport], title: str,
                 notes: Sequence[str] = ()) -> Path:
    """Write ``report.html`` and its PNG plots into ``directory``; returns the HTML's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures, left_out = {}, []
    for panel in PANELS:
        having = [run for run in runs if panel.has(run)]
        if not having:
            left_out.append(f"No {panel.name} plot: no run has {panel.needs}.")
            continue
        fig, ax = plt.subplots(1, panel.columns, figsize=(6.4 * panel.columns, 4.2))
        panel.draw(having, ax)
        figures[panel.name] = _save(fig, directory / f"{panel.name}.png")
        plt.close(fig)
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"></figure>' for name, data in figures.items())
    scored = [run for run in runs if _ks(run.metrics)]
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in [*notes, *summarize(scored)])
    metrics = _table(scored) if scored else "<p>No run has full-corpus metrics.</p>"
    days = _day_tables(runs)
    missing = "".join(f"<li>{html.escape(line)}</li>" for line in left_out)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:4px}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1><h2>What changed</h2><ul>{summary}</ul>
<h2>Metrics</h2>{metrics}<h2>Plots</h2>{images}
{f"<h2>Day by day (held out)</h2>{days}" if days else ""}
{f"<h2>Left out</h2><ul>{missing}</ul>" if missing else ""}</body></html>
"""
    out = directory / "report.html"
    atomic_write(out, lambda p: p.write_text(page))
    return out


def _read_log(path: Path) -> list[dict]:
    """The records of a metrics log (JSON lines), with an error naming a bad line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a record must be a JSON object")
        records.append(record)
    return records


def run_from_model_dir(directory: str | Path, name: str | None = None,
                       ) -> tuple[RunReport, list[str]]:
    """A model directory's part of a report, read from its metrics log, and lines saying
    where its metrics come from: its last evaluation record (for a run continued day by
    day, the last day's, held out), as nothing else in a model directory scores it."""
    directory = Path(directory)
    if not (directory / CONFIG).exists():
        raise FileNotFoundError(f"{directory} is not a model directory (no {CONFIG})")
    if not (directory / METRICS).exists():
        raise FileNotFoundError(f"{directory} has no metrics log ({METRICS}); `twotower "
                                "train` writes one into every model directory")
    history = _read_log(directory / METRICS)
    name = name or directory.name
    evals = [r for r in history if r.get("event") == "eval"]
    if not evals:
        return RunReport(name, {}, history), [
            f"{name}: no evaluation record in its {METRICS}, so no metrics or recall plots "
            "(`twotower train --resume` and `--follow` test each day before training on it)."]
    last = evals[-1]
    metrics = {k: float(v) for k, v in last.items() if k != "step"
               and isinstance(v, int | float) and not isinstance(v, bool)}
    what = f"held out: {last['input']}" if "held_out" in last else "its last evaluation"
    lines = [f"{name}: metrics at step {last.get('step', '?')} ({what}); "
             f"{len(per_day(history))} held-out day(s) in its {METRICS}."]
    return RunReport(name, metrics, history), lines


def report_model_dirs(directories: Sequence[str | Path], out: str | Path) -> Path:
    """``twotower report``: one report over model directories (named by their folder
    names, or as given where those repeat); returns the HTML's path."""
    names = [Path(d).name for d in directories]
    if len(set(names)) < len(names):
        names = [str(d) for d in directories]
    runs, notes = [], []
    for directory, name in zip(directories, names, strict=True):
        run, lines = run_from_model_dir(directory, name)
        runs.append(run)
        notes.extend(lines)
    return write_report(out, runs, f"twotower report: {', '.join(names)}", notes)
