"""``twotower index`` and ``twotower recommend`` through ``main([...])``: options, output
files, what they never delete, and item keys that come back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from tiny_serving import make_artifacts
from twotower.cli import main
from twotower.index import ItemIndex
from twotower.recommend import Recommender


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_artifacts(tmp_path_factory.mktemp("cli_serving"))


def test_index_out_never_deletes_what_twotower_did_not_write(artifacts, tmp_path, capsys):
    model, items, _ = artifacts
    out = tmp_path / "ix"
    assert main(["index", str(model), "--items", str(items), "--out", str(out)]) == 0
    assert main(["index", str(model), "--items", str(items), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["index", str(model), "--items", str(items), "--out", str(out)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(ItemIndex.load(out)) > 0
    own = tmp_path / "own"
    own.mkdir()
    (own / "index.json").write_text('{"mine": true}')
    assert main(["index", str(model), "--items", str(items), "--out", str(own)]) == 2
    assert "index.json that twotower did not write" in capsys.readouterr().err
    assert (own / "index.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "own"]  # no leftovers


def test_index_out_a_file_is_a_clear_error(artifacts, tmp_path, capsys):
    model, items, _ = artifacts
    target = tmp_path / "a_file"
    target.write_text("keep")
    assert main(["index", str(model), "--items", str(items), "--out", str(target)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep"


def _queries(path: Path, rows: int, bad_user: int | None = None,
             bad_history: int | None = None) -> Path:
    """Queries of the tiny model; a null user id, or a null id in a history, at a row."""
    users = [i % 50 for i in range(rows)]
    histories = [[i % 300, (i * 7) % 300] for i in range(rows)]
    if bad_user is not None:
        users[bad_user] = None
    if bad_history is not None:
        histories[bad_history][1] = None
    table = pa.table({"user_id": pa.array(users, pa.int64()),
                      "history": pa.array(histories, pa.list_(pa.int64()))})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("option", [["--batch-size", "-1"], ["--batch-size", "0"],
                                    ["-k", "0"], ["--popularity-penalty", "nan"]])
def test_recommend_options_are_checked(artifacts, tmp_path, capsys, option):
    model, _, index = artifacts
    queries = _queries(tmp_path / "q.parquet", 3)
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", str(model), "--index", str(index), "--queries", str(queries),
              "--out", str(tmp_path / "out.jsonl"), *option])
    assert exit_.value.code == 2
    assert option[0] in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_recommend_out_is_complete_or_absent_and_the_error_names_the_row(artifacts, tmp_path,
                                                                         capsys):
    model, _, index = artifacts
    out = tmp_path / "out.jsonl"
    good = _queries(tmp_path / "good.parquet", 2000)
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(good),
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2000
    assert "top-10 for 2,000 queries" in capsys.readouterr().err
    bad = _queries(tmp_path / "bad.parquet", 2000, bad_user=1500)
    fresh = tmp_path / "fresh.jsonl"
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(bad),
                 "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "row 1500" in err and "user_id" in err and "1024-1999" not in err
    assert not fresh.exists()
    holed = _queries(tmp_path / "holed.parquet", 2000, bad_history=1800)
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(holed),
                 "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "row 1800" in err and "'history'" in err and str(holed) in err
    assert not fresh.exists()
    holed.unlink()
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(bad),
                 "--out", str(out)]) == 2
    assert len(out.read_text().splitlines()) == 2000  # the earlier output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "good.parquet",
                                                          "out.jsonl"]


def test_recommend_names_the_row_of_a_bad_id_in_a_text_list(artifacts, tmp_path, capsys):
    model, _, index = artifacts
    histories = ["1 2"] * 1200
    histories[1100] = f"3 {2 ** 70}"
    pcsv.write_csv(pa.table({"user_id": list(range(1200)), "history": histories}),
                   tmp_path / "q.csv")
    assert main(["recommend", str(model), "--index", str(index), "--queries",
                 str(tmp_path / "q.csv"), "--out", str(tmp_path / "out.jsonl")]) == 2
    assert "column 'history' at row 1100" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


BIG = [2 ** 64 - 1, 2 ** 63, 2 ** 63 + 5] + [2 ** 63 + 1000 + i for i in range(37)]


def _uint64_log(directory: Path) -> tuple[Path, Path]:
    """Items keyed by unsigned 64-bit integers from 2**63, and a log of them."""
    rng = np.random.default_rng(0)
    items = pa.table({"item_id": pa.array(BIG, pa.uint64()),
                      "channel": [i % 4 for i in range(len(BIG))],
                      "category": [i % 3 for i in range(len(BIG))]})
    n = 3000
    events = pa.table({"user_id": rng.integers(0, 60, n),
                       "item_id": pa.array([BIG[i] for i in rng.zipf(1.5, n) % len(BIG)],
                                           pa.uint64()),
                       "timestamp": np.arange(n), "reward": np.ones(n)})
    pq.write_table(items, directory / "items.parquet")
    pq.write_table(events, directory / "events.parquet")
    return directory / "events.parquet", directory / "items.parquet"


def test_unsigned_item_keys_from_2_63_come_back_exactly(tmp_path, capsys):
    events, items = _uint64_log(tmp_path)
    model, index = tmp_path / "m", tmp_path / "ix"
    assert main(["train", "--events", str(events), "--items", str(items), "--out", str(model),
                 "--batch-size", "128", "--quiet"]) == 0
    assert main(["index", str(model), "--items", str(items), "--out", str(index)]) == 0
    pq.write_table(pa.table({"user_id": [1, 2, 3],
                             "history": pa.array([[BIG[0], BIG[1]], [], [BIG[2]]],
                                                 pa.list_(pa.uint64()))}),
                   tmp_path / "q.parquet")
    out = tmp_path / "out.jsonl"
    assert main(["recommend", str(model), "--index", str(index), "--queries",
                 str(tmp_path / "q.parquet"), "-k", "40", "--exclude-seen",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["items"]) for r in records] == [38, 40, 39]
    assert all(set(r["items"]) <= set(BIG) for r in records)
    assert BIG[0] not in records[0]["items"] and BIG[2] not in records[2]["items"]
    # The same keys in a request: accepted, hashed as in training, excluded exactly.
    recommender = Recommender.load(model, index)
    [result] = recommender.recommend_queries([recommender.parse(
        {"user_id": 1, "history": [BIG[0], BIG[1]]}, k=40, exclude=[BIG[0], BIG[2]])])
    assert sorted(result.keys) == sorted(set(BIG) - {BIG[0], BIG[2]})
    assert recommender.parse({"user_id": 2 ** 64 - 1, "history": []}).features["user_id"] == -1



def test_recommend_from_the_model_alone_equals_an_exact_index(artifacts, tmp_path):
    """``--items`` searches an items table exactly without a built index: the same answers
    as a saved exact index (the fixture's index is exact: 300 items)."""
    model, items, index = artifacts
    queries = _queries(tmp_path / "q.parquet", 50)
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(queries),
                 "-k", "20", "--out", str(tmp_path / "indexed.jsonl")]) == 0
    assert main(["recommend", str(model), "--items", str(items), "--queries", str(queries),
                 "-k", "20", "--out", str(tmp_path / "exact.jsonl")]) == 0
    indexed = [json.loads(line) for line in (tmp_path / "indexed.jsonl").read_text().splitlines()]
    exact = [json.loads(line) for line in (tmp_path / "exact.jsonl").read_text().splitlines()]
    assert [r["items"] for r in exact] == [r["items"] for r in indexed]
    assert len(exact) == 50 and all(len(r["items"]) == 20 for r in exact)
    assert main(["recommend", str(model), "--items", str(items), "--index", str(index),
                 "--queries", str(queries)]) == 2


def test_recommend_reads_queries_from_standard_input_and_from_a_pipe(artifacts, tmp_path):
    """``--queries /dev/stdin`` was an unknown format and a FIFO a traceback (pyarrow seeks
    in the files it opens); ``-`` is JSON lines on standard input."""
    import os
    import subprocess
    import sys
    import threading

    model, _, index = artifacts
    lines = "".join(json.dumps({"user_id": u, "history": [u, u + 1]}) + "\n" for u in range(5))
    plain = tmp_path / "q.jsonl"
    plain.write_text(lines)
    expected = tmp_path / "expected.jsonl"
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(plain),
                 "--out", str(expected)]) == 0

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    piped = subprocess.run(
        [sys.executable, "-m", "twotower", "recommend", str(model), "--index", str(index),
         "--queries", "-"], input=lines.encode(), capture_output=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode() == expected.read_text()

    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(lines,))
    writer.start()
    out = tmp_path / "out.jsonl"
    assert main(["recommend", str(model), "--index", str(index), "--queries", str(fifo),
                 "--out", str(out)]) == 0
    writer.join()
    assert out.read_text() == expected.read_text()
