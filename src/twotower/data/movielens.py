"""MovieLens in its three published layouts, read into the events/items tables.

- ML-100K: ``u.data`` (tab separated) and ``u.item`` (``|`` separated, 19 genre flags);
- ML-1M: ``ratings.dat`` and ``movies.dat`` (``::`` separated, genres ``A|B``);
- ml-latest and ml-latest-small: ``ratings.csv`` and ``movies.csv`` (with headers).

Events get ``user_id, item_id, rating, timestamp``; items get ``item_id, title,
genres`` (a list of genre names: an ``id_list`` feature) and ``year`` (from the title,
0 where the title has none, counted in the report). :func:`download_movielens` fetches
an archive from the official GroupLens site and checks its MD5 before unpacking.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

__all__ = ["ARCHIVES", "GENRES_100K", "download_movielens", "read_movielens"]

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
# MD5 of the fixed releases, as GroupLens publishes them; ml-latest* change over time,
# so their MD5 is read from the ``.md5`` file published beside the archive.
ARCHIVES: dict[str, str | None] = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-latest-small": None,
    "ml-latest": None,
}
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")
LAYOUTS = {"ml-100k": ("u.data", "u.item"), "ml-1m": ("ratings.dat", "movies.dat"),
           "ml-latest": ("ratings.csv", "movies.csv")}
_EVENT_NAMES = ["user_id", "item_id", "rating", "timestamp"]
_YEAR = r"\((?P<year>\d{4})[^()]*\)\s*$"


def _read(data: bytes | Path, names: list[str] | None, delimiter: str,
          types: dict[str, pa.DataType], quoted: bool = True) -> pa.Table:
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    return pcsv.read_csv(
        source,
        read_options=pcsv.ReadOptions(column_names=names, encoding="utf8"),
        parse_options=pcsv.ParseOptions(delimiter=delimiter,
                                        quote_char='"' if quoted else False),
        convert_options=pcsv.ConvertOptions(column_types=types))


def _latin1(path: Path, separator: bytes = b"") -> bytes:
    """The file re-encoded as UTF-8 (MovieLens 100K and 1M are Latin-1), with a multi-byte
    separator turned into a tab."""
    text = path.read_bytes().decode("latin-1")
    if separator:
        text = text.replace(separator.decode(), "\t")
    return text.encode()


def _event_types() -> dict[str, pa.DataType]:
    return {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(),
            "timestamp": pa.int64()}


def _with_year(items: pa.Table) -> pa.Table:
    year = pc.struct_field(pc.extract_regex(items.column("title"), _YEAR), 0)
    year = pc.cast(pc.if_else(pc.equal(year, ""), "0", year), pa.int64())
    return items.append_column("year", year.fill_null(0))


def _read_100k(directory: Path) -> tuple[pa.Table, pa.Table]:
    events = _read(directory / "u.data", _EVENT_NAMES, "\t", _event_types())
    names = ["item_id", "title", "release", "video_release", "url", *GENRES_100K]
    raw = _read(_latin1(directory / "u.item"), names, "|",
                {"item_id": pa.int64(), **{g: pa.int8() for g in GENRES_100K}}, quoted=False)
    flags = np.stack([raw.column(g).to_numpy() for g in GENRES_100K], axis=1) > 0
    offsets = np.zeros(len(flags) + 1, dtype=np.int32)
    np.cumsum(flags.sum(axis=1), out=offsets[1:])
    values = pa.array(np.asarray(GENRES_100K)[np.nonzero(flags)[1]].tolist(), pa.string())
    genres = pa.ListArray.from_arrays(pa.array(offsets), values)
    items = pa.table({"item_id": raw.column("item_id"), "title": raw.column("title"),
                      "genres": genres})
    return events, items


def _split_genres(items: pa.Table) -> pa.Table:
    """``"A|B"`` into ``["A", "B"]``; ``"(no genres listed)"`` into an empty list."""
    genres = items.column("genres")
    none = pc.or_(pc.equal(genres, ""), pc.equal(genres, "(no genres listed)"))
    lists = pc.if_else(none, pa.scalar([], pa.list_(pa.string())),
                       pc.split_pattern(genres, "|"))
    return items.set_column(items.column_names.index("genres"), "genres", lists)


def _read_1m(directory: Path) -> tuple[pa.Table, pa.Table]:
    events = _read(_latin1(directory / "ratings.dat", b"::"), _EVENT_NAMES, "\t",
                   _event_types(), quoted=False)
    items = _read(_latin1(directory / "movies.dat", b"::"), ["item_id", "title", "genres"],
                  "\t", {"item_id": pa.int64()}, quoted=False)
    return events, _split_genres(items)


def _read_latest(directory: Path) -> tuple[pa.Table, pa.Table]:
    events = _read(directory / "ratings.csv", None, ",",
                   {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(),
                    "timestamp": pa.int64()}).rename_columns(_EVENT_NAMES)
    items = _read(directory / "movies.csv", None, ",", {"movieId": pa.int64()})
    items = items.rename_columns(["item_id", "title", "genres"])
    return events, _split_genres(items)


def read_movielens(directory: str | Path) -> tuple[pa.Table, pa.Table, dict]:
    """``(events, items, report)`` of the MovieLens files in ``directory``."""
    directory = Path(directory)
    for layout, files in LAYOUTS.items():
        if all((directory / f).is_file() for f in files):
            reader = {"ml-100k": _read_100k, "ml-1m": _read_1m, "ml-latest": _read_latest}
            events, items = reader[layout](directory)
            break
    else:
        expected = " or ".join(" + ".join(files) for files in LAYOUTS.values())
        raise FileNotFoundError(f"{directory}: no MovieLens files found; expected {expected}")
    items = _with_year(items)
    genres = items.column("genres")
    report = {"format": layout, "events": events.num_rows, "items": items.num_rows,
              "items_without_year": int(pc.sum(pc.equal(items.column("year"), 0)).as_py() or 0),
              "items_without_genres": int(pc.sum(pc.equal(pc.list_value_length(genres), 0))
                                          .as_py() or 0)}
    return events, items, report


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_movielens(name: str, destination: str | Path, base_url: str = BASE_URL) -> Path:
    """Download and unpack MovieLens ``name`` (see :data:`ARCHIVES`) under ``destination``.

    The archive's MD5 must match the published one, or nothing is unpacked and the
    download is deleted. Returns the directory holding the files. Needs the network.
    """
    if name not in ARCHIVES:
        raise ValueError(f"unknown MovieLens archive {name!r}; choose one of {list(ARCHIVES)}")
    destination = Path(destination)
    target = destination / name
    if target.is_dir():
        return target
    destination.mkdir(parents=True, exist_ok=True)
    url = f"{base_url}{name}.zip"
    expected = ARCHIVES[name]
    if expected is None:
        with urllib.request.urlopen(f"{url}.md5") as response:
            found = re.search(r"\b[0-9a-f]{32}\b", response.read().decode())
        if found is None:
            raise ValueError(f"{url}.md5 holds no MD5 checksum")
        expected = found.group(0)
    archive = destination / f"{name}.zip.part"
    with urllib.request.urlopen(url) as response, open(archive, "wb") as f:
        shutil.copyfileobj(response, f)
    actual = _md5(archive)
    if actual != expected:
        archive.unlink()
        raise ValueError(f"{url}: checksum mismatch (MD5 {actual}, expected {expected}); "
                         "the download was deleted, try again")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(destination)
    archive.unlink()
    if not target.is_dir():
        raise FileNotFoundError(f"{url} did not unpack into {target}")
    return target
