"""Streaming, hash-based estimate of how often each item is sampled into a batch.

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations"
(RecSys 2019), Algorithms 2 and 3: per hash ``i`` an array ``A_i`` (last step a bucket was
seen) and ``B_i`` (moving average of the steps between sightings); the estimate is
``p(y) = 1 / max_i B_i[h_i(y)]``. No item vocabulary is needed, and the estimate follows
shifts in the item distribution.

Choices the paper leaves open (see DESIGN.md section 1, "What exact means here"):

- An item counts once per step however often it occurs in the batch (``p`` is the
  probability of being *in* a batch), so an update runs over the batch's distinct ids.
- Initial state ``A = 0``, ``B = 0``, steps numbered from 1, so ``A == 0`` means "bucket never
  seen". The first sighting of a bucket at step ``t`` sets ``B = t`` ("not seen in ``t`` steps
  since the start", i.e. the update rule with ``alpha = 1``). The paper's plain rule from
  ``A = B = 0`` would give ``B = alpha * t`` and ``p = 1 / (alpha t)``, far above 1 early on.
  A bucket never seen is read as ``B = t + 1`` (``p = 1 / (t + 1)``; ``p = 1`` before any
  update), the value it would get if it were seen at the next step.
- ``p`` is clamped to at most 1: distinct items colliding in one step push ``B`` below 1.
- The training loop reads a batch's estimate *after* that batch's update, so the estimate
  includes the batch it corrects: a brand-new item gets ``p = 1/t`` from its first sighting
  (bounded by 1) instead of the never-seen value, and every item in the batch has a bucket
  that is actually populated, so all items are read the same way.

A, the last step, is ``int64`` so ``t - A`` stays exact past 2**53 steps. The update is
vectorised and gives arrays bit-identical to the plain per-item loop (kept in the tests).
"""

from __future__ import annotations

import numpy as np

from twotower.hashing import hash_buckets, seed_for, to_int64_ids

__all__ = ["StreamingFrequencyEstimator"]

_MASK64 = 0xFFFFFFFFFFFFFFFF


def _flat_ids(item_ids: object) -> np.ndarray:
    return to_int64_ids(item_ids).ravel()


