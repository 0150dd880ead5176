"""What every runner shares: its command line, the split as integer indices, top-K with
the user's seen items removed, and the epoch loop with early stopping on valid Recall@50.

A runner is a small file defining ``build(data, settings, seed) -> Model`` and calling
``run(build)``. It runs inside its peer's virtual environment, so this module needs only
the standard library and numpy, plus the protocol's own ``protocol.py`` and
``evaluate.py`` (standard library), imported from ``--protocol-dir``.

Command line (the driver, ``bench_quality.py``, calls it; so can a person):

    python run_X.py --split-dir SPLIT --phase valid|test --settings '{"lr": 0.1}' \
        --seed 0 --out DIR [--max-epochs 20 --eval-every 2 --patience 2]

``valid``: trains up to ``--max-epochs``, scores valid Recall@50 every ``--eval-every``
epochs, stops after ``--patience`` checks without a gain, and keeps the best checkpoint's
predictions. ``test``: trains exactly ``settings["epochs"]`` epochs, predicts once.
Writes ``DIR/predictions.jsonl`` and ``DIR/run.json`` (training seconds, examples per
second, best epoch, the Recall@50 curve).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

TOP_K = 100


@dataclass
class Data:
    """One phase of the split as integer indices (users and items numbered from 0).

    ``sequences[u]`` is user ``u``'s fit events in time order; in both phases it is also
    exactly the set of items to exclude for ``u`` (the protocol's exclusion set).
    """

    phase: str
    user_ids: list[str]              # index -> user id
    item_ids: list[str]              # index -> item id, the full catalogue
    fit_users: np.ndarray            # [num_events] fit events, by user then time
    fit_items: np.ndarray            # [num_events]
    sequences: list[np.ndarray]      # per user, items in time order
    targets: np.ndarray              # users that must receive a ranking
    item_features: list[list[str]]   # per item, its feature values ([] when none)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


class Model(Protocol):
    """What a runner's ``build`` returns."""

    def train_epoch(self) -> int:
        """One pass over the fit data; returns the number of training examples seen."""

    def recommend(self, users: np.ndarray, k: int) -> list[list[int]]:
        """Top-``k`` item indices per user, best first, the user's fit items excluded."""


def load(split_dir: Path, phase: str, protocol_dir: Path) -> Data:
    """The phase's data, read through the protocol's own ``load_phase``."""
    sys.path.insert(0, str(protocol_dir))
    from protocol import load_phase

    pd = load_phase(split_dir, phase)
    items = list(pd.catalogue)
    item_index = {item: i for i, item in enumerate(items)}
    users = list(pd.history)
    user_index = {user: u for u, user in enumerate(users)}
    sequences = [np.array([item_index[i] for i in pd.history[user]], dtype=np.int64)
                 for user in users]
    fit_users = np.concatenate([np.full(len(s), u) for u, s in enumerate(sequences)])
    return Data(phase=phase, user_ids=users, item_ids=items, fit_users=fit_users,
                fit_items=np.concatenate(sequences), sequences=sequences,
                targets=np.array([user_index[u] for u in pd.target_users], dtype=np.int64),
                item_features=_item_features(split_dir.parent / "items.csv", item_index))


def _item_features(path: Path, item_index: dict[str, int]) -> list[list[str]]:
    """Per item, the values of the items file's one feature column ('a|b|c' lists)."""
    features: list[list[str]] = [[] for _ in item_index]
    if not path.exists():
        return features
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if len(header) < 2:
            return features
        for row in reader:
            if row[0] in item_index and row[1]:
                features[item_index[row[0]]] = row[1].split("|")
    return features


def top_k_excluding(scores: np.ndarray, users: np.ndarray, data: Data, k: int) -> list[list[int]]:
    """Best ``k`` columns of ``scores`` [num_users, num_items] per row, seen items removed."""
    scores = scores.astype(np.float32, copy=True)
    for row, u in enumerate(users):
        scores[row, data.sequences[u]] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    finite = np.isfinite(np.take_along_axis(scores, top, axis=1))
    return [row[ok].tolist() for row, ok in zip(top, finite, strict=True)]


def write_predictions(model: Model, data: Data, path: Path, batch: int = 256) -> None:
    with open(path, "w") as f:
        for start in range(0, len(data.targets), batch):
            users = data.targets[start:start + batch]
            for u, items in zip(users, model.recommend(users, TOP_K), strict=True):
                f.write(json.dumps({"user_id": data.user_ids[u],
                                    "items": [data.item_ids[i] for i in items]}) + "\n")


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--split-dir", type=Path, required=True)
    ap.add_argument("--phase", choices=["valid", "test"], required=True)
    ap.add_argument("--settings", type=json.loads, default={}, help="JSON object")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--protocol-dir", type=Path,
                    default=Path(__file__).resolve().parents[3] / "shared" / "protocol")
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--patience", type=int, default=2, help="checks without a gain")
    return ap.parse_args()


