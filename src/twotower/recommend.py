"""Top-K items for raw query features: the one code path of ``twotower recommend`` and the service.

A :class:`Recommender` holds a model, its item index and the model's query-feature
layout. Queries come as columns (Arrow or numpy, from a file) or as JSON-like dicts
(from a request, checked by :meth:`Recommender.parse`); a batch of them is embedded in
one query-tower forward and searched in one index call. ``k``, excluded items and the
popularity penalty are per query: exclusions are met by fetching that many more
candidates and dropping them, the penalty rides in the query vector (see
:mod:`twotower.index`).
"""

from __future__ import annotations

import json
import os
import reprlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa

from twotower.checkpoint import METRICS, load_model, published_metrics_bytes
from twotower.evaluate import embed
from twotower.features import LIST_KINDS, Bag, EncodedFeatures, FeatureSpec, bag_from_arrow
from twotower.hashing import to_int64_ids
from twotower.index import ItemIndex, check_built_from, index_items
from twotower.towers import TwoTowerModel

__all__ = ["MAX_POPULARITY_PENALTY", "Query", "QueryError", "Recommendation", "Recommender",
           "read_queries", "recommend_file"]

_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Beyond this the penalty alone decides the ranking; the bound keeps scores finite in float32.
MAX_POPULARITY_PENALTY = 1000.0


class QueryError(ValueError):
    """A query that does not fit the model (a client error); ``loc`` names the field."""

    def __init__(self, message: str, loc: Sequence[str | int] = ()) -> None:
        super().__init__(message)
        self.loc = tuple(loc)


@dataclass
class Query:
    """One checked query: raw ids as ``int64`` (ints kept as their 64 bits, strings hashed),
    dense as floats."""

    features: dict[str, object]
    k: int = 10
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    popularity_penalty: float = 0.0


@dataclass
class Recommendation:
    """Item keys (the items table's own keys) and scores, best first."""

    keys: list
    scores: list[float]


def _ids(values: object, loc: Sequence[str | int]) -> np.ndarray:
    """``int64`` ids of a JSON list of ints and strings (strings hashed as in training)."""
    if not isinstance(values, list):
        raise QueryError("expected a list of ids (integers or strings)", loc)
    # An unsigned id from 2**63 is read as the same 64 bits in int64, as training reads a
    # uint64 column: it hashes to the same rows and matches the index's keys.
    values = [v - 2 ** 64 if type(v) is int and _INT64[1] < v < 2 ** 64 else v for v in values]
    out = np.empty(len(values), np.int64)
    strings = []
    for i, value in enumerate(values):
        if isinstance(value, str) and _is_unicode(value):
            strings.append(i)
        elif isinstance(value, int) and not isinstance(value, bool) and \
                _INT64[0] <= value <= _INT64[1]:
            out[i] = value
        else:
            raise QueryError("expected an id (a 64-bit integer or a string of valid Unicode), "
                             f"got {reprlib.repr(value)}", (*loc, i))
    if strings:
        out[strings] = to_int64_ids(np.array([values[i] for i in strings], dtype=object))
    return out


def _id(value: object, loc: Sequence[str | int]) -> int:
    if isinstance(value, list):
        raise QueryError("expected one id (an integer or a string), got a list "
                         f"{reprlib.repr(value)}", loc)
    try:
        return int(_ids([value], loc)[0])
    except QueryError as error:
        raise QueryError(str(error), loc) from None


