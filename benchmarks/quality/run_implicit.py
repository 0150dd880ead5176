"""implicit's ALS and BPR (``settings["model"]``: "als" or "bpr"), one epoch = one
iteration of ``fit`` continued from the previous factors.

The user-item matrix holds each (user, item) event count, duplicates included, as the
protocol treats them as events. Recommendations come from implicit's own batch
``recommend`` with ``filter_already_liked_items=True``, which removes exactly the
protocol's exclusion set (the fit items).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from implicit.bpr import BayesianPersonalizedRanking
from runner_lib import Data, run


class Implicit:
    def __init__(self, data: Data, settings: dict, seed: int) -> None:
        ones = np.ones(len(data.fit_items), dtype=np.float32)
        self.user_items = sp.csr_matrix((ones, (data.fit_users, data.fit_items)),
                                        shape=(data.num_users, data.num_items))
        self.user_items.sum_duplicates()
        # A generator (not an int) so each epoch continues its stream: fresh BPR samples.
        rng = np.random.default_rng(seed)
        common = {"factors": settings["factors"], "regularization": settings["regularization"],
                  "iterations": 1, "random_state": rng, "num_threads": 1}
        if settings["model"] == "als":
            self.model = AlternatingLeastSquares(alpha=settings.get("alpha", 1.0), **common)
        else:
            self.model = BayesianPersonalizedRanking(learning_rate=settings["learning_rate"],
                                                     **common)
        self.num_events = len(data.fit_items)

    def train_epoch(self) -> int:
        self.model.fit(self.user_items, show_progress=False)
        return self.num_events

    def recommend(self, users: np.ndarray, k: int) -> list[list[int]]:
        ids, _ = self.model.recommend(users, self.user_items[users], N=k,
                                      filter_already_liked_items=True)
        return [row[row >= 0].tolist() for row in np.atleast_2d(ids)]


def build(data: Data, settings: dict, seed: int) -> Implicit:
    return Implicit(data, settings, seed)


if __name__ == "__main__":
    run(build, __doc__)
