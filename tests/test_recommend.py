"""The recommender: query checking, one batched path, exclusions, files and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from tiny_serving import NUM_ITEMS, make_artifacts, make_items, make_model, without_fingerprint
from twotower.cli_serving import add_commands
from twotower.evaluate import embed
from twotower.features import Bag, EncodedFeatures
from twotower.hashing import to_int64_ids
from twotower.index import ItemIndex, index_items
from twotower.recommend import QueryError, Recommender, recommend_file


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_artifacts(tmp_path_factory.mktemp("recommend"))


@pytest.fixture(scope="module")
def recommender(artifacts) -> Recommender:
    model, _, index = artifacts
    return Recommender.load(model, index)


def oracle_scores(recommender: Recommender, users: list, histories: list,
                  beta: float = 0.0) -> np.ndarray:
    """``[num_queries, num_items]`` scores by brute force, in the index's row order."""
    columns = {"user_id": np.asarray(users), "history": Bag.from_lists(histories)}
    features = EncodedFeatures(recommender.specs, recommender.model.config.tables, columns)
    u = embed(recommender.model, features, "query").numpy().astype(np.float64)
    index = recommender.index
    v = index.index.reconstruct_n(0, len(index))[:, :index.dim].astype(np.float64)
    return u @ v.T - beta * index.log_popularity.astype(np.float64)[None, :]


def oracle(recommender: Recommender, users: list, histories: list, k: int, beta: float = 0.0,
           exclude: list | None = None) -> list[list[int]]:
    """Top-k keys by brute force, excluded items dropped (ties broken by row)."""
    index = recommender.index
    scores = oracle_scores(recommender, users, histories, beta)
    out = []
    for i, row in enumerate(scores):
        order = [int(index.keys[r]) for r in np.argsort(-row, kind="stable")]
        banned = set(exclude[i]) if exclude else set()
        out.append([key for key in order if key not in banned][:k])
    return out


def test_parse_checks_features_and_names_the_field(recommender):
    good = recommender.parse({"user_id": 3, "history": [1, "a", 2]}, k=4, exclude=[7])
    assert good.features["user_id"] == 3 and good.k == 4
    assert good.features["history"].tolist() == [1, int(to_int64_ids(["a"])[0]), 2]
    empty = recommender.parse({"user_id": "u", "history": []}, exclude_history=True)
    assert empty.exclude.size == 0
    cases = [
        ({"user_id": 3, "history": [], "age": 4}, r"unknown feature\(s\) \['age'\]",
         ("features", "age")),
        ({"history": []}, "missing feature 'user_id'", ("features", "user_id")),
        ({"user_id": 1.5, "history": []}, "expected an id", ("features", "user_id")),
        ({"user_id": True, "history": []}, "expected an id", ("features", "user_id")),
        ({"user_id": [1], "history": []}, "expected one id", ("features", "user_id")),
        ({"user_id": 1, "history": 5}, "expected a list", ("features", "history")),
        ({"user_id": 1, "history": [1, {"x": 1}]}, "expected an id", ("features", "history", 1)),
        ({"user_id": 2 ** 64, "history": []}, "64-bit", ("features", "user_id")),
        ({"user_id": 1, "history": ["\ud800"]}, "valid Unicode", ("features", "history", 0)),
    ]
    for features, message, loc in cases:
        with pytest.raises(QueryError, match=message) as caught:
            recommender.parse(features, loc=("body",))
        assert caught.value.loc == ("body", *loc)
    with pytest.raises(QueryError, match="k must be a positive integer"):
        recommender.parse({"user_id": 1, "history": []}, k=0)
    for beta in (float("nan"), 1e39, 10 ** 400, 1000.5):
        with pytest.raises(QueryError, match="popularity_penalty must be a number from"):
            recommender.parse({"user_id": 1, "history": []}, popularity_penalty=beta)
    with pytest.raises(QueryError, match="expected an id") as caught:
        recommender.parse({"user_id": 1, "history": []}, exclude=[1.5])
    assert caught.value.loc == ("exclude", 0)