def _is_unicode(text: str) -> bool:
    """False for a string with a lone surrogate (JSON allows ``"\\ud800"``): it has no
    UTF-8 form to hash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _numbers(value: object, width: int, loc: Sequence[str | int]) -> np.ndarray:
    values = value if isinstance(value, list) else [value]
    # abs() <= max also refuses NaN and infinities, and compares huge ints exactly.
    if len(values) != width or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= _FLOAT32_MAX
            for v in values):
        raise QueryError(f"expected {width} number(s) within float32 range, got "
                         f"{reprlib.repr(value)}", loc)
    return np.asarray(values, np.float32)


def _history_features(model: TwoTowerModel, config: Mapping) -> list[str]:
    """The id_list and sequence query features in the item id's space (the user's watched
    items)."""
    columns = config.get("columns") or {}
    names = {columns.get("item"), columns.get("item_key")} - {None}
    tables = {f.table_name for f in model.config.item_features if f.name in names}
    return [f.name for f in model.config.query_features
            if f.kind in LIST_KINDS and f.table_name in tables]


METRICS_TAIL = 1 << 20  # bytes of a metrics log's end looked through for its last records


def _last_records(path: Path, limit: int | None = None,
                  tail: int = METRICS_TAIL) -> dict[str, dict]:
    """The last training record and the last evaluation record of a metrics log, within
    its first ``limit`` bytes (what was logged when the model was published).

    Only complete lines are read (a trainer may be appending one right now), and a line
    that is not a JSON object is passed over: this is a report, not a check of the log.
    Only the last ``tail`` bytes are looked through, newest line first: a long run's log
    reaches gigabytes, and reading all of it took seconds for every ``GET /v1/model``.
    """
    found: dict[str, dict] = {}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            end = size if limit is None else min(limit, size)
            start = max(0, end - tail)
            f.seek(start)
            lines = f.read(end - start).split(b"\n")
    except FileNotFoundError:  # none yet, or removed by a new run right now
        return found
    lines.pop()  # after the last newline: a line being written, or nothing
    for line in reversed(lines[1:] if start else lines):  # from the middle, the first is cut
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.setdefault("eval" if record.get("event") == "eval" else "train", record)
            if len(found) == 2:
                break
    return found


class Recommender:
    """A model and its item index, answering top-K queries given as raw features."""

    def __init__(self, model: TwoTowerModel, index: ItemIndex, config: Mapping | None = None,
                 model_dir: str | Path | None = None,
                 index_dir: str | Path | None = None) -> None:
        if index.dim != model.config.output_dim:
            raise ValueError(f"the index holds {index.dim}-dim embeddings but the model "
                             f"outputs {model.config.output_dim}; rebuild the index with "
                             "`twotower index` for this model")
        self.model = model.eval()
        self.index = index
        self.config = dict(config or {})
        self.model_dir = None if model_dir is None else str(model_dir)
        self.index_dir = None if index_dir is None else str(index_dir)
        self.specs: list[FeatureSpec] = list(model.config.query_features)
        self.fields = {s.name for s in self.specs} | {s.weights for s in self.specs if s.weights}
        self.history_features = _history_features(model, self.config)
        self._metrics: tuple[tuple, dict] | None = None  # (the log's stat, its last records)

    @classmethod
    def load(cls, model_dir: str | Path, index_dir: str | Path) -> Recommender:
        """Load and check a model and index directory, and answer one query end to end.

        Raises ``FileNotFoundError`` or ``ValueError`` naming what is wrong, so a
        service can refuse a broken directory before it serves from it.
        """
        model, _, config = load_model(model_dir)
        index = ItemIndex.load(index_dir)
        check_built_from(index, model_dir, f"index {index_dir}")
        recommender = cls(model, index, config, model_dir, index_dir)
        recommender.warm_up()
        return recommender

    @classmethod
    def exact(cls, model_dir: str | Path, items: str | Path) -> Recommender:
        """A model and an exact index of ``items`` built in memory now (for one-off
        recommendations; a service should load a saved index)."""
        loaded = load_model(model_dir)
        model, _, config = loaded
        index = index_items(model_dir, items, "Flat", loaded=loaded)
        recommender = cls(model, index, config, model_dir)
        recommender.warm_up()
        return recommender

    def warm_up(self) -> None:
        """Answer a placeholder query, so a broken model fails here and not on a request."""
        features: dict[str, object] = {}
        for spec in self.specs:
            features[spec.name] = np.zeros(spec.width, np.float32) if spec.kind == "dense" \
                else np.zeros(1, np.int64) if spec.kind in LIST_KINDS else 0
            if spec.weights:
                features[spec.weights] = np.ones(1, np.float32)
        [result] = self.recommend_queries([Query(features, k=1)])
        if len(self.index) and not np.isfinite(result.scores).all():
            raise ValueError("the model gives non-finite scores")

    def parse(self, features: Mapping[str, object], k: int = 10,
              exclude: Sequence[object] = (), exclude_history: bool = False,
              popularity_penalty: float = 0.0, loc: Sequence[str | int] = ()) -> Query:
        """Check JSON-like query features against the model and return a :class:`Query`.

        ``exclude_history`` also excludes the items of the history features. Raises
        :class:`QueryError` naming the field (under ``loc``) for unknown or missing
        features, wrong types and values out of range (``|popularity_penalty|`` at most
        ``MAX_POPULARITY_PENALTY``).
        """
        unknown = sorted(set(features) - self.fields)
        if unknown:
            raise QueryError(f"unknown feature(s) {unknown}; this model's query features are "
                             f"{sorted(self.fields)}", (*loc, "features", unknown[0]))
        parsed: dict[str, object] = {}
        for spec in self.specs:
            where = (*loc, "features", spec.name)
            if spec.name not in features:
                raise QueryError(f"missing feature {spec.name!r} ({spec.kind})", where)
            value = features[spec.name]
            if spec.kind == "id":
                parsed[spec.name] = _id(value, where)
            elif spec.kind in LIST_KINDS:
                parsed[spec.name] = _ids(value, where)
                if spec.weights:
                    weights = features.get(spec.weights)
                    parsed[spec.weights] = _numbers(weights, len(parsed[spec.name]),
                                                    (*loc, "features", spec.weights))
            else:
                parsed[spec.name] = _numbers(value, spec.width, where)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise QueryError(f"k must be a positive integer, got {reprlib.repr(k)}", (*loc, "k"))
        if isinstance(popularity_penalty, bool) or not isinstance(popularity_penalty,
                                                                  int | float) \
                or not abs(popularity_penalty) <= MAX_POPULARITY_PENALTY:
            raise QueryError(f"popularity_penalty must be a number from "
                             f"-{MAX_POPULARITY_PENALTY:g} to {MAX_POPULARITY_PENALTY:g}",
                             (*loc, "popularity_penalty"))
        if popularity_penalty and self.index.popularity is None:
            raise QueryError("this index has no popularity column, so popularity_penalty must "
                             "be 0 (rebuild it from a model with a frequency estimator)",
                             (*loc, "popularity_penalty"))
        excluded = _ids(list(exclude), (*loc, "exclude"))
        if exclude_history:
            excluded = np.concatenate([excluded, *(parsed[n] for n in self.history_features)])
        return Query(parsed, k, excluded, float(popularity_penalty))

    def recommend_queries(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Top-K of each parsed query, in one forward and one index search."""
        columns: dict[str, object] = {}
        for spec in self.specs:
            values = [q.features[spec.name] for q in queries]
            if spec.kind == "id":
                columns[spec.name] = np.asarray(values, np.int64)
            elif spec.kind in LIST_KINDS:
                offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])])
                flat = np.concatenate(values) if values else np.zeros(0, np.int64)
                columns[spec.name] = Bag(flat.astype(np.int64), offsets.astype(np.int64))
                if spec.weights:
                    columns[spec.weights] = [q.features[spec.weights] for q in queries]
            else:
                columns[spec.name] = np.stack(values) if values else \
                    np.zeros((0, spec.width), np.float32)
        return self.recommend(columns, [q.k for q in queries], [q.exclude for q in queries],
                              np.asarray([q.popularity_penalty for q in queries], np.float32))

    def recommend(self, columns: Mapping[str, object], k: int | Sequence[int],
                  exclude: Sequence[np.ndarray] | None = None,
                  popularity_penalty: float | np.ndarray = 0.0,
                  where: str = "queries", first_row: int = 0) -> list[Recommendation]:
        """Top-``k`` of each query row of ``columns`` (raw features, Arrow or numpy).

        ``exclude`` holds per query the ``int64`` item keys to leave out;
        ``popularity_penalty`` ranks by ``<u, v> - beta * log p_hat`` (one beta, or one
        per query). Errors name rows counted from ``first_row`` (rows of ``where``).
        """
        features = EncodedFeatures(self.specs, self.model.config.tables, columns, where,
                                   first_row)
        n = len(features)
        ks = np.broadcast_to(np.asarray(k, np.int64), (n,))
        if n == 0:
            return []
        if ks.min() < 1:
            raise QueryError(f"k must be >= 1, got {int(ks.min())}", ("k",))
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        queries = embed(self.model, features, "query").numpy()
        broken = ~np.isfinite(queries).all(axis=1)
        if broken.any():  # e.g. dense values so large that the tower overflows
            raise QueryError(f"{where}: the model gives a non-finite embedding for the query "
                             f"at row {first_row + int(np.argmax(broken))}; check its dense "
                             "features")
        scores, rows = self.index.search_rows(queries, int(ks.max()) + extra,
                                              popularity_penalty)
        keys = np.where(rows >= 0, self.index.keys[np.maximum(rows, 0)], -1)
        results = []
        for i in range(n):
            keep = rows[i] >= 0
            if exclude is not None and len(exclude[i]):
                keep &= ~np.isin(keys[i], exclude[i])
            chosen = np.flatnonzero(keep)[:ks[i]]
            if not np.isfinite(scores[i, chosen]).all():  # finite vectors, overflowing product
                raise QueryError(f"the model gives non-finite scores for query {i}; check its "
                                 "dense features")
            labels = keys[i, chosen].tolist() if self.index.labels is None else \
                [self.index.labels[r] for r in rows[i, chosen]]
            # float32 scores: more digits would be noise (and cost JSON encoding time).
            results.append(Recommendation(labels, scores[i, chosen].astype(np.float64)
                                          .round(6).tolist()))
        return results

    def _last_metrics(self) -> dict[str, dict]:
        """:func:`_last_records` of the model's metrics log, read again only once the log
        or the published model has changed (``/v1/model`` is asked often)."""
        path = Path(self.model_dir) / METRICS
        try:
            stat = path.stat()
            seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            seen = ()
        key = (seen, published_metrics_bytes(self.model_dir))
        if self._metrics is None or self._metrics[0] != key:
            self._metrics = (key, _last_records(path, key[1]))
        return self._metrics[1]

    def describe(self) -> dict:
        """What the service reports at ``/v1/model``: versions, corpus, index, metrics.

        No paths: a client has no business knowing the server's file layout.
        """
        config = self.model.config
        metrics = self._last_metrics() if self.model_dir else {}
        index = self.index.describe()
        info = index["info"] if isinstance(index["info"], dict) else {}
        index["info"] = {key: info.get(key) for key in ("model_fingerprint", "model_versions")}
        return {
            "model": {
                "versions": self.config.get("versions"),
                "output_dim": config.output_dim, "temperature": config.temperature,
                "query_features": [s.to_dict() for s in self.specs],
                "item_features": [s.to_dict() for s in config.item_features],
                "history_features": self.history_features,
                "train": self.config.get("train"), "columns": self.config.get("columns"),
                "metrics": metrics,
            },
            "index": {"corpus_size": len(self.index),
                      "kind": "exact" if self.index.factory == "Flat" else "approximate",
                      "recall@100": self.index.recall,
                      "popularity_penalty": self.index.popularity is not None, **index},
        }


