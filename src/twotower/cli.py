"""The ``twotower`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from twotower.cli_serving import add_commands
from twotower.cli_types import at_least, finite, positive

# Epochs of a new model: a fixed few without validation events (on the shared real logs the
# best epoch was the 2nd to the 5th), else at most this many, early stopping choosing.
EPOCHS, EPOCHS_VALIDATED = 3, 30

__all__ = ["main"]


def _quickstart(args: argparse.Namespace) -> int:
    import torch

    from twotower.quickstart import run_quickstart

    torch.set_num_threads(1)  # as `train` does by default: spinning threads stall a busy machine

    run_quickstart(args.out, small=args.small, seed=args.seed, progress=not args.quiet)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from twotower.data.synthetic import SyntheticConfig, generate, write

    config = SyntheticConfig(num_users=args.users, num_items=args.items, num_days=args.days,
                             events_per_day=args.events_per_day,
                             popularity_exponent=args.exponent, seed=args.seed)
    log = generate(config)
    paths = write(log, Path(args.out))
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _schema(args: argparse.Namespace, stored: dict | None = None):
    """The command's schema: ``--schema``, else the one stored with the model, else the
    column flags; ``--events``/``--items`` replace its paths."""
    from twotower.data.interactions import Columns
    from twotower.data.schema import Schema, load_schema, parse_schema

    if args.schema:
        schema = load_schema(args.schema)
    elif stored and "schema" in stored:
        schema = parse_schema(stored["schema"], f"{args.model}/config.json")
    else:
        if not (args.events and args.items):
            raise ValueError("give --schema SCHEMA.yaml, or --events and --items")
        columns = Columns(**{**stored["columns"],
                             "item_features": tuple(stored["columns"]["item_features"])}) \
            if stored else _flag_columns(args)
        schema = Schema.from_columns(columns, args.events, args.items)
    updates: dict = {}
    for name in ("events", "items"):
        if getattr(args, name):
            if schema.movielens is not None:
                raise ValueError(f"--{name} cannot replace a MovieLens schema's files")
            part = getattr(schema, name)
            updates[name] = part.model_copy(update={"path": str(Path(getattr(args, name))
                                                                 .resolve())})
    if args.drop_unknown_items:
        updates["missing_items"] = "drop"
    return schema.model_copy(update=updates)


def _flag_columns(args: argparse.Namespace):
    from twotower.data.interactions import Columns

    return Columns(user=args.user_column, item=args.item_column, timestamp=args.time_column,
                   reward=None if args.reward_column == "" else args.reward_column,
                   item_features=tuple(args.item_features), history_length=args.history,
                   ties=args.ties)


def _load(schema):
    from twotower.data.sources import load

    return load(schema)


def _split_choice(args: argparse.Namespace, schema, stored: dict) -> tuple[str | None, dict]:
    """Split kind and parameters: the flags, else what the model was trained with, else the
    schema's ``split``; ``None`` when nothing names one."""
    stored = stored if stored.get("kind") != "none" else {}
    kind = args.split or stored.get("kind") or (schema.split.kind if schema.split else None)
    explicit = args.cutoff is not None or args.test_fraction is not None
    if kind is None and explicit:
        kind = "time"
    if explicit and kind != "time":  # never ignore a flag the user gave
        source = "--split" if args.split else "the model's split" \
            if stored.get("kind") == kind else "the schema's split"
        raise ValueError(f"--cutoff and --test-fraction are for a time split, but {source} is "
                         f"{kind!r}; add --split time, or leave them out")
    same = stored if stored.get("kind") == kind else {}
    from_schema = schema.split.model_dump() if schema.split and schema.split.kind == kind else {}
    cutoff = args.cutoff if explicit else same.get("cutoff", from_schema.get("cutoff"))
    fraction = args.test_fraction if explicit else \
        same.get("test_fraction", from_schema.get("test_fraction"))
    column = same.get("column", from_schema.get("column"))
    if kind == "column" and column is None:
        raise ValueError("--split column needs the schema's split to name its column "
                         "(split: {kind: column, column: NAME})")
    return kind, {k: v for k, v in (("cutoff", cutoff), ("test_fraction", fraction),
                                    ("column", column)) if v is not None}


