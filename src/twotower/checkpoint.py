"""The model directory: config (JSON), weights and estimator (safetensors), metrics, and
the training checkpoints a run resumes from.

Every file is written atomically (temporary file, fsync, rename), so a crash leaves
either the old file or the new one, never half of one. Nothing is pickled.

The published model switches as a whole: :func:`save_model` writes config, weights,
estimator and a ``manifest.json`` (each file's size and sha256, and how much of the
metrics log belongs to this model) into a new directory ``published/v-<id>``, then
swaps the symbolic link ``current`` to it in one atomic rename; ``config.json``,
``model.safetensors`` and ``estimator.safetensors`` at the top are links through
``current``. A crash at any moment leaves the previous model whole, and
:func:`load_model` reads one generation, checked against its manifest, so parts of two
saves never load together. A checkpoint directory loads as a model too.

A training checkpoint is a directory ``checkpoints/step-<step>`` holding the weights,
the estimator, the optimizer states and RNG (with a validated run's best weights so far;
safetensors) and ``state.json`` (step, position in the input, configs, early stopping,
and the structure of the optimizer states); its
``manifest.json``, written last, records each file's size and sha256. It is written
under a hidden name and renamed into place when complete, and only then does
``checkpoints/LATEST`` (rewritten atomically) point to it: a crash at any moment leaves
the previous checkpoint current. Loading checks every file against the manifest, so a
truncated or altered checkpoint is an error, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from twotower.frequency import StreamingFrequencyEstimator
from twotower.towers import ModelConfig, TwoTowerModel

__all__ = ["Checkpoint", "CheckpointError", "atomic_write", "checkpoint_dirs", "load_checkpoint",
           "load_model", "model_files", "published_metrics_bytes", "remove_leftovers",
           "remove_run", "run_files", "save_checkpoint", "save_model", "sha256_of", "versions"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ESTIMATOR = "estimator.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE = "state.json"
TRAINING = "training.safetensors"  # optimizer states, RNG and a validated run's best weights
BEST = "best."  # the prefix of the best epoch's weights in TRAINING
MANIFEST = "manifest.json"
FORMAT = "twotower-checkpoint"
PUBLISHED = "published"  # generations of the published model, each with its manifest
CURRENT = "current"  # symbolic link to the generation in use
MODEL_FORMAT = "twotower-model"
MODEL_FILES = (CONFIG, WEIGHTS, ESTIMATOR)
_STEP_NAME = re.compile(r"step-\d{12,}(-\d+)?")


def versions() -> dict[str, str]:
    """Versions of twotower and the libraries whose output it stores."""
    import pyarrow
    import torch

    from twotower import __version__

    return {"twotower": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fresh_directory(parent: Path, prefix: str) -> Path:
    """A new, empty hidden directory in ``parent`` with the usual mode (mkdtemp makes 0700),
    to fill and then rename into place."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes 0600, and some writers (safetensors) make the file anew: artifacts
        # get the usual mode once written.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _symlink(path: Path, target: Path) -> None:
    """Point the link ``path`` at ``target`` in one atomic rename (unless it already does)."""
    if path.is_symlink() and Path(os.readlink(path)) == target:
        return
    if path.is_dir() and not path.is_symlink():  # a copy that followed the links: while it
        shutil.rmtree(path)  # is gone, the copied files beside it are read (the same model)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}"
    os.symlink(target, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_manifest(where: Path, files: list[str], **fields: object) -> None:
    """``manifest.json``, written last: ``fields`` and each file's size and sha256."""
    manifest = {**fields, "files": {f: {"bytes": (where / f).stat().st_size,
                                        "sha256": sha256_of(where / f)} for f in files}}
    atomic_write(where / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))


