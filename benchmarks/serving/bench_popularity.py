"""What the popularity penalty does: recall against exposure of less popular items.

Serves the held-out last day of a quickstart run through ``Recommender`` (the path of
``twotower recommend`` and the service) at several betas, ranking by
``<u, v> - beta * log p_hat(item)``, and reports recall@10/100, the share of
recommended slots that go to head / torso / tail items (by training popularity) and
catalogue coverage. Run from the repository root after a quickstart:

    PYTHONPATH=src python -m twotower quickstart --out qs
    PYTHONPATH=src python benchmarks/serving/bench_popularity.py qs
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from twotower.data.interactions import load_interactions
from twotower.evaluate import GROUPS, popularity_groups
from twotower.features import take_bag
from twotower.index import index_items
from twotower.recommend import Recommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quickstart", help="a `twotower quickstart --out` directory")
    parser.add_argument("--mode", default="streaming", help="which correction's model")
    parser.add_argument("--betas", type=float, nargs="+",
                        default=[0.0, 0.01, 0.025, 0.05, 0.1])
    args = parser.parse_args()

    model_dir = f"{args.quickstart}/models/{args.mode}"
    items = f"{args.quickstart}/data/items.parquet"
    index_dir = index_items(model_dir, items).save(f"{args.quickstart}/index-{args.mode}")
    recommender = Recommender.load(model_dir, index_dir)
    data = load_interactions(f"{args.quickstart}/data/events.parquet", items)
    days = data.timestamp // 86400  # the quickstart tests on the last calendar day
    train, test = np.flatnonzero(days < days.max()), np.flatnonzero(days == days.max())
    groups = popularity_groups(data.item_counts(train))
    columns = {"user_id": data.user[test], "history": take_bag(data.history, test)}
    rows_of = dict(zip(data.item_keys.tolist(), range(len(data.item_keys)), strict=True))

    table = []
    for beta in args.betas:
        results = recommender.recommend(columns, 100, popularity_penalty=beta)
        top = np.array([[rows_of[key] for key in r.keys] for r in results])
        hit_rank = np.array([list(row).index(p) if p in row else 100
                             for row, p in zip(top, data.item_row[test], strict=True)])
        share = np.bincount(groups[top.ravel()], minlength=3) / top.size
        table.append({"beta": beta, "recall@10": float(np.mean(hit_rank < 10)),
                      "recall@100": float(np.mean(hit_rank < 100)),
                      **{f"slots_{g}": float(share[i]) for i, g in enumerate(GROUPS)},
                      "coverage@100": len(np.unique(top)) / len(data.item_keys)})
    print(json.dumps({"model": model_dir, "test_queries": len(test), "results": table},
                     indent=2))
    header = list(table[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(f"{row[h]:.3f}" for h in header) + " |")


if __name__ == "__main__":
    main()