def test_batch_equals_one_by_one_and_the_oracle(recommender):
    users, histories = [5, 9, 5, 11], [[1, 2, 3], [], [40], [7, 7, 8]]
    ks, betas = [3, 10, 1, 300 + NUM_ITEMS], [0.0, 0.02, 0.05, 0.0]
    queries = [recommender.parse({"user_id": u, "history": h}, k=k, popularity_penalty=b)
               for u, h, k, b in zip(users, histories, ks, betas, strict=True)]
    together = recommender.recommend_queries(queries)
    for query, result, u, h, k, b in zip(queries, together, users, histories, ks, betas,
                                         strict=True):
        [alone] = recommender.recommend_queries([query])
        assert alone.keys == result.keys
        np.testing.assert_allclose(alone.scores, result.scores, atol=1e-5)
        # Same scores as brute force, and each key really has its score (ties may swap).
        scores = oracle_scores(recommender, [u], [h], b)[0]
        expected = np.sort(scores)[::-1][:k]
        np.testing.assert_allclose(result.scores, expected, atol=1e-5)
        rows = {int(key): r for r, key in enumerate(recommender.index.keys)}
        np.testing.assert_allclose(scores[[rows[key] for key in result.keys]], result.scores,
                                   atol=1e-5)
        assert result.scores == sorted(result.scores, reverse=True)
    assert len(together[3].keys) == NUM_ITEMS  # k beyond the corpus: every item, once
    assert recommender.recommend_queries([]) == []


def test_popularity_penalty_moves_towards_unpopular_items(recommender):
    def mean_log_p(beta):
        queries = [recommender.parse({"user_id": u, "history": []}, k=20,
                                     popularity_penalty=beta) for u in range(30)]
        keys = np.concatenate([r.keys for r in recommender.recommend_queries(queries)])
        rows = np.searchsorted(recommender.index.keys, keys,
                               sorter=np.argsort(recommender.index.keys))
        return recommender.index.log_popularity[np.argsort(recommender.index.keys)[rows]].mean()

    assert mean_log_p(0.5) < mean_log_p(0.0) < mean_log_p(-0.5)


def test_exclusions_are_removed_and_k_still_filled(recommender):
    [plain] = recommender.recommend_queries([recommender.parse({"user_id": 1, "history": []},
                                                               k=5)])
    banned = plain.keys[:3]
    [result] = recommender.recommend_queries([recommender.parse(
        {"user_id": 1, "history": []}, k=5, exclude=banned)])
    assert len(result.keys) == 5 and not set(banned) & set(result.keys)
    assert result.keys == oracle(recommender, [1], [[]], 5, exclude=[banned])[0]
    [seen] = recommender.recommend_queries([recommender.parse(
        {"user_id": 1, "history": banned}, k=5, exclude_history=True)])
    assert not set(banned) & set(seen.keys) and len(seen.keys) == 5


def test_scores_past_float32_are_a_query_error_not_infinities(recommender):
    """Finite embeddings whose inner product overflows: a client error, not an answer that
    cannot be written as JSON."""
    model = recommender.model
    huge = Recommender(model, ItemIndex.build(np.full((2, 8), 3e38, np.float32),
                                              np.arange(2), "Flat"), recommender.config)
    query = model.query
    model.query = lambda batch: torch.ones(len(batch["user_id"]), 8)
    try:
        with pytest.raises(QueryError, match="non-finite scores for query 0"):
            huge.recommend_queries([huge.parse({"user_id": 1, "history": []}, k=2)])
    finally:
        model.query = query


