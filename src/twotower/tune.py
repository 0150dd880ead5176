"""``twotower tune``: a small grid of settings, each trained with early stopping on the
validation events, so a user's first model on a new log is already a good one.

Every setting is a full training run on the split's training events, scored on its
validation events after every epoch (:mod:`twotower.validation`); the table ranks the
settings by their best validation score, and the best run's model directory is kept
under ``best``. Nothing is ever chosen on test events.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from twotower.data.schema import Schema
from twotower.data.splits import Split
from twotower.experiment import fit, memory_ids, prepare, schema_model_config
from twotower.train import TrainConfig

__all__ = ["GRID_KEYS", "format_tuning", "parse_grid", "plan", "tune"]

# What a grid may vary: settings of training, or of the model in the schema.
TRAIN_KEYS = {"lr": ("learning_rate", float), "batch_size": ("batch_size", int),
              "mixed_negatives": ("mixed_negatives", int), "correction": ("correction", str)}
MODEL_KEYS = {"temperature": float, "dropout": float, "history_dropout": float, "dim": int,
              "output_dim": int}
# Query features to leave out of a run: "-" (none) or names joined by "+". Whether the
# user's own id helps depends on the log (it memorises users with few events), so a user
# can let validation decide: `without=-,user_id`.
WITHOUT = "without"
# History features to read in order, by self-attention (`kind: sequence`), instead of as
# a mean: "-" (none) or names joined by "+". Order pays on logs whose next item follows
# from the last few, and costs time everywhere, so a user can let validation decide:
# `sequence=-,history`.
SEQUENCE = "sequence"
# The type of each grid key's values.
_KINDS = {**{k: kind for k, (_, kind) in TRAIN_KEYS.items()}, **MODEL_KEYS, WITHOUT: str,
          SEQUENCE: str}
GRID_KEYS: tuple[str, ...] = tuple(_KINDS)


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["lr=0.005,0.02", "temperature=0.05,0.1"]`` -> ``{"lr": [0.005, 0.02], ...}``."""
    grid: dict[str, list] = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in GRID_KEYS or not values:
            raise ValueError(f"grid entry {item!r}: write NAME=V1,V2,... with NAME one of "
                             f"{GRID_KEYS}")
        kind = _KINDS[name]
        try:
            grid[name] = [kind(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"grid entry {item!r}: {name} takes {kind.__name__} values") \
                from None
    return grid


def _settings(schema: Schema, train: TrainConfig,
              setting: Mapping[str, object]) -> tuple[Schema, TrainConfig]:
    model = {k: v for k, v in setting.items() if k in MODEL_KEYS}
    query = _query_without(schema, str(setting.get(WITHOUT, "-")))
    query = _as_sequences(schema, query, str(setting.get(SEQUENCE, "-")))
    schema = schema.model_copy(update={"model": schema.model.model_copy(update=model),
                                       "query_features": query})
    changes = {TRAIN_KEYS[k][0]: v for k, v in setting.items() if k in TRAIN_KEYS}
    return schema, replace(train, **changes)


def _query_without(schema: Schema, without: str) -> list:
    """The schema's query features less those named in ``without`` ("-": none)."""
    if without == "-":
        return schema.query_features
    names = without.split("+")
    known = [f.name for f in schema.query_features]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"grid entry without={without}: {unknown} not among the schema's "
                         f"query_features {known}")
    query = [f for f in schema.query_features if f.name not in names]
    if not query:
        raise ValueError(f"grid entry without={without} leaves the query no feature")
    return query


def plan(schema: Schema, train: TrainConfig,
         grid: Mapping[str, Sequence]) -> list[tuple[dict, Schema, TrainConfig]]:
    """Every combination of ``grid`` as ``(setting, schema, train config)``. It needs no
    data, so a bad grid (an unknown query feature, a learning rate out of range) is an
    error before the log is read."""
    names = list(grid)
    settings = [dict(zip(names, values, strict=True))
                for values in itertools.product(*(grid[n] for n in names))]
    return [(setting, *_settings(schema, train, setting)) for setting in settings]


def _as_sequences(schema: Schema, query: list, names: str) -> list:
    """``query`` with the history features named in ``names`` ("-": none) read as
    sequences. A name must be a history of the events' item column (one id per event,
    as a sequence needs; an attribute may be a list per item); ``without`` may leave it
    out of this run."""
    if names == "-":
        return query
    histories = [f.name for f in schema.query_features if f.history == schema.events.item]
    chosen = names.split("+")
    unknown = [n for n in chosen if n not in histories]
    if unknown:
        raise ValueError(f"grid entry sequence={names}: {unknown} not among the schema's "
                         f"histories of {schema.events.item!r} {histories}")
    return [type(f).model_validate({**f.model_dump(), "kind": "sequence"})
            if f.name in chosen else f for f in query]


def tune(schema: Schema, interactions, split: Split, grid: Mapping[str, Sequence],
         train: TrainConfig, out: str | Path, progress: bool = False,
         extra: Mapping | None = None) -> list[dict]:
    """Train every combination of ``grid`` with early stopping on ``split.valid``; returns
    one row per setting (its values, best epoch and validation metrics), best first, and
    copies the best run's model to ``out/best``."""
    if len(split.valid) == 0:
        raise ValueError("tuning chooses on validation events, and this split has none: use "
                         "split {kind: leave-last-out} or {kind: column, column: NAME} with "
                         "`valid` rows")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; tune writes its runs, best and tuning.json "
                         "into a new directory: give another --out")
    ids = memory_ids(interactions)
    rows = []
    for number, (setting, run_schema, config) in enumerate(plan(schema, train, grid)):
        prepared = prepare(interactions, schema_model_config(run_schema, ids))
        run_dir = out / f"run-{number}"
        fit(prepared, split.train, config, run_dir, progress,
            {**(extra or {}), "schema": run_schema.model_dump(mode="json"),
             "split": split.summary()}, valid_rows=split.valid)
        records = [json.loads(line)
                   for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = [r for r in records if r.get("event") == "input"][-1]
        best = [r for r in records if r.get("event") == "validation"
                and r["epoch"] == summary["best_epoch"]][-1]
        rows.append({"run": run_dir.name, **setting, "best_epoch": summary["best_epoch"],
                     **{k: v for k, v in best.items() if "@" in k}})
    rows.sort(key=lambda r: -r["recall@50"])
    best_dir = out / "best"
    shutil.rmtree(best_dir, ignore_errors=True)
    shutil.copytree(out / rows[0]["run"], best_dir)
    (out / "tuning.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def format_tuning(rows: Sequence[Mapping]) -> str:
    """The table ``twotower tune`` prints, best first."""
    columns = [c for c in rows[0] if c != "run"]
    cells = [[str(r["run"])] + [f"{r[c]:.4f}" if isinstance(r[c], float) and "@" in c
                                 else str(r[c]) for c in columns] for r in rows]
    header = ["run", *columns]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
