"""Feature specs and their encoding: hashed ids, bags of ids and dense values.

No feature keeps a vocabulary. An ``id`` is hashed into a fixed number of buckets of
an embedding table, so an id never seen before still gets a row, and the same id lands
in the same row in every process (see :mod:`twotower.hashing`). An ``id_list`` (a bag
of ids, for example a watch history) is mean-pooled, optionally weighted, and may share
its table with an ``id`` feature of the same id space. ``dense`` features are numbers.

Encoding happens once per table of rows, in numpy (:class:`EncodedFeatures`); a batch
is then a cheap gather (:meth:`EncodedFeatures.take`) that yields the tensors the
towers read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from twotower.hashing import hash_buckets, seed_for, to_int64_ids

__all__ = ["LIST_KINDS", "Bag", "EncodedFeatures", "FeatureSpec", "TableSpec", "bag_from_arrow",
           "newest", "newest_first", "take_bag"]

FeatureKind = Literal["id", "id_list", "sequence", "dense"]
KINDS: tuple[str, ...] = ("id", "id_list", "sequence", "dense")
LIST_KINDS: tuple[str, ...] = ("id_list", "sequence")  # features given as lists of ids


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: ``num_buckets`` hashed rows of width ``dim``."""

    num_buckets: int
    dim: int

    def __post_init__(self) -> None:
        if self.num_buckets < 1 or self.dim < 1:
            raise ValueError(f"table needs num_buckets >= 1 and dim >= 1, got {self}")


@dataclass(frozen=True)
class FeatureSpec:
    """One input of a tower.

    ``table`` names the embedding table of an ``id`` or ``id_list`` feature (default: the
    feature's own name); two features naming the same table share it. ``weights``
    names a list column of per-id weights for an ``id_list`` (a weighted mean instead
    of a plain one). ``width`` is the number of values of a ``dense`` feature. A
    ``sequence`` is a list of ids whose order matters (oldest first), read by a small
    self-attention encoder over its newest ``length`` ids; an ``id_list`` with a
    ``length`` (a history of item ids) is cut to its newest ``length`` ids too, so a query
    may give a user's whole history and the model reads what training read.
    """

    name: str
    kind: FeatureKind
    table: str | None = None
    weights: str | None = None
    width: int = 1
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"feature {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}"
            )
        if self.kind == "dense" and self.width < 1:
            raise ValueError(f"dense feature {self.name!r}: width must be >= 1")
        if self.weights is not None and self.kind != "id_list":
            raise ValueError(f"feature {self.name!r}: only an id_list feature takes weights")
        if self.kind == "sequence" and (self.length is None or self.length < 1):
            raise ValueError(f"sequence feature {self.name!r}: give its length (>= 1), the "
                             "newest ids the encoder reads")

    @property
    def table_name(self) -> str:
        return self.table or self.name

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Bag:
    """Bags of ids in CSR form: bag ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    ``weights`` (optional, same length as ``values``) weight each id in the mean.
    """

    values: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence],
                   weights: Sequence[Sequence] | None = None) -> Bag:
        """A bag from Python lists (convenient for requests and tests)."""
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [v for x in lists for v in x]
        values = to_int64_ids(np.asarray(flat)) if flat else np.zeros(0, np.int64)
        flat_w = None
        if weights is not None:
            flat_w = np.asarray([w for x in weights for w in x], dtype=np.float32)
            if len(flat_w) != len(values):
                raise ValueError("bag weights must have one weight per id")
        return cls(values, offsets, flat_w)