def remove_leftovers(directory: str | Path) -> None:
    """Remove what a killed save left half-written in a model directory: hidden temporary
    files and links, unfinished generations and checkpoints (never a complete one)."""
    directory = Path(directory)
    found = [p for name in (*MODEL_FILES, CURRENT) for p in directory.glob(f".{name}.*")]
    found += [*(directory / PUBLISHED).glob(".v-*"), *(directory / CHECKPOINTS).glob(".step-*")]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def save_model(directory: str | Path, model: TwoTowerModel,
               estimator: StreamingFrequencyEstimator | None, extra: dict | None = None) -> Path:
    """Publish ``model`` (and its estimator) in ``directory`` as one unit; ``extra`` goes into
    the config. The previous generation stays until the next save (a reader may be on it)."""
    directory = Path(directory)
    root = directory / PUBLISHED
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    metrics = directory / METRICS
    config = {"model": model.config.to_dict(), "versions": versions(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    writers = {WEIGHTS: lambda p: safetensors.torch.save_file(tensors, str(p)),
               CONFIG: lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True))}
    if estimator is not None:
        state = estimator.state_dict()
        writers[ESTIMATOR] = lambda p: safetensors.numpy.save_file(state, str(p))
    tmp = fresh_directory(root, ".v-")
    for file, write in writers.items():
        atomic_write(tmp / file, write)
    _write_manifest(tmp, list(writers), format=MODEL_FORMAT,
                    metrics_bytes=metrics.stat().st_size if metrics.exists() else 0)
    final = root / tmp.name[1:]
    os.rename(tmp, final)
    _fsync_dir(root)
    previous = (directory / CURRENT).resolve() if (directory / CURRENT).is_symlink() else None
    _symlink(directory / CURRENT, Path(PUBLISHED) / final.name)  # the switch
    for name in MODEL_FILES:  # links for readers of the files by name, none left dangling
        if name in writers:
            _symlink(directory / name, Path(CURRENT) / name)
        elif (directory / name).is_symlink():
            (directory / name).unlink()
    for old in root.iterdir():
        if old.resolve() not in (final.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)
    return directory


def model_files(directory: str | Path) -> Path:
    """The directory holding a model's files: the published generation ``current`` names
    (resolved once, so a save meanwhile cannot mix two), else ``directory`` itself (a
    checkpoint, or a model directory written before generations)."""
    directory = Path(directory)
    current = directory / CURRENT
    return current.resolve() if current.is_symlink() else directory


def _files_problem(where: Path, files: dict) -> str | None:
    """What is wrong with the files a manifest lists, or ``None``."""
    for file, expected in files.items():
        path = where / file
        if not path.exists():
            return f"{file} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return (f"{file} has {size} bytes, its manifest says {expected['bytes']} "
                    "(truncated or overwritten)")
        if sha256_of(path) != expected["sha256"]:
            return f"{file} does not match its sha256 in {MANIFEST} (changed after it was written)"
    return None


