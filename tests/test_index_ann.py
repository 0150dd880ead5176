"""Approximate indexes, the recall check, the popularity column and index building."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny_serving import NUM_ITEMS, make_items, make_model
from twotower.checkpoint import load_model
from twotower.index import ItemIndex, choose_factory, index_items, recall_at_k


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 50 centres: the structure that makes HNSW recall realistic."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_choose_factory_and_recall_helper():
    assert choose_factory(10) == "Flat" and choose_factory(99_999) == "Flat"
    assert choose_factory(100_000) == "HNSW16" and choose_factory(3_000_000) == "HNSW32"
    assert choose_factory(500, exact_below=100) == "HNSW16"
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    found = np.array([[4, 3, 9, 8], [6, 7, 5, -1]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 2 / 2) / 2)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_popularity_penalty_scores_match_oracle(factory):
    items = clustered(400, 6, seed=1)
    rng = np.random.default_rng(2)
    log_p = np.log(rng.uniform(1e-5, 1.0, 400)).astype(np.float32)
    keys = rng.choice(10**9, 400, replace=False)
    queries = clustered(9, 6, seed=3)
    beta = np.linspace(0.0, 0.2, 9).astype(np.float32)  # one beta per query
    index = ItemIndex.build(items, keys, factory, log_popularity=log_p, exact_below=0,
                            search_params={"efSearch": 400} if factory != "Flat" else None)
    assert index.index.d == 7 and index.dim == 6
    scores, got = index.search(queries, 10, beta)
    expected = queries.astype(np.float64) @ items.T - beta[:, None] * log_p[None, :]
    top = np.argsort(-expected, axis=1)[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(expected, top, 1), atol=1e-4)
    assert np.array_equal(got, keys[top])
    # beta = 0 is the plain inner product.
    plain, _ = index.search(queries, 10)
    np.testing.assert_allclose(plain, -np.sort(-(queries @ items.T), axis=1)[:, :10], atol=1e-5)


def test_index_without_popularity_rejects_a_penalty():
    index = ItemIndex.build(clustered(20, 4, 0), np.arange(20))
    with pytest.raises(ValueError, match="no popularity column"):
        index.search(clustered(2, 4, 1), 3, 0.1)
    assert index.search(clustered(2, 4, 1), 3, 0.0)[1].shape == (2, 3)
    with pytest.raises(ValueError, match=r"queries must be \[num_queries, 4\]"):
        index.search(np.zeros((2, 5), np.float32), 3)


def test_hnsw_recall_is_measured_tuned_and_kept(tmp_path):
    items = clustered(3000, 16, seed=4)
    log_p = np.log(np.random.default_rng(5).uniform(1e-4, 1, 3000))
    index = ItemIndex.build(items, np.arange(3000), exact_below=1000, log_popularity=log_p,
                            recall_penalties=(0.0, 0.05), num_recall_queries=200)
    assert index.factory == "HNSW16"
    recall = index.meta["recall"]
    assert recall["tuned"] and recall["queries"] == 200
    assert min(recall["by_penalty"].values()) >= 0.95 and index.recall == recall["recall@100"]
    ef = index.meta["search_params"]["efSearch"]
    # The stored figure is what the same search path gives against exact search.
    exact = ItemIndex.build(items, np.arange(3000), "Flat", log_popularity=log_p)
    queries = items[::15]
    measured = recall_at_k(index.search(queries, 100)[1], exact.search(queries, 100)[1])
    assert measured == pytest.approx(recall["recall@100"], abs=0.03)

    directory = index.save(tmp_path / "ix")
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["embeddings.npy", "index.faiss", "index.json", "keys.npy",
                     "log_popularity.npy"]
    meta = json.loads((directory / "index.json").read_text())
    assert meta["search_params"] == {"efSearch": ef} and meta["recall"] == recall
    assert meta["build_params"]["efConstruction"] == 40 and "faiss" in meta["versions"]
    loaded = ItemIndex.load(directory)
    assert loaded.index.hnsw.efSearch == ef and loaded.popularity == index.popularity
    for beta in (0.0, 0.05):
        a, b = index.search(queries, 50, beta), loaded.search(queries, 50, beta)
        assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0])


def test_scaled_popularity_column_keeps_hnsw_recall():
    # Raw log p (spread of units) would dominate the graph's inner products; scaled to one
    # embedding coordinate's spread, recall at beta = 0 is as good as without the column.
    items = clustered(3000, 16, seed=6)
    log_p = np.log(np.random.default_rng(7).uniform(1e-6, 1, 3000))
    fixed = {"search_params": {"efSearch": 128}, "exact_below": 0, "num_recall_queries": 200}
    plain = ItemIndex.build(items, np.arange(3000), "HNSW16", **fixed)
    folded = ItemIndex.build(items, np.arange(3000), "HNSW16", log_popularity=log_p, **fixed)
    assert not folded.meta["recall"]["tuned"]
    assert folded.recall >= plain.recall - 0.03
    assert folded.popularity["scale"] == pytest.approx(items.std() / log_p.std(), rel=1e-5)


def test_ivf_nprobe_is_tuned_or_fixed():
    items = clustered(2000, 8, seed=8)
    tuned = ItemIndex.build(items, np.arange(2000), "IVF32,Flat", num_recall_queries=100)
    assert tuned.recall >= 0.95 and 1 <= tuned.meta["search_params"]["nprobe"] <= 32
    fixed = ItemIndex.build(items, np.arange(2000), "IVF32,Flat", search_params={"nprobe": 1},
                            num_recall_queries=100)
    assert fixed.meta["search_params"] == {"nprobe": 1} and not fixed.meta["recall"]["tuned"]
    assert fixed.recall < tuned.recall


def test_ivf_pq_builds_with_the_popularity_column():
    items = clustered(1000, 12, seed=9)  # 12 + 1 popularity column = 13 = PQ13
    index = ItemIndex.build(items, np.arange(1000), "IVF16,PQ13x4",
                            log_popularity=np.zeros(1000) - 3.0, num_recall_queries=50)
    assert 0 < index.recall <= 1 and index.search(items[:3], 5, 0.1)[1].shape == (3, 5)


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an index directory"):
        ItemIndex.build(clustered(5, 2, 0), np.arange(5)).save(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_index_items_covers_every_item_with_popularity(tmp_path):
    model_dir = make_model(tmp_path / "model")
    items = make_items(tmp_path / "items.parquet", NUM_ITEMS + 50)  # 50 never seen in training
    index = index_items(model_dir, items)
    assert len(index) == NUM_ITEMS + 50 and index.factory == "Flat"
    assert np.array_equal(np.sort(index.keys), np.arange(NUM_ITEMS + 50))
    _, estimator, _ = load_model(model_dir)
    np.testing.assert_allclose(index.log_popularity,
                               np.log(estimator.probability(index.keys)), rtol=1e-6)
    assert index.log_popularity[1] > index.log_popularity[NUM_ITEMS + 10]  # popular vs unseen
    assert index.meta["info"]["model_fingerprint"] and index.meta["recall"]["exact"]
    approx = index_items(model_dir, items, exact_below=10, num_recall_queries=50)
    assert approx.factory == "HNSW16"
    assert set(approx.meta["recall"]["by_penalty"]) == {"0.0", "0.05"}  # beta = temperature
    assert len(index_items(model_dir, items, popularity=False).keys) == NUM_ITEMS + 50


def test_index_items_string_keys_and_bad_tables(tmp_path):
    model_dir = make_model(tmp_path / "model")
    index = index_items(model_dir, make_items(tmp_path / "s.parquet", 20, string_keys=True))
    assert index.labels == [f"item-{i}" for i in range(20)]
    loaded = ItemIndex.load(index.save(tmp_path / "ix"))
    assert loaded.labels == index.labels
    pq.write_table(pa.table({"item_id": [1, 1], "channel": [0, 0], "category": [0, 0]}),
                   tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate item key"):
        index_items(model_dir, tmp_path / "dup.parquet")
    pq.write_table(pa.table({"item_id": [1, 2], "channel": [0, 0]}), tmp_path / "miss.parquet")
    with pytest.raises(KeyError, match="category"):
        index_items(model_dir, tmp_path / "miss.parquet")
