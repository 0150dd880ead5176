"""Tests for feature specs, bags and their encoding into table buckets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from twotower.features import (
    Bag,
    EncodedFeatures,
    FeatureSpec,
    TableSpec,
    bag_from_arrow,
    take_bag,
)
from twotower.hashing import hash_buckets, seed_for, to_int64_ids
from twotower.towers import ModelConfig, TwoTowerModel

TABLES = {"item": TableSpec(num_buckets=50, dim=4), "user": TableSpec(num_buckets=30, dim=3)}


def bucket(table: str, ids: list) -> list[int]:
    """Buckets of ``ids`` in ``table``, computed from the documented rule."""
    values = to_int64_ids(np.asarray(ids)) if ids else np.zeros(0, np.int64)
    return hash_buckets(values, TABLES[table].num_buckets, seed_for(f"table/{table}")).tolist()


def random_bag(rng: np.random.Generator, num_bags: int, weighted: bool) -> Bag:
    lengths = rng.integers(0, 5, size=num_bags)
    lengths[rng.random(num_bags) < 0.3] = 0  # plenty of empty bags
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(-100, 100, size=offsets[-1]).astype(np.int64)
    weights = rng.random(offsets[-1]).astype(np.float32) if weighted else None
    return Bag(values, offsets, weights)


def take_bag_reference(bag: Bag, rows) -> tuple[list[list[int]], list[list[float]] | None]:
    out, out_w = [], []
    for r in rows:
        lo, hi = int(bag.offsets[r]), int(bag.offsets[r + 1])
        out.append([int(v) for v in bag.values[lo:hi]])
        if bag.weights is not None:
            out_w.append([float(w) for w in bag.weights[lo:hi]])
    return out, (out_w if bag.weights is not None else None)


def as_lists(bag: Bag) -> tuple[list[list[int]], list[list[float]] | None]:
    return take_bag_reference(bag, range(len(bag)))


# --- Bag and take_bag ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("weighted", [False, True])
def test_take_bag_matches_loop(seed, weighted):
    rng = np.random.default_rng(seed)
    bag = random_bag(rng, int(rng.integers(1, 30)), weighted)
    rows = rng.integers(0, len(bag), size=int(rng.integers(0, 40)))  # repeats allowed
    got = take_bag(bag, rows)
    assert got.offsets.dtype == np.int64 and got.offsets[0] == 0
    assert len(got) == len(rows)
    assert as_lists(got) == take_bag_reference(bag, rows)


def test_take_bag_empty_rows_and_all_empty_bags():
    bag = Bag(np.zeros(0, np.int64), np.zeros(4, np.int64))
    got = take_bag(bag, np.array([2, 0, 0], dtype=np.int64))
    assert got.offsets.tolist() == [0, 0, 0, 0] and got.values.size == 0
    none = take_bag(Bag(np.array([1, 2]), np.array([0, 2])), np.zeros(0, np.int64))
    assert len(none) == 0 and none.offsets.tolist() == [0] and none.values.size == 0


def test_bag_from_lists():
    bag = Bag.from_lists([[1, 2], [], [3]], weights=[[0.5, 1.0], [], [2.0]])
    assert bag.values.tolist() == [1, 2, 3]
    assert bag.offsets.tolist() == [0, 2, 2, 3]
    assert bag.weights.tolist() == [0.5, 1.0, 2.0]
    assert len(bag) == 3
    empty = Bag.from_lists([[], []])
    assert empty.values.dtype == np.int64 and empty.offsets.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="one weight per id"):
        Bag.from_lists([[1, 2]], weights=[[1.0]])


def test_bag_from_arrow_nulls_and_slices():
    column = pa.array([[1, 2], None, [], [3], [4, 5, 6]], type=pa.list_(pa.int64()))
    assert as_lists(bag_from_arrow(column, "h"))[0] == [[1, 2], [], [], [3], [4, 5, 6]]
    sliced = column.slice(3, 2)  # offsets no longer start at zero
    assert as_lists(bag_from_arrow(sliced, "h"))[0] == [[3], [4, 5, 6]]
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2)])
    assert as_lists(bag_from_arrow(chunked, "h"))[0] == [[1, 2], [], [], [3], [4, 5, 6]]
    strings = pa.array([["a"], ["b", "a"]])
    a, b = to_int64_ids(["a", "b"]).tolist()
    assert as_lists(bag_from_arrow(strings, "h"))[0] == [[a], [b, a]]
    with pytest.raises(TypeError, match="'h'"):
        bag_from_arrow(pa.array([1, 2]), "h")


# --- encoding -----------------------------------------------------------------------------


def test_id_feature_buckets_and_unseen_ids():
    specs = [FeatureSpec("item_id", "id", table="item")]
    ids = [3, 17, 3, 10**15]  # 10**15: an id nobody ever saw still gets a row
    enc = EncodedFeatures(specs, TABLES, {"item_id": np.array(ids)})
    assert enc.data["item_id"].tolist() == bucket("item", ids)
    assert len(enc) == 4
    batch = enc.take(np.array([3, 0]))
    assert batch["item_id"].dtype == torch.int64
    assert batch["item_id"].tolist() == bucket("item", [10**15, 3])
    strings = EncodedFeatures(specs, TABLES, {"item_id": pa.array(["x", "never-seen"])})
    assert strings.data["item_id"].tolist() == bucket("item", ["x", "never-seen"])
    assert all(0 <= b < TABLES["item"].num_buckets for b in strings.data["item_id"])


def test_same_id_same_row_in_every_feature_of_a_table():
    specs = [FeatureSpec("item_id", "id", table="item"),
             FeatureSpec("history", "id_list", table="item"),
             FeatureSpec("user_id", "id", table="user")]
    enc = EncodedFeatures(specs, TABLES, {"item_id": [7], "history": [[7]], "user_id": [7]})
    assert enc.data["item_id"][0] == enc.data["history"].values[0]
    assert enc.data["user_id"].tolist() == bucket("user", [7])


def _pooled(model: TwoTowerModel, enc: EncodedFeatures, name: str, table: str) -> torch.Tensor:
    values, offsets, weights = enc.take(np.arange(len(enc)))[name]
    return model.tables[table](values, offsets, per_sample_weights=weights)


def _model() -> TwoTowerModel:
    config = ModelConfig(
        tables=dict(TABLES),
        query_features=[FeatureSpec("user_id", "id", table="user"),
                        FeatureSpec("history", "id_list", table="item")],
        item_features=[FeatureSpec("item_id", "id", table="item")],
        query_hidden=[8], item_hidden=[], output_dim=5,
    )
    torch.manual_seed(0)
    return TwoTowerModel(config)


def test_id_list_pools_the_plain_mean():
    model = _model()
    weight = model.tables["item"].weight.detach().numpy().astype(np.float64)
    lists = [[1, 2, 2], [], [5], [9, 10**12, 3, 1]]
    spec = [FeatureSpec("history", "id_list", table="item")]
    for column in (lists, pa.array(lists, type=pa.list_(pa.int64())), Bag.from_lists(lists)):
        enc = EncodedFeatures(spec, TABLES, {"history": column})
        pooled = _pooled(model, enc, "history", "item").detach().numpy()
        for i, ids in enumerate(lists):
            expected = (weight[bucket("item", ids)].mean(axis=0) if ids
                        else np.zeros(TABLES["item"].dim))
            np.testing.assert_allclose(pooled[i], expected, rtol=1e-5, atol=1e-7)
    assert np.all(pooled[1] == 0)  # an empty bag is exactly zero


def test_id_list_pools_the_weighted_mean():
    model = _model()
    weight = model.tables["item"].weight.detach().numpy().astype(np.float64)
    lists = [[1, 2, 2], [], [5], [4, 6], [8, 9]]
    weights = [[1.0, 2.0, 0.5], [], [3.0], [0.0, 0.0], [0.25, 0.75]]
    enc = EncodedFeatures([FeatureSpec("history", "id_list", table="item")], TABLES,
                          {"history": Bag.from_lists(lists, weights)})
    pooled = _pooled(model, enc, "history", "item").detach().numpy()
    for i, (ids, w) in enumerate(zip(lists, weights, strict=True)):
        w = np.asarray(w)
        if w.sum() > 0:
            expected = (w[:, None] * weight[bucket("item", ids)]).sum(0) / w.sum()
        else:  # empty bag, or all weights zero: nothing to average
            expected = np.zeros(TABLES["item"].dim)
        np.testing.assert_allclose(pooled[i], expected, rtol=1e-5, atol=1e-7)


def test_weights_column_gives_the_same_weighted_mean():
    lists = [[1, 2, 2], [], [5], [8, 9]]
    weights = [[1.0, 2.0, 0.5], [], [3.0], [0.25, 0.75]]
    from_bag = EncodedFeatures([FeatureSpec("history", "id_list", table="item")], TABLES,
                               {"history": Bag.from_lists(lists, weights)})
    spec = [FeatureSpec("history", "id_list", table="item", weights="history_w")]
    for column, weight_column in ((lists, weights),
                                  (pa.array(lists, type=pa.list_(pa.int64())),
                                   pa.array(weights, type=pa.list_(pa.float32())))):
        enc = EncodedFeatures(spec, TABLES, {"history": column, "history_w": weight_column})
        assert as_lists(enc.data["history"]) == as_lists(from_bag.data["history"])


def test_shared_table_is_one_parameter_trained_by_both_towers():
    model = _model()
    assert list(model.tables) == ["item", "user"]
    item_table = model.tables["item"].weight
    table_params = [p for n, p in model.named_parameters() if n.startswith("tables.")]
    assert len(table_params) == 2
    assert sum(p is item_table for p in model.parameters()) == 1

    queries = EncodedFeatures(model.config.query_features, TABLES,
                              {"user_id": [1, 2], "history": [[11, 12], [13]]})
    items = EncodedFeatures(model.config.item_features, TABLES, {"item_id": [21, 22]})
    history_rows = set(bucket("item", [11, 12, 13]))
    item_rows = set(bucket("item", [21, 22]))
    assert not history_rows & item_rows  # pick ids whose rows differ, so the test can tell

    model.zero_grad()
    model.query(queries.take(np.arange(2))).sum().backward()
    from_query = set(np.flatnonzero(item_table.grad.abs().sum(1).numpy()).tolist())
    assert from_query == history_rows

    model.zero_grad()
    model.item(items.take(np.arange(2))).sum().backward()
    from_item = set(np.flatnonzero(item_table.grad.abs().sum(1).numpy()).tolist())
    assert from_item == item_rows

    model.zero_grad()
    (model.query(queries.take(np.arange(2))).sum()
     + model.item(items.take(np.arange(2))).sum()).backward()
    both = set(np.flatnonzero(item_table.grad.abs().sum(1).numpy()).tolist())
    assert both == history_rows | item_rows


def test_dense_feature():
    spec = [FeatureSpec("age", "dense"), FeatureSpec("xy", "dense", width=2)]
    enc = EncodedFeatures(spec, TABLES, {"age": pa.array([1, 2, 3]),
                                         "xy": np.array([[0.5, 1], [2, 3], [4, 5]])})
    batch = enc.take(slice(1, 3))
    assert batch["age"].dtype == torch.float32 and batch["age"].tolist() == [[2.0], [3.0]]
    assert batch["xy"].tolist() == [[2.0, 3.0], [4.0, 5.0]]
    with pytest.raises(ValueError, match="'xy' has width 3, expected 2"):
        EncodedFeatures(spec[1:], TABLES, {"xy": np.zeros((2, 3))})
    with pytest.raises(TypeError, match="'age' must be numeric"):
        EncodedFeatures(spec[:1], TABLES, {"age": np.array(["a", "b"])})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dense_non_finite_names_feature_and_row(bad):
    values = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, bad], [6.0, 7.0], [bad, 0.0]])
    with pytest.raises(ValueError, match=r"'xy' has non-finite values in 2 row\(s\), first at "
                                         r"row 2"):
        EncodedFeatures([FeatureSpec("xy", "dense", width=2)], TABLES, {"xy": values},
                        where="queries")


def test_missing_feature_raises_key_error_naming_it():
    specs = [FeatureSpec("user_id", "id", table="user"), FeatureSpec("history", "id_list",
                                                                     table="item")]
    with pytest.raises(KeyError, match="'history'"):
        EncodedFeatures(specs, TABLES, {"user_id": [1]})


def test_undefined_table_raises_key_error():
    with pytest.raises(KeyError, match="'nowhere'"):
        EncodedFeatures([FeatureSpec("x", "id", table="nowhere")], TABLES, {"x": [1]})


def test_feature_name_is_default_table():
    spec = FeatureSpec("item", "id")
    assert spec.table_name == "item"
    enc = EncodedFeatures([spec], TABLES, {"item": [4]})
    assert enc.data["item"].tolist() == bucket("item", [4])


def test_features_of_different_lengths_raise():
    specs = [FeatureSpec("user_id", "id", table="user"), FeatureSpec("age", "dense")]
    with pytest.raises(ValueError, match="different numbers of rows"):
        EncodedFeatures(specs, TABLES, {"user_id": [1, 2], "age": [1.0]})


def test_id_feature_errors_name_the_feature():
    spec = [FeatureSpec("user_id", "id", table="user")]
    with pytest.raises(TypeError, match="'user_id'"):
        EncodedFeatures(spec, TABLES, {"user_id": np.array([1.5])})
    with pytest.raises(ValueError, match=r"'user_id'.*null"):
        EncodedFeatures(spec, TABLES, {"user_id": pa.array([1, None])})


# --- specs --------------------------------------------------------------------------------


def test_unknown_kind_raises_value_error():
    with pytest.raises(ValueError, match="unknown kind 'embedding'"):
        FeatureSpec("x", "embedding")


@pytest.mark.parametrize("num_buckets, dim", [(0, 4), (4, 0), (-1, 4)])
def test_table_spec_validation(num_buckets, dim):
    with pytest.raises(ValueError, match="num_buckets >= 1 and dim >= 1"):
        TableSpec(num_buckets, dim)


def test_feature_spec_validation_and_dict():
    with pytest.raises(ValueError, match="width must be >= 1"):
        FeatureSpec("x", "dense", width=0)
    spec = FeatureSpec("h", "id_list", table="item")
    data = spec.to_dict()
    assert {k: data[k] for k in ("name", "kind", "table", "width")} == {
        "name": "h", "kind": "id_list", "table": "item", "width": 1}
    assert FeatureSpec(**data) == spec
