"""A large synthetic interaction log, written to Parquet in chunks (bounded memory).

Power-law item popularity and user activity, timestamps increasing from chunk to
chunk and sorted within each (so the files are in time order, as streaming needs),
items with a category and a list of tags. Used by the data benchmarks next to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

EPOCH = 1_700_000_000
SECONDS_PER_CHUNK = 86_400


def _cumulative(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    cumulative = np.cumsum(weights)
    return cumulative / cumulative[-1]


def write_log(out: Path, events: int, users: int, items: int, seed: int = 0,
              chunk: int = 1_000_000, history: int = 20) -> Path:
    """Write ``out/events.parquet``, ``out/items.parquet`` and ``out/schema.yaml``;
    returns the schema's path."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_cdf, user_cdf = _cumulative(items, 0.9, rng), _cumulative(users, 0.8, rng)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("timestamp", pa.int64())])
    with pq.ParquetWriter(out / "events.parquet", schema, compression="zstd") as writer:
        for start in range(0, events, chunk):
            n = min(chunk, events - start)
            day = EPOCH + (start // chunk) * SECONDS_PER_CHUNK
            writer.write_table(pa.table({
                "user_id": np.searchsorted(user_cdf, rng.random(n)) + 1,
                "item_id": np.searchsorted(item_cdf, rng.random(n)) + 1,
                "timestamp": day + np.sort(rng.integers(0, SECONDS_PER_CHUNK, n)),
            }, schema=schema), row_group_size=1 << 17)
    keys = np.arange(1, items + 1)
    tags = pa.ListArray.from_arrays(np.arange(0, 2 * items + 1, 2, dtype=np.int32),
                                    np.stack([keys % 50, 1000 + keys % 37], 1).ravel())
    pq.write_table(pa.table({"item_id": keys, "category": keys % 100, "tags": tags}),
                   out / "items.parquet")
    spec = {
        "events": {"path": "events.parquet", "user": "user_id", "item": "item_id",
                   "time": "timestamp"},
        "items": {"path": "items.parquet", "key": "item_id"},
        "query_features": [
            {"name": "user_id", "kind": "id", "table": "user"},
            {"name": "history", "kind": "id_list", "history": "item_id", "length": history,
             "table": "item"},
            {"name": "history_category", "kind": "id_list", "history": "category",
             "length": history, "table": "category"},
        ],
        "item_features": [
            {"name": "item_id", "kind": "id", "table": "item"},
            {"name": "category", "kind": "id", "table": "category"},
            {"name": "tags", "kind": "id_list"},
        ],
    }
    path = out / "schema.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