def _parse_id_token(token: str) -> int | str:
    try:
        return int(token)
    except ValueError:
        return token


def _list_column(column: pa.ChunkedArray, name: str, where: str, first_row: int) -> Bag:
    """An id_list column: Arrow lists as they are; text (CSV) as ``"1 2 3"`` or ``"[1, 2]"``."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return bag_from_arrow(column, name, where=where, first_row=first_row)
    lists = []
    for row, text in enumerate(column.to_pylist()):
        tokens = (text or "").replace("[", " ").replace("]", " ").replace(",", " ").split()
        try:
            lists.append(_ids([_parse_id_token(t.strip("\"'")) for t in tokens], (name,)))
        except QueryError as error:
            raise ValueError(f"{where}: column {name!r} at row {first_row + row}: "
                             f"{error}") from None
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return Bag(np.concatenate(lists) if lists else np.zeros(0, np.int64), offsets)


STDIN = "-"  # the queries path that names standard input (JSON lines)


def _query_source(path: str | Path) -> tuple[object, str]:
    """``(what pyarrow reads, the format's suffix)`` of a queries path.

    pyarrow seeks in a file it opens by name: a pipe (``/dev/stdin``, a FIFO) failed
    with a traceback ("lseek failed"). Standard input (``-``, JSON lines) and any file
    that is not a regular one are read into memory first, as a whole file is anyway.
    """
    import pyarrow as pa

    if str(path) == STDIN:
        return pa.BufferReader(sys.stdin.buffer.read()), ".jsonl"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"queries file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".parquet", ".pq"):
        raise ValueError(f"queries file {path}: unknown format {suffix!r}; use .parquet, "
                         f".csv or .jsonl, or {STDIN} for JSON lines on standard input")
    if path.is_file() or path.is_dir():
        return path, suffix
    with open(path, "rb") as f:
        return pa.BufferReader(f.read()), suffix


def read_queries(path: str | Path, batch_size: int = 1024) -> Iterator[pa.Table]:
    """Record batches of a Parquet, CSV or JSON lines file of queries, ``batch_size`` rows
    each; ``-`` reads JSON lines from standard input."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    source, suffix = _query_source(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        import pyarrow.json as pjson

        table = pjson.read_json(source)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(source)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(source)
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)


