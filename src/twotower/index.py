"""A faiss inner-product index over item embeddings, addressed by item key.

The model scores with a plain inner product at serving time, so the index is always
built with ``METRIC_INNER_PRODUCT`` (an L2 index would rank differently unless every
embedding had the same norm). ``"Flat"`` is exact; any faiss factory string works.
faiss is imported lazily so the library starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twotower.checkpoint import atomic_write, versions

__all__ = ["ItemIndex"]

KEYS = "keys.npy"
FAISS = "index.faiss"
META = "index.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


class ItemIndex:
    """Top-K items by inner product: ``search(queries, k) -> (scores, keys)``."""

    def __init__(self, index: object, keys: np.ndarray, factory: str) -> None:
        self.index = index
        self.keys = np.asarray(keys, dtype=np.int64)
        self.factory = factory

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, embeddings: np.ndarray, keys: np.ndarray, factory: str = "Flat") -> ItemIndex:
        """Index ``embeddings`` ``[num_items, dim]`` whose rows belong to items ``keys``."""
        import faiss

        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(keys):
            raise ValueError(f"embeddings must be [num_items, dim] with one row per key; got "
                             f"shape {embeddings.shape} for {len(keys)} keys")
        if not np.isfinite(embeddings).all():
            raise ValueError("item embeddings contain NaN or infinite values")
        index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(embeddings)
        index.add(embeddings)
        return cls(index, keys, factory)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[num_queries, k]`` scores and item keys, best first (key -1 pads a short list)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.keys))
        scores, rows = self.index.search(queries, k)
        keys = np.where(rows >= 0, self.keys[np.maximum(rows, 0)], -1)
        return scores, keys

    def save(self, directory: str | Path) -> Path:
        """Write the index, its keys and its parameters into ``directory``, atomically."""
        import faiss

        directory = Path(directory)
        meta = {"factory": self.factory, "size": len(self.keys), "dim": self.index.d,
                "metric": "inner_product", "versions": versions()}
        atomic_write(directory / KEYS, lambda p: _save_npy(p, self.keys))
        atomic_write(directory / FAISS, lambda p: faiss.write_index(self.index, str(p)))
        atomic_write(directory / META, lambda p: p.write_text(json.dumps(meta, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ItemIndex:
        """Read an index directory written by :meth:`save`."""
        import faiss

        directory = Path(directory)
        if not (directory / META).exists():
            raise FileNotFoundError(f"{directory} is not an index directory (no {META})")
        meta = json.loads((directory / META).read_text())
        keys = np.load(directory / KEYS, allow_pickle=False)
        index = faiss.read_index(str(directory / FAISS))
        if index.ntotal != len(keys):
            raise ValueError(f"{directory}: index holds {index.ntotal} vectors but "
                             f"{len(keys)} keys")
        return cls(index, keys, meta["factory"])
