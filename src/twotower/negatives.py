"""Mixed negative sampling (Yang et al., "Mixed Negative Sampling for Learning Two-tower
Neural Networks in Recommendations", WWW 2020).

In-batch negatives are drawn by popularity: an item nobody interacted with lately is
never a negative, so nothing teaches the model that it is worse than anything, and the
tail of the corpus (fresh items, items only their features describe) is ranked by
chance. Adding items drawn uniformly from the whole corpus to every batch's candidates
fixes that. Each column keeps its own logQ correction: an in-batch column its
probability of being in the batch, a sampled column its probability of being drawn.
"""

from __future__ import annotations

import numpy as np

__all__ = ["uniform_negatives"]


def uniform_negatives(num_items: int, count: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """``count`` uniform draws (with replacement) of rows in ``[0, num_items)``.

    Returns ``(rows, counts, log_q)``: the distinct rows drawn, how often each was drawn,
    and the log of an item's probability of being drawn at least once,
    ``log(1 - (1 - 1/num_items)^count)``, the same for every item.
    """
    if num_items < 1 or count < 1:
        raise ValueError(f"uniform negatives need a corpus and a count >= 1, got "
                         f"{num_items} items and count {count}")
    rows, counts = np.unique(rng.integers(num_items, size=count), return_counts=True)
    log_q = float(np.log(-np.expm1(count * np.log1p(-1.0 / num_items)))) if num_items > 1 \
        else 0.0
    return rows, counts, log_q
