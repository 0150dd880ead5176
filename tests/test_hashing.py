"""Tests for stable id hashing: known answers, a pure-Python oracle, cross-process stability."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from twotower.hashing import hash_buckets, seed_for, splitmix64, to_int64_ids

MASK = (1 << 64) - 1
SRC = str(Path(__file__).resolve().parents[1] / "src")


def splitmix64_py(x: int) -> int:
    """splitmix64's finaliser on Python ints, modulo 2**64 (the reference)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def bucket_py(y: int, num_buckets: int, seed: int) -> int:
    return splitmix64_py((y & MASK) ^ (seed & MASK)) % num_buckets


def string_id_py(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little",
                          signed=True)


def test_splitmix64_known_answer():
    # The first output of the splitmix64 generator seeded with 0 (Vigna's reference).
    out = splitmix64(np.array([0], dtype=np.uint64))
    assert int(out[0]) == 0xE220A8397B1DCDAF


def test_splitmix64_matches_python_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**64, size=200, dtype=np.uint64)
    expected = [splitmix64_py(int(v)) for v in x]
    assert splitmix64(x).tolist() == expected


@pytest.mark.parametrize("num_buckets", [1, 2, 7, 1000, 2**20 + 7])
@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 + 5, seed_for("table/item")])
def test_hash_buckets_matches_python_reference(num_buckets, seed):
    rng = np.random.default_rng(num_buckets)
    ids = np.concatenate([
        np.array([0, 1, -1, 2**63 - 1, -(2**63)], dtype=np.int64),
        rng.integers(-(2**63), 2**63 - 1, size=100, dtype=np.int64),
    ])
    got = hash_buckets(ids, num_buckets, seed)
    assert got.dtype == np.int64
    assert got.tolist() == [bucket_py(int(y), num_buckets, seed) for y in ids]


def test_hash_buckets_deterministic_in_range_same_shape():
    rng = np.random.default_rng(1)
    ids = rng.integers(-(10**12), 10**12, size=(3, 4, 5), dtype=np.int64)
    a = hash_buckets(ids, 97, seed=3)
    b = hash_buckets(ids.copy(), 97, seed=3)
    assert a.shape == ids.shape and a.dtype == np.int64
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < 97
    # Another seed is another hash.
    assert not np.array_equal(a, hash_buckets(ids, 97, seed=4))


def test_hash_buckets_rejects_zero_buckets():
    with pytest.raises(ValueError, match="num_buckets"):
        hash_buckets(np.arange(3), 0)


def test_seed_for_is_stable():
    expected = int.from_bytes(hashlib.blake2b(b"table/item", digest_size=8).digest(), "little")
    assert seed_for("table/item") == expected
    assert seed_for("a") != seed_for("b")


_CHILD = """
import json, numpy as np, pyarrow as pa
from twotower.hashing import hash_buckets, seed_for, to_int64_ids
ints = np.arange(-50, 50, dtype=np.int64) * 7919
strs = [f"item-{i}" for i in range(100)] + ["", "é", "日本"]
print(json.dumps({
    "ints": hash_buckets(ints, 1009, seed_for("table/item")).tolist(),
    "str_ids": to_int64_ids(np.array(strs)).tolist(),
    "strs": hash_buckets(to_int64_ids(pa.array(strs)), 1009, 5).tolist(),
    "hash_of_str": hash("item-1"),
}))
"""


def _in_process() -> dict:
    ints = np.arange(-50, 50, dtype=np.int64) * 7919
    strs = [f"item-{i}" for i in range(100)] + ["", "é", "日本"]
    return {
        "ints": hash_buckets(ints, 1009, seed_for("table/item")).tolist(),
        "str_ids": to_int64_ids(np.array(strs)).tolist(),
        "strs": hash_buckets(to_int64_ids(pa.array(strs)), 1009, 5).tolist(),
    }


def test_same_buckets_in_other_processes_with_other_hash_seeds():
    procs = []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # The child processes really had different salts for the built-in hash...
    assert len({r.pop("hash_of_str") for r in results}) > 1
    # ...and still agree with each other and with this process.
    expected = _in_process()
    for r in results:
        assert r == expected