def recommend_file(recommender: Recommender, queries: str | Path, out: IO[str], k: int = 10,
                   exclude_history: bool = False, exclude_column: str | None = None,
                   popularity_penalty: float = 0.0, batch_size: int = 1024) -> int:
    """Write one JSON line per query of ``queries``: ``{"row", <user>, "items", "scores"}``.

    Returns the number of queries answered. An error names the row of ``queries``.
    """
    user = recommender.config.get("columns", {}).get("user")
    where = f"queries {queries}"
    done = 0
    for table in read_queries(queries, batch_size):
        columns: dict[str, object] = {}
        for spec in recommender.specs:
            if spec.name in table.column_names:
                column = table.column(spec.name)
                columns[spec.name] = _list_column(column, spec.name, where, done) \
                    if spec.kind in LIST_KINDS else column
            if spec.weights and spec.weights in table.column_names:
                columns[spec.weights] = table.column(spec.weights)
        excluded: list[np.ndarray] | None = None
        sources = [exclude_column] if exclude_column else []
        if exclude_history:
            sources += recommender.history_features
        for name in sources:
            if name not in table.column_names:
                raise KeyError(f"{where}: exclusion column {name!r} not found; columns are "
                               f"{table.column_names}")
            bag = columns[name] if isinstance(columns.get(name), Bag) else \
                _list_column(table.column(name), name, where, done)
            lists = np.split(bag.values, bag.offsets[1:-1])
            excluded = lists if excluded is None else \
                [np.concatenate(pair) for pair in zip(excluded, lists, strict=True)]
        results = recommender.recommend(columns, k, excluded, popularity_penalty, where, done)
        users = table.column(user).to_pylist() if user in table.column_names else None
        for i, result in enumerate(results):
            record = {"row": done + i}
            if users is not None:
                record[user] = users[i]
            record.update(items=result.keys, scores=result.scores)
            out.write(json.dumps(record) + "\n")
        done += table.num_rows
    return done
