"""A faiss inner-product index over item embeddings, addressed by item key.

The model scores with a plain inner product at serving time, so the index is always
built with ``METRIC_INNER_PRODUCT`` (an L2 index would rank differently unless every
embedding had the same norm). ``"auto"`` picks exact search (``"Flat"``) below
``EXACT_BELOW`` items and HNSW above; any faiss factory string works (for example
``"IVF4096,PQ13"`` for a corpus that must not be held in full).

An approximate index is checked when it is built: recall@100 against exact search over
the same vectors, on sampled queries, is measured and stored with it, and its search
parameter (HNSW ``efSearch``, IVF ``nprobe``) is raised until that recall reaches
``target_recall`` unless the caller fixes it.

Popularity penalty. With ``log_popularity`` (log p_hat of each item, from the model's
frequency estimator) the index stores one extra column, so that a query ``[u, -beta]``
scores ``<u, v> - beta * log p_hat`` by plain inner product, for any per-query beta, and
approximate search honours it. The column is stored centred and scaled,
``scale * (log p_hat - shift)``, with the query coordinate ``-beta / scale`` and the
constant ``beta * shift`` added back, so scores are unchanged. The scale matters for HNSW:
its graph links items by inner product over all stored columns, and raw log p_hat (spread
of several units against about ``1 / sqrt(dim)`` per embedding coordinate) would make
neighbours by popularity rather than by content and cost recall at beta = 0. Scaled to
the spread of one embedding coordinate it leaves the graph almost as it would be without it.

faiss is imported lazily so the library starts fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from twotower.checkpoint import (
    WEIGHTS,
    atomic_write,
    fresh_directory,
    model_files,
    sha256_of,
    versions,
)

if TYPE_CHECKING:
    from twotower.frequency import StreamingFrequencyEstimator
    from twotower.towers import TwoTowerModel

__all__ = ["EXACT_BELOW", "RECALL_K", "ItemIndex", "check_built_from", "choose_factory",
           "index_items", "model_fingerprint", "recall_at_k"]

KEYS = "keys.npy"
FAISS = "index.faiss"
META = "index.json"
EMBEDDINGS = "embeddings.npy"
POPULARITY = "log_popularity.npy"
LABELS = "labels.json"
_FILES = frozenset({KEYS, FAISS, META, EMBEDDINGS, POPULARITY, LABELS})

EXACT_BELOW = 100_000
RECALL_K = 100
# Search-parameter ladders tried in order until the measured recall reaches the target.
_EF_SEARCH = (128, 192, 256, 384, 512, 768, 1024, 2048)


def choose_factory(num_items: int, exact_below: int = EXACT_BELOW) -> str:
    """Exact search for small corpora, HNSW (more links per node past a million) above."""
    if num_items < exact_below:
        return "Flat"
    return "HNSW16" if num_items <= 2_000_000 else "HNSW32"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ truth| / |truth|`` (``[num_queries, k]`` ids, -1 pads)."""
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(int((t >= 0).sum()), 1)
            for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _search_ladder(index: object, factory: str) -> tuple[str, list[int]] | None:
    """The parameter that trades speed for recall in ``index``, and the values to try."""
    import faiss

    if "IVF" in factory:
        nlist = faiss.extract_index_ivf(index).nlist
        return "nprobe", [p for p in (2 ** i for i in range(20)) if p < nlist] + [nlist]
    if "HNSW" in factory:
        return "efSearch", list(_EF_SEARCH)
    return None


def _written_by_us(meta: Path) -> bool:
    """Whether ``meta`` is an index description that :meth:`ItemIndex.save` wrote."""
    try:
        return "twotower" in json.loads(meta.read_text()).get("versions", {})
    except (OSError, ValueError, AttributeError):
        return False