def test_load_rejects_an_index_of_another_model(artifacts, tmp_path):
    model, items, index = artifacts
    other = make_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="built from another model"):
        Recommender.load(other, index)
    wide = make_model(tmp_path / "wide", output_dim=12)
    with pytest.raises(ValueError, match="12"):
        Recommender(Recommender.load(model, index).model, index_items(wide, items))
    with pytest.raises(ValueError, match="records no model fingerprint"):
        Recommender.load(model, without_fingerprint(index, tmp_path / "unsigned"))
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        Recommender.load(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        Recommender.load(tmp_path, index)


def test_string_item_keys_come_back_as_strings(tmp_path):
    model = make_model(tmp_path / "model")
    index = index_items(model, make_items(tmp_path / "items.parquet", 30, string_keys=True))
    recommender = Recommender.load(model, index.save(tmp_path / "ix"))
    [result] = recommender.recommend_queries([recommender.parse(
        {"user_id": 1, "history": ["item-3"]}, k=30, exclude=["item-4"])])
    assert len(result.keys) == 29 and "item-4" not in result.keys
    assert all(key.startswith("item-") for key in result.keys)


def _query_files(directory: Path) -> list[Path]:
    table = pa.table({"user_id": [1, 2, 3], "history": [[4, 5], [], [6]],
                      "seen": [[], [1, 2], [3]]})
    pq.write_table(table, directory / "q.parquet")
    (directory / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    text = table.set_column(1, "history", pa.array(["4 5", "", "[6]"]))
    pcsv.write_csv(text.set_column(2, "seen", pa.array(["", "1,2", "3"])), directory / "q.csv")
    return [directory / "q.parquet", directory / "q.jsonl", directory / "q.csv"]


def test_recommend_file_reads_parquet_csv_and_json_lines(recommender, tmp_path):
    outputs = []
    for path in _query_files(tmp_path):
        out = tmp_path / f"{path.suffix}.out"
        with open(out, "w") as f:
            assert recommend_file(recommender, path, f, k=4, exclude_history=True,
                                  exclude_column="seen", batch_size=2) == 3
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] == outputs[2]
    records = outputs[0]
    assert [r["row"] for r in records] == [0, 1, 2] and [r["user_id"] for r in records] == [1, 2, 3]
    expected = oracle(recommender, [1, 2, 3], [[4, 5], [], [6]], 4,
                      exclude=[[4, 5], [1, 2], [6, 3]])
    assert [r["items"] for r in records] == expected
    with pytest.raises(KeyError, match="exclusion column 'nope'"), open(tmp_path / "x", "w") as f:
        recommend_file(recommender, tmp_path / "q.parquet", f, exclude_column="nope")
    with pytest.raises(ValueError, match="unknown format"), open(tmp_path / "y", "w") as f:
        recommend_file(recommender, tmp_path / "x", f)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="twotower")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_index_and_recommend(artifacts, tmp_path, capsys):
    model, items, _ = artifacts
    assert _cli(["index", str(model), "--items", str(items), "--out", str(tmp_path / "ix"),
                 "--exact-below", "100", "--recall-queries", "50"]) == 0
    assert "recall@100" in capsys.readouterr().out
    index = ItemIndex.load(tmp_path / "ix")
    assert index.factory == "HNSW16" and index.popularity is not None
    queries = _query_files(tmp_path)[0]
    assert _cli(["recommend", str(model), "--index", str(tmp_path / "ix"), "--queries",
                 str(queries), "-k", "3", "--popularity-penalty", "0.05",
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["items"]) == 3 for r in records)
    assert _cli(["recommend", str(model), "--index", str(tmp_path / "ix"), "--queries",
                 str(queries), "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    parsed = argparse.ArgumentParser()
    add_commands(parsed.add_subparsers(dest="command"))
    args = parsed.parse_args(["serve", str(model)])
    assert args.host == "127.0.0.1" and args.index is None


def test_model_info_reports_the_metrics_logged_up_to_the_published_model(tmp_path):
    from twotower.checkpoint import load_model, save_model

    model_dir = make_model(tmp_path / "model")
    metrics = model_dir / "metrics.jsonl"
    metrics.write_text('{"step": 20, "loss": 4.5}\n{"event": "eval", "recall@10": 0.25}\n')
    model, estimator, config = load_model(model_dir)
    save_model(model_dir, model, estimator, {"columns": config["columns"]})  # published here
    index = index_items(model_dir, make_items(tmp_path / "items.parquet")).save(tmp_path / "ix")
    with open(metrics, "a") as f:  # training goes on; nothing published since
        f.write('{"step": 40, "loss": 3.9}\n{"event": "eval", "recall@10": 0.5}\n')
    described = Recommender.load(model_dir, index).describe()["model"]["metrics"]
    assert described == {"train": {"step": 20, "loss": 4.5},
                         "eval": {"event": "eval", "recall@10": 0.25}}


def test_model_info_reads_only_the_end_of_a_long_metrics_log_and_again_when_it_changes(
        tmp_path):
    """Every ``GET /v1/model`` read and parsed the whole log: 25 s for 135 MB, on the
    event loop. Now the last megabyte, once per change of the log."""
    import time

    from twotower.checkpoint import load_model, save_model

    model_dir = make_model(tmp_path / "model")
    index = index_items(model_dir, make_items(tmp_path / "items.parquet")).save(tmp_path / "ix")
    model, estimator, config = load_model(model_dir)
    line = b'{"step": 1, "loss": 5.0, "examples": 3000, "seconds": 0.1}\n'
    metrics = model_dir / "metrics.jsonl"
    with open(metrics, "wb") as f:
        f.write(b'{"event": "eval", "recall@10": 0.25}\n' + line * ((16 << 20)
                                                                    // len(line)))
        f.write(b'{"step": 9, "loss": 4.0}\n')
    save_model(model_dir, model, estimator, {"columns": config["columns"]})  # published here
    with open(metrics, "ab") as f:
        f.write(b'{"step": 10, "lo')  # training goes on, a line being written
    recommender = Recommender.load(model_dir, index)
    started = time.perf_counter()
    assert recommender.describe()["model"]["metrics"] == {"train": {"step": 9, "loss": 4.0}}
    assert time.perf_counter() - started < 2
    started = time.perf_counter()
    for _ in range(200):
        recommender.describe()
    assert time.perf_counter() - started < 2  # not read again: the log has not changed
    with open(metrics, "ab") as f:
        f.write(b'ss": 3.5}\n{"event": "eval", "recall@10": 0.5}\n')
    save_model(model_dir, model, estimator, {"columns": config["columns"]})
    assert recommender.describe()["model"]["metrics"] == {
        "train": {"step": 10, "loss": 3.5}, "eval": {"event": "eval", "recall@10": 0.5}}


def test_a_history_longer_than_training_read_is_cut_to_its_newest_items(recommender):
    """A query may give a user's whole history: the model reads the newest ``length``
    items, as training did, and ``exclude_history`` leaves out every item given."""
    [spec] = [s for s in recommender.specs if s.name == "history"]
    whole = list(range(100, 100 + spec.length + 15))
    newest = whole[-spec.length:]
    long_query = recommender.parse({"user_id": 5, "history": whole}, k=50,
                                   exclude_history=True)
    short_query = recommender.parse({"user_id": 5, "history": newest}, k=50 + 15,
                                    exclude_history=True)
    [long_result] = recommender.recommend_queries([long_query])
    [short_result] = recommender.recommend_queries([short_query])
    assert not set(long_result.keys) & set(whole)
    # The same query vector: the newest items' ranking, less the older history items.
    assert long_result.keys == [k for k in short_result.keys if k not in whole][:50]


def test_exact_recommender_reads_the_model_once_and_ranks_like_a_saved_index(
        artifacts, recommender, monkeypatch):
    import twotower.checkpoint

    model, items, _ = artifacts
    reads = []
    real = twotower.checkpoint.load_model
    monkeypatch.setattr(twotower.checkpoint, "load_model",
                        lambda d: reads.append(d) or real(d))
    monkeypatch.setattr("twotower.recommend.load_model", twotower.checkpoint.load_model)
    exact = Recommender.exact(model, items)
    assert len(reads) == 1
    users, histories = [1, 2, 3], [[1, 2], [5], []]
    queries = [exact.parse({"user_id": u, "history": h}, k=10)
               for u, h in zip(users, histories, strict=True)]
    got = [list(r.keys) for r in exact.recommend_queries(queries)]
    assert got == oracle(recommender, users, histories, 10)