def run(build: Callable[[Data, dict, int], Model], description: str,
        max_epochs: int | None = None) -> None:
    """The whole runner: load, build, train (with early stopping in ``valid``), predict.

    ``max_epochs`` caps the epochs for systems with a fixed number (MostPop: 1). A model
    with ``save_state``/``load_state`` (a Resumable) is saved after every epoch, and a run
    started again with the same ``--out`` goes on from its last saved epoch: a run that
    takes longer than the machine is held survives being stopped.
    """
    args = parse_args(description)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load(args.split_dir, args.phase, args.protocol_dir)
    model = build(data, args.settings, args.seed)
    if args.phase == "test":
        epochs, every = int(args.settings["epochs"]), 10**9
    else:
        epochs, every = args.max_epochs, args.eval_every
    if max_epochs is not None:
        epochs, every = min(epochs, max_epochs), min(every, max_epochs)
    sys.path.insert(0, str(args.protocol_dir))
    from evaluate import evaluate

    preds, best_preds = args.out / "predictions.jsonl", args.out / "best.jsonl"
    checkpoint = Checkpoint(args.out, model)
    loop = checkpoint.restore() or {"epoch": 0, "seconds": 0.0, "examples": 0, "best": -1.0,
                                    "best_epoch": 0, "stale": 0, "curve": [],
                                    "predict_seconds": None}
    stop = False
    for epoch in range(loop["epoch"] + 1, epochs + 1):
        start = time.perf_counter()
        loop["examples"] += model.train_epoch()
        loop["seconds"] += time.perf_counter() - start
        loop["epoch"] = epoch
        print(f"[{args.out.name}] epoch {epoch} trained ({loop['seconds']:.0f}s)",
              file=sys.stderr, flush=True)
        if epoch % every == 0 or epoch == epochs:
            start = time.perf_counter()
            write_predictions(model, data, preds)
            loop["predict_seconds"] = time.perf_counter() - start
            if args.phase == "test":
                loop["best_epoch"], stop = epoch, True
            else:
                stop = _check(loop, evaluate(preds, args.split_dir, "valid")["recall@50"],
                              args, preds, best_preds)
        if stop or epoch == epochs:
            break
        checkpoint.save(loop)
    if args.phase == "valid":
        os.replace(best_preds, preds)
    seconds, examples = loop["seconds"], loop["examples"]
    report = {"train_seconds": seconds, "examples": examples,
              "examples_per_second": examples / seconds if seconds else None,
              "epochs_trained": loop["epoch"], "best_epoch": loop["best_epoch"],
              "predict_seconds": loop["predict_seconds"], "curve": loop["curve"]}
    (args.out / "run.json").write_text(json.dumps(report, indent=1) + "\n")
    checkpoint.clear()


def _check(loop: dict, recall: float, args: argparse.Namespace, preds: Path,
           best_preds: Path) -> bool:
    """Record one valid check; keep the predictions if best; True when patience runs out."""
    epoch = loop["epoch"]
    loop["curve"].append({"epoch": epoch, "recall@50": recall,
                          "train_seconds": round(loop["seconds"], 2)})
    print(f"[{args.out.name}] epoch {epoch} valid recall@50 {recall:.4f} "
          f"({loop['seconds']:.0f}s)", file=sys.stderr, flush=True)
    if recall > loop["best"]:
        loop["best"], loop["best_epoch"], loop["stale"] = recall, epoch, 0
        os.replace(preds, best_preds)
        return False
    loop["stale"] += 1
    return loop["stale"] >= args.patience


class Resumable(Protocol):
    """A model that can be saved after an epoch and carried on from there."""

    def save_state(self, path: Path) -> None:
        """Write everything the next epoch depends on (weights, optimiser, random state)."""

    def load_state(self, path: Path) -> None:
        """Read back what ``save_state`` wrote."""


class Checkpoint:
    """The epoch loop's state beside the model's, in ``DIR/resume/``.

    The model's state goes to a file named for its epoch, and ``loop.json`` (written last,
    by rename) names it: a run stopped at any moment restarts from a consistent pair.
    """

    def __init__(self, out: Path, model: Model) -> None:
        self.dir = out / "resume"
        self.model: Resumable | None = model if hasattr(model, "save_state") else None

    def restore(self) -> dict | None:
        path = self.dir / "loop.json"
        if self.model is None or not path.exists():
            return None
        loop = json.loads(path.read_text())
        self.model.load_state(self.dir / loop["state"])
        print(f"[{self.dir.parent.name}] resumed after epoch {loop['epoch']}",
              file=sys.stderr, flush=True)
        return loop

    def save(self, loop: dict) -> None:
        if self.model is None:
            return
        self.dir.mkdir(exist_ok=True)
        name = f"epoch{loop['epoch']}.state"
        self.model.save_state(self.dir / name)
        tmp = self.dir / "loop.json.tmp"
        tmp.write_text(json.dumps({**loop, "state": name}))
        os.replace(tmp, self.dir / "loop.json")
        for old in self.dir.glob("epoch*.state"):
            if old.name != name:
                old.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
