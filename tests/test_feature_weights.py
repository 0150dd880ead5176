"""Weighted bags: an id_list with a weights column pools by weighted mean."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from twotower.features import EncodedFeatures, FeatureSpec, TableSpec
from twotower.hashing import hash_buckets, seed_for

SPECS = [FeatureSpec("history", "id_list", table="item", weights="history_weights")]
TABLES = {"item": TableSpec(64, 3)}


@pytest.mark.parametrize("arrow", [True, False])
def test_weighted_mean_matches_hand_computation(arrow: bool) -> None:
    ids, weights = [[5, 7], [], [9]], [[1.0, 3.0], [], [2.0]]
    columns = {"history": pa.array(ids) if arrow else ids,
               "history_weights": pa.array(weights) if arrow else weights}
    batch = EncodedFeatures(SPECS, TABLES, columns).take(np.arange(3))
    table = torch.nn.EmbeddingBag(64, 3, mode="sum")
    pooled = table(*batch["history"][:2], per_sample_weights=batch["history"][2])
    rows = hash_buckets(np.array([5, 7, 9]), 64, seed_for("table/item"))
    w = table.weight.detach()
    expected = torch.stack([(1 * w[rows[0]] + 3 * w[rows[1]]) / 4, torch.zeros(3), w[rows[2]]])
    torch.testing.assert_close(pooled.detach(), expected)


def test_weights_must_match_ids_and_be_non_negative() -> None:
    with pytest.raises(ValueError, match="one weight per id"):
        EncodedFeatures(SPECS, TABLES, {"history": [[1, 2]], "history_weights": [[1.0]]})
    with pytest.raises(ValueError, match="finite and non-negative"):
        EncodedFeatures(SPECS, TABLES, {"history": [[1, 2]], "history_weights": [[1.0, -1.0]]})
    with pytest.raises(KeyError, match="history_weights"):
        EncodedFeatures(SPECS, TABLES, {"history": [[1, 2]]})
    with pytest.raises(ValueError, match="only an id_list"):
        FeatureSpec("user", "id", weights="w")
