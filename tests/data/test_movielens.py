"""MovieLens readers on tiny files in each layout, and the checked download (offline)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import yaml

from twotower.data import movielens
from twotower.data.movielens import download_movielens, read_movielens
from twotower.data.schema import parse_schema
from twotower.data.sources import load

EXAMPLE = Path(__file__).parents[2] / "examples" / "movielens-1m.yaml"


def flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in movielens.GENRES_100K)


def write_100k(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text("1\t2\t3\t881250949\n2\t1\t5\t881250950\n"
                                      "1\t1\t4\t881250951\n")
    (directory / "u.item").write_bytes(
        ("1|Toy Story (1995)|01-Jan-1995||http://x|" + flags("Animation", "Comedy") + "\n"
         "2|Caf\xe9 \"Noir\" (1994)|01-Jan-1994||http://y|" + flags("Film-Noir") + "\n"
         "3|unknown||||" + flags("unknown") + "\n").encode("latin-1"))
    return directory


def write_1m(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.dat").write_text("1::1193::5::978300760\n2::661::3::978302109\n")
    (directory / "movies.dat").write_bytes(
        ("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
         "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
         "5::Am\xe9lie (2001)::Comedy|Romance\n").encode("latin-1"))
    return directory


def write_latest(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                           "1,1,4.0,964982703\n1,3,4.5,964981247\n")
    (directory / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation\n"
        '3,"Grumpier Old Men, The (1995)",Comedy|Romance\n'
        "7,Babylon 5 (1994-1998),(no genres listed)\n"
        "9,No Year Here,Drama\n")
    return directory


def test_100k(tmp_path):
    events, items, report = read_movielens(write_100k(tmp_path / "ml-100k"))
    assert events.column_names == ["user_id", "item_id", "rating", "timestamp"]
    assert events.column("item_id").to_pylist() == [2, 1, 1]
    assert events.column("rating").to_pylist() == [3.0, 5.0, 4.0]
    assert items.column("title").to_pylist()[1] == 'Café "Noir" (1994)'
    assert items.column("genres").to_pylist() == [["Animation", "Comedy"], ["Film-Noir"],
                                                  ["unknown"]]
    assert items.column("year").to_pylist() == [1995, 1994, 0]
    assert report == {"format": "ml-100k", "events": 3, "items": 3, "items_without_year": 1,
                      "items_without_genres": 0}


def test_1m(tmp_path):
    events, items, report = read_movielens(write_1m(tmp_path / "ml-1m"))
    assert events.column("user_id").to_pylist() == [1, 2]
    assert events.column("timestamp").to_pylist() == [978300760, 978302109]
    assert items.column("genres").to_pylist()[1] == ["Animation", "Children's", "Musical"]
    assert items.column("title").to_pylist()[2] == "Amélie (2001)"
    assert items.column("year").to_pylist() == [1975, 1996, 2001]
    assert report["format"] == "ml-1m"


def test_latest(tmp_path):
    events, items, report = read_movielens(write_latest(tmp_path / "ml-latest-small"))
    assert events.column("rating").to_pylist() == [4.0, 4.5]
    assert items.column("title").to_pylist()[1] == "Grumpier Old Men, The (1995)"
    assert items.column("genres").to_pylist() == [["Adventure", "Animation"],
                                                  ["Comedy", "Romance"], [], ["Drama"]]
    assert items.column("year").to_pylist() == [1995, 1995, 1994, 0]
    assert report["items_without_genres"] == 1 and report["items_without_year"] == 1


def test_no_movielens_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no MovieLens files found; expected u\.data "
                                                r"\+ u\.item or ratings\.dat \+ movies\.dat"):
        read_movielens(tmp_path)


def test_example_schema_trains_genres_and_year(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["movielens"] = str(write_1m(tmp_path / "ml-1m"))
    schema = parse_schema(data)
    interactions = load(schema)
    assert interactions.report["events_kept"] == 2
    columns = interactions.item_columns()
    assert columns["genres"].to_pylist()[0] == ["Drama"] and "year" in columns
    genres = interactions.query_columns(["history_genres"])["history_genres"]
    assert len(genres) == 2 and genres.values.size == 0  # two users, one event each


def zipped(tmp_path: Path, name: str) -> tuple[str, str]:
    """A local 'server' directory holding ``name``.zip; returns its URL and the MD5."""
    write_100k(tmp_path / "build" / name)
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / f"{name}.zip", "w") as z:
        for f in (tmp_path / "build" / name).iterdir():
            z.write(f, f"{name}/{f.name}")
    md5 = hashlib.md5((server / f"{name}.zip").read_bytes()).hexdigest()
    return server.as_uri() + "/", md5


def test_download_checks_the_md5(tmp_path, monkeypatch):
    url, md5 = zipped(tmp_path, "ml-100k")
    monkeypatch.setitem(movielens.ARCHIVES, "ml-100k", md5)
    directory = download_movielens("ml-100k", tmp_path / "data", base_url=url)
    assert directory == tmp_path / "data" / "ml-100k"
    assert read_movielens(directory)[2]["events"] == 3
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-100k"]
    assert download_movielens("ml-100k", tmp_path / "data", base_url="unused://") == directory


def test_download_with_a_bad_md5_keeps_nothing(tmp_path, monkeypatch):
    url, _ = zipped(tmp_path, "ml-100k")
    monkeypatch.setitem(movielens.ARCHIVES, "ml-100k", "0" * 32)
    with pytest.raises(ValueError, match=r"checksum mismatch .*expected 0{32}.*deleted"):
        download_movielens("ml-100k", tmp_path / "data", base_url=url)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_of_latest_reads_the_published_md5(tmp_path):
    url, md5 = zipped(tmp_path, "ml-latest-small")
    (tmp_path / "server" / "ml-latest-small.zip.md5").write_text(
        f"MD5 (ml-latest-small.zip) = {md5}\n")
    directory = download_movielens("ml-latest-small", tmp_path / "data", base_url=url)
    assert (directory / "u.data").is_file()


def test_download_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown MovieLens archive 'ml-2m'"):
        download_movielens("ml-2m", tmp_path)
