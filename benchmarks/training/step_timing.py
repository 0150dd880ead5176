"""Step times of several trainers measured in turn, round by round (shared by the benches).

The machine is shared and noisy: each round gives every trainer the same batches one
after another, so a burst of load falls on all of them alike.
"""

from __future__ import annotations

import numpy as np


def interleaved_step_times(runs: dict, warm_up: np.ndarray, rows: np.ndarray,
                           rounds: int) -> dict[str, list[float]]:
    """Seconds a step for each ``name: (trainer, prepared)`` of ``runs``, one per round,
    after a warm-up on ``warm_up`` (first-touch allocation of the optimizer state)."""
    for trainer, prepared in runs.values():
        trainer.fit(prepared.training_data(warm_up), "warm-up")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name, (trainer, prepared) in runs.items():
            summary = trainer.fit(prepared.training_data(rows), f"round {round_}")
            times[name].append(summary["seconds"] / summary["steps"])
            print(f"round {round_} {name:24s} {1000 * times[name][-1]:8.1f} ms/step", flush=True)
    return times
