"""Tests for the synthetic YouTube-like log generator."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from twotower.data.synthetic import (
    EPOCH,
    SECONDS_PER_DAY,
    SyntheticConfig,
    SyntheticLog,
    generate,
    read,
    true_logits,
    write,
)

SMALL = SyntheticConfig(
    num_users=300,
    num_items=2000,
    num_days=4,
    events_per_day=3000,
    latent_dim=8,
    num_channels=60,
    num_categories=8,
    seed=3,
)


@pytest.fixture(scope="module")
def small_log() -> SyntheticLog:
    return generate(SMALL)


def _tables(log: SyntheticLog) -> list[pa.Table]:
    return [log.events, log.items, log.item_truth, log.user_truth]


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float64)


def _top1pct_share(log: SyntheticLog) -> float:
    item_ids = log.items.column("item_id").to_numpy()
    idx = np.searchsorted(item_ids, log.events.column("item_id").to_numpy())
    counts = np.sort(np.bincount(idx, minlength=item_ids.size))[::-1]
    return counts[: max(1, item_ids.size // 100)].sum() / counts.sum()


def test_same_seed_identical_different_seed_differs(small_log: SyntheticLog) -> None:
    again = generate(SMALL)
    for a, b in zip(_tables(small_log), _tables(again), strict=True):
        assert a.equals(b)
    other = generate(SyntheticConfig(**{**SMALL.to_dict(), "seed": 4}))
    assert not other.events.equals(small_log.events)
    assert not other.item_truth.equals(small_log.item_truth)


def test_schema_and_values(small_log: SyntheticLog) -> None:
    assert small_log.events.schema == pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("timestamp", pa.int64()),
            ("day", pa.int32()),
            ("reward", pa.float32()),
        ]
    )
    assert small_log.items.schema == pa.schema(
        [
            ("item_id", pa.int64()),
            ("channel", pa.int64()),
            ("category", pa.int64()),
            ("release_day", pa.int32()),
        ]
    )
    assert small_log.item_truth.schema == pa.schema(
        [
            ("item_id", pa.int64()),
            ("popularity", pa.float64()),
            ("latent", pa.list_(pa.float32())),
        ]
    )
    assert small_log.user_truth.schema == pa.schema(
        [
            ("user_id", pa.int64()),
            ("activity", pa.float64()),
            ("taste", pa.list_(pa.float32())),
        ]
    )
    ev = small_log.events
    assert ev.num_rows == SMALL.num_days * SMALL.events_per_day
    assert all(ev.column(c).null_count == 0 for c in ev.column_names)
    reward = ev.column("reward").to_numpy()
    assert not np.isnan(reward).any()
    assert reward.min() >= 0.0 and reward.max() <= 1.0
    assert reward.std() > 0.05  # not a constant

    ts = ev.column("timestamp").to_numpy()
    day = ev.column("day").to_numpy()
    assert np.all(np.diff(ts) >= 0)
    assert np.array_equal((ts - EPOCH) // SECONDS_PER_DAY, day)
    assert np.array_equal(np.bincount(day), [SMALL.events_per_day] * SMALL.num_days)

    items = small_log.items
    item_ids = items.column("item_id").to_numpy()
    assert items.num_rows == SMALL.num_items
    assert np.all(np.diff(item_ids) > 0)  # unique, sorted
    assert not np.array_equal(item_ids, np.arange(SMALL.num_items))  # not dense indices
    assert np.array_equal(small_log.item_truth.column("item_id").to_numpy(), item_ids)
    channel = items.column("channel").to_numpy()
    category = items.column("category").to_numpy()
    assert channel.min() >= 0 and channel.max() < SMALL.num_channels
    assert category.min() >= 0 and category.max() < SMALL.num_categories
    # a channel belongs to exactly one category
    pairs = np.unique(np.stack([channel, category], axis=1), axis=0)
    assert np.unique(pairs[:, 0]).size == pairs.shape[0]

    user_ids = small_log.user_truth.column("user_id").to_numpy()
    assert user_ids.size == SMALL.num_users and np.all(np.diff(user_ids) > 0)
    assert np.isin(ev.column("user_id").to_numpy(), user_ids).all()

    popularity = small_log.item_truth.column("popularity").to_numpy()
    activity = small_log.user_truth.column("activity").to_numpy()
    assert popularity.min() > 0 and np.isclose(popularity.sum(), 1.0)
    assert activity.min() > 0 and np.isclose(activity.sum(), 1.0)
    latent = _matrix(small_log.item_truth, "latent")
    taste = _matrix(small_log.user_truth, "taste")
    assert latent.shape == (SMALL.num_items, SMALL.latent_dim)
    assert taste.shape == (SMALL.num_users, SMALL.latent_dim)
    assert np.allclose(np.linalg.norm(latent, axis=1), 1.0, atol=1e-5)


def test_events_respect_release_days(small_log: SyntheticLog) -> None:
    items = small_log.items
    item_ids = items.column("item_id").to_numpy()
    release = items.column("release_day").to_numpy()
    ev_items = small_log.events.column("item_id").to_numpy()
    ev_day = small_log.events.column("day").to_numpy()
    pos = np.searchsorted(item_ids, ev_items)
    assert np.all(pos < item_ids.size) and np.array_equal(item_ids[pos], ev_items)
    assert np.all(release[pos] <= ev_day)

    new = release > 0
    assert new.sum() == int(SMALL.new_item_fraction * SMALL.num_items)
    assert set(np.unique(release[new])) == set(range(1, SMALL.num_days))
    # new items do show up in the log, first after day 0
    new_events = new[pos]
    assert new_events.any()
    assert ev_day[new_events].min() > 0


def test_no_new_items_and_single_day() -> None:
    log = generate(
        SyntheticConfig(
            num_users=20,
            num_items=50,
            num_days=1,
            events_per_day=100,
            num_channels=5,
            num_categories=2,
            new_item_fraction=0.0,
        )
    )
    assert log.events.num_rows == 100
    assert (log.items.column("release_day").to_numpy() == 0).all()


def test_popularity_is_power_law_and_grows_with_exponent() -> None:
    base = {**SMALL.to_dict(), "new_item_fraction": 0.0}
    flat = generate(SyntheticConfig(**{**base, "popularity_exponent": 0.5}))
    steep = generate(SyntheticConfig(**{**base, "popularity_exponent": 1.2}))
    flat_share, steep_share = _top1pct_share(flat), _top1pct_share(steep)
    assert flat_share > 0.03  # well above the 1% of a uniform log
    assert steep_share > flat_share + 0.2
    # the ground-truth weights are Zipf: weight * rank**exponent is constant
    pop = np.sort(
        generate(SyntheticConfig(**{**base, "events_per_day": 1, "popularity_exponent": 1.0}))
        .item_truth.column("popularity")
        .to_numpy()
    )[::-1]
    ranks = np.arange(1, pop.size + 1)
    assert np.allclose(pop * ranks, pop[0])


def test_events_are_personalised(small_log: SyntheticLog) -> None:
    user_ids = small_log.user_truth.column("user_id").to_numpy()
    item_ids = small_log.item_truth.column("item_id").to_numpy()
    taste = _matrix(small_log.user_truth, "taste")
    latent = _matrix(small_log.item_truth, "latent")
    popularity = small_log.item_truth.column("popularity").to_numpy()
    release = small_log.items.column("release_day").to_numpy()
    uidx = np.searchsorted(user_ids, small_log.events.column("user_id").to_numpy())
    iidx = np.searchsorted(item_ids, small_log.events.column("item_id").to_numpy())
    day = small_log.events.column("day").to_numpy()

    logits = true_logits(taste, latent, popularity, SMALL.taste_strength)
    # log P(j | u, d): softmax over the items released by day d
    log_norm = np.stack(
        [np.log(np.exp(logits[:, release <= d]).sum(axis=1)) for d in range(SMALL.num_days)],
        axis=1,
    )
    own = logits[uidx, iidx] - log_norm[uidx, day]
    other_user = np.random.default_rng(0).permutation(SMALL.num_users)[uidx]
    other = logits[other_user, iidx] - log_norm[other_user, day]
    assert own.mean() > other.mean() + 1.0  # nats per event

    # each user's true top-50 items hold far more of that user's events than of others'
    top = np.argsort(-logits, axis=1)[:, :50]
    in_top = np.zeros_like(logits, dtype=bool)
    np.put_along_axis(in_top, top, True, axis=1)
    own_share = in_top[uidx, iidx].mean()
    other_share = in_top[other_user, iidx].mean()
    assert own_share > 2 * other_share


def test_write_and_read_back(small_log: SyntheticLog, tmp_path) -> None:
    out = tmp_path / "synth"
    paths = write(small_log, out)
    expected = {
        "events": out / "events.parquet",
        "items": out / "items.parquet",
        "item_truth": out / "truth" / "items.parquet",
        "user_truth": out / "truth" / "users.parquet",
        "meta": out / "synth.json",
    }
    assert paths == expected
    assert all(p.is_file() for p in paths.values())
    meta = json.loads(paths["meta"].read_text())
    assert meta["config"] == SMALL.to_dict()
    assert meta["counts"]["events"] == small_log.events.num_rows
    assert meta["counts"]["items"] == SMALL.num_items
    assert meta["counts"]["users"] == SMALL.num_users

    back = read(out)
    assert back.config == SMALL
    for a, b in zip(_tables(small_log), _tables(back), strict=True):
        assert a.equals(b)


def test_read_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"synth\.json"):
        read(tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_users", 0),
        ("num_items", -1),
        ("num_days", 0),
        ("events_per_day", 0),
        ("latent_dim", 0),
        ("num_channels", 0),
        ("num_categories", 0),
        ("num_items", 2.5),
        ("num_users", True),
        ("popularity_exponent", -0.1),
        ("popularity_exponent", float("nan")),
        ("taste_strength", float("inf")),
        ("taste_strength", -1.0),
        ("new_item_fraction", 1.0),
        ("new_item_fraction", -0.1),
        ("seed", -1),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_new_items_need_a_later_day() -> None:
    with pytest.raises(ValueError, match="new_item_fraction"):
        SyntheticConfig(num_days=1, new_item_fraction=0.2)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="bogus"):
        SyntheticConfig.from_dict({"bogus": 1})
    assert SyntheticConfig.from_dict(SMALL.to_dict()) == SMALL
