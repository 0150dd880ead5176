"""Continuous training: one day's log after another, as the paper's trainer runs.

A directory holds the log in partitions (a Parquet or CSV file, or a folder of them, per
day), named so that name order is time order (``2026-01-01.parquet``, ``day=003/``).
:func:`follow` trains on each partition in that order, checkpoints after each, then waits
for the next one to appear; SIGINT or SIGTERM stops it after the current batch, with a
final checkpoint, and a restarted follow goes on where it stopped. A partition must appear
whole: write it under a name starting with ``.`` or ``_`` (ignored) and rename it.

Each day is tested, then trained on (:func:`train_day`): the model's full-corpus metrics
on the day's events before it has seen them (held-out events, the streaming protocol of
training on days 1..D and testing on D+1) and the training loss on them go into the
metrics log, one pair per day.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch.distributed as dist

from twotower.data.interactions import Columns, load_interactions, read_table
from twotower.data.sources import refuse_repeated_files
from twotower.experiment import Prepared, prepare, score
from twotower.hashing import to_int64_ids
from twotower.towers import ModelConfig
from twotower.train import Trainer
from twotower.validation import Validation

__all__ = ["GrowingLog", "follow", "partitions", "train_day"]

SUFFIXES = (".parquet", ".csv")


def partitions(directory: str | Path) -> list[Path]:
    """The partitions of ``directory`` in name order: data files and folders, skipping
    names that start with ``.`` or ``_`` (partitions still being written, markers)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--follow needs a directory of partitions, not {directory}")
    return sorted(p for p in directory.iterdir() if not p.name.startswith((".", "_"))
                  and (p.is_dir() or p.suffix in SUFFIXES))


def _read_partition(path: Path) -> pa.Table:
    if path.is_file():
        return read_table(path, "events")
    files = [f for f in path.rglob("*") if f.suffix in SUFFIXES
             and not f.name.startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"partition {path} holds no .parquet or .csv files")
    dataset = ds.dataset(path, format=files[0].suffix[1:])
    return refuse_repeated_files(dataset, path, "partition").to_table()


class GrowingLog:
    """The events of the partitions read so far, with the item corpus.

    A partition is trained on with histories built from every earlier event, so the log
    read so far stays in memory (as Arrow tables) and is re-read as a whole for each new
    partition; a partition must not go back in time before the previous one ends.
    """

    def __init__(self, items: str | Path | pa.Table, columns: Columns,
                 model_config: ModelConfig, missing_items: str = "error") -> None:
        self.items = items if isinstance(items, pa.Table) else read_table(items, "items")
        self.columns, self.model_config = columns, model_config
        self.missing_items = missing_items
        self.tables: list[pa.Table] = []
        self.last_time: int | None = None

    def append(self, path: Path) -> None:
        """Add a partition, checking that it starts no earlier than the log so far ends."""
        table = _read_partition(path)
        times = table.column(self.columns.timestamp).to_numpy()
        if self.last_time is not None and len(times) and times.min() < self.last_time:
            raise ValueError(f"partition {path} has events at {int(times.min())}, before the "
                             f"previous partition's last event ({self.last_time}): partitions "
                             "must be named in time order")
        self.tables.append(table)
        self.last_time = int(times.max()) if len(times) else self.last_time

    def latest(self) -> tuple[Prepared, np.ndarray, np.ndarray]:
        """``(prepared, earlier rows, rows of the latest partition)`` of the log so far."""
        events = pa.concat_tables(self.tables, promote_options="default")
        interactions = load_interactions(events, self.items, self.columns, self.missing_items)
        items = to_int64_ids(self.tables[-1].column(self.columns.item))
        # Sorting is stable and the latest partition is the latest in time: its kept events
        # are the last rows.
        cut = len(interactions) - int(np.isin(items, interactions.item_keys).sum())
        rows = np.arange(len(interactions))
        return prepare(interactions, self.model_config), rows[:cut], rows[cut:]


def train_day(trainer: Trainer, prepared: Prepared, earlier: np.ndarray, rows: np.ndarray,
              name: str, validation: Validation | None = None) -> dict:
    """Test, then train: the model's metrics on ``rows`` before training on them (unless a
    stopped run already tested them), then a fit; both go into the metrics log.

    ``earlier`` (rows already trained on) sets the head / torso / tail groups; with
    ``validation`` the fit keeps its best epoch (see :meth:`Trainer.fit`).
    """
    trainer.check_input(name)  # before a test that would go into the metrics log
    if trainer.world.main and trainer.position.input != name and name not in trainer.inputs_done:
        metrics = score(trainer.model, prepared, earlier, rows)
        trainer.log({"event": "eval", "input": name, "step": trainer.step,
                     "held_out": "before training on it", **metrics})
    return trainer.fit(prepared.training_data(rows), name, validation)


def _agree(trainer: Trainer, names: list[str]) -> tuple[list[str], bool]:
    """The main process's view of the partitions, and whether any worker must stop, so
    that every worker trains on the same partitions and stops together."""
    if trainer.world.size == 1:
        return names, trainer.stop_requested
    shared: list = [names, trainer.stop_requested]
    dist.broadcast_object_list(shared, src=0)
    stops = [False] * trainer.world.size
    dist.all_gather_object(stops, trainer.stop_requested)
    return shared[0], any(stops)


def _sleep(trainer: Trainer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not trainer.stop_requested and time.monotonic() < deadline:
        time.sleep(min(0.1, seconds))


def follow(trainer: Trainer, directory: str | Path, log: GrowingLog, poll_seconds: float = 30.0,
           idle_timeout: float | None = None) -> None:
    """Train on every partition of ``directory`` in name order, checkpointing and publishing
    the model after each, and wait for more.

    Returns once :attr:`Trainer.stop_requested` is set (use
    :func:`~twotower.train.stop_on_signals`) or after ``idle_timeout`` seconds without a new
    partition, with a final checkpoint. Partitions the trainer has already finished are
    read (for histories) but not trained on again.
    """
    read: list[str] = []
    idle_since, saved_at = time.monotonic(), None
    while True:
        names, stop = _agree(trainer, [p.name for p in partitions(directory)])
        if stop:
            break
        new = [name for name in names if name not in read]
        if not new:
            if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                break
            _sleep(trainer, poll_seconds)
            continue
        for name in new:
            log.append(Path(directory) / name)
            read.append(name)
            if name in trainer.inputs_done:
                continue
            if train_day(trainer, *log.latest(), name)["stopped"]:
                break
            trainer.save()
            saved_at = trainer.step
        idle_since = time.monotonic()
    if saved_at != trainer.step:
        trainer.save()
