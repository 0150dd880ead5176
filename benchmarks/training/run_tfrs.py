"""TensorFlow Recommenders' side of ``bench_throughput.py`` (its own virtual environment).

A ``tfrs.Model`` with the quickstart towers (embeddings of width 32, a history mean-pooled
from the item table it shares, Dense 256 relu -> Dense 64, L2 normalised) and
``tfrs.tasks.Retrieval`` (temperature, candidate sampling probability, accidental-hit
removal), trained by Keras ``fit`` with Adam. Reads the batches ``bench_throughput.py``
wrote; prints one JSON line per batch size.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
import tensorflow_recommenders as tfrs
from peer_run import DIM, HIDDEN, LR, OUTPUT, TEMPERATURE, load, parse_args, report


def tower() -> tf.keras.Sequential:
    return tf.keras.Sequential([tf.keras.layers.Dense(HIDDEN, activation="relu"),
                                tf.keras.layers.Dense(OUTPUT)])


class TwoTower(tfrs.Model):
    def __init__(self, sizes: dict) -> None:
        super().__init__()
        embedding = tf.keras.layers.Embedding
        self.user = embedding(int(sizes["user"]), DIM)
        self.item = embedding(int(sizes["item"]), DIM)
        self.channel = embedding(int(sizes["channel"]), DIM)
        self.category = embedding(int(sizes["category"]), DIM)
        self.query_tower, self.item_tower = tower(), tower()
        self.task = tfrs.tasks.Retrieval(temperature=TEMPERATURE, remove_accidental_hits=True)

    def compute_loss(self, x: dict, training: bool = False) -> tf.Tensor:
        mask = tf.cast(x["history"] > 0, tf.float32)[..., None]
        history = tf.reduce_sum(self.item(x["history"]) * mask, axis=1) / tf.maximum(
            tf.reduce_sum(mask, axis=1), 1.0)
        query = self.query_tower(tf.concat([self.user(x["user"]), history], axis=1))
        item = self.item_tower(tf.concat([self.item(x["item"]), self.channel(x["channel"]),
                                          self.category(x["category"])], axis=1))
        return self.task(tf.math.l2_normalize(query, -1), tf.math.l2_normalize(item, -1),
                         sample_weight=x["reward"],
                         candidate_sampling_probability=tf.exp(x["log_q"]),
                         candidate_ids=x["item"], compute_metrics=False)


def main() -> None:
    args = parse_args(__doc__)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    sizes, data = load(args.data)
    for batch, steps in zip(args.batch, args.steps, strict=True):
        tf.keras.utils.set_random_seed(0)
        model = TwoTower(sizes)
        model.compile(optimizer=tf.keras.optimizers.Adam(LR))
        batches = tf.data.Dataset.from_tensor_slices(data).batch(batch, drop_remainder=True)
        model.fit(batches.take(args.warm_up), verbose=0)
        timed = batches.skip(args.warm_up).take(steps).cache()
        for _ in timed:  # fill the cache: time training, not slicing
            pass
        started = time.perf_counter()
        model.fit(timed, verbose=0)
        seconds = time.perf_counter() - started
        report("TensorFlow Recommenders", batch, steps, args.threads, seconds)


if __name__ == "__main__":
    main()
