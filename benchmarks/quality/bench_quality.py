"""Quality of the peers under the next-item protocol, with one command.

    python benchmarks/quality/bench_quality.py [--datasets amazon-sports] \
        [--systems tfrs tfrs-logq] [--max-epochs 20] [--jobs 2]

For each data set present and each system: every grid setting is trained on ``valid``
(seed 0, early stopping on valid Recall@50), the best one is retrained on ``test`` with
seeds 0, 1, 2 for the epochs it stopped at, and every run is scored by the protocol's
``evaluate.py``. Each run appends one record to ``results/results.json`` as soon as it
ends (a run already recorded with the same settings is skipped, so an interrupted
benchmark resumes; so is one that stopped early under a smaller epoch cap, which a larger
cap would not have changed), and the table in ``README.md`` is rewritten from those
records.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import prepare
import report
import venvs
from systems import SYSTEMS, System, refit_settings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "results.json"
SEEDS = (0, 1, 2)
# One thread per process: the machine is shared, and every system gets the same.
THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                  "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}
_lock = threading.Lock()


def load_results() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def append_result(record: dict) -> None:
    """Add one record; a file lock lets two drivers (say, two data sets) share the file."""
    with _lock, open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = [*load_results(), record]
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        os.replace(tmp, RESULTS)


def reusable(record: dict, phase: str, budget: dict) -> bool:
    """Whether a record stands for a run under ``budget``. A test refit trains a fixed
    number of epochs, so any budget's will do; a valid run will if it has the same check
    interval and patience and stopped on its own before both caps (the cap never bit)."""
    if phase == "test" or record["budget"] == budget:
        return True
    old, epochs = record["budget"], record["epochs_trained"]
    return ((old["eval_every"], old["patience"]) == (budget["eval_every"], budget["patience"])
            and epochs < old["max_epochs"] and epochs <= budget["max_epochs"])


def find(dataset: str, system: str, phase: str, settings: dict, seed: int,
         budget: dict) -> dict | None:
    """The record of this run under ``budget``: its own, else the latest that stands for it."""
    same = [r for r in load_results()
            if (r["dataset"], r["system"], r["phase"], r["settings"], r["seed"]) == (
                dataset, system, phase, settings, seed) and reusable(r, phase, budget)]
    own = [r for r in same if r["budget"] == budget]
    return (own or same or [None])[-1]


def run_one(system: System, dataset: str, split: Path, phase: str, settings: dict, seed: int,
            budget: dict, args: argparse.Namespace) -> dict:
    """Train and score one setting (or return its record if already there)."""
    done = find(dataset, system.name, phase, settings, seed, budget)
    if done and done["budget"] != budget:  # recorded again under this budget, saying whence
        done = {**done, "budget": budget, "reused_from": done["budget"]}
        append_result(done)
    if done:
        return done
    tag = "-".join(f"{k}{v}" for k, v in settings.items() if k not in system.fixed) or "default"
    out = args.work / dataset / "runs" / system.name / f"{phase}-{tag}-seed{seed}"
    cmd = [venvs.python(system.venv), str(HERE / system.script), "--split-dir", str(split),
           "--phase", phase, "--settings", json.dumps(settings), "--seed", str(seed),
           "--out", str(out), "--protocol-dir", str(args.protocol_dir),
           "--max-epochs", str(budget["max_epochs"]), "--eval-every", str(budget["eval_every"]),
           "--patience", str(budget["patience"])]
    print(f"[bench] {dataset} {system.name} {phase} {tag} seed {seed}", file=sys.stderr, flush=True)
    start = time.time()
    # Appended to: a resumable runner started again goes on where the log left off.
    with open(out.parent.mkdir(parents=True, exist_ok=True) or out.parent / f"{out.name}.log",
              "a") as log:
        subprocess.run(["nice", "-n", "10", *cmd], check=True, stdout=log, stderr=log,
                       env={**os.environ, **THREADS}, cwd=HERE)
    run = json.loads((out / "run.json").read_text())
    sys.path.insert(0, str(args.protocol_dir))
    from evaluate import evaluate

    metrics = evaluate(out / "predictions.jsonl", split, phase)
    record = {"dataset": dataset, "system": system.name, "phase": phase, "seed": seed,
              "settings": settings, "budget": budget, "metrics": metrics,
              "train_seconds": run["train_seconds"],
              "examples_per_second": run["examples_per_second"],
              "epochs_trained": run["epochs_trained"], "best_epoch": run["best_epoch"],
              "predict_seconds": run["predict_seconds"], "curve": run["curve"],
              # serving settings a runner chose on valid after the epoch (twotower's beta)
              **({"chosen": run["chosen"]} if run.get("chosen") else {}),
              "wall_seconds": time.time() - start, "command": args.command,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    append_result(record)
    print(f"[bench] {dataset} {system.name} {phase} {tag} seed {seed}: recall@50 "
          f"{metrics['recall@50']:.4f}, {run['train_seconds']:.0f}s", file=sys.stderr, flush=True)
    return record


def bench(system: System, dataset: str, split: Path, args: argparse.Namespace) -> None:
    budget = {"max_epochs": args.max_epochs * system.epoch_scale,
              "eval_every": args.eval_every * system.epoch_scale, "patience": args.patience}
    settings = [{**system.fixed, **s} for s in system.grid[:args.max_settings]]
    with ThreadPoolExecutor(args.jobs) as pool:
        valid = list(pool.map(lambda s: run_one(system, dataset, split, "valid", s, 0, budget,
                                                args), settings))
        best = max(valid, key=lambda r: r["metrics"]["recall@50"])
        chosen = refit_settings(best)
        test = list(pool.map(lambda seed: run_one(system, dataset, split, "test", chosen, seed,
                                                  budget, args), SEEDS))
    r50 = [r["metrics"]["recall@50"] for r in test]
    print(f"[bench] {dataset} {system.name}: chosen {chosen}, test recall@50 "
          f"{statistics.mean(r50):.4f} ± {statistics.stdev(r50):.4f}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    paths = prepare.default_paths()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(prepare.DATASETS),
                    choices=prepare.DATASETS)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=2, help="epochs between valid checks")
    ap.add_argument("--patience", type=int, default=2, help="checks without a gain")
    ap.add_argument("--max-settings", type=int, default=None,
                    help="try only the first N settings of each grid (a smaller budget)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    ap.add_argument("--data-dir", type=Path, default=paths["data"])
    ap.add_argument("--protocol-dir", type=Path, default=paths["protocol"])
    ap.add_argument("--work", type=Path, default=paths["work"])
    args = ap.parse_args(argv)
    args.command = "python benchmarks/quality/bench_quality.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    RESULTS.parent.mkdir(exist_ok=True)
    for dataset in args.datasets:
        subprocess.run([sys.executable, str(HERE / "prepare.py"), "--datasets", dataset,
                        "--data-dir", str(args.data_dir), "--protocol-dir",
                        str(args.protocol_dir), "--work", str(args.work)], check=True)
        split = args.work / dataset / "split"
        if not split.exists():
            continue
        for name in args.systems:
            try:
                bench(SYSTEMS[name], dataset, split, args)
            except subprocess.CalledProcessError as error:
                print(f"[bench] {dataset} {name} failed: {error}; see its log under "
                      f"{args.work / dataset / 'runs' / name}", file=sys.stderr, flush=True)
            report.write_readme()


if __name__ == "__main__":
    main()
