"""The training loop: time-ordered batches, corrected in-batch softmax, checkpoints.

Examples are consumed in time order, as the paper's trainer consumes its daily logs;
at every step the estimator sees the batch's items first and then gives their
sampling probabilities (read after update, so every batch item has been seen once).

A :class:`Trainer` holds everything a run needs to go on: model, optimizers, estimator
(whose step is the global step), position in the current input and the inputs already
trained on. Its checkpoints hold all of it, so a run killed at any moment resumes to the
same weights as a run never stopped, and a model continues on the next day's log with
its optimizer and estimator state. With several processes (:mod:`twotower.distributed`)
every worker reads the same global batches and embeds its own slice; the loss is the
single-process loss of the global batch, and only the main process writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from twotower.checkpoint import (
    CHECKPOINTS,
    METRICS,
    checkpoint_dirs,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
    save_model,
)
from twotower.distributed import (
    World,
    broadcast_tables,
    gather_with_grad,
    pick_device,
    shard,
    sync_table_grads,
)
from twotower.features import EncodedFeatures
from twotower.frequency import StreamingFrequencyEstimator
from twotower.lazy_adam import LazyAdam
from twotower.loss import in_batch_softmax_loss
from twotower.negatives import uniform_negatives
from twotower.towers import TwoTowerModel
from twotower.validation import EarlyStopping, Validation

__all__ = ["CORRECTIONS", "Position", "TrainConfig", "Trainer", "TrainingData",
           "TrainingDiverged", "TrainingStopped", "fit_and_save", "input_name",
           "make_optimizers", "oracle_log_q", "stop_on_signals", "train"]

Correction = Literal["none", "streaming", "oracle"]
CORRECTIONS: tuple[str, ...] = ("none", "streaming", "oracle")


MAX_LEARNING_RATE = 100.0  # far above any useful rate; near float32's limit Adam overflows


@dataclass
class TrainConfig:
    """How to train; stored with the model."""

    batch_size: int = 1024
    epochs: int = 1
    learning_rate: float = 0.005
    correction: Correction = "streaming"
    estimator_buckets: int = 1 << 20
    estimator_hashes: int = 1
    estimator_alpha: float = 0.01
    remove_accidental_hits: bool = True
    shuffle: bool = False
    patience: int = 3
    mixed_negatives: int = 0
    sparse: bool = True
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got "
                             f"{self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 < self.learning_rate < MAX_LEARNING_RATE:  # False for a NaN too
            raise ValueError(f"learning_rate must be above 0 and below {MAX_LEARNING_RATE:g}, "
                             f"got {self.learning_rate}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1 step, got {self.log_every}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {self.patience}")
        if self.mixed_negatives < 0:
            raise ValueError(f"mixed_negatives must be >= 0, got {self.mixed_negatives}")

    def make_estimator(self) -> StreamingFrequencyEstimator:
        return StreamingFrequencyEstimator(self.estimator_buckets, self.estimator_hashes,
                                           self.estimator_alpha)


@dataclass
class TrainingData:
    """Encoded features and targets of the training events, in time order.

    ``rows`` selects the training events (indices into ``queries``); ``item_row[e]`` is
    event ``e``'s row in ``items``, ``item_key[e]`` its item key, ``reward[e]`` its weight.
    """

    queries: EncodedFeatures
    items: EncodedFeatures
    item_row: np.ndarray
    item_key: np.ndarray
    reward: np.ndarray
    rows: np.ndarray

    def batches(self, batch_size: int,
                shuffle_seed: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """Batches of event indices, consecutive in time order, or in a random order drawn
        from ``shuffle_seed``; a last batch under 2 events is dropped."""
        rows = self.rows
        if shuffle_seed is not None:
            rows = rows[np.random.default_rng(shuffle_seed).permutation(len(rows))]
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            if len(batch) >= 2:
                yield batch


def oracle_log_q(data: TrainingData, batch_size: int) -> np.ndarray:
    """``[num_items]`` log of each item's exact probability of being in a batch.

    With frequency ``f`` over the training events, an item is in a batch of ``B``
    independent draws with probability ``1 - (1 - f)^B``: the quantity the streaming
    estimator tracks, counted exactly (a reference, not a production mode).
    """
    counts = np.bincount(data.item_row[data.rows], minlength=len(data.items))
    freq = counts / max(len(data.rows), 1)
    p = -np.expm1(batch_size * np.log1p(-np.minimum(freq, 1 - 1e-12)))
    return np.log(np.maximum(p, 1e-12))


def make_optimizers(model: TwoTowerModel, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam for the towers; for the tables, lazy Adam on the rows a batch touches.

    With ``config.sparse`` a step costs the same whatever the table size, because
    only touched rows get gradients and optimizer updates.
    """
    model.set_sparse(config.sparse)
    tables = list(model.tables.parameters())
    dense = [p for name, p in model.named_parameters() if not name.startswith("tables.")]
    if not config.sparse:
        return [torch.optim.Adam(tables + dense, lr=config.learning_rate)]
    return [LazyAdam(tables, lr=config.learning_rate),
            torch.optim.Adam(dense, lr=config.learning_rate)]


