"""MostPop: every user gets the items most frequent in the fit data, seen ones removed.

The floor any learned system must clear. No hyper-parameters and no randomness, so its
three test seeds agree; it trains one "epoch" (the count).
"""

from __future__ import annotations

import numpy as np
from runner_lib import Data, run, top_k_excluding


class MostPop:
    def __init__(self, data: Data) -> None:
        self.data = data
        self.counts = np.zeros(data.num_items, dtype=np.float32)

    def train_epoch(self) -> int:
        self.counts = np.bincount(self.data.fit_items, minlength=self.data.num_items)
        # Ties go to the lower catalogue index, deterministically.
        self.counts = self.counts - np.arange(self.data.num_items) / (10 * self.data.num_items)
        return len(self.data.fit_items)

    def recommend(self, users: np.ndarray, k: int) -> list[list[int]]:
        return top_k_excluding(np.tile(self.counts, (len(users), 1)), users, self.data, k)


def build(data: Data, settings: dict, seed: int) -> MostPop:
    return MostPop(data)


if __name__ == "__main__":
    run(build, __doc__, max_epochs=1)
