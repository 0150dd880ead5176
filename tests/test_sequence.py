"""The sequence feature kind: newest-first ids, the self-attention encoder, save and load,
schemas."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_serving import make_items
from twotower.checkpoint import load_model, save_model
from twotower.data.interactions import Columns
from twotower.data.schema import parse_schema
from twotower.data.sources import check_features
from twotower.experiment import default_model_config
from twotower.features import Bag, EncodedFeatures, FeatureSpec, TableSpec, newest_first
from twotower.frequency import StreamingFrequencyEstimator
from twotower.hashing import hash_buckets, seed_for
from twotower.index import index_items
from twotower.recommend import QueryError, Recommender
from twotower.sequence import SequenceEncoder
from twotower.towers import ModelConfig, TwoTowerModel
from twotower.train import TrainConfig, make_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")


def newest_first_reference(lists: list[list[int]], length: int):
    ids = np.zeros((len(lists), length), np.int64)
    mask = np.zeros((len(lists), length), bool)
    for row, values in enumerate(lists):
        for position, value in enumerate(reversed(values[-length:] if values else [])):
            ids[row, position] = value
            mask[row, position] = True
    return ids, mask


@settings(max_examples=200, deadline=None)
@given(lists=st.lists(st.lists(st.integers(-2**40, 2**40), max_size=9), max_size=8),
       length=st.integers(1, 6))
def test_newest_first_equals_a_plain_loop(lists, length):
    ids, mask = newest_first(Bag.from_lists(lists), length)
    expected_ids, expected_mask = newest_first_reference(lists, length)
    assert ids.shape == mask.shape == (len(lists), length)
    assert ids.dtype == np.int64 and mask.dtype == bool
    assert np.array_equal(mask, expected_mask)
    assert np.array_equal(ids, expected_ids)


def test_newest_first_by_hand():
    ids, mask = newest_first(Bag.from_lists([[1, 2, 3, 4], [], [7]]), 3)
    assert ids.tolist() == [[4, 3, 2], [0, 0, 0], [7, 0, 0]]
    assert mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]


DIM, LENGTH = 8, 6


def encoder(dropout: float = 0.0) -> SequenceEncoder:
    torch.manual_seed(0)
    model = SequenceEncoder(DIM, LENGTH, heads=2, dropout=dropout)
    with torch.no_grad():  # the now token starts at zero; make it matter like a trained one
        model.now.normal_()
    return model.eval()


def padded(history: torch.Tensor, length: int, fill: float = 0.0):
    """``history`` ``[n, dim]`` (newest first) padded to ``length`` with ``fill``."""
    items = torch.full((1, length, DIM), fill)
    items[0, :len(history)] = history
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, :len(history)] = True
    return items, mask


def test_an_empty_history_gives_a_finite_vector():
    model = encoder()
    with torch.no_grad():
        out = model(torch.zeros(2, LENGTH, DIM), torch.zeros(2, LENGTH, dtype=torch.bool))
    assert out.shape == (2, DIM) and torch.isfinite(out).all()
    assert torch.equal(out[0], out[1])
    with torch.no_grad():  # no positions at all
        empty = model(torch.zeros(1, 0, DIM), torch.zeros(1, 0, dtype=torch.bool))
    torch.testing.assert_close(empty[0], out[0])


def test_padding_does_not_change_the_output():
    model = encoder()
    history = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [model(*padded(history, length, fill)) for length, fill in
                ((3, 0.0), (4, 0.0), (LENGTH, 0.0), (LENGTH, 5.0))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)
    # Rows of one batch with different lengths do not affect each other.
    other = torch.randn(LENGTH, DIM, generator=torch.Generator().manual_seed(2))
    a, mask_a = padded(history, LENGTH)
    b, mask_b = padded(other, LENGTH)
    with torch.no_grad():
        both = model(torch.cat([a, b]), torch.cat([mask_a, mask_b]))
    torch.testing.assert_close(both[:1], outs[0], rtol=1e-5, atol=1e-6)


def test_order_matters():
    model = encoder()
    history = torch.randn(4, DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        forward = model(*padded(history, LENGTH))
        backward = model(*padded(history.flip(0), LENGTH))
    assert (forward - backward).abs().max() > 1e-3


def test_an_encoder_needs_heads_that_divide_its_width():
    with pytest.raises(ValueError, match="cannot split into 3 attention heads"):
        SequenceEncoder(8, 4, heads=3)


def test_a_sequence_spec_needs_a_length():
    with pytest.raises(ValueError, match="sequence feature 'h': give its length"):
        FeatureSpec("h", "sequence", table="item")
    with pytest.raises(ValueError, match="sequence feature 'h'"):
        FeatureSpec("h", "sequence", table="item", length=0)


def sequence_config(**changes) -> ModelConfig:
    return ModelConfig(
        tables={"item": TableSpec(64, DIM), "user": TableSpec(16, 4)},
        query_features=[FeatureSpec("user_id", "id", table="user"),
                        FeatureSpec("history", "sequence", table="item", length=LENGTH)],
        item_features=[FeatureSpec("item_id", "id", table="item")],
        query_hidden=[8], item_hidden=[8], output_dim=4, **changes)


def query_batch(config: ModelConfig, histories: list[list[int]]) -> dict:
    features = EncodedFeatures(config.query_features, config.tables, {
        "user_id": np.zeros(len(histories), np.int64), "history": histories})
    return features.take(np.arange(len(histories)))


HISTORIES = [[], [5], [1, 2, 3], [2, 1, 3], list(range(20))]


def test_the_tower_reads_the_newest_ids_and_their_order():
    model = TwoTowerModel(sequence_config()).eval()
    with torch.no_grad():
        out = model.query(query_batch(model.config, HISTORIES))
        longer = model.query(query_batch(model.config, [[99, *range(20)]]))
    assert torch.isfinite(out).all()
    assert (out[2] - out[3]).abs().max() > 1e-4  # same ids, another order
    torch.testing.assert_close(longer[0], out[4])  # beyond the newest LENGTH ids: ignored


def test_a_model_with_a_sequence_saves_and_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = TwoTowerModel(sequence_config(dropout=0.1)).eval()
    save_model(tmp_path, model, StreamingFrequencyEstimator(64))
    loaded, _, _ = load_model(tmp_path)
    assert loaded.config == model.config
    assert loaded.config.query_features[1].length == LENGTH
    batch = query_batch(model.config, HISTORIES)
    with torch.no_grad():
        assert torch.equal(model.query(batch), loaded.eval().query(batch))
    assert json.loads(json.dumps(model.config.to_dict())) == model.config.to_dict()


def test_sequence_gradients_reach_the_table_and_the_encoder():
    model = TwoTowerModel(sequence_config())
    model.query(query_batch(model.config, HISTORIES)).sum().backward()
    encoder = model.query_tower.sequences["history"]
    assert encoder.now.grad is not None and encoder.now.grad.abs().sum() > 0
    assert model.tables["item"].weight.grad.abs().sum() > 0


SCHEMA = {
    "events": {"path": "events.parquet"},
    "items": {"path": "items.parquet"},
    "query_features": [{"name": "user_id", "kind": "id"},
                       {"name": "recent", "kind": "sequence", "history": "item_id",
                        "length": 4, "table": "item_id"}],
    "item_features": [{"name": "item_id", "kind": "id"}, {"name": "tags", "kind": "id_list"}],
}


def schema_with(*query_features) -> dict:
    return {**SCHEMA, "query_features": [SCHEMA["query_features"][0], *query_features]}


def test_a_sequence_in_a_schema_becomes_a_feature_spec_with_its_length():
    schema = parse_schema(yaml.safe_load(yaml.safe_dump(SCHEMA)), "schema.yaml")
    [spec] = [f.spec() for f in schema.query_features if f.name == "recent"]
    assert spec == FeatureSpec("recent", "sequence", table="item_id", length=4)


@pytest.mark.parametrize("feature, message", [
    ({"name": "recent", "kind": "sequence", "length": 4},
     r"query_features\[1\] \('recent'\): a sequence is a history feature: add `history: "),
    ({"name": "recent", "kind": "sequence", "history": "item_id"},
     r"query_features\[1\] \('recent'\): a history feature needs a length"),
    ({"name": "recent", "kind": "sequence", "history": "item_id", "length": 0},
     r"query_features\[1\] \('recent'\)\.length"),
])
def test_schema_errors_name_the_feature(feature, message):
    with pytest.raises(ValueError, match=message):
        parse_schema(schema_with(feature), "schema.yaml")


def test_a_sequence_over_a_list_column_is_refused_naming_it():
    schema = parse_schema(schema_with({"name": "recent_tags", "kind": "sequence",
                                       "history": "tags", "length": 3}), "schema.yaml")
    events = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("timestamp", pa.int64())])
    items = pa.schema([("item_id", pa.int64()), ("tags", pa.list_(pa.int64()))])
    with pytest.raises(TypeError, match=r"items.parquet: sequence feature 'recent_tags' "
                                        r"reads 'tags', a list column.*use kind id_list"):
        check_features(schema, events, items, "events.parquet", "items.parquet")
    ok = parse_schema(schema_with({"name": "recent_tags", "kind": "id_list",
                                   "history": "tags", "length": 3}), "schema.yaml")
    check_features(ok, events, items, "events.parquet", "items.parquet")
    check_features(parse_schema(SCHEMA, "schema.yaml"), events, items, "events.parquet",
                   "items.parquet")


def test_default_config_with_a_sequence_history_round_trips():
    config = default_model_config(Columns())
    history = next(f for f in config.query_features if f.name == "history")
    changed = replace(config, query_features=[
        f if f is not history else FeatureSpec("history", "sequence", table=history.table,
                                               length=5)
        for f in config.query_features])
    assert ModelConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed


def test_a_model_with_a_sequence_serves_recommendations(tmp_path):
    """The recommender reads a sequence feature as a list of ids, like an id_list."""
    columns = Columns()
    config = default_model_config(columns, item_buckets=512, user_buckets=64,
                                  feature_buckets=32, dim=8, hidden=(16,), output_dim=8)
    config = replace(config, query_features=[
        f if f.name != "history" else FeatureSpec("history", "sequence", table=f.table,
                                                  length=LENGTH)
        for f in config.query_features])
    torch.manual_seed(0)
    model = TwoTowerModel(config).eval()
    save_model(tmp_path / "model", model, StreamingFrequencyEstimator(64),
               {"columns": asdict(columns)})
    index = index_items(tmp_path / "model", make_items(tmp_path / "items.parquet"))
    index.save(tmp_path / "index")
    recommender = Recommender.load(tmp_path / "model", tmp_path / "index")
    query = recommender.parse({"user_id": 3, "history": [1, 2, 3]}, k=5, exclude_history=True)
    assert query.features["history"].tolist() == [1, 2, 3]
    assert sorted(query.exclude.tolist()) == [1, 2, 3]
    [result] = recommender.recommend_queries([query])
    # The same ranking by brute force: the query tower on the encoded history.
    features = EncodedFeatures(config.query_features, config.tables,
                               {"user_id": np.array([3]), "history": [[1, 2, 3]]})
    with torch.no_grad():
        scores = (model.query(features.take(np.arange(1)))
                  @ model.item(EncodedFeatures(config.item_features, config.tables, {
                      "item_id": index.keys, "channel": index.keys % 7,
                      "category": index.keys % 3}).take(np.arange(len(index.keys)))).T)[0]
    order = [int(index.keys[r]) for r in torch.argsort(-scores, stable=True)]
    assert result.keys == [key for key in order if key not in (1, 2, 3)][:5]
    with pytest.raises(QueryError, match="expected a list"):
        recommender.parse({"user_id": 3, "history": 4})


def test_padding_touches_no_table_row():
    """A sparse optimizer moves every row a gradient names, even by a zero gradient (its
    momentum): a padded slot must not name row 0 of the table."""
    torch.manual_seed(0)
    config = ModelConfig(
        tables={"item": TableSpec(64, DIM)},
        query_features=[FeatureSpec("history", "sequence", table="item", length=4)],
        item_features=[FeatureSpec("item_id", "id", table="item")],
        query_hidden=[8], item_hidden=[8], output_dim=4)
    model = TwoTowerModel(config)
    optimizers = make_optimizers(model, TrainConfig(sparse=True))
    ids = np.arange(1000)
    buckets = hash_buckets(ids, 64, seed_for("table/item"))
    [in_zero, *others] = [int(ids[buckets == 0][0]), *ids[buckets > 2][:5].tolist()]

    def step(histories: list[list[int]], items: list[int]) -> set[int]:
        """One step; the table rows it changed."""
        queries = EncodedFeatures(config.query_features, config.tables, {"history": histories})
        candidates = EncodedFeatures(config.item_features, config.tables,
                                     {"item_id": np.asarray(items)})
        before = model.tables["item"].weight.detach().clone()
        loss = (model.query(queries.take(np.arange(len(histories))))
                * model.item(candidates.take(np.arange(len(items))))).sum()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        changed = (model.tables["item"].weight.detach() != before).any(dim=1)
        return set(torch.nonzero(changed).flatten().tolist())

    assert 0 in step([[in_zero, others[0]]], [others[1], others[2]])  # row 0 has momentum
    used = set(hash_buckets(np.asarray(others[3:5]), 64, seed_for("table/item")).tolist())
    assert step([[others[3]]], [others[4]]) == used  # a padded history: row 0 stays


def test_public_names():
    import twotower.features
    import twotower.sequence

    assert twotower.sequence.__all__ == ["SequenceEncoder"]
    assert {"LIST_KINDS", "newest_first"} <= set(twotower.features.__all__)
    assert twotower.features.LIST_KINDS == ("id_list", "sequence")
