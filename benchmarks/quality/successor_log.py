"""A synthetic log whose next item follows from the newest one, for the history encoders.

Each of 1,000 items has three random successors; each of 3,000 users starts at a random
item and walks until it has 20 distinct items, each step to one of the current item's
successors not yet seen (with probability 0.9, else to a random item; an item seen
before is walked through, not recorded again). What comes next is then a function of
the newest item alone, while the set of items seen names some sixty items' successors: a
mean over the history cannot tell which is the newest, an encoder that reads the order
can. Writes ``work/successor/{events,items}.csv`` and the protocol's split of them:

    python benchmarks/quality/successor_log.py
    python benchmarks/quality/run_twotower.py --split-dir benchmarks/quality/work/successor/split \
        --phase valid --out DIR --max-epochs 30 --settings '{"history_kind": "sequence", ...}'
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys

from prepare import default_paths

ITEMS, USERS, LENGTH, SUCCESSORS, FOLLOW = 1000, 3000, 20, 3, 0.9


def main() -> None:
    paths = default_paths()
    out = paths["work"] / "successor"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    successors = {i: rng.sample(range(ITEMS), SUCCESSORS) for i in range(ITEMS)}
    with open(out / "events.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for user in range(USERS):
            item = rng.randrange(ITEMS)
            seen, sequence = {item}, [item]
            while len(sequence) < LENGTH:
                options = [s for s in successors[item] if s not in seen]
                item = (rng.choice(options) if options and rng.random() < FOLLOW
                        else rng.randrange(ITEMS))
                if item not in seen:
                    seen.add(item)
                    sequence.append(item)
            w.writerows([user, i, t] for t, i in enumerate(sequence))
    with open(out / "items.csv", "w", newline="") as f:
        csv.writer(f).writerows([["item_id"], *([i] for i in range(ITEMS))])
    subprocess.run([sys.executable, str(paths["protocol"] / "protocol.py"), "split",
                    "--data-dir", str(out)], check=True, stdout=subprocess.DEVNULL)
    print(out / "split")


if __name__ == "__main__":
    main()