def bag_from_arrow(column: pa.Array | pa.ChunkedArray, name: str, numeric: bool = False,
                   where: str = "input", first_row: int = 0) -> Bag:
    """A :class:`Bag` from an Arrow list column (null lists become empty bags).

    With ``numeric`` the list holds numbers (weights), kept as ``float32`` in ``weights``.
    A null id inside a list is an error naming ``where`` and its row, counted from
    ``first_row``.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TypeError(f"id_list feature {name!r} needs a list column, "
                        f"got Arrow type {column.type}")
    if column.null_count:
        column = column.fill_null(pa.scalar([], type=column.type))
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    if numeric:
        numbers = values.to_numpy(zero_copy_only=False).astype(np.float32)
        return Bag(np.zeros(len(numbers), np.int64), offsets - offsets[0], numbers)
    if values.null_count:
        position = np.argmax(values.is_null().to_numpy(zero_copy_only=False))
        row = first_row + int(np.searchsorted(offsets - offsets[0], position, "right")) - 1
        raise ValueError(f"{where}: id_list {name!r} holds {values.null_count} null id(s), "
                         f"first in the list at row {row}")
    return Bag(to_int64_ids(values), offsets - offsets[0])


def take_bag(bag: Bag, rows: np.ndarray) -> Bag:
    """Bags ``rows`` of ``bag`` in a new :class:`Bag`, gathered without a Python loop."""
    starts, ends = bag.offsets[rows], bag.offsets[rows + 1]
    lengths = ends - starts
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Position k of the output reads values[starts[bag of k] + (k - offsets[bag of k])].
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    weights = None if bag.weights is None else bag.weights[index]
    return Bag(bag.values[index], offsets, weights)


def newest(bag: Bag, length: int) -> Bag:
    """Each bag cut to its last (newest) ``length`` ids; shorter bags as they are."""
    lengths = np.diff(bag.offsets)
    if len(lengths) == 0 or lengths.max(initial=0) <= length:
        return bag
    kept = np.minimum(lengths, length)
    starts = bag.offsets[1:] - kept
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    index = np.repeat(starts - offsets[:-1], kept) + np.arange(offsets[-1])
    return Bag(bag.values[index], offsets,
               None if bag.weights is None else bag.weights[index])


def newest_first(bag: Bag, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``, each ``[len(bag), length]``: every bag's newest ``length`` ids (its
    last ones) from the newest on, padded with 0 where ``mask`` is false. A longer bag is
    cut to its newest ids, as training's history features are."""
    lengths = np.minimum(np.diff(bag.offsets), length)
    mask = np.arange(length)[None, :] < lengths[:, None]
    ids = np.zeros((len(lengths), length), dtype=np.int64)
    # Position p of row r holds values[end_r - 1 - p], the p-th newest id.
    ends = bag.offsets[1:]
    rows, positions = np.nonzero(mask)
    ids[rows, positions] = bag.values[ends[rows] - 1 - positions]
    return ids, mask


def _mean_weights(bag: Bag) -> np.ndarray:
    """Per-id weights that turn a weighted sum into the (weighted) mean of each bag."""
    lengths = np.diff(bag.offsets)
    raw = np.ones(len(bag.values), np.float32) if bag.weights is None else bag.weights
    totals = np.add.reduceat(raw, bag.offsets[:-1][lengths > 0]) if len(raw) else raw
    per_bag = np.ones(len(lengths), np.float32)
    per_bag[lengths > 0] = totals
    per_bag[per_bag == 0] = 1.0
    return (raw / np.repeat(per_bag, lengths)).astype(np.float32)


class EncodedFeatures:
    """The features of many rows, hashed into table buckets once, ready to gather.

    ``id`` features are stored as ``int64`` bucket arrays ``[n]``, ``id_list`` features
    as a :class:`Bag` of buckets with mean weights, ``dense`` features as ``float32``
    ``[n, width]``. ``first_row`` is the number of the first of these rows in their file
    (a file read in batches), so an error names a row a user can look up.
    """

    def __init__(self, specs: Sequence[FeatureSpec], tables: Mapping[str, TableSpec],
                 columns: Mapping[str, object], where: str = "input",
                 first_row: int = 0) -> None:
        self.specs = list(specs)
        self.data: dict[str, object] = {}
        lengths = set()
        for spec in self.specs:
            if spec.name not in columns:
                raise KeyError(
                    f"{where}: feature {spec.name!r} ({spec.kind}) is missing; "
                    f"got columns {sorted(columns)}"
                )
            weights = None
            if spec.weights is not None:
                if spec.weights not in columns:
                    raise KeyError(f"{where}: weights column {spec.weights!r} of feature "
                                   f"{spec.name!r} is missing")
                weights = columns[spec.weights]
            encoded = _encode(spec, tables, columns[spec.name], where, weights, first_row)
            self.data[spec.name] = encoded
            lengths.add(len(encoded))
        if len(lengths) > 1:
            raise ValueError(f"{where}: features have different numbers of rows: {sorted(lengths)}")
        self.num_rows = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self.num_rows

    def take(self, rows: np.ndarray | slice, device: torch.device | str = "cpu") -> dict:
        """Tensors of rows ``rows`` (an index array or a slice), as the towers read them."""
        if isinstance(rows, slice):
            rows = np.arange(self.num_rows)[rows]
        rows = np.asarray(rows, dtype=np.int64)
        batch: dict[str, object] = {}
        for spec in self.specs:
            value = self.data[spec.name]
            if spec.kind == "sequence":
                ids, mask = newest_first(take_bag(value, rows), spec.length)
                batch[spec.name] = (torch.from_numpy(ids).to(device),
                                    torch.from_numpy(mask).to(device))
            elif spec.kind == "id_list":
                bag = take_bag(value, rows)
                batch[spec.name] = (
                    torch.from_numpy(bag.values).to(device),
                    torch.from_numpy(bag.offsets[:-1]).to(device),
                    torch.from_numpy(bag.weights).to(device),
                )
            else:
                batch[spec.name] = torch.from_numpy(value[rows]).to(device)
        return batch


