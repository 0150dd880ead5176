"""Stable hashing of ids into buckets, identical in every process and on every machine.

Python's built-in ``hash`` is salted per process, so ids are hashed with splitmix64
(a fixed, well-mixed 64-bit permutation) in numpy instead. Strings are first turned
into 64-bit integers with BLAKE2b, so an item key never needs a vocabulary.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

__all__ = ["hash_buckets", "seed_for", "splitmix64", "to_int64_ids"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser applied elementwise to a ``uint64`` array (wraps mod 2**64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def seed_for(name: str) -> int:
    """A stable 64-bit seed derived from a name (for example an embedding table's)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _string_to_int64(value: str | bytes) -> int:
    data = value.encode() if isinstance(value, str) else value
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def to_int64_ids(ids: object) -> np.ndarray:
    """Turn ids of any kind (ints, strings, numpy, torch, pyarrow) into an ``int64`` array.

    Integer ids are kept as they are; string ids are hashed with BLAKE2b, each distinct
    string once (the strings are dictionary-encoded first, so long columns stay cheap).
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if isinstance(ids, pa.Array):
        if pa.types.is_integer(ids.type):
            if ids.null_count:
                raise ValueError(f"ids contain {ids.null_count} null value(s)")
            return ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
                or pa.types.is_binary(ids.type) or pa.types.is_large_binary(ids.type)):
            raise TypeError(f"ids must be integers or strings, got Arrow type {ids.type}")
        if ids.null_count:
            raise ValueError(f"ids contain {ids.null_count} null value(s)")
        encoded = pc.dictionary_encode(ids)
        uniques = np.array([_string_to_int64(v) for v in encoded.dictionary.to_pylist()],
                           dtype=np.int64)
        return uniques[encoded.indices.to_numpy(zero_copy_only=False)]
    array = np.asarray(ids)
    if array.dtype.kind in "iu" or array.size == 0:
        return array.astype(np.int64, copy=False)
    if array.dtype.kind in "USO":
        return to_int64_ids(pa.array(array.ravel().tolist())).reshape(array.shape)
    raise TypeError(f"ids must be integers or strings, got dtype {array.dtype}")


def hash_buckets(ids: np.ndarray, num_buckets: int, seed: int = 0) -> np.ndarray:
    """Bucket of each id in ``[0, num_buckets)``: ``splitmix64(id ^ seed) % num_buckets``.

    ``ids`` is an ``int64`` array of any shape (see :func:`to_int64_ids`); the result has
    the same shape and dtype ``int64``.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    x = np.asarray(ids, dtype=np.int64).view(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    return (splitmix64(x) % np.uint64(num_buckets)).astype(np.int64)