def _manifest(where: Path) -> dict | None:
    try:
        manifest = json.loads((where / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _verify_model(directory: Path, where: Path) -> None:
    """The published generation ``where`` holds exactly the files its manifest describes."""
    manifest = _manifest(where)
    if manifest is None or manifest.get("format") != MODEL_FORMAT:
        problem = f"no readable {MANIFEST}"
    else:
        problem = _files_problem(where, manifest.get("files", {}))
    if problem:
        kept = checkpoint_dirs(directory)
        hint = (f"its checkpoints load as models too: {', '.join(str(p) for p in kept)}"
                if kept else "retrain it")
        raise ValueError(f"model {directory} is damaged ({where}: {problem}); {hint}")


def published_metrics_bytes(directory: str | Path) -> int | None:
    """How much of the metrics log belongs to the published model (``None``: all of it)."""
    manifest = _manifest(model_files(directory))
    if manifest is None or manifest.get("format") != MODEL_FORMAT:
        return None
    return manifest.get("metrics_bytes")


def _checkpoint_as_model(directory: Path) -> tuple[TwoTowerModel, StreamingFrequencyEstimator,
                                                   dict]:
    """A training checkpoint read as a model: its config as :func:`save_model` writes it."""
    saved = load_checkpoint(directory)
    state = saved.state
    config = {"model": state["model"], "versions": state["versions"], "train": state["train"],
              **state["extra"]}
    return saved.model.eval(), saved.estimator, config


def load_model(directory: str | Path) -> tuple[TwoTowerModel, StreamingFrequencyEstimator | None,
                                               dict]:
    """Read a model directory written by :func:`save_model`, or a training checkpoint
    (``MODEL/checkpoints/step-N``): model, estimator, config."""
    directory = Path(directory)
    manifest = _manifest(directory)
    if manifest is not None and manifest.get("format") == FORMAT:
        return _checkpoint_as_model(directory)
    where = model_files(directory)
    if where != directory:
        _verify_model(directory, where)
    if not (where / CONFIG).exists():
        raise FileNotFoundError(f"{directory} is not a model directory (no {CONFIG})")
    try:
        config = json.loads((where / CONFIG).read_text())
        model = TwoTowerModel(ModelConfig.from_dict(config["model"]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{where / CONFIG} is not a valid model config: {error}") from None
    try:
        weights = safetensors.torch.load_file(str(where / WEIGHTS))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read weights {where / WEIGHTS}: {error}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"weights {where / WEIGHTS} do not fit the model config "
                         f"{where / CONFIG}: {error}") from None
    model.eval()
    estimator = None
    if (where / ESTIMATOR).exists():
        try:
            state = safetensors.numpy.load_file(str(where / ESTIMATOR))
            estimator = StreamingFrequencyEstimator.from_state_dict(state)
        except Exception as error:  # safetensors' own error types, or a bad state
            raise ValueError(f"cannot read estimator {where / ESTIMATOR}: {error}") from None
    return model, estimator, config


RUN = (*MODEL_FILES, CURRENT, PUBLISHED, METRICS, CHECKPOINTS)  # what a training run writes


def run_files(directory: str | Path) -> list[str]:
    """What a training run left in ``directory`` (a model, checkpoints, a metrics log)."""
    return [name for name in RUN if os.path.lexists(Path(directory) / name)]


def remove_run(directory: str | Path) -> None:
    """Remove what a training run wrote into ``directory``, leaving anything else there."""
    remove_leftovers(directory)
    for name in run_files(directory):
        path = Path(directory) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


LOCK = ".lock"  # held by the run writing a directory; never counted as part of a run


class RunLocked(ValueError):
    """Another training run is writing the directory."""


def _open_lock(directory: Path) -> int | None:
    """A descriptor of ``directory``'s lock file, locked; ``None`` if another run holds it."""
    import fcntl

    for _ in range(10):  # the file may be removed between opening and locking it
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(directory / LOCK)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    return None


@contextlib.contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s lock while a run writes into it.

    Two trainers given the same ``--out`` both ran to the end: their metrics logs were
    interleaved in one file, each published over the other and the checkpoints of both
    stood side by side. The second now stops at once, naming the directory. A directory
    created here that the run left empty is removed again.
    """
    directory = Path(directory)
    created = not directory.exists()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(directory)
    if fd is None:
        raise RunLocked(f"{directory} is being written by another training run (it holds "
                        f"{directory / LOCK}): wait for that run to end, or give another "
                        "--out")
    try:
        yield
    finally:
        if created and not run_files(directory):
            (directory / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: something else was put there
                directory.rmdir()
        os.close(fd)


class CheckpointError(ValueError):
    """A training checkpoint that is missing, incomplete or damaged (never loaded)."""


@dataclass
class Checkpoint:
    """What a run resumes from; ``state`` is ``state.json`` (step, position, configs)."""

    path: Path
    model: TwoTowerModel
    estimator: StreamingFrequencyEstimator
    optimizers: list[dict]
    rng: torch.Tensor
    state: dict
    best: dict[str, torch.Tensor] | None = None  # the best epoch's weights, with validation


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (artifacts can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(value: object, key: str, tensors: dict[str, torch.Tensor]) -> object:
    """JSON for an optimizer state dict, its tensors moved into ``tensors`` by key. Dicts
    keep their key types (parameter indices are ints) and tuples stay tuples."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple | list):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    return value


def _decode(value: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "tuple" in value:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    return {k: _decode(v, tensors) for k, v in value["dict"]}


def checkpoint_dirs(directory: str | Path) -> list[Path]:
    """The complete checkpoints of a model directory, oldest first."""
    root = Path(directory) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists())


def save_checkpoint(directory: str | Path, model: TwoTowerModel,
                    estimator: StreamingFrequencyEstimator,
                    optimizers: list[torch.optim.Optimizer], state: dict, keep: int = 2,
                    best: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint of step ``state["step"]`` and make it the latest; keep ``keep``.

    ``best`` (the weights of a validated run's best epoch so far) goes with the optimizer
    states, so a resumed run can end with them wherever it writes."""
    root = Path(directory) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:012d}"
    final, n = root / name, 0
    while final.exists():  # the same step again (a stop right after a checkpoint)
        n += 1
        final = root / f"{name}-{n}"
    tmp = fresh_directory(root, f".{final.name}.")
    try:
        _write_checkpoint(tmp, final, model, estimator, optimizers, state, best)
    except (OSError, safetensors.SafetensorError) as error:  # e.g. the disk is full
        shutil.rmtree(tmp, ignore_errors=True)
        complete = [p for p in checkpoint_dirs(directory) if p != final]
        kept = f"the last complete checkpoint, {complete[-1]}, is intact (resume from it " \
            "once there is room)" if complete else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final}: {error}; {kept}") from None
    for old in checkpoint_dirs(directory)[:-keep] + list(root.glob(".step-*")):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, final: Path, model: TwoTowerModel,
                      estimator: StreamingFrequencyEstimator,
                      optimizers: list[torch.optim.Optimizer], state: dict,
                      best: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill ``tmp`` (files, then the manifest), rename it to ``final``, point LATEST at it."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    structure = [_encode(o.state_dict(), f"optimizer.{i}", tensors)
                 for i, o in enumerate(optimizers)]
    for key, value in (best or {}).items():
        tensors[f"{BEST}{key}"] = value.detach().cpu().contiguous()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    estimator_state = estimator.state_dict()
    text = json.dumps({**state, "model": model.config.to_dict(), "optimizers": structure,
                       "versions": versions()}, indent=1)
    writers = {WEIGHTS: lambda p: safetensors.torch.save_file(weights, str(p)),
               ESTIMATOR: lambda p: safetensors.numpy.save_file(estimator_state, str(p)),
               TRAINING: lambda p: safetensors.torch.save_file(tensors, str(p)),
               STATE: lambda p: p.write_text(text)}
    for file, write in writers.items():
        atomic_write(tmp / file, write)
    _write_manifest(tmp, list(writers), format=FORMAT, step=state["step"])
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    atomic_write(final.parent / LATEST, lambda p: p.write_text(final.name + "\n"))


def _resolve(path: Path) -> Path:
    """The checkpoint a path names: a step directory, or a model directory's latest."""
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        return path
    latest = path / CHECKPOINTS / LATEST
    complete = checkpoint_dirs(path)
    remaining = f"; complete checkpoints: {', '.join(str(p) for p in complete)} (resume " \
        "from one by naming it, the newest last)" if complete else ""
    if not latest.exists():
        advice = remaining or ": resume from a model directory written by `twotower train`, " \
            "or train a new model"
        raise CheckpointError(f"{path} holds no training checkpoint ({CHECKPOINTS}/{LATEST} is "
                              f"missing){advice}")
    try:
        name = latest.read_bytes().decode().strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{latest} is damaged (it does not name a checkpoint)"
                              f"{remaining or '; no complete checkpoint is left, so retrain'}")
    return path / CHECKPOINTS / name


def _damaged(where: Path, what: str) -> CheckpointError:
    others = [str(p) for p in checkpoint_dirs(where.parent.parent) if p != where] \
        if where.parent.name == CHECKPOINTS else []
    hint = (f"; earlier checkpoints: {', '.join(others)} (resume from one by naming it)"
            if others else "; no earlier checkpoint is left, so retrain")
    return CheckpointError(f"checkpoint {where} is damaged: {what}{hint}")


def _verify(where: Path) -> None:
    """Every file of the checkpoint is the one its manifest describes."""
    if not where.is_dir():
        raise _damaged(where, "the directory is missing")
    try:
        manifest = json.loads((where / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise _damaged(where, f"no {MANIFEST} (the writer stopped before finishing)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise _damaged(where, f"{MANIFEST} is unreadable ({error})") from None
    if manifest.get("format") != FORMAT or set(files) != {WEIGHTS, ESTIMATOR, TRAINING, STATE}:
        raise _damaged(where, f"{MANIFEST} does not describe a {FORMAT}")
    problem = _files_problem(where, files)
    if problem:
        raise _damaged(where, problem)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint: a model directory (its latest) or a step directory."""
    where = _resolve(Path(path))
    _verify(where)
    state = json.loads((where / STATE).read_text())
    model = TwoTowerModel(ModelConfig.from_dict(state["model"]))
    model.load_state_dict(safetensors.torch.load_file(str(where / WEIGHTS)))
    estimator = StreamingFrequencyEstimator.from_state_dict(
        safetensors.numpy.load_file(str(where / ESTIMATOR)))
    tensors = safetensors.torch.load_file(str(where / TRAINING))
    optimizers = [_decode(o, tensors) for o in state.pop("optimizers")]
    best = {k[len(BEST):]: v for k, v in tensors.items() if k.startswith(BEST)}
    return Checkpoint(where, model, estimator, optimizers, tensors["rng.torch"], state,
                      best or None)
