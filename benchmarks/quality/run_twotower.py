"""twotower under the next-item protocol, driven as a user drives it: its command line.

The same command line as the peers' runners (``runner_lib.py``):

    python run_twotower.py --split-dir SPLIT --phase valid|test --settings '{"lr": 0.01}' \
        --seed 0 --out DIR [--max-epochs 20 --patience 2]

What it does, as a user with this split would:

1. writes the phase's events as Parquet with a ``part`` column (``train`` for the events
   to fit; in ``valid`` the validation targets as ``valid``) and the items table (a
   ``a|b|c`` feature column becomes a list column);
2. writes a schema from the items' header alone (no per-data-set constant): the query
   is the user's item history (and, when items have a feature column, that column over
   the history); the item is its id (and its feature); ``split: {kind: column}``; the
   events keep the protocol's order, ties included (``ties: ordered`` lets a history hold
   the events before it at its own time);
3. ``twotower train``: in ``valid`` it validates every epoch on the validation events,
   keeps the best epoch and stops after ``--patience`` times ``--eval-every`` epochs
   without a gain (the peers' wait, in epochs); in
   ``test`` it trains ``settings["epochs"]`` epochs on train + valid;
4. ``twotower index`` (exact) and ``twotower recommend`` for the phase's target users
   with every item they have seen excluded, and converts the answer to the protocol's
   predictions file.

Writes ``DIR/predictions.jsonl`` and ``DIR/run.json`` (training seconds, examples per
second, best epoch, the validation curve). A run killed midway (the job stopped, the
machine restarted) goes on from its last checkpoint when the same command runs again;
its seconds are those of every attempt up to the last checkpoint each wrote. Run it
with the Python of the repository's own virtual environment (where ``twotower`` is
installed).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from runner_lib import parse_args

TOP_K = 100
# Settings a grid may set: the name in the settings object -> the `twotower train` flag.
FLAGS = {"lr": "--lr", "temperature": "--temperature", "batch_size": "--batch-size",
         "correction": "--correction", "mixed_negatives": "--mixed-negatives",
         "order": "--order"}
# `popularity_penalty: "valid"` chooses beta (`<u, v> - beta log p_hat` at serving) among
# these on the validation targets, after the epoch: 0, and -0.2, -0.4 and -1 times the
# default temperature (negative favours popular items).
PENALTIES = (0.0, -0.01, -0.02, -0.05)
# Each attempt at a run (a killed one is started again by the same command): when it
# began and, once a later attempt resumes it, the seconds it trained up to its last
# checkpoint.
ATTEMPTS = "attempts.json"
# Settings that go into the schema's `model` section.
MODEL = ("dim", "hidden", "output_dim", "dropout", "history_dropout")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def phase_events(split_dir: Path, phase: str) -> tuple[list[tuple], list[dict]]:
    """``(events, targets)``: the events twotower sees, as ``(user, item, time, part)``, and
    the target rows of the phase (only their users are read)."""
    train = [(r["user_id"], r["item_id"], int(float(r["timestamp"])), "train")
             for r in read_csv(split_dir / "train.csv")]
    valid = [(r["user_id"], r["item_id"], int(float(r["timestamp"])))
             for r in read_csv(split_dir / "valid.csv")]
    if phase == "valid":
        events = train + [(*v, "valid") for v in valid]
    else:
        events = train + [(*v, "train") for v in valid]
    # By time; a user's events at one time stay in the split files' order, which is the
    # protocol's (by item id) and puts a validation target after its user's train events.
    events.sort(key=lambda e: (e[2], e[0]))
    return events, read_csv(split_dir / f"{phase}.csv")


def write_items(items_csv: Path, catalogue: list[str], out: Path) -> str | None:
    """The items table as Parquet (every catalogue item); returns its feature column, if
    any (``a|b|c`` values become a list column)."""
    rows = {r["item_id"]: r for r in read_csv(items_csv)} if items_csv.exists() else {}
    header = list(next(iter(rows.values())).keys()) if rows else ["item_id"]
    feature = header[1] if len(header) > 1 else None
    columns = {"item_id": catalogue}
    if feature is not None:
        values = [rows.get(item, {}).get(feature, "") for item in catalogue]
        columns[feature] = [v.split("|") if v else [] for v in values]
    pq.write_table(pa.table(columns), out)
    return feature


def schema(feature: str | None, settings: dict, phase: str) -> dict:
    history = {"name": "history", "kind": settings.get("history_kind", "id_list"),
               "history": "item_id", "length": int(settings.get("history", 50)),
               "table": settings.get("history_table", "item")}
    query, item = [history], [{"name": "item_id", "kind": "id", "table": "item"}]
    if settings.get("recent"):  # the newest items again, pooled on their own
        query.append({"name": "recent", "kind": "id_list", "history": "item_id",
                      "length": int(settings["recent"]), "table": "item"})
    if settings.get("user_id"):  # an ablation: the user's own id embedding as well
        query.append({"name": "user_id", "kind": "id", "table": "user"})
    if feature is not None:
        query.append({"name": f"history_{feature}", "kind": "id_list", "history": feature,
                      "length": int(settings.get("history", 50)), "table": feature})
        item.append({"name": feature, "kind": "id_list", "table": feature})
    return {"events": {"path": "events.parquet", "user": "user_id", "item": "item_id",
                       "time": "timestamp", "ties": settings.get("ties", "simultaneous")},
            "items": {"path": "items.parquet", "key": "item_id"},
            "missing_items": "error", "query_features": query, "item_features": item,
            # Without the setting, no history dropout: what the earlier records measured.
            "model": {"history_dropout": 0.0, **{k: settings[k] for k in MODEL if k in settings}},
            **({"split": {"kind": "column", "column": "part"}} if phase == "valid" else {})}


def queries(events: list[tuple], users: list[str], feature_of: dict[str, list[str]] | None,
            recent: bool, path: Path) -> None:
    """One query per target user: the history features and every item the user has seen
    (``recent``: the history again, as the schema's ``recent`` feature, which keeps the
    newest)."""
    seen: dict[str, list[str]] = {}
    for user, item, _, part in events:
        if part == "train":
            seen.setdefault(user, []).append(item)
    with open(path, "w") as f:
        for user in users:
            history = seen.get(user, [])
            query = {"user_id": user, "history": history, "exclude": history}  # user_id: the key
            if recent:
                query["recent"] = history
            if feature_of is not None:
                name, values = feature_of["name"], feature_of["values"]
                query[f"history_{name}"] = [v for item in history for v in values[item]]
            f.write(json.dumps(query) + "\n")


def twotower(*args: str, capture: bool = False) -> str | None:
    """Run a ``twotower`` command with this Python (the repository's environment); with
    ``capture``, return what it printed instead of letting it reach the log."""
    done = subprocess.run([sys.executable, "-m", "twotower", *args], check=True,
                          capture_output=capture, text=True)
    return done.stdout if capture else None


def choose_penalty(model: Path) -> tuple[float, dict[str, float]]:
    """The popularity penalty with the best validation recall@50, and the recall of each,
    as a user chooses it: ``twotower evaluate --on valid --popularity-penalty B``."""
    recall = {str(beta): json.loads(twotower(
        "evaluate", str(model), "--on", "valid", "--exclude-seen", "--ks", "50",
        "--bootstrap", "0", f"--popularity-penalty={beta}", capture=True))["recall@50"]
        for beta in PENALTIES}
    return max(PENALTIES, key=lambda beta: recall[str(beta)]), recall


def earlier_seconds(out: Path, model: Path, train: list[str]) -> tuple[float | None, int]:
    """Training seconds the earlier attempts at this same run put into the checkpoint it can
    go on from (None when it starts afresh), and how many attempts this one makes; records
    this attempt in ``out/ATTEMPTS``.

    An attempt's useful time ends at the last checkpoint it wrote: what it trained after
    that is trained again. A run is the same when its ``twotower train`` command and
    schema are; a run that finished removed its checkpoints, so it starts afresh."""
    record_path, checkpoints = out / ATTEMPTS, model / "checkpoints"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    schema = (out / "schema.json").read_text()
    written = [p.stat().st_mtime for p in checkpoints.rglob("*") if p.is_file()] \
        if checkpoints.is_dir() else []
    same = record.get("train") == train and record.get("schema") == schema
    if not (same and written and record.get("attempts")):
        record = {"train": train, "schema": schema, "attempts": []}
    else:
        last = record["attempts"][-1]
        last.setdefault("seconds", max(0.0, max(written) - last["started"]))
    resumed = bool(record["attempts"])
    earlier = sum(a["seconds"] for a in record["attempts"])
    record["attempts"].append({"started": time.time()})
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return (earlier if resumed else None), len(record["attempts"])


def main() -> None:
    # The peers' command line. twotower validates every epoch and stops after as many epochs
    # without a gain as the peers wait (--patience checks, one every --eval-every epochs): on
    # a small validation set (ml-100k: 943 users) two epochs stopped runs at a noisy dip.
    args = parse_args(__doc__.splitlines()[0])
    out, settings = args.out, args.settings
    out.mkdir(parents=True, exist_ok=True)
    events, targets = phase_events(args.split_dir, args.phase)
    catalogue = [r["item_id"] for r in read_csv(args.split_dir / "catalogue.csv")]
    feature = write_items(args.split_dir.parent / "items.csv", catalogue, out / "items.parquet")
    user, item, timestamp, part = zip(*events, strict=True)
    pq.write_table(pa.table({"user_id": list(user), "item_id": list(item),
                             "timestamp": list(timestamp), "part": list(part)}),
                   out / "events.parquet")
    (out / "schema.json").write_text(json.dumps(schema(feature, settings, args.phase)))

    epochs = args.max_epochs if args.phase == "valid" else int(settings["epochs"])
    flags = [f"{flag}={settings[name]}" for name, flag in FLAGS.items() if name in settings]
    model = out / "model"
    train = ["train", "--schema", str(out / "schema.json"), "--out", str(model),
             "--epochs", str(epochs), "--patience", str(args.patience * args.eval_every),
             "--seed", str(args.seed), "--quiet", *flags]
    earlier, attempts = earlier_seconds(out, model, train)
    start = time.perf_counter()
    if earlier is None:
        shutil.rmtree(model, ignore_errors=True)  # a fresh model
        twotower(*train)
    else:  # the same run, killed: on from its last checkpoint (written every 1,000 steps)
        print(f"[{out.name}] resuming {model} after {earlier:.0f}s of earlier attempts",
              file=sys.stderr, flush=True)
        twotower("train", "--resume", str(model), "--schema", str(out / "schema.json"),
                 "--quiet")
    attempt = time.perf_counter() - start
    seconds = (earlier or 0.0) + attempt

    start = time.perf_counter()
    feature_of = None
    if feature is not None:
        table = pq.read_table(out / "items.parquet").to_pydict()
        feature_of = {"name": feature,
                      "values": dict(zip(table["item_id"], table[feature], strict=True))}
    users = sorted({r["user_id"] for r in targets})
    queries(events, users, feature_of, bool(settings.get("recent")), out / "queries.jsonl")
    penalty, penalties = settings.get("popularity_penalty", 0.0), None
    if penalty == "valid":
        penalty, penalties = choose_penalty(model)
    twotower("index", str(model), "--items", str(out / "items.parquet"), "--factory", "Flat",
             "--out", str(out / "index"), *([] if penalty else ["--no-popularity"]))
    answers = out / "answers.jsonl"
    twotower("recommend", str(model), "--index", str(out / "index"), "--queries",
             str(out / "queries.jsonl"), "-k", str(TOP_K), "--exclude-column", "exclude",
             f"--popularity-penalty={penalty}", "--out", str(answers))
    with open(answers) as f, open(out / "predictions.jsonl", "w") as preds:
        for line in f:
            answer = json.loads(line)
            preds.write(json.dumps({"user_id": str(answer["user_id"]),
                                    "items": [str(i) for i in answer["items"]]}) + "\n")

    predict_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    # An epoch a killed attempt validated after its last checkpoint was trained and
    # validated again by the next: the later record stands.
    curve = {r["epoch"]: {"epoch": r["epoch"], "recall@50": r["recall@50"]} for r in records
             if r.get("event") == "validation"}
    curve = [curve[epoch] for epoch in sorted(curve)]
    summary = [r for r in records if r.get("event") == "input"][-1]
    report = {"train_seconds": seconds, "examples": summary["examples"],
              # the last attempt's pace: its examples over its own seconds
              "examples_per_second": summary["examples"] / attempt,
              "attempts": attempts,
              "epochs_trained": max((c["epoch"] for c in curve), default=epochs),
              "best_epoch": summary.get("best_epoch", epochs),
              "predict_seconds": predict_seconds, "curve": curve,
              "chosen": {"popularity_penalty": penalty} if penalties else {},
              "penalties": penalties}
    (out / "run.json").write_text(json.dumps(report, indent=1) + "\n")
    os.remove(out / "events.parquet")  # large, and rebuilt from the split on every run
    # the training state to resume from (optimizer included) is most of a model's size,
    # and nothing here resumes; the published model stays for a look afterwards
    shutil.rmtree(model / "checkpoints", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