def _null_row(column: object, first_row: int) -> str:
    """`` (first at row N)`` for the first null of an Arrow column, else nothing."""
    if not isinstance(column, pa.Array | pa.ChunkedArray) or not column.null_count:
        return ""
    nulls = column.is_null()
    return f" (first at row {first_row + int(np.argmax(nulls.to_numpy(zero_copy_only=False)))})"


def _bag_weights(bag: Bag, column: object, spec: FeatureSpec, where: str,
                 first_row: int) -> np.ndarray:
    """The weights column of an id_list, checked against its bags."""
    if isinstance(column, pa.Array | pa.ChunkedArray):
        weights = bag_from_arrow(column, spec.weights, numeric=True)
        offsets, values = weights.offsets, weights.weights
    else:
        lists = list(column)
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        values = [w for x in lists for w in x]
    if not np.array_equal(offsets, bag.offsets):
        raise ValueError(f"{where}: weights {spec.weights!r} of feature {spec.name!r} do not "
                         "have one weight per id")
    values = np.asarray(values, dtype=np.float32)
    bad = ~(np.isfinite(values) & (values >= 0))
    if bad.any():
        row = first_row + int(np.searchsorted(offsets, np.argmax(bad), side="right")) - 1
        raise ValueError(f"{where}: weights {spec.weights!r} of feature {spec.name!r} must be "
                         f"finite and non-negative, first bad one at row {row}")
    return values


def _encode(spec: FeatureSpec, tables: Mapping[str, TableSpec], column: object,
            where: str, weights: object = None, first_row: int = 0) -> object:
    if spec.kind == "dense":
        values = np.asarray(column.to_numpy(zero_copy_only=False)
                            if isinstance(column, pa.ChunkedArray | pa.Array) else column)
        if values.dtype.kind not in "fiub":
            raise TypeError(f"{where}: dense feature {spec.name!r} must be numeric, "
                            f"got dtype {values.dtype}")
        values = values.astype(np.float32).reshape(len(values), -1)
        if values.shape[1] != spec.width:
            raise ValueError(f"{where}: dense feature {spec.name!r} has width "
                             f"{values.shape[1]}, expected {spec.width}")
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise ValueError(f"{where}: dense feature {spec.name!r} has non-finite values "
                             f"in {int(bad.sum())} row(s), first at row "
                             f"{first_row + int(np.argmax(bad))}")
        return values
    if spec.table_name not in tables:
        raise KeyError(f"{where}: feature {spec.name!r} uses table {spec.table_name!r}, "
                       f"which is not defined; tables: {sorted(tables)}")
    table = tables[spec.table_name]
    seed = seed_for(f"table/{spec.table_name}")
    if spec.kind == "id":
        try:
            ids = to_int64_ids(column)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: id feature {spec.name!r}: {error}"
                              f"{_null_row(column, first_row)}") from None
        return hash_buckets(ids, table.num_buckets, seed)
    if isinstance(column, pa.Array | pa.ChunkedArray):
        bag = bag_from_arrow(column, spec.name, where=where, first_row=first_row)
    elif isinstance(column, Bag):
        bag = column
    else:
        bag = Bag.from_lists(column)
    if weights is not None:
        bag = Bag(bag.values, bag.offsets, _bag_weights(bag, weights, spec, where, first_row))
    if spec.kind == "id_list" and spec.length is not None:
        bag = newest(bag, spec.length)
    buckets = hash_buckets(bag.values, table.num_buckets, seed)
    if spec.kind == "sequence":
        return Bag(buckets, bag.offsets)  # order kept; the encoder weighs the ids itself
    return Bag(buckets, bag.offsets, _mean_weights(bag))