@dataclass
class Position:
    """Where a run stands in an input: ``batch`` batches of epoch ``epoch`` are done, drawn
    in shuffled or time order (a stopped epoch goes on in the order it began in)."""

    input: str = ""
    epoch: int = 0
    batch: int = 0
    shuffled: bool = False


def input_name(data: TrainingData) -> str:
    """A name for an input that changes when its events do (``data.name`` if it has one):
    a resumed run goes on where it stopped only on the same events."""
    name = getattr(data, "name", None)
    if name:
        return str(name)
    if not isinstance(data, TrainingData):
        return f"{type(data).__name__}:{len(data.rows)}"
    digest = hashlib.sha256(np.ascontiguousarray(data.item_key[data.rows]).tobytes())
    digest.update(np.ascontiguousarray(data.reward[data.rows]).tobytes())
    return f"events:{len(data.rows)}:{digest.hexdigest()[:16]}"


def _finite_after_step(model: nn.Module) -> bool:
    """Whether the weights a step changed are all finite: for a table with a sparse gradient
    only the rows the batch touched (a step costs the same whatever the table size).

    A sum is finite only if every term is, and one sum per tensor costs a fraction of an
    elementwise test; only a sum that overflows needs the elementwise test after it."""
    changed = [p.detach().index_select(0, p.grad._indices()[0]) if p.grad.is_sparse
               else p.detach() for p in model.parameters() if p.grad is not None]
    if not changed or bool(torch.isfinite(torch.stack([c.sum() for c in changed])).all()):
        return True  # one sync point a step
    return all(bool(torch.isfinite(c).all()) for c in changed)


