"""TensorFlow Recommenders two-tower retrieval, as its tutorials build it.

Query tower: a user-id embedding. Candidate tower: an item-id embedding plus the mean
embedding of the item's feature values (category, or the list of attribute ids).
``tfrs.tasks.Retrieval`` computes the in-batch softmax; with ``settings["logq"]`` it is
also given ``candidate_sampling_probability`` = the item's share of the fit events
(static counts), TFRS's logQ correction. Adagrad and dot-product scores, as in the
tutorials; one epoch = one shuffled pass over the fit events in batches of
``settings["batch_size"]``. Top-100 is an exact dot product over the whole catalogue.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
from runner_lib import Data, run, top_k_excluding


def feature_matrix(data: Data) -> np.ndarray:
    """[num_items, max_values] feature ids per item, 0 = padding."""
    vocab: dict[str, int] = {}
    rows = [[vocab.setdefault(v, len(vocab) + 1) for v in values] for values in data.item_features]
    width = max(1, max(map(len, rows)))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


class TwoTower(tfrs.Model):
    def __init__(self, data: Data, dim: int, logq: bool) -> None:
        super().__init__()
        self.features = tf.constant(feature_matrix(data))
        self.query_tower = tf.keras.layers.Embedding(data.num_users, dim)
        self.item_embedding = tf.keras.layers.Embedding(data.num_items, dim)
        self.feature_embedding = tf.keras.layers.Embedding(
            int(tf.reduce_max(self.features)) + 1, dim, mask_zero=True)
        counts = np.bincount(data.fit_items, minlength=data.num_items)
        self.probability = tf.constant(counts / counts.sum(), dtype=tf.float32) if logq else None
        self.task = tfrs.tasks.Retrieval()

    def candidate_tower(self, items: tf.Tensor) -> tf.Tensor:
        values = tf.gather(self.features, items)
        mask = tf.cast(values > 0, tf.float32)[..., None]
        pooled = tf.reduce_sum(self.feature_embedding(values) * mask, axis=1) / tf.maximum(
            tf.reduce_sum(mask, axis=1), 1.0)
        return self.item_embedding(items) + pooled

    def compute_loss(self, batch: tuple, training: bool = False) -> tf.Tensor:
        users, items = batch
        probability = None if self.probability is None else tf.gather(self.probability, items)
        return self.task(self.query_tower(users), self.candidate_tower(items),
                         candidate_sampling_probability=probability, compute_metrics=False)


class Runner:
    def __init__(self, data: Data, settings: dict, seed: int) -> None:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.keras.utils.set_random_seed(seed)
        self.data = data
        self.model = TwoTower(data, settings["dim"], settings.get("logq", False))
        self.model.compile(optimizer=tf.keras.optimizers.Adagrad(settings["learning_rate"]))
        self.dataset = (tf.data.Dataset.from_tensor_slices((data.fit_users, data.fit_items))
                        .shuffle(len(data.fit_items), seed=seed, reshuffle_each_iteration=True)
                        .batch(settings.get("batch_size", 1024)))
        self.candidates: np.ndarray | None = None

    def train_epoch(self) -> int:
        self.model.fit(self.dataset, epochs=1, verbose=0)
        self.candidates = None
        return len(self.data.fit_items)

    def recommend(self, users: np.ndarray, k: int) -> list[list[int]]:
        if self.candidates is None:
            items = tf.range(self.data.num_items, dtype=tf.int64)
            self.candidates = self.model.candidate_tower(items).numpy()
        queries = self.model.query_tower(tf.constant(users)).numpy()
        return top_k_excluding(queries @ self.candidates.T, users, self.data, k)


def build(data: Data, settings: dict, seed: int) -> Runner:
    return Runner(data, settings, seed)


if __name__ == "__main__":
    run(build, __doc__)
