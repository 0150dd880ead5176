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
vectorised (no sort in the common case, see ``_update``) and gives arrays bit-identical to
the plain per-item loop kept in the tests; ``benchmarks/frequency`` measures it against that
loop and against a bare gather-plus-scatter.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from twotower.hashing import seed_for, splitmix64, to_int64_ids

__all__ = ["StreamingFrequencyEstimator", "gather_global_ids"]

_MASK64 = 0xFFFFFFFFFFFFFFFF
_MARKER_ROUNDS = 4  # buckets shared by more distinct ids in one step are counted by sorting


def _flat_ids(item_ids: object) -> np.ndarray:
    return np.ascontiguousarray(to_int64_ids(item_ids).ravel())


def gather_global_ids(local_ids: object,
                      group: dist.ProcessGroup | None = None) -> tuple[np.ndarray, int]:
    """The global batch's ids, every rank's ids in rank order, and where this rank's start.

    Ranks may hold different numbers of ids: each is padded to the longest and the lengths
    are gathered alongside. Every rank gets the same array, so replicas that apply it with
    :meth:`StreamingFrequencyEstimator.update` stay identical. Without an initialised
    ``torch.distributed`` group this is a world of one: ``(ids, 0)``.
    """
    ids = _flat_ids(local_ids)
    if not (dist.is_available() and dist.is_initialized()):
        return ids, 0
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([ids.size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.int64, device=device)
    padded[:ids.size] = torch.tensor(ids, device=device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    parts = [g[:n].cpu().numpy() for g, n in zip(gathered, lengths, strict=True)]
    return np.concatenate(parts), sum(lengths[:rank])


def _shrink_by_distinct(new: np.ndarray, target: np.ndarray, ids: np.ndarray,
                        keep: float) -> None:
    """``new[i] *= keep`` once per distinct id paired with ``i`` in ``(target, ids)``, by
    sorting: for buckets shared by many distinct ids, where marker rounds would be slow."""
    order = np.lexsort((ids, target))
    target, ids = target[order], ids[order]
    first = np.ones(target.size, dtype=bool)
    first[1:] = (target[1:] != target[:-1]) | (ids[1:] != ids[:-1])
    targets, counts = np.unique(target[first], return_counts=True)
    for depth in range(1, int(counts.max()) + 1):
        new[targets[counts >= depth]] *= keep


class StreamingFrequencyEstimator:
    """Estimate of each item's per-step sampling probability (Algorithms 2 and 3).

    ``update(ids)`` is one training step; ``probability(ids)`` reads without changing state;
    ``update_and_probability(ids)`` does both and hashes the ids once (what a training step
    needs: the batch's estimate read after its update). Ids are integers or strings
    (strings go through the features' stable hash, :func:`twotower.hashing.to_int64_ids`),
    so no item vocabulary is needed.

    State: per hash, ``A`` (``int64``, last step seen; 0 = never) and ``B`` (``float64``,
    steps between sightings): 16 bytes per bucket per hash, ``16 * num_hashes * num_buckets``
    bytes in all (:attr:`nbytes`; 16 MiB for ``2**20`` buckets and one hash). Steps are
    ``int64``, so ``t - A`` is exact for any step below ``2**63``.

    Distributed training: keep one replica per worker and feed every replica the global
    batch, each rank's ids in rank order, once per step (:meth:`update_global`, or
    ``update(gather_global_ids(ids)[0])``). The update is deterministic, so the replicas stay
    bit-identical to one estimator fed the same global batches.
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
        self._seeds = np.array([seed_for(f"frequency/{i}") ^ self.seed
                                for i in range(self.num_hashes)], dtype=np.uint64)[:, None]
        # Row i of the flattened state starts at i * num_buckets.
        self._row_start = (np.arange(self.num_hashes, dtype=np.int64)
                           * self.num_buckets)[:, None]
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
        """Memory held by the state arrays: 16 bytes per bucket per hash."""
        return int(self._last_step.nbytes + self._interval.nbytes)

    def buckets(self, item_ids: object) -> np.ndarray:
        """Bucket of each id under each hash: ``[num_hashes, n]`` ``int64`` (ids flattened).

        Hash ``i`` is :func:`twotower.hashing.hash_buckets` with seed
        ``seed_for(f"frequency/{i}") ^ seed``, computed for all hashes in one pass.
        """
        x = splitmix64(_flat_ids(item_ids).view(np.uint64)[None, :] ^ self._seeds)
        h = self.num_buckets
        # A power of two: the same remainder as ``%``, without a slow 64-bit division.
        x = x & np.uint64(h - 1) if h & (h - 1) == 0 else x % np.uint64(h)
        return x.view(np.int64)

    def update(self, item_ids: object) -> None:
        """One training step over the batch's distinct ids (an empty batch still counts)."""
        self._update(_flat_ids(item_ids))

    def update_and_probability(self, item_ids: object) -> np.ndarray:
        """:meth:`update`, then :meth:`probability` of the same ids, hashing them once."""
        return self._update(_flat_ids(item_ids))

    def update_global(self, local_ids: object,
                      group: dist.ProcessGroup | None = None) -> np.ndarray:
        """One distributed step: update with the global batch (see :func:`gather_global_ids`)
        and return the probabilities of this rank's ids. Every rank must call it each step."""
        local = _flat_ids(local_ids)
        ids, start = gather_global_ids(local, group)
        return self._update(ids)[start:start + local.size]

    def _flat_buckets(self, ids: np.ndarray) -> np.ndarray:
        """``[num_hashes * n]``: each id's bucket under each hash, as an index into the
        flattened state (hash ``i``'s row starts at ``i * num_buckets``)."""
        flat = self.buckets(ids)
        if self.num_hashes > 1:
            flat = flat + self._row_start
        return flat.reshape(-1)

    def _update(self, ids: np.ndarray) -> np.ndarray:
        """Apply step ``t`` for ``ids`` (``[n]`` ``int64``) and return their probabilities.

        The plain loop visits each distinct id once; the first distinct id into a bucket
        sets ``B <- (1 - alpha) B + alpha (t - A)`` and every further one sees ``t - A == 0``,
        i.e. ``B <- (1 - alpha) B``, so order within a step does not matter, only how many
        distinct ids share each bucket. That is found without sorting: every element writes
        its own negative marker into ``A`` (never a real step) and reads back the marker that
        stayed, its bucket's "winner"; elements whose id differs from their winner's (rare
        collisions) go through the same again, a few rounds, then a sort for what is left.
        """
        t = self._step + 1
        self._step = t
        n = ids.size
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        last_step, interval = self._last_step.reshape(-1), self._interval.reshape(-1)
        flat = self._flat_buckets(ids)  # element e = (hash e // n, id e % n)
        ids = np.tile(ids, self.num_hashes) if self.num_hashes > 1 else ids
        position = np.arange(flat.size, dtype=np.int64)
        last = last_step[flat]
        last_step[flat] = -1 - position
        winner = -1 - last_step[flat]
        win = np.flatnonzero(winner == position)
        win_flat, win_last = flat[win], last[win]
        alpha, keep = self.alpha, 1.0 - self.alpha
        # The same expression as the plain loop; a never-seen bucket (A == 0) gets B = t.
        new = np.where(win_last > 0, keep * interval[win_flat] + alpha * (t - win_last),
                       np.float64(t))
        rest = np.flatnonzero(ids[winner] != ids)
        if rest.size:
            rank = np.empty(flat.size, dtype=np.int64)
            rank[win] = np.arange(win.size)
            for _ in range(_MARKER_ROUNDS):  # one more distinct id per crowded bucket a round
                last_step[flat[rest]] = -1 - rest
                again = -1 - last_step[flat[rest]]
                new[rank[winner[again[again == rest]]]] *= keep  # keep * B + alpha * 0
                rest = rest[ids[again] != ids[rest]]
            if rest.size:
                _shrink_by_distinct(new, rank[winner[rest]], ids[rest], keep)
        interval[win_flat] = new
        last_step[win_flat] = t
        after = np.empty(flat.size, dtype=np.float64)
        after[win] = new
        after = after[winner]
        if self.num_hashes > 1:
            after = after.reshape(self.num_hashes, n).max(axis=0)
        return 1.0 / np.maximum(after, 1.0)

    def probability(self, item_ids: object) -> np.ndarray:
        """Estimated probability that each id is in a batch: ``[n]`` ``float64`` in (0, 1]."""
        ids = _flat_ids(item_ids)
        flat = self._flat_buckets(ids)
        seen = self._last_step.reshape(-1)[flat] > 0
        effective = np.where(seen, self._interval.reshape(-1)[flat], np.float64(self._step + 1))
        if self.num_hashes > 1:
            effective = effective.reshape(self.num_hashes, ids.size).max(axis=0)
        return 1.0 / np.maximum(effective, 1.0)

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
