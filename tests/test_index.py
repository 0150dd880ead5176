"""Tests for the faiss item index against an exact numpy argsort oracle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from twotower.index import ItemIndex


def oracle(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k scores and rows by inner product, best first (float64)."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def assert_same_top_k(items, keys, queries, k, got_scores, got_keys, tol=1e-4):
    """Equal to the oracle up to ties: same scores, and every returned key truly has the
    returned score, and no item clearly above the k-th score is left out."""
    k_eff = min(k, len(items))
    exp_scores, exp_rows = oracle(items, queries, k_eff)
    assert got_scores.shape == got_keys.shape == (len(queries), k_eff)
    np.testing.assert_allclose(got_scores, exp_scores, rtol=0, atol=tol)
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    row_of = {int(key): row for row, key in enumerate(keys)}
    for q in range(len(queries)):
        returned = [row_of[int(key)] for key in got_keys[q]]
        assert len(set(returned)) == k_eff  # no duplicates, no padding
        np.testing.assert_allclose(scores[q, returned], got_scores[q], rtol=0, atol=tol)
        clearly_in = set(np.flatnonzero(scores[q] > exp_scores[q, -1] + tol).tolist())
        assert clearly_in <= set(returned)
        # Without near-ties the keys are exactly the oracle's.
        if np.all(np.abs(np.diff(np.sort(scores[q]))) > tol):
            assert got_keys[q].tolist() == keys[exp_rows[q]].tolist()


def random_case(n: int, dim: int, seed: int, num_queries: int = 7):
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
    keys = rng.choice(10**12, size=n, replace=False).astype(np.int64)  # keys are not rows
    return items, keys, queries


@pytest.mark.parametrize("n", [1, 2, 5, 64, 300])
@pytest.mark.parametrize("dim", [1, 3, 16])
@pytest.mark.parametrize("k", [1, 4, 10, 1000])
def test_flat_matches_numpy_oracle(n, dim, k):
    items, keys, queries = random_case(n, dim, seed=n * 100 + dim)
    index = ItemIndex.build(items, keys, "Flat")
    assert len(index) == n
    scores, got_keys = index.search(queries, k)
    assert got_keys.dtype == np.int64
    assert_same_top_k(items, keys, queries, k, scores, got_keys)


def test_ties_tolerated():
    items = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    keys = np.array([10, 11, 12, 13])
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    scores, got = ItemIndex.build(items, keys).search(queries, 2)
    assert sorted(got[0].tolist()) == [10, 11]
    np.testing.assert_allclose(scores[0], [1.0, 1.0])


def test_inner_product_not_distance():
    # Nearest by L2 is item 0; best by inner product is the long item 1.
    items = np.array([[1.0, 0.0], [10.0, 5.0]], dtype=np.float32)
    scores, keys = ItemIndex.build(items, np.array([1, 2])).search(
        np.array([[1.0, 0.0]], dtype=np.float32), 1)
    assert keys.tolist() == [[2]] and scores.tolist() == [[10.0]]


def assert_clean_index_dir(parent, directory) -> None:
    """The index files are there, and no temporary file or directory is left behind."""
    names = {p.name for p in directory.iterdir()}
    assert {"index.faiss", "index.json", "keys.npy"} <= names
    assert not [n for n in names if n.startswith(".")]
    assert [p.name for p in parent.iterdir()] == [directory.name]


def test_save_load_round_trip(tmp_path):
    items, keys, queries = random_case(200, 8, seed=3)
    index = ItemIndex.build(items, keys, "Flat")
    directory = index.save(tmp_path / "index")
    assert_clean_index_dir(tmp_path, directory)
    meta = json.loads((directory / "index.json").read_text())
    assert meta["factory"] == "Flat" and meta["size"] == 200 and meta["dim"] == 8
    assert meta["metric"] == "inner_product" and "twotower" in meta["versions"]
    loaded = ItemIndex.load(directory)
    assert loaded.factory == "Flat" and len(loaded) == 200
    assert np.array_equal(loaded.keys, keys)
    for k in (1, 10, 500):
        a_scores, a_keys = index.search(queries, k)
        b_scores, b_keys = loaded.search(queries, k)
        assert np.array_equal(a_scores, b_scores) and np.array_equal(a_keys, b_keys)
    # Saving again over the same directory replaces it cleanly.
    ItemIndex.build(items[:50], keys[:50]).save(directory)
    assert len(ItemIndex.load(directory)) == 50
    assert_clean_index_dir(tmp_path, directory)


def test_approximate_factory_builds_and_searches():
    items, keys, queries = random_case(500, 8, seed=4)
    index = ItemIndex.build(items, keys, "IVF4,Flat")
    scores, got = index.search(queries, 5)
    assert scores.shape == got.shape == (len(queries), 5)
    assert set(got.ravel().tolist()) <= set(keys.tolist()) | {-1}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_rejected(bad):
    items, keys, _ = random_case(10, 4, seed=5)
    items[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        ItemIndex.build(items, keys)


@pytest.mark.parametrize("shape, num_keys", [((10, 4), 9), ((10, 4), 11), ((10,), 10),
                                             ((2, 5, 4), 2)])
def test_shape_mismatch_rejected(shape, num_keys):
    with pytest.raises(ValueError, match=r"embeddings must be \[num_items, dim\]"):
        ItemIndex.build(np.zeros(shape, np.float32), np.arange(num_keys))


def test_load_non_index_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        ItemIndex.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        ItemIndex.load(tmp_path / "missing")


def _index_with_every_file(directory):
    """An approximate index with popularity and labels: every file an index can have."""
    items, keys, _ = random_case(300, 8, seed=6)
    labels = [f"item-{k}" for k in keys]
    popularity = np.log(np.linspace(0.01, 1, len(keys)))
    return ItemIndex.build(items, keys, "HNSW8", log_popularity=popularity, labels=labels,
                           num_recall_queries=20).save(directory)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_index_file_is_refused_naming_it(tmp_path, damage):
    directory = _index_with_every_file(tmp_path / "ix")
    names = sorted(p.name for p in directory.iterdir() if p.name != "index.json")
    assert names == ["embeddings.npy", "index.faiss", "keys.npy", "labels.json",
                     "log_popularity.npy"]
    for name in names:
        copy = tmp_path / f"{damage}-{name}"
        shutil.copytree(directory, copy)
        path = copy / name
        data = path.read_bytes()
        if damage == "flip":  # one bit in the data region, past any header
            middle = len(data) * 3 // 4
            path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
        elif damage == "truncate":
            path.write_bytes(data[:-4])
        else:
            path.unlink()
        with pytest.raises(ValueError, match=f"damaged: {name}") as error:
            ItemIndex.load(copy)
        assert "rebuild it with `twotower index`" in str(error.value)
    assert len(ItemIndex.load(directory)) == 300


def test_an_index_without_checksums_is_refused(tmp_path):
    directory = _index_with_every_file(tmp_path / "ix")
    meta = json.loads((directory / "index.json").read_text())
    del meta["files"]
    (directory / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lists no checksums"):
        ItemIndex.load(directory)
