"""Deterministic synthetic YouTube-like interaction log with ground truth.

Used by ``twotower synth`` and ``twotower quickstart``. The log is built so that
popularity bias matters: item popularity follows a power law, so a model trained
with in-batch negatives over-penalises popular items unless its logits are
corrected by the items' sampling probabilities (logQ correction).

Generative model (every draw comes from one ``np.random.default_rng(seed)``, so
the same :class:`SyntheticConfig` gives identical tables):

1. **Content.** ``num_categories`` category centres are random unit vectors in
   ``R^latent_dim``. Each of the ``num_channels`` channels belongs to a random
   category; its centre is ``unit(category centre + noise)``. Each item belongs to
   a random channel; its latent vector is ``unit(channel centre + noise)``. So an
   item's channel and category are informative about its latent vector, and an
   item tower can place items (including brand-new ones) from their content.
2. **Popularity.** A base weight ``w_j ∝ rank_j ** -popularity_exponent``, where
   the ranks ``1..num_items`` are randomly permuted over items (independent of
   channel and category). ``item_truth.popularity`` is ``w`` normalised to sum 1.
3. **Releases.** ``floor(new_item_fraction * num_items)`` random items get a
   release day drawn uniformly from ``1..num_days-1``; the others are released
   on day 0. An item can only be watched from its release day on.
4. **Users.** Each user's taste is ``unit(c1 + b * c2 + noise)`` for a random
   primary and secondary category centre ``c1, c2`` and ``b ~ U(0, 0.7)``.
   Activity is a power law: ``activity ∝ rank ** -0.8`` over randomly permuted
   ranks (a few users are far more active than most); ``user_truth.activity``
   sums to 1.
5. **Events.** Each day ``d`` has exactly ``events_per_day`` events; their users
   are a multinomial draw with the activity probabilities. For an event of user
   ``u`` on day ``d`` the item is drawn with

       P(j | u, d) ∝ w_j * exp(taste_strength * <taste_u, latent_j>)

   over the items with ``release_day <= d`` (see :func:`true_logits`). The reward
   (think watch fraction) is ``sigmoid(4 * (<taste_u, latent_j> - 0.3) + N(0,1))``
   in ``[0, 1]``. The timestamp is ``EPOCH + d * 86400 + U{0..86399}`` with
   ``EPOCH`` = 2026-01-01T00:00:00Z; events are sorted by timestamp, ties kept
   in generation order (stable sort).
6. **Ids.** User and item ids are unique int64 values drawn at random from
   ``[1, 2**40)``: they are keys, not dense indices. ``items``, ``item_truth``
   and ``user_truth`` are sorted by id.

Sampling is vectorised: items are ordered by release day, so a day's active
items are a prefix of that order. For a chunk of users the unnormalised item
probabilities are computed once, their row-wise cumulative sums normalised to
``[0, 1]`` and shifted by the row index, and all of the chunk's events (every
day) are drawn with one ``np.searchsorted`` on the flattened array.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "EPOCH",
    "SECONDS_PER_DAY",
    "SyntheticConfig",
    "SyntheticLog",
    "generate",
    "read",
    "true_logits",
    "write",
]

EPOCH = 1767225600  # 2026-01-01T00:00:00Z
SECONDS_PER_DAY = 86400
FORMAT_VERSION = 1

# Fixed shape parameters of the generative model (documented above).
_CHANNEL_NOISE = 0.6  # norm of the channel's offset from its category centre (before unit())
_ITEM_NOISE = 0.6  # norm of the item's offset from its channel centre (before unit())
_TASTE_NOISE = 0.5  # norm of the noise in a user's taste (before unit())
_SECONDARY_TASTE_MAX = 0.7  # weight of the secondary category in a taste, U(0, this)
_ACTIVITY_EXPONENT = 0.8  # user activity ∝ rank ** -this
_REWARD_SLOPE = 4.0
_REWARD_CENTRE = 0.3
_REWARD_NOISE = 1.0
_ID_HIGH = 2**40  # ids are drawn from [1, _ID_HIGH)
_CHUNK_ELEMENTS = 1 << 22  # users per chunk * num_items, bounds the working memory

_EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("day", pa.int32()),
        ("reward", pa.float32()),
    ]
)
_ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("channel", pa.int64()),
        ("category", pa.int64()),
        ("release_day", pa.int32()),
    ]
)
_ITEM_TRUTH_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("popularity", pa.float64()),
        ("latent", pa.list_(pa.float32())),
    ]
)
_USER_TRUTH_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("activity", pa.float64()),
        ("taste", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic log (see the module docstring for the model)."""

    num_users: int = 5000
    num_items: int = 20000
    num_days: int = 14
    events_per_day: int = 30000
    latent_dim: int = 16
    popularity_exponent: float = 0.8  # Zipf exponent of the item popularity weights
    num_channels: int = 400
    num_categories: int = 24
    new_item_fraction: float = 0.2  # share of items released after day 0
    taste_strength: float = 8.0  # weight of <taste, latent> against log popularity
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_users",
            "num_items",
            "num_days",
            "events_per_day",
            "latent_dim",
            "num_channels",
            "num_categories",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"SyntheticConfig.{name} must be a positive integer, got {value!r}"
                )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(
                f"SyntheticConfig.seed must be a non-negative integer, got {self.seed!r}"
            )
        for name in ("popularity_exponent", "taste_strength"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"SyntheticConfig.{name} must be a finite number >= 0, got {value!r}"
                )
        f = self.new_item_fraction
        if not _is_real(f) or not 0 <= f < 1:
            raise ValueError(f"SyntheticConfig.new_item_fraction must be in [0, 1), got {f!r}")
        if self.num_days == 1 and math.floor(f * self.num_items) > 0:
            raise ValueError(
                "SyntheticConfig.new_item_fraction must be 0 when num_days is 1 "
                f"(no later day to release items on), got {f!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticConfig:
        """Build a config from a mapping (e.g. ``synth.json``'s ``config``); unknown keys fail."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass
class SyntheticLog:
    """A generated log: events, the item corpus and the ground truth behind them."""

    config: SyntheticConfig
    events: pa.Table  # user_id int64, item_id int64, timestamp int64, day int32, reward float32
    items: pa.Table  # item_id int64, channel int64, category int64, release_day int32
    item_truth: pa.Table  # item_id int64, popularity float64, latent list<float32>
    user_truth: pa.Table  # user_id int64, activity float64, taste list<float32>


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, n: int, dim: int, scale: float) -> np.ndarray:
    """Gaussian noise whose expected norm is about ``scale``."""
    return rng.standard_normal((n, dim)) * (scale / math.sqrt(dim))


def _unique_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    ids = np.unique(rng.integers(1, _ID_HIGH, size=n + n // 8 + 16, dtype=np.int64))
    while ids.size < n:  # practically never: collisions in 2**40 are rare
        extra = rng.integers(1, _ID_HIGH, size=n, dtype=np.int64)
        ids = np.unique(np.concatenate([ids, extra]))
    # a random subset of n distinct values, in random order
    return rng.permutation(ids)[:n]


def _list_column(matrix: np.ndarray) -> pa.ListArray:
    values = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


def true_logits(
    taste: np.ndarray,
    latent: np.ndarray,
    popularity: np.ndarray,
    taste_strength: float,
) -> np.ndarray:
    """Unnormalised log P(j | u): ``log popularity_j + taste_strength * <taste_u, latent_j>``.

    ``taste`` is ``[num_users, dim]``, ``latent`` ``[num_items, dim]``, ``popularity``
    ``[num_items]`` (any positive scale). On day ``d`` the distribution is the softmax
    of these logits over the items with ``release_day <= d``. Returns float64
    ``[num_users, num_items]``.
    """
    taste = np.asarray(taste, dtype=np.float64)
    latent = np.asarray(latent, dtype=np.float64)
    logw = np.log(np.asarray(popularity, dtype=np.float64))
    return logw[None, :] + taste_strength * (taste @ latent.T)


def generate(config: SyntheticConfig) -> SyntheticLog:
    """Generate the synthetic log described in the module docstring."""
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    rng = np.random.default_rng(config.seed)
    n_users, n_items, n_days = config.num_users, config.num_items, config.num_days
    dim = config.latent_dim

    # 1. content: categories -> channels -> items
    category_centres = _unit(rng.standard_normal((config.num_categories, dim)))
    channel_category = rng.integers(0, config.num_categories, size=config.num_channels)
    channel_centres = _unit(
        category_centres[channel_category] + _noise(rng, config.num_channels, dim, _CHANNEL_NOISE)
    )
    item_channel = rng.integers(0, config.num_channels, size=n_items)
    item_latent = _unit(channel_centres[item_channel] + _noise(rng, n_items, dim, _ITEM_NOISE))

    # 2. popularity: power law over randomly permuted ranks
    ranks = rng.permutation(n_items).astype(np.float64) + 1.0
    weight = ranks ** (-float(config.popularity_exponent))
    popularity = weight / weight.sum()

    # 3. releases
    release_day = np.zeros(n_items, dtype=np.int32)
    n_new = math.floor(config.new_item_fraction * n_items)
    if n_new:
        new_items = rng.choice(n_items, size=n_new, replace=False)
        release_day[new_items] = rng.integers(1, n_days, size=n_new)

    item_ids = _unique_ids(rng, n_items)

    # 4. users
    primary = rng.integers(0, config.num_categories, size=n_users)
    secondary = rng.integers(0, config.num_categories, size=n_users)
    mix = rng.uniform(0.0, _SECONDARY_TASTE_MAX, size=n_users)
    taste = _unit(
        category_centres[primary]
        + mix[:, None] * category_centres[secondary]
        + _noise(rng, n_users, dim, _TASTE_NOISE)
    )
    user_ranks = rng.permutation(n_users).astype(np.float64) + 1.0
    activity = user_ranks**-_ACTIVITY_EXPONENT
    activity /= activity.sum()
    user_ids = _unique_ids(rng, n_users)

    # 5. events
    counts = rng.multinomial(config.events_per_day, activity, size=n_days)  # [days, users]
    order = np.argsort(release_day, kind="stable")  # a day's active items are a prefix
    n_active = np.searchsorted(release_day[order], np.arange(n_days), side="right")
    latent_sorted = item_latent[order]
    popularity_sorted = popularity[order]

    chunk = max(1, _CHUNK_ELEMENTS // n_items)
    ev_user, ev_item, ev_day, ev_sec, ev_reward = [], [], [], [], []
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        c = counts[:, start:stop].T  # [rows, days]
        rows = stop - start
        logits = true_logits(
            taste[start:stop], latent_sorted, popularity_sorted, config.taste_strength
        )
        logits -= logits.max(axis=1, keepdims=True)
        cum = np.cumsum(np.exp(logits), axis=1)
        cum /= cum[:, -1:]
        flat_counts = c.reshape(-1)
        row = np.repeat(np.repeat(np.arange(rows), n_days), flat_counts)
        day = np.repeat(np.tile(np.arange(n_days), rows), flat_counts)
        last = n_active[day] - 1
        mass = cum[row, last]  # probability mass of the day's active prefix
        cum += np.arange(rows, dtype=np.float64)[:, None]
        u = rng.random(row.size)
        pos = np.searchsorted(cum.reshape(-1), row + u * mass, side="right")
        local = np.clip(pos - row * n_items, 0, last)  # guards float rounding at edges
        item_index = order[local]
        affinity = np.einsum("ij,ij->i", taste[start + row], item_latent[item_index])
        noise = rng.standard_normal(row.size)
        reward = 1.0 / (
            1.0 + np.exp(-(_REWARD_SLOPE * (affinity - _REWARD_CENTRE) + _REWARD_NOISE * noise))
        )
        ev_user.append(start + row)
        ev_item.append(item_index)
        ev_day.append(day)
        ev_sec.append(rng.integers(0, SECONDS_PER_DAY, size=row.size))
        ev_reward.append(reward)

    user_index = np.concatenate(ev_user)
    item_index = np.concatenate(ev_item)
    day = np.concatenate(ev_day).astype(np.int32)
    timestamp = EPOCH + day.astype(np.int64) * SECONDS_PER_DAY + np.concatenate(ev_sec)
    reward = np.clip(np.concatenate(ev_reward), 0.0, 1.0).astype(np.float32)
    by_time = np.argsort(timestamp, kind="stable")

    events = pa.Table.from_arrays(
        [
            pa.array(user_ids[user_index[by_time]], type=pa.int64()),
            pa.array(item_ids[item_index[by_time]], type=pa.int64()),
            pa.array(timestamp[by_time], type=pa.int64()),
            pa.array(day[by_time], type=pa.int32()),
            pa.array(reward[by_time], type=pa.float32()),
        ],
        schema=_EVENTS_SCHEMA,
    )

    item_order = np.argsort(item_ids)
    items = pa.Table.from_arrays(
        [
            pa.array(item_ids[item_order], type=pa.int64()),
            pa.array(item_channel[item_order], type=pa.int64()),
            pa.array(channel_category[item_channel[item_order]], type=pa.int64()),
            pa.array(release_day[item_order], type=pa.int32()),
        ],
        schema=_ITEMS_SCHEMA,
    )
    item_truth = pa.Table.from_arrays(
        [
            pa.array(item_ids[item_order], type=pa.int64()),
            pa.array(popularity[item_order], type=pa.float64()),
            _list_column(item_latent[item_order]),
        ],
        schema=_ITEM_TRUTH_SCHEMA,
    )
    user_order = np.argsort(user_ids)
    user_truth = pa.Table.from_arrays(
        [
            pa.array(user_ids[user_order], type=pa.int64()),
            pa.array(activity[user_order], type=pa.float64()),
            _list_column(taste[user_order]),
        ],
        schema=_USER_TRUTH_SCHEMA,
    )
    return SyntheticLog(config, events, items, item_truth, user_truth)


_FILES = {
    "events": "events.parquet",
    "items": "items.parquet",
    "item_truth": "truth/items.parquet",
    "user_truth": "truth/users.parquet",
    "meta": "synth.json",
}


def write(log: SyntheticLog, out_dir: Path | str) -> dict[str, Path]:
    """Write the log under ``out_dir``; returns the paths by role.

    Files: ``events.parquet``, ``items.parquet``, ``truth/items.parquet``,
    ``truth/users.parquet`` (zstd Parquet) and ``synth.json`` (config and counts).
    """
    out = Path(out_dir)
    paths = {role: out / name for role, name in _FILES.items()}
    paths["item_truth"].parent.mkdir(parents=True, exist_ok=True)
    for role in ("events", "items", "item_truth", "user_truth"):
        pq.write_table(getattr(log, role), paths[role], compression="zstd")
    release = log.items.column("release_day").to_numpy()
    meta = {
        "format": "twotower-synthetic",
        "format_version": FORMAT_VERSION,
        "config": log.config.to_dict(),
        "counts": {
            "events": log.events.num_rows,
            "items": log.items.num_rows,
            "users": log.user_truth.num_rows,
            "new_items": int(np.count_nonzero(release > 0)),
            "days": log.config.num_days,
        },
        "epoch": EPOCH,
        "files": {role: name for role, name in _FILES.items() if role != "meta"},
    }
    paths["meta"].write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return paths


def read(out_dir: Path | str) -> SyntheticLog:
    """Read back a log written by :func:`write`."""
    out = Path(out_dir)
    meta_path = out / _FILES["meta"]
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found (not a synthetic log directory?)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "twotower-synthetic":
        raise ValueError(f"{meta_path}: not a twotower synthetic log description")
    config = SyntheticConfig.from_dict(meta["config"])
    tables = {role: pq.read_table(out / name) for role, name in _FILES.items() if role != "meta"}
    return SyntheticLog(config=config, **tables)