def test_string_ids_agree_across_input_kinds():
    strs = ["a", "bb", "a", "", "é", "日本", "bb"]
    expected = [string_id_py(s) for s in strs]
    as_numpy = to_int64_ids(np.array(strs))
    as_object = to_int64_ids(np.array(strs, dtype=object))
    as_list = to_int64_ids(strs)
    as_arrow = to_int64_ids(pa.array(strs))
    as_large = to_int64_ids(pa.array(strs, type=pa.large_string()))
    as_chunked = to_int64_ids(pa.chunked_array([strs[:3], strs[3:]]))
    as_bytes = to_int64_ids(pa.array([s.encode() for s in strs], type=pa.binary()))
    for got in (as_numpy, as_object, as_list, as_arrow, as_large, as_chunked, as_bytes):
        assert got.dtype == np.int64
        assert got.tolist() == expected


def test_string_ids_keep_shape():
    strs = np.array([["a", "b", "c"], ["d", "a", "b"]])
    got = to_int64_ids(strs)
    assert got.shape == (2, 3)
    assert got[0, 0] == got[1, 1] == string_id_py("a")


def test_integer_ids_agree_across_input_kinds():
    values = [5, -3, 0, 2**40, 5]
    expected = np.array(values, dtype=np.int64)
    for ids in (values, np.array(values, dtype=np.int32 if max(values) < 2**31 else np.int64),
                np.array(values, dtype=np.int64), torch.tensor(values),
                pa.array(values), pa.array(values, type=pa.int64()),
                pa.chunked_array([values[:2], values[2:]])):
        got = to_int64_ids(ids)
        assert got.dtype == np.int64
        assert np.array_equal(got, expected)
    small = to_int64_ids(pa.array([1, 2, 3], type=pa.int8()))
    assert small.dtype == np.int64 and small.tolist() == [1, 2, 3]


@pytest.mark.parametrize("ids", [
    pa.array(["a", None, "c"]),
    pa.array([1, None, 3]),
    pa.chunked_array([["a"], [None]]),
    np.array(["a", None], dtype=object),
    ["a", None],
])
def test_null_ids_raise_value_error(ids):
    with pytest.raises(ValueError, match="null"):
        to_int64_ids(ids)


@pytest.mark.parametrize("ids", [
    np.array([1.0, 2.0]),
    [1.5, 2.5],
    torch.tensor([1.0, 2.0]),
    pa.array([1.0, 2.0]),
    np.array([True, False]),
])
def test_float_ids_raise_type_error(ids):
    with pytest.raises(TypeError, match="integers or strings"):
        to_int64_ids(ids)


@pytest.mark.parametrize("ids", [
    [], np.zeros(0, dtype=np.int64), np.zeros(0), np.array([], dtype=str),
    pa.array([], type=pa.string()), pa.array([], type=pa.int64()), torch.zeros(0),
])
def test_empty_ids_give_empty_int64(ids):
    got = to_int64_ids(ids)
    assert got.dtype == np.int64 and got.size == 0
    buckets = hash_buckets(got, 10)
    assert buckets.dtype == np.int64 and buckets.size == 0


@pytest.mark.parametrize("kind", ["sequential", "strided", "strings"])
def test_buckets_roughly_uniform(kind):
    n, num_buckets = 100_000, 100
    if kind == "sequential":
        ids = np.arange(n, dtype=np.int64)
    elif kind == "strided":
        ids = np.arange(n, dtype=np.int64) * 1024  # low bits all zero
    else:
        ids = to_int64_ids(pa.array([f"user-{i}" for i in range(n)]))
    counts = np.bincount(hash_buckets(ids, num_buckets, seed=7), minlength=num_buckets)
    expected = n / num_buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 99 degrees of freedom: mean 99, sd ~14. A loose bound that a broken hash misses by far.
    assert chi2 < 200, chi2
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected
