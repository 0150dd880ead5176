"""The model directory: config (JSON), weights and estimator (safetensors), metrics.

Every file is written atomically (temporary file, fsync, rename), so a crash leaves
either the old file or the new one, never half of one. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch

from twotower.frequency import StreamingFrequencyEstimator
from twotower.towers import ModelConfig, TwoTowerModel

__all__ = ["atomic_write", "load_model", "save_model", "versions"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ESTIMATOR = "estimator.safetensors"
METRICS = "metrics.jsonl"


def versions() -> dict[str, str]:
    """Versions of twotower and the libraries whose output it stores."""
    import pyarrow
    import torch

    from twotower import __version__

    return {"twotower": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
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


def save_model(directory: str | Path, model: TwoTowerModel,
               estimator: StreamingFrequencyEstimator | None, extra: dict | None = None) -> Path:
    """Write ``model`` (and its estimator) into ``directory``; ``extra`` goes into the config."""
    directory = Path(directory)
    config = {"model": model.config.to_dict(), "versions": versions(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda p: safetensors.torch.save_file(tensors, str(p)))
    if estimator is not None:
        state = estimator.state_dict()
        atomic_write(directory / ESTIMATOR, lambda p: safetensors.numpy.save_file(state, str(p)))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG, lambda p: p.write_text(text))
    return directory


def load_model(directory: str | Path) -> tuple[TwoTowerModel, StreamingFrequencyEstimator | None,
                                               dict]:
    """Read a model directory written by :func:`save_model`: model, estimator, config."""
    directory = Path(directory)
    if not (directory / CONFIG).exists():
        raise FileNotFoundError(f"{directory} is not a model directory (no {CONFIG})")
    try:
        config = json.loads((directory / CONFIG).read_text())
        model = TwoTowerModel(ModelConfig.from_dict(config["model"]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{directory / CONFIG} is not a valid model config: {error}") from None
    try:
        weights = safetensors.torch.load_file(str(directory / WEIGHTS))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read weights {directory / WEIGHTS}: {error}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"weights {directory / WEIGHTS} do not fit the model config "
                         f"{directory / CONFIG}: {error}") from None
    model.eval()
    estimator = None
    if (directory / ESTIMATOR).exists():
        try:
            state = safetensors.numpy.load_file(str(directory / ESTIMATOR))
            estimator = StreamingFrequencyEstimator.from_state_dict(state)
        except Exception as error:  # safetensors' own error types, or a bad state
            raise ValueError(f"cannot read estimator {directory / ESTIMATOR}: {error}") from None
    return model, estimator, config