class _Towers(nn.Module):
    """Both towers in one ``forward``, the call DDP synchronises."""

    def __init__(self, model: TwoTowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, queries: Mapping, items: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.query(queries), self.model.item(items)


# What may change on resume; the rest shapes the optimizer and estimator state.
RESUMABLE = ("epochs", "log_every", "shuffle")


class Trainer:
    """A model with its optimizers and estimator, and where its training stands.

    :meth:`fit` trains on one input; :meth:`checkpoint` writes what a run resumes from
    and :meth:`save` also publishes the model (both into ``out_dir``, by the main process
    only); :meth:`resume` continues from a checkpoint. ``checkpoint_every`` steps (0: only
    when the caller asks) a checkpoint is written during :meth:`fit`.
    """

    def __init__(self, model: TwoTowerModel, config: TrainConfig,
                 estimator: StreamingFrequencyEstimator | None = None,
                 out_dir: str | Path | None = None, device: str = "auto",
                 checkpoint_every: int = 0, progress: bool = True,
                 metrics_path: str | Path | None = None, extra: dict | None = None) -> None:
        self.world = World.current()
        if self.world.size > 1 and config.mixed_negatives:
            raise ValueError("mixed negatives are sampled in one process only; train with "
                             "--nproc 1, or without --mixed-negatives")
        self.device = pick_device(device)
        self.model = model.to(self.device)
        self.config = config
        self.estimator = estimator or config.make_estimator()
        self.optimizers = make_optimizers(model, config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None and self.world.main:  # what a killed save left behind
            remove_leftovers(self.out_dir)
        if metrics_path is None and self.out_dir is not None:
            metrics_path = self.out_dir / METRICS
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.extra = extra or {}
        self.position = Position()
        self.inputs_done: list[str] = []
        self.early_stopping = EarlyStopping(patience=config.patience)
        self._best: dict[str, torch.Tensor] | None = None
        # Stopped mid-input with a best epoch published: save() keeps that model published
        # (the resumed run puts its weights back at the end) and only checkpoints.
        self._best_published = False
        self.stop_requested = False
        broadcast_tables(list(model.tables.values()), self.world)
        self.towers: nn.Module = _Towers(model)
        if self.world.size > 1:
            tables = [f"model.tables.{name}.weight" for name in model.tables]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.towers, tables)
            self.towers = DistributedDataParallel(
                self.towers, device_ids=[self.device] if self.device.type == "cuda" else None)

    @property
    def step(self) -> int:
        """The global step: one per global batch, over every input so far."""
        return self.estimator.step

    @classmethod
    def resume(cls, path: str | Path, out_dir: str | Path | None = None, device: str = "auto",
               checkpoint_every: int = 0, progress: bool = True, **changes) -> Trainer:
        """Continue from a checkpoint: a model directory's latest, or a step directory.

        Weights, optimizer states, estimator, step, position and RNG carry on; ``changes``
        may set ``epochs``, ``log_every`` and ``shuffle`` (an epoch stopped midway goes on
        only in its own order). Writes go to ``out_dir`` (default: the model directory the
        checkpoint belongs to).
        """
        unknown = sorted(set(changes) - set(RESUMABLE))
        if unknown:
            raise ValueError(f"only {RESUMABLE} can change when resuming, not {unknown}: the "
                             "rest shapes the optimizer and estimator state")
        saved = load_checkpoint(path)
        if out_dir is None:
            out_dir = saved.path.parent.parent if saved.path.parent.name == CHECKPOINTS \
                else Path(path)
        config = replace(TrainConfig(**saved.state["train"]), **changes)
        trainer = cls(saved.model, config, saved.estimator, out_dir, device, checkpoint_every,
                      progress, extra=saved.state["extra"])
        for optimizer, state in zip(trainer.optimizers, saved.optimizers, strict=True):
            optimizer.load_state_dict(state)
        torch.set_rng_state(saved.rng)
        # A position written before it recorded its order was drawn in the run's order.
        trainer.position = Position(**{"shuffled": saved.state["train"].get("shuffle", False),
                                       **saved.state["position"]})
        trainer.inputs_done = list(saved.state["inputs_done"])
        if "early_stopping" in saved.state:
            trainer.early_stopping = EarlyStopping(**saved.state["early_stopping"])
        trainer._best = saved.best
        trainer.log({"event": "resume", "step": trainer.step, "from": str(saved.path)})
        return trainer

    def fit(self, data: TrainingData, name: str | None = None,
            validation: Validation | None = None) -> dict:
        """Train on ``data`` for ``config.epochs`` epochs, from where a run on the same input
        stopped; returns the input's summary, also appended to the metrics log.

        With ``validation``, the model is scored after every epoch; training stops once
        :attr:`early_stopping` has waited its patience, and the model ends with the weights
        of its best epoch (the summary says which). Stops early, after the
        current batch, once :attr:`stop_requested` is set (see :func:`stop_on_signals`);
        the summary then says ``stopped``.

        An input already trained on gets more epochs if it was the last one and
        ``config.epochs`` grew; otherwise it is skipped, the summary's ``reason`` says why. A
        run that stopped partway through an input refuses any other input (``ValueError``
        naming both); a loss or weights that become non-finite raise
        :class:`TrainingDiverged` before the step is saved.
        """
        name = name or input_name(data)
        self.check_input(name)
        if name in self.inputs_done:
            done = self._done_with(name)
            if done:
                return {"event": "input", "input": name, "step": self.step, "skipped": True,
                        "stopped": False, "reason": done}
            self.inputs_done.remove(name)  # more epochs on the input it last trained on
            self.position = Position(name, self.position.epoch + 1, 0, self.config.shuffle)
        start = self.position if self.position.input == name else Position(name)
        config = self.config
        if start == Position(name):  # a new input: its epochs alone are judged
            self.early_stopping = EarlyStopping(self.early_stopping.metric, config.patience)
            self._best = None
        if start.batch and start.shuffled != config.shuffle:
            order = "shuffled" if start.shuffled else "time"
            raise ValueError(f"input {name!r} stopped {start.batch} batches into epoch "
                             f"{start.epoch + 1} in {order} order; go on in {order} order "
                             f"(shuffle={start.shuffled}, --order {order}), or the epoch "
                             "would repeat some events and skip others")
        oracle = oracle_log_q(data, config.batch_size) if config.correction == "oracle" else None
        per_epoch = -(-len(data.rows) // config.batch_size)
        bar = tqdm(total=per_epoch * config.epochs, initial=start.epoch * per_epoch + start.batch,
                   disable=not (self.progress and self.world.main), unit="step",
                   mininterval=1.0, desc=f"train[{config.correction}]")
        started, losses, running, examples, stopped = time.perf_counter(), [], [], 0, False
        try:
            for epoch in range(start.epoch, config.epochs):
                self.towers.train()
                skip = start.batch if epoch == start.epoch else 0
                for index, rows in itertools.islice(self._batches(data, epoch), skip, None):
                    loss, stopped = self._reduce(self._step(data, rows, oracle))
                    if not math.isfinite(loss):  # before anything of this step is written
                        raise TrainingDiverged(self._diverged(f"the training loss became {loss}"))
                    self.position = Position(name, epoch, index + 1, config.shuffle)
                    losses.append(loss)
                    running.append(loss)
                    examples += len(rows)
                    bar.update(1)
                    if self.step % config.log_every == 0 or stopped:
                        bar.set_postfix(loss=f"{np.mean(running):.4f}")
                        running = self._log_loss(epoch, running, examples, started)
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.checkpoint()
                    if stopped:
                        break
                if running:
                    running = self._log_loss(epoch, running, examples, started)
                if stopped or (validation is not None and self._validate(validation, epoch)):
                    break
        finally:
            bar.close()
        if stopped:
            self.stop_requested = True  # a worker that got no signal stops with the others
        else:
            self.inputs_done.append(name)
        self._best_published = stopped and validation is not None \
            and self.early_stopping.best_epoch >= 0
        summary = {"event": "input", "input": name, "step": self.step, "steps": len(losses),
                   "examples": examples,
                   "loss": float(np.mean(losses)) if losses else float("nan"),
                   # the first and last steps' mean loss: did training move the model?
                   "loss_start": float(np.mean(losses[:config.log_every])) if losses else None,
                   "loss_end": float(np.mean(losses[-config.log_every:])) if losses else None,
                   "seconds": round(time.perf_counter() - started, 3), "stopped": stopped}
        if validation is not None and not stopped:
            summary.update(self._keep_best())
        self.log(summary)
        return summary

    def check_input(self, name: str) -> None:
        """Raise ``ValueError`` naming both inputs if this run stopped partway through another
        input than ``name``: it finishes that one first, it never starts over silently."""
        stopped_in = self.position.input
        if stopped_in and stopped_in not in self.inputs_done and name != stopped_in:
            raise ValueError(
                f"this run stopped partway through input {stopped_in} (epoch "
                f"{self.position.epoch + 1}, batch {self.position.batch}), but was given input "
                f"{name}: resume it with the same events and options (and --streaming if it "
                "streamed them) to finish it")

    def _done_with(self, name: str) -> str:
        """Why a finished input gets no more training ('' if it gets more epochs): only the
        input trained on last can go on, up to ``config.epochs`` epochs in all."""
        if self.position.input != name:
            return (f"input {name} was trained on before input {self.position.input}; only "
                    "the last input trained on can get more epochs")
        if self.early_stopping.done:
            return (f"validation stopped training on {name} early, after epoch "
                    f"{self.position.epoch + 1} (the best was epoch "
                    f"{self.early_stopping.best_epoch + 1})")
        trained = self.position.epoch + 1
        if trained >= self.config.epochs:
            return (f"{trained} epoch(s) on these events are done, as many as asked "
                    f"(epochs {self.config.epochs}); ask for more epochs to train further")
        return ""

    def _diverged(self, what: str) -> str:
        """What a run that diverged says: the step, and what is left to use."""
        kept = checkpoint_dirs(self.out_dir) if self.out_dir is not None else []
        left = (f"the last good checkpoint, {kept[-1]}, is kept (it resumes with the same "
                "learning rate and temperature, so to get past this step train anew with a "
                "lower --lr or a higher --temperature)" if kept else
                "no checkpoint was written")
        return (f"{what} at step {self.step}; training stopped there, nothing of that step "
                f"was saved, and {left}")

    def _batches(self, data: TrainingData, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, rows)`` of the batches of ``epoch``: in time order, or shuffled with a
        seed of the run's seed and the epoch (so a resumed run sees the same batches)."""
        seed = (self.config.seed, epoch) if self.config.shuffle else None
        return enumerate(data.batches(self.config.batch_size, seed))

    def _validate(self, validation: Validation, epoch: int) -> bool:
        """Score the epoch, remember the weights if it is the best; True to stop."""
        metrics = validation.score(self.model)
        stopping = self.early_stopping
        best = stopping.update(epoch, self.step, metrics[stopping.metric])
        self.log({"event": "validation", "epoch": epoch + 1, "step": self.step, **metrics,
                  "best_epoch": stopping.best_epoch + 1})
        if best:
            self._best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.out_dir is not None and self.world.main:  # survives a kill: resume reads it
                save_model(self.out_dir, self.model, self.estimator,  # with its record logged
                           {"train": asdict(self.config), **self.extra})
        if self.progress and self.world.main:
            tqdm.write(f"epoch {epoch + 1}: validation {stopping.metric} "
                       f"{metrics[stopping.metric]:.4f} (best {stopping.best_value:.4f}, "
                       f"epoch {stopping.best_epoch + 1})")
        return stopping.done

    def _keep_best(self) -> dict:
        """Put the best epoch's weights back (the estimator goes on: its estimates of item
        frequencies are as good after later epochs); what the summary says of it. They are
        in memory, or came with the checkpoint a resumed run started from."""
        stopping = self.early_stopping
        if self._best is not None:
            self.model.load_state_dict(self._best)
        return {"best_epoch": stopping.best_epoch + 1, stopping.metric: stopping.best_value,
                "early_stopped": stopping.done}

    def _log_loss(self, epoch: int, running: list[float], examples: int,
                  started: float) -> list[float]:
        """Log the mean loss of the steps since the last record; returns a new, empty list."""
        self.log({"step": self.step, "epoch": epoch, "loss": float(np.mean(running)),
                  "examples": examples, "seconds": round(time.perf_counter() - started, 3)})
        return []

    def _step(self, data: TrainingData, rows: np.ndarray,
              oracle: np.ndarray | None) -> torch.Tensor:
        """One optimizer step on the global batch ``rows``; returns this worker's share of
        the batch loss (the shares of all workers add up to it)."""
        dev, world, config = self.device, self.world, self.config
        local, first = shard(rows, world)
        keys = data.item_key[rows]  # the global batch: every estimator replica sees all of it
        probability = self.estimator.update_and_probability(keys)
        # Each distinct item of the global batch is one candidate column, with its count.
        item_rows, once, columns, counts = np.unique(
            data.item_row[rows], return_index=True, return_inverse=True, return_counts=True)
        log_q = None
        if config.correction == "streaming":
            log_q = np.log(probability[once])
        elif config.correction == "oracle":
            log_q = oracle[item_rows]
        candidates = item_rows
        if config.mixed_negatives:  # uniform draws from the corpus, after the batch's items
            sampled, times, sampled_log_q = uniform_negatives(
                len(data.items), config.mixed_negatives,
                np.random.default_rng((config.seed, self.step)))
            candidates = np.concatenate([item_rows, sampled])
            counts = np.concatenate([counts, times])
            if log_q is not None:
                log_q = np.concatenate([log_q, np.full(len(sampled), sampled_log_q)])
        if world.size == 1:  # the item tower sees each distinct item once
            query, items = self.towers(data.queries.take(local, dev),
                                       data.items.take(candidates, dev))
        else:  # every worker's items, gathered with their gradients, first copies kept
            query, item = self.towers(data.queries.take(local, dev),
                                      data.items.take(data.item_row[local], dev))
            items = gather_with_grad(item, len(rows), world)[torch.from_numpy(once).to(dev)]
        positives = torch.from_numpy(columns[first:first + len(local)]).to(dev)
        loss = in_batch_softmax_loss(
            query, items, torch.from_numpy(candidates).to(dev),
            None if log_q is None else torch.from_numpy(log_q).to(dev),
            torch.from_numpy(data.reward[local]).to(dev), self.model.config.temperature,
            config.remove_accidental_hits, positives, torch.from_numpy(counts).to(dev))
        share = loss * (len(local) / len(rows))
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over workers; scaled by the world size, that is their sum.
        (share * world.size).backward()
        sync_table_grads(list(self.model.tables.values()), world)
        for optimizer in self.optimizers:
            optimizer.step()
        if not _finite_after_step(self.model):  # so that no checkpoint ever holds a NaN
            raise TrainingDiverged(self._diverged("the weights became non-finite"))
        return share.detach()

    def _reduce(self, share: torch.Tensor) -> tuple[float, bool]:
        """The global batch loss, and whether any worker was asked to stop: every worker
        must stop after the same batch (a sync point)."""
        if self.world.size == 1:
            return share.item(), self.stop_requested
        both = torch.stack([share.float(), torch.tensor(float(self.stop_requested),
                                                         device=share.device)])
        dist.all_reduce(both)
        return both[0].item(), both[1].item() > 0

    def state(self) -> dict:
        """The JSON part of a checkpoint."""
        return {"step": self.step, "position": asdict(self.position),
                "inputs_done": self.inputs_done, "train": asdict(self.config),
                "early_stopping": self.early_stopping.state_dict(), "extra": self.extra}

    def checkpoint(self) -> Path | None:
        """Write a checkpoint into ``out_dir/checkpoints`` (main process only)."""
        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir to write checkpoints into")
        if not self.world.main:
            return None
        return save_checkpoint(self.out_dir, self.model, self.estimator, self.optimizers,
                               self.state(), best=self._best)

    def save(self) -> Path | None:
        """Publish the model into ``out_dir`` (what index and serve read) and checkpoint.

        A run with validation stopped mid-input leaves its best epoch's model published
        (:meth:`fit` wrote it there) and only checkpoints: the resumed run puts those
        weights back when it ends, and a model to use meanwhile is the best one."""
        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir to save into")
        if not self.world.main:
            return None
        if not self._best_published:
            save_model(self.out_dir, self.model, self.estimator,
                       {"train": asdict(self.config), **self.extra})
        return self.checkpoint()

    def log(self, record: dict) -> None:
        """Append a record to the metrics log (JSON lines; main process only)."""
        if self.metrics_path is None or not self.world.main:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TrainingStopped(Exception):
    """Training was stopped by a signal after a final checkpoint; resume it to go on."""


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite; the step that did it was not saved."""


@contextmanager
def stop_on_signals(trainer: Trainer, signals: tuple[int, ...] = (signal.SIGINT,
                                                                   signal.SIGTERM)):
    """While inside, SIGINT or SIGTERM asks ``trainer`` to stop after its current batch (so
    the caller can write a final checkpoint); a second signal interrupts at once. Outside
    the main thread, where Python cannot catch signals, this does nothing."""
    def ask_to_stop(signum: int, frame: object) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    if threading.current_thread() is not threading.main_thread():
        yield trainer
        return
    previous = {s: signal.signal(s, ask_to_stop) for s in signals}
    try:
        yield trainer
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fit_and_save(trainer: Trainer, data: TrainingData, name: str | None = None,
                 validation: Validation | None = None) -> dict:
    """Fit (SIGINT and SIGTERM stop it after the current batch), then publish the model and
    checkpoint; raises :class:`TrainingStopped` after saving if a signal stopped it."""
    with stop_on_signals(trainer):
        summary = trainer.fit(data, name, validation)
    trainer.save()
    if summary["stopped"]:
        raise TrainingStopped(f"stopped at step {trainer.step}; {trainer.out_dir} holds a "
                              f"checkpoint: `twotower train --resume {trainer.out_dir}` with the "
                              "same events goes on from there")
    return summary


def train(model: TwoTowerModel, data: TrainingData, config: TrainConfig,
          estimator: StreamingFrequencyEstimator | None = None,
          metrics_path: str | Path | None = None, progress: bool = True,
          device: str = "auto") -> StreamingFrequencyEstimator:
    """Train ``model`` on ``data``; returns the frequency estimator (new or continued).

    The estimator runs in every correction mode, so a model trained without correction
    still carries item frequencies for serving and reports. For checkpoints and resume,
    use a :class:`Trainer`.
    """
    trainer = Trainer(model, config, estimator, device=device, progress=progress,
                      metrics_path=metrics_path)
    trainer.fit(data)
    model.eval()
    return trainer.estimator
