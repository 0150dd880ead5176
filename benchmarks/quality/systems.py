"""The systems compared, each with its runner script, environment and validation grid.

Every system gets the same budget: at most four settings on ``valid`` (a learning rate or
regularisation crossed with a dimension or dropout), each trained with the same epoch cap,
check interval and patience. Adding a system is one runner file (see ``runner_lib.py``)
and one entry here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


def grid(**axes: list) -> list[dict]:
    """Every combination of the axes' values, as settings dicts."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def refit_settings(valid_record: dict) -> dict:
    """What the test refits of a valid run train with: its settings, the epoch it kept, and
    what it chose on valid after the epoch (twotower's popularity penalty)."""
    return {**valid_record["settings"], "epochs": valid_record["best_epoch"],
            **valid_record.get("chosen", {})}


@dataclass(frozen=True)
class System:
    name: str
    script: str                  # runner file in this directory
    venv: str | None             # environment name in venvs.REQUIREMENTS (None: this Python)
    grid: list[dict]             # settings tried on valid
    fixed: dict = field(default_factory=dict)  # settings shared by the whole grid
    # Multiplies the epoch cap and the check interval, for a system whose epochs are tiny
    # steps: implicit's BPR is one SGD sample per event (about a second an epoch here) and
    # needs on the order of its default 100 iterations, so it is checked every 20.
    epoch_scale: int = 1


# Four queries for three kinds of log: the history as a mean, with dropout 0.2 (short,
# sparse histories); with the user's own id embedding added, with dropout 0 (it pays on
# logs with many events per user and costs on logs with few); and the history read in
# order by self-attention, without and with the user id (logs whose next item follows
# from the last few: on ml-100k the two together led, valid Recall@50 0.5822 against
# 0.5217 for the order alone). Settings that no shared log chose made way for the last
# two (README, "Reading the history in order" and "Ties"). Mixed negatives are fixed at
# 1,024: they won on valid on every shared log, with and without the correction, when
# they were the grid's other axis (README, "twotower in this benchmark").
TWOTOWER_GRID = [{"dropout": 0.2}, {"dropout": 0.0, "user_id": True},
                 {"dropout": 0.2, "history_kind": "sequence"},
                 {"dropout": 0.2, "history_kind": "sequence", "user_id": True}]

SYSTEMS = {s.name: s for s in [
    System("mostpop", "run_mostpop.py", None, [{}]),
    System("implicit-als", "run_implicit.py", "implicit",
           grid(factors=[64, 128], regularization=[0.01, 0.1]), {"model": "als"}),
    System("implicit-bpr", "run_implicit.py", "implicit",
           grid(factors=[64, 128], learning_rate=[0.01, 0.05]),
           {"model": "bpr", "regularization": 0.01}, epoch_scale=10),
    System("tfrs", "run_tfrs.py", "tfrs", grid(dim=[32, 64], learning_rate=[0.05, 0.2]),
           {"logq": False, "batch_size": 1024}),
    System("tfrs-logq", "run_tfrs.py", "tfrs", grid(dim=[32, 64], learning_rate=[0.05, 0.2]),
           {"logq": True, "batch_size": 1024}),
    # twotower through its own command line (run_twotower.py), with the driver's Python:
    # the defaults with 1,024 mixed negatives, and the grid above. `ties: ordered`: the
    # protocol orders each user's events (by time, then item id) and a query at recommend
    # time holds every event before the target, tied ones included (on ml-100k 45% of the
    # validation targets share their second with the user's last train event); so each
    # training event's history holds the events before it in that order too.
    # The popularity penalty at serving is chosen on valid after the epoch, as a user would
    # (`twotower evaluate --on valid --popularity-penalty B`; run_twotower.PENALTIES).
    System("twotower", "run_twotower.py", None, TWOTOWER_GRID,
           {"lr": 0.005, "popularity_penalty": "valid", "mixed_negatives": 1024,
            "history_dropout": 0.5, "ties": "ordered"}),
    # The same without the sampling-bias correction (`--correction none`), same grid.
    System("twotower-none", "run_twotower.py", None, TWOTOWER_GRID,
           {"lr": 0.005, "correction": "none", "mixed_negatives": 1024,
            "history_dropout": 0.5, "ties": "ordered"}),
    # The faster-learning learning rate first: `--max-settings 1` tries it alone.
    System("recbole-sasrec", "run_recbole_sasrec.py", "recbole",
           grid(learning_rate=[0.003, 0.001], dropout=[0.2, 0.5]),
           {"hidden_size": 64, "batch_size": 2048}),
]}