def _replace_directory(directory: Path, write: Callable[[Path], None]) -> None:
    """Write a fresh sibling directory, then rename it into place.

    A reader sees the old directory or the new one, never a mix of their files (between
    the two renames, for an instant, neither: a loader then fails and can retry). An
    existing directory is only replaced if it holds nothing but index files, so nothing
    twotower did not write is ever deleted.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"index output {directory} is a file, not a directory; choose "
                         "another output directory")
    present = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    foreign = [name for name in present if name not in _FILES]
    if foreign or (present and not _written_by_us(directory / META)):
        what = f"files an index does not ({', '.join(foreign[:5])})" if foreign else \
            f"a {META} that twotower did not write"
        raise ValueError(f"index output {directory} is not an index directory: it holds "
                         f"{what}; refusing to replace it (choose another output directory, "
                         "or an empty one)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    fresh = fresh_directory(directory.parent, f".{directory.name}.new.")
    old = None
    try:
        write(fresh)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old)
        os.replace(fresh, directory)
        dir_fd = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for leftover in (fresh, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


class ItemIndex:
    """Top-K items by inner product: ``search(queries, k) -> (scores, keys)``.

    ``dim`` is the embedding width queries have; the stored vectors have one more
    column when the index carries log popularity (``popularity`` is then
    ``{"scale": s, "shift": m}``). ``meta`` holds the build parameters and the measured
    recall, as written to ``index.json``.
    """

    def __init__(self, index: object, keys: np.ndarray, factory: str,
                 embeddings: np.ndarray | None = None,
                 log_popularity: np.ndarray | None = None,
                 labels: list[str | int] | None = None, meta: dict | None = None) -> None:
        self.index = index
        self.keys = np.asarray(keys, dtype=np.int64)
        self.factory = factory
        self.embeddings = embeddings
        self.log_popularity = log_popularity
        self.labels = labels
        self.meta = dict(meta or {})
        self.popularity: dict[str, float] | None = self.meta.get("popularity")
        self.dim = int(self.meta.get("dim", index.d - (self.popularity is not None)))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def recall(self) -> float | None:
        """Recall@100 against exact search measured at build time (1.0 when exact)."""
        return (self.meta.get("recall") or {}).get(f"recall@{RECALL_K}")

    @classmethod
    def build(cls, embeddings: np.ndarray, keys: np.ndarray, factory: str = "auto", *,
              log_popularity: np.ndarray | None = None,
              labels: Sequence[str | int] | None = None,
              search_params: dict[str, int] | None = None, exact_below: int = EXACT_BELOW,
              target_recall: float = 0.95, recall_queries: np.ndarray | None = None,
              num_recall_queries: int = 1000, recall_penalties: Sequence[float] = (0.0,),
              seed: int = 0, info: dict | None = None) -> ItemIndex:
        """Index ``embeddings`` ``[num_items, dim]`` whose rows belong to items ``keys``.

        Args:
            factory: a faiss factory string, or ``"auto"`` (see :func:`choose_factory`).
            log_popularity: ``[num_items]`` log p_hat, folded in as one extra column so
                searches can take a popularity penalty.
            labels: the items' original keys when ``keys`` cannot show them: strings
                (``keys`` then holds their 64-bit hashes) or unsigned integers from 2**63
                (``keys`` holds the same 64 bits as negative ``int64``); returned instead
                of ``keys`` by the recommender.
            search_params: fixes e.g. ``{"efSearch": 256}`` instead of tuning it.
            recall_queries: ``[num_queries, dim]`` queries for the recall check; default: a
                sample of the item embeddings themselves.
            recall_penalties: popularity penalties at which recall is measured; the
                search parameter is tuned until every one reaches ``target_recall``.
            info: anything worth keeping in ``index.json`` (model, items table, ...).
        """
        import faiss

        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(keys):
            raise ValueError(f"embeddings must be [num_items, dim] with one row per key; got "
                             f"shape {embeddings.shape} for {len(keys)} keys")
        if not np.isfinite(embeddings).all():
            raise ValueError("item embeddings contain NaN or infinite values")
        if labels is not None and len(labels) != len(keys):
            raise ValueError(f"{len(labels)} labels for {len(keys)} keys")
        factory = choose_factory(len(keys), exact_below) if factory == "auto" else factory
        meta: dict = {"factory": factory, "size": len(keys), "dim": embeddings.shape[1],
                      "metric": "inner_product", "popularity": None, "info": info or {}}
        stored = embeddings
        if log_popularity is not None:
            log_popularity = np.asarray(log_popularity, dtype=np.float32)
            if log_popularity.shape != (len(keys),) or not np.isfinite(log_popularity).all():
                raise ValueError("log_popularity must be [num_items] finite values")
            shift = float(log_popularity.mean()) if len(keys) else 0.0
            spread = float(log_popularity.std()) if len(keys) else 0.0
            width = float(embeddings.std()) if len(keys) else 0.0
            scale = width / spread if spread > 0 and width > 0 else 1.0
            meta["popularity"] = {"scale": scale, "shift": shift}
            column = (scale * (log_popularity - shift)).astype(np.float32)[:, None]
            stored = np.hstack([embeddings, column])
        index = faiss.index_factory(stored.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in factory and "IVF" not in factory:
            hnsw = faiss.downcast_index(index).hnsw
            hnsw.efConstruction = max(40, 2 * hnsw.nb_neighbors(1))  # 2 M, at least 40
            meta["build_params"] = {"efConstruction": hnsw.efConstruction}
        if not index.is_trained:
            index.train(stored)
        index.add(stored)
        approximate = factory != "Flat"
        built = cls(index, keys, factory, embeddings if approximate else None,
                    log_popularity, list(labels) if labels is not None else None, meta)
        if approximate:
            if recall_queries is None:
                rng = np.random.default_rng(seed)
                sample = rng.choice(len(keys), min(num_recall_queries, len(keys)), replace=False)
                recall_queries = embeddings[np.sort(sample)]
            built._tune(np.asarray(recall_queries, np.float32), stored, search_params or {},
                        target_recall, recall_penalties)
        else:
            built.meta["recall"] = {f"recall@{RECALL_K}": 1.0, "exact": True}
        return built

    def _tune(self, queries: np.ndarray, stored: np.ndarray, fixed: dict[str, int],
              target: float, penalties: Sequence[float]) -> None:
        """Set the search parameter (fixed, or the cheapest reaching ``target``) and record
        the recall@100 measured against exact search over the same stored vectors."""
        import faiss

        exact = ItemIndex(faiss.IndexFlatIP(stored.shape[1]), self.keys, "Flat",
                          meta=self.meta | {"factory": "Flat"})
        exact.index.add(stored)
        truth = {beta: exact.search(queries, RECALL_K, beta)[1] for beta in penalties}
        ladder = _search_ladder(self.index, self.factory)
        trials = [dict(fixed)] if fixed or ladder is None else \
            [{ladder[0]: value} for value in ladder[1]]
        for params in trials:
            self.set_search_params(params)
            by_penalty = {str(beta): recall_at_k(self.search(queries, RECALL_K, beta)[1],
                                                 truth[beta]) for beta in penalties}
            if min(by_penalty.values()) >= target:
                break
        self.meta["recall"] = {f"recall@{RECALL_K}": by_penalty[str(penalties[0])],
                               "by_penalty": by_penalty, "queries": len(queries),
                               "target": target, "tuned": not fixed and ladder is not None}

    def set_search_params(self, params: dict[str, int]) -> None:
        """Apply faiss search parameters (``efSearch``, ``nprobe``, ...) and remember them."""
        import faiss

        space = faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self.index, name, value)
        self.meta["search_params"] = dict(params)

    def search_rows(self, queries: np.ndarray, k: int,
                    popularity_penalty: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """``[num_queries, k]`` scores and row numbers, best first (row -1 pads a short list).

        Scores are ``<u, v> - beta * log p_hat`` with ``beta = popularity_penalty`` (one
        value, or one per query).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [num_queries, {self.dim}], got {queries.shape}")
        beta = np.broadcast_to(np.asarray(popularity_penalty, np.float32), (len(queries),))
        if not np.isfinite(beta).all():
            raise ValueError("popularity_penalty must be finite")
        if self.popularity is not None:
            extra = -beta / np.float32(self.popularity["scale"])
            queries = np.ascontiguousarray(np.hstack([queries, extra[:, None]]))
        elif beta.any():
            raise ValueError("this index has no popularity column, so popularity_penalty must "
                             "be 0; rebuild it from a model with a frequency estimator")
        k = min(k, len(self.keys))
        scores, rows = self.index.search(queries, k)
        if self.popularity is not None:
            scores -= beta[:, None] * np.float32(self.popularity["shift"])
        return scores, rows

    def search(self, queries: np.ndarray, k: int,
               popularity_penalty: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """``[num_queries, k]`` scores and item keys, best first (key -1 pads a short list)."""
        scores, rows = self.search_rows(queries, k, popularity_penalty)
        return scores, np.where(rows >= 0, self.keys[np.maximum(rows, 0)], -1)

    def describe(self) -> dict:
        """What a service reports about its index: kind, size, parameters, recall."""
        return {key: self.meta.get(key) for key in (
            "factory", "size", "dim", "metric", "build_params", "search_params", "recall",
            "popularity", "info", "versions")}

    def save(self, directory: str | Path) -> Path:
        """Write the index, its keys and its parameters into ``directory``, atomically."""
        import faiss

        directory = Path(directory)
        meta = {**self.meta, "factory": self.factory, "size": len(self.keys), "dim": self.dim,
                "metric": "inner_product", "versions": {**versions(),
                                                        "faiss": faiss.__version__}}

        def write(target: Path) -> None:
            atomic_write(target / KEYS, lambda p: _save_npy(p, self.keys))
            if self.embeddings is not None:
                atomic_write(target / EMBEDDINGS, lambda p: _save_npy(p, self.embeddings))
            if self.log_popularity is not None:
                atomic_write(target / POPULARITY, lambda p: _save_npy(p, self.log_popularity))
            if self.labels is not None:
                atomic_write(target / LABELS, lambda p: p.write_text(json.dumps(self.labels)))
            atomic_write(target / FAISS, lambda p: faiss.write_index(self.index, str(p)))
            # Written last, with the size and sha256 of every other file: load checks them.
            meta["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                             for p in sorted(target.iterdir())}
            atomic_write(target / META, lambda p: p.write_text(json.dumps(meta, indent=2)))

        _replace_directory(directory, write)
        self.meta = meta
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ItemIndex:
        """Read an index directory written by :meth:`save` (embeddings are memory-mapped).

        Every file is checked against the size and sha256 that ``index.json`` records, so
        a damaged index is an error naming the file, never served.
        """
        import faiss

        directory = Path(directory)
        if not (directory / META).exists():
            raise FileNotFoundError(f"{directory} is not an index directory (no {META})")
        try:
            meta = json.loads((directory / META).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {directory / META}: {error}") from None
        files = _verify(directory, meta)
        try:
            keys = np.load(directory / KEYS, allow_pickle=False)
            index = faiss.read_index(str(directory / FAISS))
        except (OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"cannot read index directory {directory}: {error}") from None
        if index.ntotal != len(keys):
            raise ValueError(f"{directory}: index holds {index.ntotal} vectors but "
                             f"{len(keys)} keys")

        def optional(name: str) -> np.ndarray | None:
            return np.load(directory / name, mmap_mode="r", allow_pickle=False) \
                if name in files else None

        labels = json.loads((directory / LABELS).read_text()) if LABELS in files else None
        loaded = cls(index, keys, meta["factory"], optional(EMBEDDINGS), optional(POPULARITY),
                     labels, meta)
        if loaded.popularity is not None and index.d != loaded.dim + 1:
            raise ValueError(f"{directory}: index width {index.d} does not fit dim "
                             f"{loaded.dim} plus a popularity column")
        if meta.get("search_params"):
            loaded.set_search_params(meta["search_params"])
        return loaded


def _verify(directory: Path, meta: object) -> set[str]:
    """The index's files, each checked against its size and sha256 in ``index.json``."""
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or KEYS not in files or FAISS not in files:
        raise ValueError(f"{directory / META} lists no checksums of the index files (written "
                         "by an older twotower, or not by twotower); rebuild the index with "
                         "`twotower index`")
    for name, expected in files.items():
        path = directory / name
        if name not in _FILES or name == META or not isinstance(expected, dict):
            raise ValueError(f"{directory / META} is damaged: its entry for {name!r} is not "
                             "one the index writes; rebuild the index with `twotower index`")
        if not path.is_file():
            raise ValueError(f"index {directory} is damaged: {name} is missing; rebuild it "
                             "with `twotower index`")
        size = path.stat().st_size
        if size != expected.get("bytes") or sha256_of(path) != expected.get("sha256"):
            change = f"has {size} bytes, {META} says {expected.get('bytes')}" \
                if size != expected.get("bytes") else f"does not match its sha256 in {META}"
            raise ValueError(f"index {directory} is damaged: {name} {change} (changed after "
                             "it was written); rebuild it with `twotower index`")
    return set(files)


def model_fingerprint(model_dir: str | Path) -> str:
    """BLAKE2b of a model's weights file: ties an index to the model that embedded its items."""
    digest = hashlib.blake2b(digest_size=16)
    with open(model_files(model_dir) / WEIGHTS, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_built_from(index: ItemIndex, model_dir: str | Path, where: str) -> None:
    """Raise ``ValueError`` unless ``index`` records the fingerprint of ``model_dir``'s weights.

    An index that records none is refused too: nothing then ties its vectors to this
    model, and serving another model's vectors gives confident nonsense.
    """
    info = index.meta.get("info")
    built_from = info.get("model_fingerprint") if isinstance(info, dict) else None
    rebuild = f"rebuild it with `twotower index {model_dir} --items ITEMS`"
    if built_from is None:
        raise ValueError(f"{where} records no model fingerprint; {rebuild}")
    if built_from != model_fingerprint(model_dir):
        raise ValueError(f"{where} was built from another model than {model_dir} (or from an "
                         f"earlier state of it, before more training); {rebuild}")


def index_items(model_dir: str | Path, items: str | Path, factory: str = "auto",
                popularity: bool = True, batch_size: int = 8192,
                loaded: tuple[TwoTowerModel, StreamingFrequencyEstimator | None, dict] | None
                = None, **options) -> ItemIndex:
    """Embed every item of an items table with a model's item tower and index them.

    Items never seen in training are embedded from their features like any other. With
    ``popularity`` (and a model that has a frequency estimator) log p_hat is folded in,
    and recall is also measured at beta = temperature. ``loaded`` is what
    ``load_model(model_dir)`` returned, for a caller that holds it already (one read of
    the weights, and the same weights on both sides). ``options`` go to
    :meth:`ItemIndex.build`.
    """
    import pyarrow as pa

    from twotower.checkpoint import load_model
    from twotower.data.checks import ids
    from twotower.data.interactions import lists_from_text, read_table
    from twotower.evaluate import embed
    from twotower.features import EncodedFeatures

    model, estimator, config = loaded or load_model(model_dir)
    lists = [f.name for f in model.config.item_features if f.kind == "id_list"]
    table = lists_from_text(read_table(items, "items"), lists)
    where = f"items {items}"
    columns = config.get("columns") or {}
    key_column = columns.get("item_key") or columns.get("item", "item_id")
    if key_column not in table.column_names:
        raise KeyError(f"{where}: item key column {key_column!r} not found; columns are "
                       f"{table.column_names}")
    keys = ids(table, key_column, where)
    column = table.column(key_column)
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        first = np.flatnonzero(np.isin(keys, unique[counts > 1]))
        shown = list(dict.fromkeys(column.take(first).to_pylist()))[:5]
        raise ValueError(f"{where}: {int((counts > 1).sum())} duplicate item key(s) in column "
                         f"{key_column!r}, for example {shown}")
    if pa.types.is_integer(column.type):  # uint64 keys from 2**63 wrap in int64: keep them
        labels = column.to_pylist() if (keys < 0).any() and pa.types.is_uint64(column.type) \
            else None
    else:
        labels = [str(v) for v in column.to_pylist()]
    specs = model.config.item_features
    names = {f.name for f in specs} | {f.weights for f in specs if f.weights}
    found = {n: table.column(n) for n in table.column_names if n in names}
    # The item id feature is named after the events' item column, which the items table
    # may call otherwise (``item_key``).
    found.setdefault(columns.get("item", key_column), keys)
    features = EncodedFeatures(specs, model.config.tables, found, where)
    embeddings = embed(model, features, "item", batch_size=batch_size).numpy()
    log_p = None
    if popularity and estimator is not None:
        log_p = np.log(estimator.probability(keys))
        options.setdefault("recall_penalties", (0.0, model.config.temperature))
    info = {"model_dir": str(Path(model_dir).resolve()), "items": str(Path(items).resolve()),
            "model_fingerprint": model_fingerprint(model_dir),
            "model_versions": config.get("versions")}
    return ItemIndex.build(embeddings, keys, factory, log_popularity=log_p, labels=labels,
                           info=info, **options)
