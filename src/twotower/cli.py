"""The ``twotower`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _quickstart(args: argparse.Namespace) -> int:
    from twotower.quickstart import run_quickstart

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


def _load(args: argparse.Namespace):
    from twotower.data.interactions import Columns, load_interactions

    columns = Columns(user=args.user_column, item=args.item_column,
                      timestamp=args.time_column,
                      reward=None if args.reward_column == "" else args.reward_column,
                      item_features=tuple(args.item_features), history_length=args.history)
    return load_interactions(args.events, args.items, columns,
                             missing_items="drop" if args.drop_unknown_items else "error")


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from twotower.experiment import default_model_config, fit, prepare
    from twotower.train import TrainConfig

    interactions = _load(args)
    rows = interactions.split_at(args.until)[0] if args.until is not None else \
        np.arange(len(interactions))
    config = TrainConfig(batch_size=args.batch_size, epochs=args.epochs,
                         learning_rate=args.lr, correction=args.correction, seed=args.seed)
    model_config = default_model_config(interactions.columns, temperature=args.temperature)
    fit(prepare(interactions, model_config), rows, config, args.out, not args.quiet)
    print(f"trained on {len(rows):,} events ({interactions.report}); model in {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from twotower.checkpoint import load_model
    from twotower.data.interactions import Columns
    from twotower.experiment import prepare, score

    model, _, config = load_model(args.model)
    args.user_column, args.item_column = config["columns"]["user"], config["columns"]["item"]
    args.time_column, args.reward_column = config["columns"]["timestamp"], \
        config["columns"]["reward"] or ""
    args.item_features = Columns(**config["columns"]).item_features
    args.history = config["columns"]["history_length"]
    interactions = _load(args)
    train_rows, test_rows = interactions.split_at(args.cutoff)
    if len(test_rows) == 0:
        raise SystemExit(f"no events at or after --cutoff {args.cutoff}")
    metrics = score(model, prepare(interactions, model.config), train_rows, test_rows,
                    exclude_seen=args.exclude_seen)
    print(json.dumps(metrics, indent=2))
    return 0


def _index(args: argparse.Namespace) -> int:
    from twotower.checkpoint import load_model
    from twotower.data.interactions import read_table
    from twotower.evaluate import embed
    from twotower.features import EncodedFeatures
    from twotower.hashing import to_int64_ids
    from twotower.index import ItemIndex

    model, _, config = load_model(args.model)
    items = read_table(args.items, "items")
    features = EncodedFeatures(model.config.item_features, model.config.tables,
                               {n: items.column(n) for n in items.column_names
                                if n in {f.name for f in model.config.item_features}},
                               f"items {args.items}")
    keys = to_int64_ids(items.column(config["columns"]["item"]))
    index = ItemIndex.build(embed(model, features, "item").numpy(), keys, args.factory)
    index.save(args.out)
    print(f"indexed {len(index):,} items ({args.factory}, inner product) into {args.out}")
    return 0


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", required=True, help="events table (Parquet or CSV)")
    parser.add_argument("--items", required=True, help="items table (Parquet or CSV)")
    parser.add_argument("--drop-unknown-items", action="store_true",
                        help="skip (and count) events whose item is not in the items table")


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
    p.add_argument("--exponent", type=float, default=0.8, help="item popularity power law")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = commands.add_parser("train", help="train a model on a log")
    _data_arguments(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--user-column", default="user_id")
    p.add_argument("--item-column", default="item_id")
    p.add_argument("--time-column", default="timestamp")
    p.add_argument("--reward-column", default="reward", help="'' for no reward column")
    p.add_argument("--item-features", nargs="*", default=["channel", "category"])
    p.add_argument("--history", type=int, default=20, help="history length")
    p.add_argument("--until", type=int, help="train only on events before this timestamp")
    p.add_argument("--correction", choices=["none", "streaming", "oracle"],
                   default="streaming")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_train)

    p = commands.add_parser("evaluate", help="full-corpus metrics on a later time range")
    p.add_argument("model", help="model directory")
    _data_arguments(p)
    p.add_argument("--cutoff", type=int, required=True,
                   help="test on events at or after this timestamp")
    p.add_argument("--exclude-seen", action="store_true",
                   help="drop items the user interacted with before from each ranking")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("index", help="build the inner-product index of a model")
    p.add_argument("model", help="model directory")
    p.add_argument("--items", required=True, help="items table (Parquet or CSV)")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--factory", default="Flat", help="faiss index factory string")
    p.set_defaults(run=_index)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as error:
        print(f"twotower {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
