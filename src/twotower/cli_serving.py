"""The serving commands of ``twotower``: ``index``, ``recommend`` and ``serve``.

Registered by :func:`add_commands` from :mod:`twotower.cli`; each handler takes the
parsed arguments and returns the exit status. They are thin: the work is in
:mod:`twotower.index`, :mod:`twotower.recommend` and :mod:`twotower.serve`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO

from twotower.cli_types import at_least, finite, share

__all__ = ["add_commands"]


def _index_dir(args: argparse.Namespace) -> Path:
    return Path(args.index) if args.index else Path(args.model) / "index"


def _index(args: argparse.Namespace) -> int:
    from twotower.index import index_items

    params = {name: value for name, value in (("efSearch", args.ef_search),
                                              ("nprobe", args.nprobe)) if value is not None}
    index = index_items(args.model, args.items, args.factory, popularity=not args.no_popularity,
                        batch_size=args.batch_size, search_params=params or None,
                        exact_below=args.exact_below, target_recall=args.target_recall,
                        num_recall_queries=args.recall_queries, seed=args.seed)
    out = index.save(args.out or Path(args.model) / "index")
    recall = index.meta["recall"]
    kind = "exact" if recall.get("exact") else \
        f"approximate, recall@100 {recall['recall@100']:.4f} vs exact on " \
        f"{recall['queries']} sampled queries, {index.meta.get('search_params')}"
    popularity = ", with popularity column" if index.popularity else ""
    print(f"indexed {len(index):,} items ({index.factory}, inner product, {kind}"
          f"{popularity}) into {out}")
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from twotower.checkpoint import atomic_write
    from twotower.recommend import Recommender, recommend_file

    if args.items:
        if args.index:
            raise ValueError("give --index (search a built index) or --items (exact search "
                             "over an items table), not both")
        recommender = Recommender.exact(args.model, args.items)
    else:
        recommender = Recommender.load(args.model, _index_dir(args))

    def answer(out: IO[str]) -> int:
        return recommend_file(recommender, args.queries, out, args.k, args.exclude_seen,
                              args.exclude_column, args.popularity_penalty, args.batch_size)

    if args.out == "-":
        count = answer(sys.stdout)
    else:  # complete or absent: a bad query leaves no half-written file
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; name a file")
        counts: list[int] = []

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                counts.append(answer(f))

        atomic_write(Path(args.out), write)
        count = counts[0]
    print(f"top-{args.k} for {count:,} queries -> {args.out}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from twotower.access import reload_token
    from twotower.serve import Limits, serve

    limits = Limits(max_k=args.max_k, max_batch=args.max_batch,
                    max_body_bytes=args.max_body_bytes, max_micro_batch=args.micro_batch,
                    max_wait_ms=args.max_wait_ms, request_timeout_s=args.request_timeout)
    token = reload_token(args.reload_token_file)
    print(json.dumps({"serving": args.model, "index": str(_index_dir(args)),
                      "url": f"http://{args.host}:{args.port}", "docs": "/docs",
                      "reload": "SIGHUP" + (", POST /v1/admin/reload" if token else "")}),
          file=sys.stderr)
    serve(args.model, str(_index_dir(args)), args.host, args.port, limits, args.threads,
          token, args.allowed_host, log_level=args.log_level)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``index``, ``recommend`` and ``serve`` on the ``twotower`` subparsers."""
    p = commands.add_parser("index", help="embed every item and build the inner-product index")
    p.add_argument("model", help="model directory")
    p.add_argument("--items", required=True, help="items table (Parquet or CSV)")
    p.add_argument("--out", help="index directory to write (default: MODEL/index)")
    p.add_argument("--factory", default="auto",
                   help="'auto' (exact below --exact-below items, HNSW above) or a faiss "
                   "factory string, e.g. Flat, HNSW32, IVF4096,PQ13")
    p.add_argument("--exact-below", type=at_least(0), default=100_000,
                   help="corpus size from which 'auto' goes approximate")
    p.add_argument("--ef-search", type=at_least(1),
                   help="fix HNSW efSearch instead of tuning it")
    p.add_argument("--nprobe", type=at_least(1), help="fix IVF nprobe instead of tuning it")
    p.add_argument("--target-recall", type=share, default=0.95,
                   help="tune the search parameter until recall@100 vs exact reaches this")
    p.add_argument("--recall-queries", type=at_least(1), default=1000,
                   help="sampled queries for the recall check")
    p.add_argument("--no-popularity", action="store_true",
                   help="leave out the log-popularity column (no popularity penalty)")
    p.add_argument("--batch-size", type=at_least(1), default=8192,
                   help="items per tower forward")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_index)

    p = commands.add_parser("recommend", help="top-K for a file of queries, as JSON lines")
    p.add_argument("model", help="model directory")
    p.add_argument("--index", help="index directory (default: MODEL/index)")
    p.add_argument("--items", help="instead of an index: embed this items table and search "
                   "it exactly (no `twotower index` needed)")
    p.add_argument("--queries", required=True,
                   help="queries (Parquet, CSV or JSON lines; - for JSON lines on standard "
                   "input) with the model's query features")
    p.add_argument("--out", default="-",
                   help="JSON lines output, written atomically (default: stdout)")
    p.add_argument("-k", "--k", type=at_least(1), default=10, help="items per query")
    p.add_argument("--exclude-seen", action="store_true",
                   help="never recommend the items of a query's history")
    p.add_argument("--exclude-column", help="a list column of item keys to leave out per query")
    p.add_argument("--popularity-penalty", type=finite, default=0.0,
                   help="beta: rank by <u, v> - beta log p_hat(item) (0: plain scores)")
    p.add_argument("--batch-size", type=at_least(1), default=1024,
                   help="queries per forward")
    p.set_defaults(run=_recommend)

    p = commands.add_parser("serve", help="the HTTP service (FastAPI + uvicorn)")
    p.add_argument("model", help="model directory")
    p.add_argument("--index", help="index directory (default: MODEL/index)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=256,
                   help="most queries in one /v1/recommend/batch request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--micro-batch", type=int, default=256,
                   help="most queries coalesced into one forward and index search")
    p.add_argument("--max-wait-ms", type=float, default=1.0,
                   help="how long a batch waits for more requests after its first")
    p.add_argument("--threads", type=int,
                   help="torch and faiss threads per batch (default: the cores, at most 4)")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds a request's headers and body may take to arrive (then 408)")
    p.add_argument("--reload-token-file",
                   help="enable POST /v1/admin/reload for clients sending the secret in this "
                   "file as a bearer token (or set $TWOTOWER_RELOAD_TOKEN); off by default")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a Host header value to answer besides localhost/127.0.0.1/[::1] "
                   "(repeatable; bound beyond loopback, default: any)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(run=_serve)
