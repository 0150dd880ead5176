"""``twotower index`` and ``twotower recommend`` through ``main([...])``: options, output
files and what they never delete."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_serving import make_artifacts
from twotower.cli import main
from twotower.index import ItemIndex


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
