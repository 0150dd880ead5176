"""SASRec with full-softmax cross-entropy, RecBole's model and loss.

``recbole.model.sequential_recommender.SASRec`` with ``loss_type="CE"`` and
``MAX_ITEM_LIST_LENGTH=50``, its other architecture defaults unchanged (2 layers, 2 heads,
GELU, inner size 4x hidden). RecBole's own data split would take the last items of every
user for its evaluation, so the sequences are fed to the model directly, built the way
RecBole's sequential data augmentation builds them: every prefix of a user's fit
sequence (its last 50 items) predicts the item that follows. Training is RecBole's
default learner (Adam, no weight decay) over shuffled batches; top-100 comes from the
model's ``full_sort_predict`` over the whole catalogue with the user's fit items removed.
A run saves its state after every epoch and goes on from there when started again
(``runner_lib.Checkpoint``): on a large catalogue one run takes many CPU hours.

The model's item vocabulary is the whole catalogue (index 0 is RecBole's padding item),
so every item can be ranked, as for the other systems.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from recbole.config import Config
from recbole.data.interaction import Interaction
from recbole.model.sequential_recommender import SASRec
from recbole.utils import init_seed
from runner_lib import Data, run, top_k_excluding

# Importing RecBole's sequential models imports its SINE model, which turns on autograd's
# anomaly detection for the whole process: a NaN check after every operation that makes a
# training step about 1.7x slower and changes nothing that is computed. Turn it back off.
torch.autograd.set_detect_anomaly(False)

MAX_LEN = 50


class Vocabulary:
    """The one thing SASRec asks of a RecBole dataset: the number of item ids."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def num(self, field: str) -> int:
        return self.num_items


def prefixes(data: Data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item_id_list [n, 50] left-aligned, item_length [n], next item [n])``.

    Item indices are shifted by one: 0 is padding.
    """
    count = sum(max(len(s) - 1, 0) for s in data.sequences)
    lists = np.zeros((count, MAX_LEN), dtype=np.int64)
    lengths = np.zeros(count, dtype=np.int64)
    targets = np.zeros(count, dtype=np.int64)
    row = 0
    for seq in data.sequences:
        seq = seq + 1
        for t in range(1, len(seq)):
            window = seq[max(0, t - MAX_LEN):t]
            lists[row, :len(window)] = window
            lengths[row], targets[row] = len(window), seq[t]
            row += 1
    return lists, lengths, targets


class Runner:
    def __init__(self, data: Data, settings: dict, seed: int) -> None:
        torch.set_num_threads(1)
        config = Config(model="SASRec", dataset="protocol", config_dict={
            "loss_type": "CE", "train_neg_sample_args": None, "MAX_ITEM_LIST_LENGTH": MAX_LEN,
            "use_gpu": False,
            "device": "cpu", "seed": seed, "reproducibility": True,
            "hidden_size": settings.get("hidden_size", 64),
            "inner_size": 4 * settings.get("hidden_size", 64),
            "hidden_dropout_prob": settings.get("dropout", 0.5),
            "attn_dropout_prob": settings.get("dropout", 0.5),
            "learning_rate": settings["learning_rate"], "data_path": ".",
            "show_progress": False, "state": "WARNING"})
        init_seed(seed, reproducibility=True)
        self.model = SASRec(config, Vocabulary(data.num_items + 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings["learning_rate"])
        self.batch_size = settings.get("batch_size", 2048)
        self.examples = prefixes(data)
        self.generator = np.random.default_rng(seed)
        self.data = data

    def _interaction(self, lists: np.ndarray, lengths: np.ndarray,
                     targets: np.ndarray | None = None) -> Interaction:
        fields = {"item_id_list": torch.from_numpy(lists), "item_length": torch.from_numpy(lengths)}
        if targets is not None:
            fields["item_id"] = torch.from_numpy(targets)
        return Interaction(fields)

    def train_epoch(self) -> int:
        self.model.train()
        lists, lengths, targets = self.examples
        order = self.generator.permutation(len(targets))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self._interaction(lists[idx], lengths[idx], targets[idx])
            loss = self.model.calculate_loss(batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return len(targets)

    def save_state(self, path: Path) -> None:
        """Weights, Adam's moments and both random streams (shuffling and dropout).

        Not atomic by itself: ``Checkpoint`` names a state file only once it is written."""
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "shuffle_rng": json.dumps(self.generator.bit_generator.state)}, path)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.bit_generator.state = json.loads(state["shuffle_rng"])

    @torch.no_grad()
    def recommend(self, users: np.ndarray, k: int) -> list[list[int]]:
        self.model.eval()
        lists = np.zeros((len(users), MAX_LEN), dtype=np.int64)
        lengths = np.zeros(len(users), dtype=np.int64)
        for row, u in enumerate(users):
            window = self.data.sequences[u][-MAX_LEN:] + 1
            lists[row, :len(window)], lengths[row] = window, len(window)
        scores = self.model.full_sort_predict(self._interaction(lists, lengths)).numpy()
        return top_k_excluding(scores[:, 1:], users, self.data, k)  # drop the padding column


def build(data: Data, settings: dict, seed: int) -> Runner:
    return Runner(data, settings, seed)


if __name__ == "__main__":
    run(build, __doc__)
