"""A tiny synthetic log on disk, in time-ordered Parquet files with a schema of a tiny model,
for the command-line training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from twotower.data.synthetic import SyntheticConfig, generate

TINY = SyntheticConfig(num_users=200, num_items=500, num_days=3, events_per_day=1000,
                       num_channels=20, num_categories=4)
SCHEMA = {
    "events": {"path": "events", "reward": "reward"},
    "items": {"path": "items.parquet"},
    "query_features": [{"name": "user_id", "kind": "id", "table": "user"},
                       {"name": "history", "kind": "id_list", "history": "item_id",
                        "length": 5, "table": "item"}],
    "item_features": [{"name": "item_id", "kind": "id", "table": "item"},
                      {"name": "channel", "kind": "id"}],
    "tables": {"user": {"buckets": 256}, "item": {"buckets": 1024}, "channel": {"buckets": 64}},
    "model": {"dim": 8, "hidden": [16], "output_dim": 8},
}


def write_log(folder: Path, files: int = 2) -> Path:
    """The tiny synthetic log as ``files`` Parquet files in time order, with a schema."""
    log = generate(TINY)
    (folder / "events").mkdir(parents=True)
    bounds = np.linspace(0, log.events.num_rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(log.events.slice(bounds[i], bounds[i + 1] - bounds[i]),
                       folder / "events" / f"part-{i}.parquet", row_group_size=500)
    pq.write_table(log.items, folder / "items.parquet")
    (folder / "schema.yaml").write_text(yaml.safe_dump(SCHEMA))
    return folder / "schema.yaml"


def tiny_prepared(config: SyntheticConfig):
    """A synthetic log loaded in memory and encoded for a tiny model (width 4)."""
    from twotower.data.interactions import load_interactions
    from twotower.experiment import default_model_config, prepare

    synthetic = generate(config)
    interactions = load_interactions(synthetic.events, synthetic.items)
    return prepare(interactions, default_model_config(
        interactions.columns, item_buckets=256, user_buckets=64, feature_buckets=32, dim=4,
        hidden=(8,), output_dim=4))
