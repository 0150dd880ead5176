"""A tiny saved model, items table and index for the serving tests (built in well under 1 s)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from twotower.checkpoint import save_model
from twotower.data.interactions import Columns
from twotower.experiment import default_model_config
from twotower.frequency import StreamingFrequencyEstimator
from twotower.index import index_items
from twotower.towers import TwoTowerModel

NUM_ITEMS = 300


def make_model(directory: Path, seed: int = 0, output_dim: int = 8) -> Path:
    """A random model whose estimator has seen a skewed stream (low item ids popular)."""
    columns = Columns()
    torch.manual_seed(seed)
    config = default_model_config(columns, item_buckets=512, user_buckets=64,
                                  feature_buckets=32, dim=8, hidden=(16,),
                                  output_dim=output_dim)
    estimator = StreamingFrequencyEstimator(4096)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        estimator.update((rng.zipf(1.3, 32) - 1) % NUM_ITEMS)
    save_model(directory, TwoTowerModel(config), estimator, {"columns": asdict(columns)})
    return directory


def make_items(path: Path, num_items: int = NUM_ITEMS, string_keys: bool = False) -> Path:
    ids = np.arange(num_items)
    keys = [f"item-{i}" for i in ids] if string_keys else ids
    pq.write_table(pa.table({"item_id": keys, "channel": ids % 7, "category": ids % 3}), path)
    return path


def make_artifacts(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """``(model_dir, items_path, index_dir)`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_model(root / "model", seed)
    items = make_items(root / "items.parquet")
    index = index_items(model, items).save(root / "index")
    return model, items, index


def without_fingerprint(index_dir: Path, out: Path) -> Path:
    """A copy of an index directory whose ``index.json`` has no ``info`` section, so it
    records no model fingerprint."""
    shutil.copytree(index_dir, out)
    meta = json.loads((out / "index.json").read_text())
    del meta["info"]
    (out / "index.json").write_text(json.dumps(meta))
    return out