class StreamingFrequencyEstimator:
    """Estimate of each item's per-step sampling probability (Algorithms 2 and 3).

    ``update(ids)`` is one training step; ``probability(ids)`` reads without changing state.
    """

    def __init__(self, num_buckets: int, num_hashes: int = 1, alpha: float = 0.01,
                 seed: int = 0) -> None:
        if not isinstance(num_buckets, int | np.integer) or num_buckets < 1:
            raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
        if not isinstance(num_hashes, int | np.integer) or num_hashes < 1:
            raise ValueError(f"num_hashes must be an integer >= 1, got {num_hashes!r}")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}") from None
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.num_buckets = int(num_buckets)
        self.num_hashes = int(num_hashes)
        self.alpha = alpha
        self.seed = int(seed) & _MASK64
        self._seeds = [seed_for(f"frequency/{i}") ^ self.seed for i in range(self.num_hashes)]
        shape = (self.num_hashes, self.num_buckets)
        self._last_step = np.zeros(shape, dtype=np.int64)  # A
        self._interval = np.zeros(shape, dtype=np.float64)  # B
        self._step = 0

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> StreamingFrequencyEstimator:
        """An estimator rebuilt from a saved state, its configuration included."""
        try:
            estimator = cls(int(state["num_buckets"]), int(state["num_hashes"]),
                            float(state["alpha"]), int(state["seed"]))
        except KeyError as error:
            raise ValueError(f"frequency estimator state is missing key {error}") from None
        estimator.load_state_dict(state)
        return estimator

    @property
    def step(self) -> int:
        """Global step ``t``: the number of ``update`` calls so far."""
        return self._step

    @property
    def nbytes(self) -> int:
        """Memory held by the state arrays."""
        return int(self._last_step.nbytes + self._interval.nbytes)

    def buckets(self, item_ids: object) -> np.ndarray:
        """Bucket of each id under each hash: ``[num_hashes, n]`` ``int64`` (ids flattened)."""
        ids = _flat_ids(item_ids)
        out = np.empty((self.num_hashes, ids.size), dtype=np.int64)
        for i, s in enumerate(self._seeds):
            out[i] = hash_buckets(ids, self.num_buckets, s)
        return out

    def update(self, item_ids: object) -> None:
        """One training step over the batch's distinct ids (an empty batch still counts)."""
        distinct = np.unique(_flat_ids(item_ids))
        t = self._step + 1
        alpha = self.alpha
        keep = 1.0 - alpha
        for i, s in enumerate(self._seeds):
            hit, counts = np.unique(hash_buckets(distinct, self.num_buckets, s),
                                    return_counts=True)
            if hit.size == 0:
                continue
            last = self._last_step[i, hit]
            # The first distinct item into each bucket: the same expression as the plain loop.
            new = np.where(last > 0, keep * self._interval[i, hit] + alpha * (t - last),
                           np.float64(t))
            # Each further distinct item into the bucket this step sees ``t - A == 0``; order
            # does not matter, so apply them by collision depth, not item by item.
            for k in range(1, int(counts.max())):
                deeper = counts > k
                new[deeper] = keep * new[deeper] + alpha * 0.0
            self._interval[i, hit] = new
            self._last_step[i, hit] = t
        self._step = t

    def probability(self, item_ids: object) -> np.ndarray:
        """Estimated probability that each id is in a batch: ``[n]`` ``float64`` in (0, 1]."""
        b = self.buckets(item_ids)
        if b.shape[1] == 0:
            return np.zeros(0, dtype=np.float64)
        rows = np.arange(self.num_hashes)[:, None]
        seen = self._last_step[rows, b] > 0
        effective = np.where(seen, self._interval[rows, b], np.float64(self._step + 1))
        return 1.0 / np.maximum(effective.max(axis=0), 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Self-describing state of plain contiguous numpy arrays (fits safetensors)."""
        return {
            "last_step": self._last_step.copy(),
            "interval": self._interval.copy(),
            "step": np.array(self._step, dtype=np.int64),
            "alpha": np.array(self.alpha, dtype=np.float64),
            "num_hashes": np.array(self.num_hashes, dtype=np.int64),
            "num_buckets": np.array(self.num_buckets, dtype=np.int64),
            "seed": np.array(self.seed, dtype=np.uint64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a state from :meth:`state_dict`; it must match this estimator's config."""
        expected = {
            "last_step": ((self.num_hashes, self.num_buckets), np.int64),
            "interval": ((self.num_hashes, self.num_buckets), np.float64),
            "step": ((), np.int64),
            "alpha": ((), np.float64),
            "num_hashes": ((), np.int64),
            "num_buckets": ((), np.int64),
            "seed": ((), np.uint64),
        }
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"frequency estimator state is missing key(s) {missing}")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise ValueError(f"frequency estimator state has unexpected key(s) {unexpected}")
        arrays = {}
        for key, (shape, dtype) in expected.items():
            value = np.asarray(state[key])
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(
                    f"frequency estimator state key {key!r}: expected shape {shape} dtype "
                    f"{np.dtype(dtype).name}, got shape {value.shape} dtype {value.dtype.name}")
            arrays[key] = value
        for key, mine in (("alpha", self.alpha), ("num_hashes", self.num_hashes),
                          ("num_buckets", self.num_buckets), ("seed", self.seed)):
            if arrays[key].item() != mine:
                raise ValueError(f"frequency estimator state key {key!r} is "
                                 f"{arrays[key].item()!r} but this estimator has {mine!r}")
        step = int(arrays["step"])
        last, interval = arrays["last_step"], arrays["interval"]
        if step < 0:
            raise ValueError(f"frequency estimator state key 'step' is negative ({step})")
        if last.size and (last.min() < 0 or last.max() > step):
            raise ValueError("frequency estimator state key 'last_step' has values outside "
                             f"[0, step={step}]")
        if not (np.isfinite(interval).all() and (interval >= 0).all()):
            raise ValueError("frequency estimator state key 'interval' has negative or "
                             "non-finite values")
        self._last_step = np.ascontiguousarray(last, dtype=np.int64).copy()
        self._interval = np.ascontiguousarray(interval, dtype=np.float64).copy()
        self._step = step
