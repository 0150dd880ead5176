"""Events read in record batches, so a log larger than memory trains in one pass.

:class:`EventStream` reads a schema's events file by file, record batch by record
batch (pyarrow datasets), checks each batch as the in-memory loader would (naming the
file and row), matches items against the in-memory corpus and builds causal histories
with per-user state carried across batches (:class:`~twotower.data.history.HistoryState`).

Training consumes events in time order, so a stream must already be sorted by the time
column, across files in path order: a batch that goes back in time is an error that
names the file and row (sort the files, or load the log in memory). Cleaning, if the
schema asks for it, needs a first pass over the user and item columns (16 bytes an
event) to decide which events to keep.

:class:`StreamingTrainingData` gives :func:`twotower.train.train` what it reads from a
:class:`~twotower.train.TrainingData`, one piece of the stream at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from twotower.data import checks
from twotower.data.cleaning import clean
from twotower.data.corpus import ItemCorpus
from twotower.data.history import HistoryState
from twotower.data.interactions import (
    Interactions,
    history_features,
    item_columns,
    unknown_items,
)
from twotower.data.schema import Schema
from twotower.data.sources import check_features, event_columns, events_dataset, read_items
from twotower.features import Bag, EncodedFeatures, bag_from_arrow, take_bag
from twotower.towers import ModelConfig

__all__ = ["EventStream", "StreamingTrainingData"]


@dataclass
class _Piece:
    """Checked, filtered events with their history rows, not yet cut into training pieces."""

    user: np.ndarray
    item: np.ndarray
    item_row: np.ndarray
    timestamp: np.ndarray
    reward: np.ndarray
    history_rows: Bag
    context: dict[str, pa.ChunkedArray]

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def concat(cls, pieces: list[_Piece]) -> _Piece:
        arrays = {f.name: np.concatenate([getattr(p, f.name) for p in pieces])
                  for f in fields(cls) if f.name not in ("history_rows", "context")}
        starts = np.cumsum([0] + [len(p.history_rows.values) for p in pieces[:-1]])
        offsets = np.concatenate([[0]] + [p.history_rows.offsets[1:] + s
                                          for p, s in zip(pieces, starts, strict=True)])
        history = Bag(np.concatenate([p.history_rows.values for p in pieces]), offsets)
        context = {name: pa.chunked_array([c for p in pieces for c in p.context[name].chunks],
                                          type=pieces[0].context[name].type)
                   for name in pieces[0].context}
        return cls(**arrays, history_rows=history, context=context)

    def slice(self, start: int, stop: int) -> _Piece:
        arrays = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)
                  if f.name not in ("history_rows", "context")}
        return _Piece(**arrays, history_rows=take_bag(self.history_rows, np.arange(start, stop)),
                      context={n: c.slice(start, stop - start) for n, c in self.context.items()})


@dataclass
class _Checked:
    """The checked columns of one record batch (cut at ``until``); ``read`` rows were read."""

    user: np.ndarray
    item: np.ndarray
    item_row: np.ndarray
    known: np.ndarray
    timestamp: np.ndarray
    reward: np.ndarray
    unknown: int
    read: int


class EventStream:
    """The events of a file-based schema, checked and prepared one record batch at a time.

    Args:
        schema: the schema (its events must be sorted by time).
        corpus: the item corpus (default: the schema's items table).
        until: stop before the first event at or after this time (train on a time split).
        batch_rows: rows per record batch read.
    """

    def __init__(self, schema: Schema, corpus: ItemCorpus | None = None, until: int | None = None,
                 batch_rows: int = 1 << 16) -> None:
        self.schema, self.until, self.batch_rows = schema, until, batch_rows
        self.columns = schema.columns()
        self.dataset = events_dataset(schema)
        if corpus is None:
            table, where = read_items(schema)
            corpus = ItemCorpus.from_table(table, schema.items.key, where)
        self.corpus = corpus
        check_features(schema, self.dataset.schema, corpus.table.schema,
                       f"events {schema.events.path}", f"items {schema.items.path}")
        self.report: dict = {}
        self._keep: np.ndarray | None = None
        self._cleaning_report: dict = {}
        self._checked_whole = False

    def record_batches(self, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, str, int]]:
        """``(batch, where, first_row)`` of every record batch, files in path order."""
        for fragment in sorted(self.dataset.get_fragments(), key=lambda f: f.path):
            first_row = 0
            for batch in fragment.to_batches(columns=columns, batch_size=self.batch_rows):
                yield batch, f"events {fragment.path}", first_row
                first_row += batch.num_rows

    def count(self) -> int:
        """Events before ``until`` (before unknown items and cleaning are removed)."""
        if self.until is None:
            return self.dataset.count_rows()
        return self.dataset.count_rows(filter=ds.field(self.columns.timestamp) < self.until)

    def timestamps(self) -> np.ndarray:
        """The times of the events training would keep (known items, after cleaning), in file
        order: 8 bytes an event, to place a time split's cut-off as in memory."""
        columns = [self.columns.timestamp, self.columns.item]
        times, known = [], []
        for batch, where, row in self.record_batches(columns):
            times.append(checks.times(batch, self.columns.timestamp, where, row))
            known.append(self.corpus.lookup(checks.ids(batch, self.columns.item, where, row))[1])
        keep = np.concatenate(known)
        cleaned = self._cleaning()
        return np.concatenate(times)[keep if cleaned is None else keep & cleaned]

    def distinct(self, name: str) -> np.ndarray:
        """The distinct ids of an events column (values of lists for a list column)."""
        found = np.zeros(0, dtype=np.int64)
        for batch, where, row in self.record_batches([name]):
            values = batch.column(name)
            if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                ids = bag_from_arrow(values, name).values
            else:
                ids = checks.ids(batch, name, where, row)
            found = np.union1d(found, ids)
        return found

    def _cleaning(self) -> np.ndarray | None:
        """Which events (by position in the files) survive cleaning; one pass, two columns."""
        steps = self.schema.cleaning_steps()
        if not steps.active:
            return None
        if self._keep is None:
            users, items = [], []
            for batch, where, row in self.record_batches([self.columns.user, self.columns.item]):
                users.append(checks.ids(batch, self.columns.user, where, row))
                items.append(checks.ids(batch, self.columns.item, where, row))
            user, item = np.concatenate(users), np.concatenate(items)
            known = self.corpus.lookup(item)[1]
            keep = np.zeros(len(user), dtype=bool)
            keep[known], self._cleaning_report = clean(user[known], item[known], steps)
            self._keep = keep
        return self._keep

    def check(self) -> None:
        """Check every event (times in order, ids, rewards, items, context columns) in a
        first pass over those columns, so that a bad row late in the log stops the run
        before anything is trained or written. Once passed, a no-op."""
        if self._checked_whole:
            return
        flat = [name for name in event_columns(self.schema)
                if not pa.types.is_list(self.dataset.schema.field(name).type)]
        for _ in self._checked_batches(flat):
            pass
        self._checked_whole = True

    def _checked_batches(self, read: list[str] | None = None
                         ) -> Iterator[tuple[pa.RecordBatch, _Checked]]:
        """Every record batch cut at ``until``, with its checked columns, in order; ``read``
        names the columns to read (default: all the schema reads)."""
        columns = self.columns
        context = [n for n in self.schema.context() if read is None or n in read]
        last_time = None
        for batch, where, row in self.record_batches(read or event_columns(self.schema)):
            if batch.num_rows == 0:
                continue
            timestamp = checks.times(batch, columns.timestamp, where, row)
            previous = timestamp[0] if last_time is None else last_time
            back = np.flatnonzero(np.diff(timestamp, prepend=previous) < 0)
            if len(back):
                at = int(back[0])
                before = timestamp[at - 1] if at else last_time
                raise ValueError(f"{where}: row {row + at} goes back in time ({columns.timestamp} "
                                 f"{int(timestamp[at])} after {int(before)}); streaming reads "
                                 "events in file order, so sort the files by time (across "
                                 "files in path order) or load the log in memory")
            last_time, read = int(timestamp[-1]), batch.num_rows
            stop = read if self.until is None else int(np.searchsorted(timestamp, self.until))
            batch, timestamp = batch.slice(0, stop), timestamp[:stop]
            user = checks.ids(batch, columns.user, where, row)
            item = checks.ids(batch, columns.item, where, row)
            reward = checks.rewards(batch, columns.reward, where, row)
            for name in context:
                if not pa.types.is_list(batch.schema.field(name).type):
                    checks.column(batch, name, where, row)
            item_row, known = self.corpus.lookup(item)
            unknown = unknown_items(known, item, self.schema.missing_items, where, row)
            yield batch, _Checked(user, item, item_row, known, timestamp, reward, unknown, read)
            if stop < read:
                return

    def _checked(self) -> Iterator[_Piece]:
        """Every record batch checked, filtered and with its histories, in order."""
        keep = self._cleaning()
        state = HistoryState(self.columns.history_length, self.columns.ordered)
        context = self.schema.context()
        position = 0
        self.report = {"events_read": 0, "events_unknown_item": 0, **self._cleaning_report,
                       "events_kept": 0}
        for batch, c in self._checked_batches():
            stop = len(c.user)
            self.report["events_read"] += stop
            self.report["events_unknown_item"] += c.unknown
            known = c.known if keep is None else c.known & keep[position:position + stop]
            position += c.read
            rows = np.flatnonzero(known)
            self.report["events_kept"] += len(rows)
            history = state.extend(c.user[rows], c.timestamp[rows], c.item_row[rows])
            yield _Piece(c.user[rows], c.item[rows], c.item_row[rows], c.timestamp[rows],
                         c.reward[rows], history,
                         {n: pa.chunked_array([batch.column(n).take(pa.array(rows))])
                          for n in context})
            if stop < c.read:
                self.report["stopped_at"] = self.until

    def pieces(self, multiple_of: int = 1, piece_rows: int = 1 << 18) -> Iterator[Interactions]:
        """The stream as :class:`Interactions` of about ``piece_rows`` events each, every
        piece but the last a multiple of ``multiple_of`` events (whole training batches)."""
        size = max(multiple_of, piece_rows // multiple_of * multiple_of)
        buffered: list[_Piece] = []
        for piece in self._checked():
            buffered.append(piece)
            total = sum(len(p) for p in buffered)
            if total >= size:
                joined = _Piece.concat(buffered)
                cut = total // multiple_of * multiple_of
                yield self._interactions(joined.slice(0, cut))
                buffered = [joined.slice(cut, total)]
        if buffered and sum(len(p) for p in buffered):
            yield self._interactions(_Piece.concat(buffered))

    def _interactions(self, piece: _Piece) -> Interactions:
        context = dict(piece.context)
        context.update(history_features(piece.history_rows, self.corpus, self.schema.histories(),
                                        f"items {self.schema.items.path}"))
        return Interactions(self.columns, piece.user, piece.item, piece.item_row, piece.timestamp,
                            piece.reward, piece.history_rows, self.corpus.table, self.corpus.keys,
                            {}, context)


class StreamingTrainingData:
    """A :class:`~twotower.train.TrainingData` look-alike fed from an :class:`EventStream`.

    ``train()`` reads ``queries``, ``item_row``, ``item_key`` and ``reward`` at each batch
    it is given; :meth:`batches` points them at the current piece of the stream before
    yielding that piece's batches, so only one piece is ever encoded. ``items`` (the
    corpus) is encoded once. ``rows`` only has a length (for progress); the exact
    ``oracle`` correction, which needs every event's item first, is not available.
    """

    def __init__(self, stream: EventStream, model_config: ModelConfig,
                 piece_rows: int = 1 << 18) -> None:
        self.stream, self.model_config, self.piece_rows = stream, model_config, piece_rows
        corpus = stream.corpus
        self.items = EncodedFeatures(model_config.item_features, model_config.tables,
                                     item_columns(stream.columns, corpus.table, corpus.keys),
                                     "items")
        self.rows = range(stream.count())
        self.queries: EncodedFeatures | None = None
        self.item_row = self.item_key = np.zeros(0, dtype=np.int64)
        self.reward = np.zeros(0, dtype=np.float32)

    def batches(self, batch_size: int, shuffle_seed: tuple[int, int] | None = None
                ) -> Iterator[np.ndarray]:
        """Batches of the stream, as row indices into the current piece: consecutive, or
        shuffled within each piece (a shuffle buffer of ``piece_rows`` events) when a
        ``shuffle_seed`` is given."""
        rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        names = [f.name for f in self.model_config.query_features]
        for piece in self.stream.pieces(batch_size, self.piece_rows):
            self.queries = EncodedFeatures(self.model_config.query_features,
                                           self.model_config.tables,
                                           piece.query_columns(names), "events")
            self.item_row, self.item_key, self.reward = piece.item_row, piece.item, piece.reward
            order = np.arange(len(piece)) if rng is None else rng.permutation(len(piece))
            for start in range(0, len(piece), batch_size):
                rows = order[start:start + batch_size]
                if len(rows) >= 2:
                    yield rows

    @property
    def name(self) -> str:
        """Names the input for a resumed run: the files and the cut-off."""
        return f"stream:{self.stream.schema.events.path}:until={self.stream.until}:{len(self.rows)}"

    @property
    def report(self) -> dict:
        return self.stream.report