def _split(kind: str, params: dict, interactions):
    """The split of a log in memory (a column split reads its events column)."""
    from twotower.data.splits import split_log

    parts = None
    if kind == "column":
        parts = interactions.query_columns([params["column"]])[params["column"]]
        parts = parts.to_numpy(zero_copy_only=False)
    return split_log(kind, interactions.user, interactions.timestamp, parts=parts, **params)


def _train_new(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np

    from twotower.distributed import World
    from twotower.train import TrainConfig

    schema = _schema(args)
    if args.temperature is not None:
        schema = schema.model_copy(update={"model": schema.model.model_copy(
            update={"temperature": args.temperature})})
    if args.until is not None:
        args.split, args.cutoff = "time", args.until
    config = TrainConfig(batch_size=args.batch_size, epochs=args.epochs or EPOCHS,
                         learning_rate=args.lr, correction=args.correction, seed=args.seed,
                         shuffle=(args.order or "shuffled") == "shuffled",
                         patience=args.patience, mixed_negatives=args.mixed_negatives)
    extra = {"schema": schema.model_dump(mode="json")}
    if args.streaming:
        from twotower.data.streaming import StreamingTrainingData
        from twotower.experiment import fit_stream, schema_model_config, stream_ids

        stream, split = _event_stream(args, schema)
        data = StreamingTrainingData(stream, schema_model_config(schema, stream_ids(stream)))
        fit_stream(data, config, args.out, not args.quiet, {**extra, "split": split},
                   args.device, args.checkpoint_every)
        report, trained = stream.report, stream.report["events_kept"]
    else:
        from twotower.experiment import fit, memory_ids, prepare, schema_model_config

        kind, params = _split_choice(args, schema, {})
        interactions = _load(schema)
        rows = np.arange(len(interactions))
        split, valid = {"kind": "none"}, None
        if kind not in (None, "none"):
            parts = _split(kind, params, interactions)
            rows, valid, split = parts.train, parts.valid, {**params, **parts.summary()}
        if args.epochs is None and valid is not None and len(valid):
            config = replace(config, epochs=EPOCHS_VALIDATED)  # early stopping picks
        model_config = schema_model_config(schema, memory_ids(interactions))
        fit(prepare(interactions, model_config), rows, config, args.out, not args.quiet,
            {**extra, "split": split, "data": interactions.report}, args.device,
            args.checkpoint_every, valid)
        report, trained = interactions.report, len(rows)
    if World.current().main:
        print(json.dumps({"model": str(args.out), "trained_on": trained, "data": report,
                          "split": split}, indent=2))
        warning = _barely_trained(Path(args.out))
        if warning:
            print(f"twotower train: warning: {warning}", file=sys.stderr)
    return 0


def _event_stream(args: argparse.Namespace, schema):
    """The events of a ``--streaming`` run, cut by the split, and the split: the same for a
    new run and for its resumption, so that a resumed stream lands where the run stopped."""
    from twotower.data.splits import cutoff_for_fraction
    from twotower.data.streaming import EventStream

    kind, params = _split_choice(args, schema, {})
    if kind in ("leave-last-out", "column"):
        raise ValueError(f"a {kind} split needs the whole log; with --streaming use "
                         "--split time (or load in memory)")
    stream = EventStream(schema)
    stream.check()  # a bad row late in the log stops the run before anything is written
    if kind == "time" and "cutoff" not in params:
        if "test_fraction" not in params:
            raise ValueError("a time split needs --cutoff T or --test-fraction F")
        params["cutoff"] = cutoff_for_fraction(stream.timestamps(), params["test_fraction"])
    stream.until = params.get("cutoff")
    return stream, ({"kind": kind, **params} if kind not in (None, "none") else
                    {"kind": "none"})


def _barely_trained(model_dir: Path, still: float = 0.97) -> str | None:
    """A warning when the training loss ended within ``still`` of where it started: a
    model that has barely moved from its random start should not pass unnoticed."""
    from twotower.checkpoint import METRICS

    records = [json.loads(line) for line in (model_dir / METRICS).read_text().splitlines()
               if line.strip()]
    inputs = [r for r in records if r.get("event") == "input" and r.get("loss_end")]
    if not inputs or inputs[-1]["loss_end"] < still * inputs[-1]["loss_start"]:
        return None
    start, end = inputs[-1]["loss_start"], inputs[-1]["loss_end"]
    return (f"the training loss barely moved ({start:.3f} over the first steps, {end:.3f} "
            "over the last): the model is barely trained; train more epochs (--epochs), or give "
            "the split validation events to stop at the best epoch")


def _train(args: argparse.Namespace) -> int:
    from twotower.distributed import init_from_env, launch, leave
    from twotower.train import TrainingStopped

    if args.nproc > 1 and "RANK" not in os.environ:  # start the workers, each runs this
        return launch(args.argv, args.nproc)
    world = init_from_env(args.device)
    import torch

    # One by default: the towers are small and the tables sparse, so a step gains little
    # from threads on a quiet machine and loses much on a busy one, where idle OpenMP
    # threads spin (benchmarks/training/bench_threads.py).
    torch.set_num_threads(args.threads)
    if not (args.out or args.resume):
        raise ValueError("say where to write the model: --out MODEL_DIR")
    from twotower.checkpoint import run_lock

    # The main process holds the lock: the others write nothing into the directory.
    with run_lock(args.out or args.resume) if world.main else contextlib.nullcontext():
        if not args.follow:
            _claim_out(args)
        try:
            if args.follow:
                status = _follow(args)
            else:
                status = _resume(args) if args.resume else _train_new(args)
        except TrainingStopped as stopped:
            print(f"twotower train: {stopped}", file=sys.stderr)
            status = 130
    leave()  # every worker got here after the same last step
    return status


def _claim_out(args: argparse.Namespace) -> None:
    """Refuse to start a run in a directory that holds another run (their checkpoints and
    metrics would mix), unless ``--overwrite`` says to remove it first."""
    from twotower.checkpoint import remove_run, run_files
    from twotower.distributed import World

    if not args.out or (args.resume and Path(args.out).resolve() == Path(args.resume).resolve()):
        return
    found = run_files(args.out)
    if found and not args.overwrite:
        go_on = f"continue it with `--resume {args.out}`" if not args.resume else \
            "give another --out"
        raise ValueError(f"{args.out} already holds a training run ({', '.join(found)}): "
                         f"{go_on}, or give --overwrite to remove it and start over")
    if found and World.current().main:
        remove_run(args.out)


def _epochs(args: argparse.Namespace) -> dict:
    """``--epochs`` as a change to a resumed run: none unless given, so that rerunning a
    killed command goes on with the epochs it was started with."""
    return {} if args.epochs is None else {"epochs": args.epochs}


def _train_rows(args: argparse.Namespace, schema, interactions):
    """The rows of a log in memory to train on (all, or the train part of the split), the
    validation rows of the split (maybe none) and the split's summary."""
    import numpy as np

    kind, params = _split_choice(args, schema, {})
    if kind in (None, "none"):
        return np.arange(len(interactions)), np.zeros(0, np.int64), {"kind": "none"}
    parts = _split(kind, params, interactions)
    return parts.train, parts.valid, {**params, **parts.summary()}


def _resume(args: argparse.Namespace) -> int:
    """Continue a model: on new events, tested on first (held out) when in memory, then
    trained on; on the events it stopped in (a killed run), from where it stopped."""
    from twotower.distributed import World
    from twotower.train import Trainer, TrainingStopped, stop_on_signals

    trainer = Trainer.resume(args.resume, out_dir=args.out, device=args.device,
                             checkpoint_every=args.checkpoint_every, progress=not args.quiet,
                             **_epochs(args))
    args.model = args.resume  # how messages name the stored schema
    schema = _schema(args, trainer.extra)
    if args.until is not None:
        args.split, args.cutoff = "time", args.until
    with stop_on_signals(trainer):
        summary, trained, report, split = (_resume_stream if args.streaming else
                                           _resume_memory)(args, trainer, schema)
    if summary.get("skipped"):
        print(f"twotower train: nothing left to do, the model is unchanged: "
              f"{summary['reason']}", file=sys.stderr)
    else:
        trainer.save()
    if summary["stopped"]:
        raise TrainingStopped(f"stopped at step {trainer.step}; run the same command again to "
                              "go on from the checkpoint")
    if World.current().main:
        print(json.dumps({"model": str(trainer.out_dir), "step": trainer.step,
                          "trained_on": trained, "data": report, "split": split,
                          "summary": summary}, indent=2))
    return 0


def _resume_memory(args: argparse.Namespace, trainer, schema) -> tuple[dict, int, dict, dict]:
    """Train on a log loaded in memory, tested on first: summary, events, report, split."""
    import numpy as np

    from twotower.experiment import prepare
    from twotower.follow import train_day
    from twotower.train import input_name
    from twotower.validation import Validation

    interactions = _load(schema)
    rows, valid, split = _train_rows(args, schema, interactions)
    prepared = prepare(interactions, trainer.model.config)
    validation = Validation(prepared, rows, valid) if len(valid) else None
    name = input_name(prepared.training_data(rows))
    _resume_order(args, trainer, name)
    summary = train_day(trainer, prepared, np.zeros(0, dtype=np.int64), rows, name,
                        validation)
    return summary, len(rows), interactions.report, split


def _resume_stream(args: argparse.Namespace, trainer, schema) -> tuple[dict, int, dict, dict]:
    """Train on a streamed log (not tested on first: that needs it in memory)."""
    from twotower.data.streaming import StreamingTrainingData

    if trainer.config.correction == "oracle":
        raise ValueError("correction 'oracle' counts every event's item before training, "
                         "which a stream cannot; continue this model without --streaming")
    stream, split = _event_stream(args, schema)
    data = StreamingTrainingData(stream, trainer.model.config)
    _resume_order(args, trainer, data.name)
    summary = trainer.fit(data)
    return summary, stream.report.get("events_kept", 0), stream.report, split


def _resume_order(args: argparse.Namespace, trainer, name: str) -> None:
    """New events: one pass in time order (the paper's setting) unless --order and
    --epochs say otherwise; the events the run last trained on (stopped mid-epoch, or given
    more epochs) go on in the order they were in."""
    from dataclasses import replace

    position = trainer.position
    same = position.input == name
    shuffle = args.order == "shuffled" if args.order else same and position.shuffled
    epochs = trainer.config.epochs if same or args.epochs is not None else 1
    trainer.config = replace(trainer.config, shuffle=shuffle, epochs=epochs)


def _follow(args: argparse.Namespace) -> int:
    """Train on the partitions of a directory in time order, then wait for new ones."""
    from dataclasses import asdict

    import torch

    from twotower.checkpoint import checkpoint_dirs
    from twotower.data.interactions import Columns
    from twotower.experiment import default_model_config
    from twotower.follow import GrowingLog, follow
    from twotower.towers import TwoTowerModel
    from twotower.train import TrainConfig, Trainer, stop_on_signals

    out = args.out or args.resume
    if not args.items:
        raise ValueError("--follow DIR needs --items ITEMS (the item corpus)")
    options = {"device": args.device, "checkpoint_every": args.checkpoint_every,
               "progress": not args.quiet}
    if checkpoint_dirs(out):  # a follow restarted: go on where it stopped
        trainer = Trainer.resume(out, **_epochs(args), shuffle=args.order == "shuffled",
                                 **options)
        columns = Columns(**{**trainer.extra["columns"],
                             "item_features": tuple(trainer.extra["columns"]["item_features"])})
    else:
        columns = _schema(args).columns() if args.schema else _flag_columns(args)
        torch.manual_seed(args.seed)
        config = TrainConfig(batch_size=args.batch_size, epochs=args.epochs or 1,
                             learning_rate=args.lr, correction=args.correction, seed=args.seed,
                             shuffle=args.order == "shuffled")
        trainer = Trainer(TwoTowerModel(default_model_config(columns)), config, out_dir=out,
                          extra={"columns": asdict(columns)}, **options)
    log = GrowingLog(args.items, columns, trainer.model.config,
                     "drop" if args.drop_unknown_items else "error")
    with stop_on_signals(trainer):
        follow(trainer, args.follow, log, poll_seconds=args.poll)
    if trainer.world.main:
        print(json.dumps({"model": str(out), "step": trainer.step,
                          "partitions": trainer.inputs_done}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from twotower.checkpoint import load_model
    from twotower.experiment import prepare, score
    from twotower.index_eval import format_side_by_side, index_score

    model, estimator, config = load_model(args.model)
    if args.popularity_penalty and args.index:
        raise ValueError("--popularity-penalty ranks exactly; give it without --index")
    if args.popularity_penalty and estimator is None:
        raise ValueError(f"--popularity-penalty needs the model's frequency estimator, and "
                         f"{args.model} has none")
    schema = _schema(args, config)
    kind, params = _split_choice(args, schema, config.get("split", {}))
    if kind in (None, "none"):
        raise ValueError("say which events to test on: --split time --cutoff T (or "
                         "--test-fraction F), or --split leave-last-out")
    interactions = _load(schema)
    split = _split(kind, params, interactions)
    rows = split.part(args.on)
    if len(rows) == 0:
        raise ValueError(f"the {kind} split has no {args.on} events ({split.summary()})")
    if args.index:  # checked before the exact ranking, so a wrong index fails at once
        index, index_rows = _evaluation_index(args, model, interactions)
    prepared = prepare(interactions, model.config)
    bias = None
    if args.popularity_penalty:
        bias = -args.popularity_penalty * np.log(estimator.probability(interactions.item_keys))
    metrics = score(model, prepared, split.train, rows, args.ks, args.exclude_seen,
                    args.bootstrap, bias)
    note = {"data": interactions.report, "split": split.summary(), "evaluated_on": args.on}
    if args.popularity_penalty:
        note["popularity_penalty"] = args.popularity_penalty
    if args.index:
        metrics["index"] = index_score(model, prepared, index, index_rows, split.train, rows,
                                       args.ks, args.exclude_seen, args.bootstrap)
        note["index"] = {"path": args.index, "factory": index.factory,
                         "search_params": index.meta.get("search_params"),
                         "recall@100 at build": index.recall}
    print(json.dumps(metrics, indent=2))
    trained = config.get("split", {})
    trained_on = config.get("schema", {}).get("events", {}).get("path")
    same_events = trained_on is None or trained_on == schema.events.path
    if same_events and trained and \
            (trained.get("kind"), trained.get("cutoff")) != (kind, split.info.get("cutoff")):
        note["warning"] = (f"the model was trained on the {trained.get('kind')} split "
                           f"({trained}); some {args.on} events may have been trained on")
    print(json.dumps(note), file=sys.stderr)
    if args.index:
        print(format_side_by_side(metrics, metrics["index"]), file=sys.stderr)
    return 0


def _evaluation_index(args: argparse.Namespace, model, interactions) -> tuple:
    """``(index, index row of each item)`` of ``--index``, checked against the model and the
    evaluation's items before anything is ranked."""
    from twotower.index import ItemIndex
    from twotower.index_eval import aligned_index_rows, check_index

    where = f"index {args.index}"
    index = ItemIndex.load(args.index)
    check_index(index, model, args.model, where)
    keys = interactions.items.column(interactions.columns.key)
    return index, aligned_index_rows(index, interactions.item_keys, where, keys)


def _compare(args: argparse.Namespace) -> int:
    from twotower.compare import compare, format_comparison, headline
    from twotower.data.schema import load_schema
    from twotower.train import TrainConfig

    train = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, learning_rate=args.lr,
                        seed=args.seed)
    results = compare(load_schema(args.schema), args.out, args.modes, args.temperatures,
                      args.runs, train, args.exclude_seen, not args.quiet, args.ks)
    print(format_comparison(results, headline(args.ks)))
    print(f"report: {Path(args.out).resolve() / 'report' / 'report.html'}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from twotower.train import TrainConfig
    from twotower.tune import format_tuning, parse_grid, plan, tune

    grid = parse_grid(args.grid)
    schema = _schema(args)
    kind, params = _split_choice(args, schema, {})
    if kind in (None, "none"):
        raise ValueError("tune chooses on validation events: give the schema a split with "
                         "them (leave-last-out, or a column split with `valid` rows)")
    train = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, learning_rate=args.lr,
                        correction=args.correction, seed=args.seed, shuffle=True,
                        patience=args.patience)
    plan(schema, train, grid)  # a bad grid fails before the log is read
    interactions = _load(schema)
    split = _split(kind, params, interactions)
    rows = tune(schema, interactions, split, grid, train, args.out, not args.quiet,
                {"data": interactions.report})
    print(format_tuning(rows))
    print(f"best: {Path(args.out) / 'best'} ({rows[0]['run']}, validation recall@50 "
          f"{rows[0]['recall@50']:.4f} at epoch {rows[0]['best_epoch']})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from twotower.report import report_model_dirs

    print(f"report: {report_model_dirs(args.models, args.out).resolve()}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from twotower.simulate import format_table, run_simulation

    results = run_simulation(args.out, steps=args.steps, seed=args.seed)
    print(format_table(results))
    print(f"errors.csv, summary.csv, alpha.png and hashes.png in {Path(args.out).resolve()}")
    return 0


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schema", help="schema file (YAML): tables, columns, features")
    parser.add_argument("--events", help="events table (Parquet or CSV, a file or a directory);"
                        " replaces the schema's")
    parser.add_argument("--items", help="items table (Parquet or CSV); replaces the schema's")
    parser.add_argument("--drop-unknown-items", action="store_true",
                        help="skip (and count) events whose item is not in the items table")


def _split_arguments(parser: argparse.ArgumentParser, none: bool) -> None:
    from twotower.data.splits import SPLITS

    parser.add_argument("--split", choices=[*SPLITS, *(["none"] if none else [])],
                        help="time (with --cutoff or --test-fraction) or leave-last-out; "
                             "default: the schema's split" + (", else none" if none else
                                                              ", else the model's"))
    parser.add_argument("--cutoff", type=int, help="time split: test on events at or after this")
    parser.add_argument("--test-fraction", type=positive(1),
                        help="time split: the cut-off that leaves this share of events to test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("quickstart", help="end to end on a synthetic log")
    p.add_argument("--out", default="twotower-quickstart", help="output directory")
    p.add_argument("--small", action="store_true", help="a tiny, fast run (for smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_quickstart)

    p = commands.add_parser("synth", help="write a synthetic YouTube-like log")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--events-per-day", type=int, default=30000)
    p.add_argument("--exponent", type=positive(), default=0.8, help="item popularity power law")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = commands.add_parser("compare", help="correction modes and temperatures side by side")
    p.add_argument("--schema", required=True, help="schema file (YAML) with a split")
    p.add_argument("--out", default="twotower-compare", help="output directory")
    p.add_argument("--modes", nargs="+", choices=["none", "streaming", "oracle"],
                   default=["none", "streaming", "oracle"])
    p.add_argument("--temperatures", nargs="+", type=positive(), default=[0.05])
    p.add_argument("--ks", nargs="+", type=int, default=[10, 50, 100], metavar="K",
                   help="cut-offs to evaluate at (recall@K, ndcg@K, ...)")
    p.add_argument("--runs", type=at_least(1), default=1,
                   help="seeds per run (mean and spread)")
    p.add_argument("--exclude-seen", action="store_true",
                   help="drop items the user interacted with before from each ranking")
    p.add_argument("--epochs", type=at_least(1), default=1)
    p.add_argument("--batch-size", type=at_least(2), default=1024)
    p.add_argument("--lr", type=positive(100), default=0.005)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_compare)

    p = commands.add_parser("simulate",
                            help="the paper's simulation of the streaming frequency estimator")
    p.add_argument("--out", default="twotower-simulate", help="output directory")
    p.add_argument("--steps", type=at_least(1), default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_simulate)

    p = commands.add_parser("train", help="train a model on a log")
    _data_arguments(p)
    p.add_argument("--out", help="model directory to write (with --resume: default MODEL_DIR)")
    p.add_argument("--resume", metavar="MODEL_DIR",
                   help="continue MODEL_DIR's training on these events (the next day's log): "
                        "weights, optimizer, estimator and step carry on; the events are "
                        "tested on first, and the metrics appended to its metrics log")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another run (model, checkpoints, metrics): remove it "
                   "and start over (without it, that is an error)")
    p.add_argument("--follow", metavar="DIR",
                   help="train on DIR's partitions (a file or folder per day, name order = "
                        "time order), checkpoint after each, and wait for the next; "
                        "SIGINT/SIGTERM stop with a final checkpoint; needs --items")
    p.add_argument("--poll", type=positive(), default=30.0,
                   help="with --follow: seconds between looks for a new partition")
    p.add_argument("--checkpoint-every", type=at_least(0), default=1000, metavar="STEPS",
                   help="also checkpoint every STEPS steps (0: only at the end)")
    p.add_argument("--nproc", type=at_least(1), default=1,
                   help="processes on this machine (PyTorch distributed: gloo on CPU, NCCL "
                        "on GPUs; the same as torchrun --nproc-per-node N -m twotower train)")
    p.add_argument("--device", default="auto",
                   help="auto (this worker's GPU when there is one, else cpu), cpu, cuda, ...")
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch threads per process (default 1: on a busy machine more "
                   "threads make a step several times slower; try more on an idle one)")
    p.add_argument("--user-column", default="user_id", help="without --schema")
    p.add_argument("--item-column", default="item_id", help="without --schema")
    p.add_argument("--time-column", default="timestamp", help="without --schema")
    p.add_argument("--reward-column", default="reward",
                   help="without --schema; '' for no reward column")
    p.add_argument("--item-features", nargs="*", default=["channel", "category"],
                   help="without --schema")
    p.add_argument("--history", type=at_least(0), default=20,
                   help="without --schema: history length")
    p.add_argument("--ties", choices=["simultaneous", "ordered"], default="simultaneous",
                   help="without --schema: whether a user's events at the same time see "
                        "the earlier ones in file order (ordered) or none (simultaneous)")
    _split_arguments(p, none=True)
    p.add_argument("--until", type=int, help="train only on events before this time "
                                             "(same as --split time --cutoff)")
    p.add_argument("--streaming", action="store_true",
                   help="read the events in record batches (files sorted by time)")
    p.add_argument("--correction", choices=["none", "streaming", "oracle"],
                   default="streaming")
    p.add_argument("--epochs", type=at_least(1),
                   help=f"epochs of a new model (default {EPOCHS}); with validation events in "
                   f"the split, the most epochs (default {EPOCHS_VALIDATED}: early stopping "
                   "picks the best); with --follow, per partition (default 1); with --resume, "
                   "epochs in all on these events (default: the "
                   "model's), so a model trained on a log trains further on it")
    p.add_argument("--order", choices=["shuffled", "time"],
                   help="batches drawn in a new random order every epoch (default for a new "
                   "model) or in time order, one pass as the paper trains (default for "
                   "--resume and --follow; a run stopped mid-epoch, or given more epochs on "
                   "the same events, goes on in its order)")
    p.add_argument("--mixed-negatives", type=at_least(0), default=0, metavar="N",
                   help="add N items drawn uniformly from the whole corpus to every batch's "
                   "candidates, each corrected by its own sampling probability")
    p.add_argument("--patience", type=at_least(1), default=3,
                   help="with validation events: stop after this many epochs without a new "
                   "best validation recall@50, keeping the best epoch")
    p.add_argument("--batch-size", type=at_least(2), default=1024)
    p.add_argument("--lr", type=positive(100), default=0.005)  # as TrainConfig checks
    p.add_argument("--temperature", type=positive(), help="default: the schema's (0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_train)

    p = commands.add_parser("tune", help="a small grid of settings, each trained with early "
                                         "stopping on the split's validation events")
    _data_arguments(p)
    _split_arguments(p, none=False)
    p.add_argument("--out", default="twotower-tune", help="directory for the runs")
    p.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="settings to try, every combination: lr, batch_size, temperature, "
                   "dropout, history_dropout, dim, output_dim, mixed_negatives, correction, "
                   "and without (query features to leave out: - for none, NAME or NAME+NAME)")
    p.add_argument("--epochs", type=at_least(1), default=30, help="the most epochs of a run")
    p.add_argument("--patience", type=at_least(1), default=3)
    p.add_argument("--batch-size", type=at_least(2), default=1024)
    p.add_argument("--lr", type=positive(100), default=0.005)
    p.add_argument("--correction", choices=["none", "streaming", "oracle"],
                   default="streaming")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_tune)

    p = commands.add_parser("evaluate", help="full-corpus metrics on the test part of a split")
    p.add_argument("model", help="model directory")
    _data_arguments(p)
    _split_arguments(p, none=False)
    p.add_argument("--on", choices=["test", "valid"], default="test",
                   help="which part of the split to evaluate on")
    p.add_argument("--exclude-seen", action="store_true",
                   help="drop items the user interacted with before from each ranking, as "
                        "recommend --exclude-column does; an event whose item the user "
                        "saw before is then a miss")
    p.add_argument("--ks", nargs="+", type=at_least(1), default=[10, 50, 100], metavar="K",
                   help="cut-offs (recall@K, ndcg@K, coverage@K)")
    p.add_argument("--bootstrap", type=at_least(0), default=1000, metavar="N",
                   help="query resamples for 95%% intervals of recall and NDCG (0: none)")
    p.add_argument("--index", metavar="INDEX_DIR",
                   help="also rank through this index (built by `twotower index` for this "
                        "model and items table) and show exact and index metrics side by side")
    p.add_argument("--popularity-penalty", type=finite, default=0.0, metavar="BETA",
                   help="rank by <u, v> - BETA log p_hat(item), as `recommend` and `serve` "
                        "can: evaluate a few on --on valid to choose one (negative favours "
                        "popular items)")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("report", help="an HTML report from model directories: held-out "
                                           "recall day by day, loss, metrics")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model directories")
    p.add_argument("--out", required=True, help="directory for report.html and its plots")
    p.set_defaults(run=_report)

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what --nproc starts every worker with
    try:
        return args.run(args)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as error:
        print(f"twotower {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
