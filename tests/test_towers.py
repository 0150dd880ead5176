"""Tests for the model config and the two towers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from twotower.features import EncodedFeatures, FeatureSpec, TableSpec
from twotower.towers import ModelConfig, TwoTowerModel, _drop_ids


def make_config(**overrides) -> ModelConfig:
    fields = dict(
        tables={"item": TableSpec(64, 4), "user": TableSpec(32, 3)},
        query_features=[FeatureSpec("user_id", "id", table="user"),
                        FeatureSpec("history", "id_list", table="item"),
                        FeatureSpec("age", "dense")],
        item_features=[FeatureSpec("item_id", "id", table="item"),
                       FeatureSpec("xy", "dense", width=2)],
        query_hidden=[16, 8],
        item_hidden=[12],
        output_dim=6,
        normalize=True,
        temperature=0.1,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def batches(config: ModelConfig, n: int = 5) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    queries = EncodedFeatures(config.query_features, config.tables, {
        "user_id": rng.integers(0, 100, n),
        "history": [rng.integers(0, 100, int(k)).tolist() for k in rng.integers(0, 4, n)],
        "age": rng.random(n),
    })
    items = EncodedFeatures(config.item_features, config.tables, {
        "item_id": rng.integers(0, 100, n), "xy": rng.random((n, 2)),
    })
    return queries.take(np.arange(n)), items.take(np.arange(n))


def test_config_round_trip():
    config = make_config()
    data = config.to_dict()
    again = ModelConfig.from_dict(json.loads(json.dumps(data)))
    assert again == config
    assert again.to_dict() == data


def test_config_defaults_round_trip():
    config = ModelConfig(tables={"t": TableSpec(8, 2)},
                         query_features=[FeatureSpec("q", "id", table="t")],
                         item_features=[FeatureSpec("i", "id", table="t")])
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("normalize", [True, False])
def test_output_shapes_and_normalisation(normalize):
    config = make_config(normalize=normalize)
    torch.manual_seed(0)
    model = TwoTowerModel(config)
    query_batch, item_batch = batches(config, n=5)
    q, v = model.query(query_batch), model.item(item_batch)
    assert q.shape == (5, 6) and v.shape == (5, 6)
    assert q.dtype == v.dtype == torch.float32
    norms = torch.cat([q.norm(dim=1), v.norm(dim=1)])
    if normalize:
        torch.testing.assert_close(norms, torch.ones(10))
    else:
        assert not torch.allclose(norms, torch.ones(10), atol=1e-3)


@pytest.mark.parametrize("hidden", [[], [7], [9, 5, 3]])
def test_mlp_depth_follows_hidden(hidden):
    config = make_config(query_hidden=hidden, item_hidden=list(reversed(hidden)))
    model = TwoTowerModel(config)
    for mlp, widths, in_dim in ((model.query_tower.mlp, hidden, 3 + 4 + 1),
                                (model.item_tower.mlp, list(reversed(hidden)), 4 + 2)):
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        assert len(linears) == len(widths) + 1
        assert [m.out_features for m in linears] == [*widths, 6]
        assert linears[0].in_features == in_dim
        assert sum(isinstance(m, nn.ReLU) for m in mlp) == len(widths)


def test_tables_belong_to_the_model():
    model = TwoTowerModel(make_config())
    assert sorted(model.tables) == ["item", "user"]
    assert model.tables["item"].weight.shape == (64, 4)
    assert model.tables["user"].weight.shape == (32, 3)
    assert not any(n.startswith(("query_tower.", "item_tower.")) and "weight" in n
                   and p.shape in ((64, 4), (32, 3)) for n, p in model.named_parameters())


def test_undefined_table():
    with pytest.raises(ValueError, match="'history' uses undefined table 'item'"):
        make_config(tables={"user": TableSpec(32, 3)})


@pytest.mark.parametrize("side", ["query", "item"])
def test_duplicate_feature(side):
    feature = FeatureSpec("item_id", "id", table="item")
    with pytest.raises(ValueError, match=f"the {side} tower lists a feature twice"):
        make_config(**{f"{side}_features": [feature, feature]})


@pytest.mark.parametrize("side", ["query", "item"])
def test_no_features(side):
    with pytest.raises(ValueError, match=f"the {side} tower needs at least one feature"):
        make_config(**{f"{side}_features": []})


@pytest.mark.parametrize("temperature", [0.0, -0.05, float("nan"), float("inf")])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        make_config(temperature=temperature)


# --- dropout ------------------------------------------------------------------------------

def sequence_features() -> dict:
    """``make_config`` with the history read as a sequence (dropout inside the encoder)."""
    return {"query_features": [FeatureSpec("user_id", "id", table="user"),
                               FeatureSpec("history", "sequence", table="item", length=3),
                               FeatureSpec("age", "dense")]}


@pytest.mark.parametrize("features", [{}, sequence_features()])
def test_eval_outputs_are_deterministic_with_dropout(features):
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(dropout=0.5, **features)).eval()
    queries, items = batches(model.config)
    with torch.no_grad():
        assert torch.equal(model.query(queries), model.query(queries))
        assert torch.equal(model.item(items), model.item(items))


@pytest.mark.parametrize("features", [{}, sequence_features()])
def test_train_outputs_differ_with_dropout_and_not_without(features):
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(dropout=0.5, **features)).train()
    queries, items = batches(model.config, n=8)
    with torch.no_grad():
        assert not torch.equal(model.query(queries), model.query(queries))
        assert not torch.equal(model.item(items), model.item(items))
        assert not torch.equal(model.query(queries), model.eval().query(queries))

    torch.manual_seed(0)
    plain = TwoTowerModel(make_config(dropout=0.0, **features)).train()
    with torch.no_grad():
        train_out = plain.query(queries)
        assert torch.equal(train_out, plain.query(queries))
        assert torch.equal(train_out, plain.eval().query(queries))


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_outside_zero_to_one_is_an_error_naming_it(dropout):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got"):
        make_config(dropout=dropout)


@pytest.mark.parametrize(("field", "value"), [("query_hidden", [16, 0]), ("item_hidden", [-3]),
                                              ("output_dim", 0)])
def test_a_layer_width_below_one_is_an_error_naming_it(field, value):
    """A width of 0 once trained a model whose output ignored its input; -3 a traceback."""
    with pytest.raises(ValueError, match=rf"{field}: every width must be >= 1, got"):
        make_config(**{field: value})


def test_a_table_too_large_for_memory_is_an_error_naming_it():
    """``buckets: 10000000000000`` in a schema was a traceback from torch's allocator."""
    config = make_config(tables={"item": TableSpec(10**13, 4), "user": TableSpec(32, 3)})
    with pytest.raises(ValueError, match=r"table 'item': 10,000,000,000,000 buckets x 4 dims "
                                         r"\(149,011\.6 GiB\) do not fit in memory"):
        TwoTowerModel(config)


def test_config_without_dropout_or_length_still_loads(tmp_path):
    import shutil

    from twotower.checkpoint import CONFIG, WEIGHTS, load_model, save_model

    torch.manual_seed(0)
    model = TwoTowerModel(make_config())
    save_model(tmp_path / "new", model, None)
    old = tmp_path / "old"  # as written before published generations, dropout and sequences
    old.mkdir()
    shutil.copy(tmp_path / "new" / WEIGHTS, old / WEIGHTS)
    stored = json.loads((tmp_path / "new" / CONFIG).read_text())
    del stored["model"]["dropout"], stored["model"]["history_dropout"]
    for feature in stored["model"]["query_features"] + stored["model"]["item_features"]:
        del feature["length"]
    (old / CONFIG).write_text(json.dumps(stored))
    loaded, _, _ = load_model(old)
    assert loaded.config == model.config and loaded.config.dropout == 0.0
    assert loaded.config.history_dropout == 0.0
    queries, _ = batches(model.config)
    with torch.no_grad():
        assert torch.equal(loaded.query(queries), model.eval().query(queries))


def test_schema_dropout_reaches_the_model_and_is_checked():
    from twotower.data.schema import parse_schema
    from twotower.experiment import schema_model_config

    schema = {"events": {"path": "events.parquet"}, "items": {"path": "items.parquet"},
              "query_features": [{"name": "user_id", "kind": "id"}],
              "item_features": [{"name": "item_id", "kind": "id"}]}
    parsed = parse_schema({**schema, "model": {"dropout": 0.25}}, "schema.yaml")
    distinct = {"user_id": np.arange(5), "item_id": np.arange(7)}
    config = schema_model_config(parsed, lambda where, name: distinct[name])
    assert config.dropout == 0.25
    assert parse_schema(schema, "schema.yaml").model.dropout == 0.2  # the default
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"model\.dropout"):
            parse_schema({**schema, "model": {"dropout": bad}}, "schema.yaml")


def test_schema_history_dropout_reaches_the_model_and_is_checked():
    from twotower.data.schema import parse_schema
    from twotower.experiment import schema_model_config

    schema = {"events": {"path": "events.parquet"}, "items": {"path": "items.parquet"},
              "query_features": [{"name": "user_id", "kind": "id"}],
              "item_features": [{"name": "item_id", "kind": "id"}]}
    distinct = {"user_id": np.arange(5), "item_id": np.arange(7)}
    parsed = parse_schema({**schema, "model": {"history_dropout": 0.3}}, "schema.yaml")
    assert schema_model_config(parsed, lambda where, name: distinct[name]).history_dropout == 0.3
    assert parse_schema(schema, "schema.yaml").model.history_dropout == 0.5  # the default
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ValueError, match=r"model\.history_dropout"):
            parse_schema({**schema, "model": {"history_dropout": bad}}, "schema.yaml")


# --- history dropout ----------------------------------------------------------------------

def drop_ids_by_loop(weights: list[float], offsets: list[int], keep: list[bool]) -> list[float]:
    """The reference: per bag, the kept ids share the bag's weight sum in proportion."""
    out = list(weights)
    bounds = [*offsets, len(weights)]
    for start, stop in itertools.pairwise(bounds):
        left = sum(w for w, k in zip(weights[start:stop], keep[start:stop], strict=True) if k)
        if left == 0:
            continue  # a bag that would lose every id keeps them all
        total = sum(weights[start:stop])
        for i in range(start, stop):
            out[i] = weights[i] * total / left if keep[i] else 0.0
    return out


@pytest.mark.parametrize("seed", range(5))
def test_drop_ids_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, 40)  # empty bags too
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    weights = rng.random(int(lengths.sum())).astype(np.float32)
    torch.manual_seed(seed)
    got = _drop_ids(torch.from_numpy(weights), torch.from_numpy(offsets), 0.4)
    torch.manual_seed(seed)  # the same draws, to know which ids were kept
    keep = (torch.rand(len(weights)) >= 0.4).tolist()
    want = drop_ids_by_loop(weights.tolist(), offsets.tolist(), keep)
    assert 0 < sum(keep) < len(keep)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_history_dropout_acts_only_in_training_and_only_on_the_query():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(history_dropout=0.5))
    queries, items = batches(model.config, n=8)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.query(queries), model.query(queries))
        assert torch.equal(model.item(items), model.item(items))
        model.eval()
        assert torch.equal(model.query(queries), model.query(queries))

    with pytest.raises(ValueError, match="history_dropout must be in"):
        make_config(history_dropout=1.0)
