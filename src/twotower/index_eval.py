"""Metrics through the serving index, beside the exact ones: what approximate search costs.

The test queries that exact evaluation ranks against every item are ranked again by the
index ``twotower index`` built, and both rankings go through the same metric code, so
their difference is the index's loss alone. That holds only if the index holds the same
items, embedded by the same model: an index of another model, or of another item set,
would measure a different task, so it is an error rather than a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from twotower.evaluate import Rankings, embed, index_rankings, retrieval_metrics
from twotower.experiment import Prepared
from twotower.features import Bag
from twotower.index import ItemIndex, check_built_from
from twotower.towers import TwoTowerModel

__all__ = ["aligned_index_rows", "check_index", "format_side_by_side", "index_score"]


def aligned_index_rows(index: ItemIndex, item_keys: np.ndarray, where: str,
                       labels: pa.ChunkedArray | None = None) -> np.ndarray:
    """``[num_items]`` row in ``index`` of each evaluation item (``item_keys`` order).

    The index may order the items differently; it must hold exactly the same set, else a
    ``ValueError`` names ``where`` and examples of what each side lacks (as ``labels``,
    the items table's key column, writes them: string keys are hashed in ``item_keys``).
    """
    if np.array_equal(index.keys, item_keys):
        return np.arange(len(item_keys))
    order = np.argsort(index.keys, kind="stable")
    position = np.minimum(np.searchsorted(index.keys, item_keys, sorter=order), len(order) - 1)
    rows = order[position]
    absent = np.flatnonzero(index.keys[rows] != item_keys)
    extra = np.flatnonzero(~np.isin(index.keys, item_keys))
    problems = []
    if len(absent):
        shown = labels.take(absent[:5]).to_pylist() if labels is not None \
            else item_keys[absent[:5]].tolist()
        problems.append(f"{len(absent):,} of the table's items are not in the index (for "
                        f"example {shown})")
    if len(extra):
        shown = [index.labels[i] for i in extra[:5]] if index.labels is not None \
            else index.keys[extra[:5]].tolist()
        problems.append(f"{len(extra):,} of the index's items are not in the table (for "
                        f"example {shown})")
    if problems:
        raise ValueError(f"{where} holds {len(index):,} items and the items table "
                         f"{len(item_keys):,}: {' and '.join(problems)}; build the index from "
                         "the items table you evaluate on (`twotower index MODEL --items ITEMS`)")
    return rows


def check_index(index: ItemIndex, model: TwoTowerModel, model_dir: str | Path,
                where: str) -> None:
    """The index holds this model's item embeddings: its width, and the fingerprint of the
    weights it was built from."""
    if index.dim != model.config.output_dim:
        raise ValueError(f"{where} holds {index.dim}-dim embeddings but {model_dir} outputs "
                         f"{model.config.output_dim}; rebuild it with `twotower index "
                         f"{model_dir} --items ITEMS`")
    check_built_from(index, model_dir, where)


def index_score(model: TwoTowerModel, prepared: Prepared, index: ItemIndex,
                index_rows: np.ndarray, train_rows: np.ndarray, test_rows: np.ndarray,
                ks: Sequence[int] = (10, 50, 100), exclude_seen: bool = False,
                bootstrap: int = 0) -> dict[str, float]:
    """The metrics of :func:`twotower.experiment.score`, with the index ranking the items.

    ``index_rows`` (from :func:`aligned_index_rows`) maps item rows to index rows;
    positives and exclusions are moved into the index's rows and its top lists back, so
    popularity groups, coverage and novelty read the same training counts as exact.
    """
    data = prepared.interactions
    query_emb = embed(model, prepared.queries, "query", test_rows).numpy()
    exclude = data.seen_before(test_rows) if exclude_seen else None
    if exclude is not None:
        exclude = Bag(index_rows[exclude.values], exclude.offsets)
    positives = data.item_row[test_rows]
    found = index_rankings(index, query_emb, index_rows[positives], max(ks), exclude)
    item_of_row = np.empty(len(index_rows), dtype=np.int64)
    item_of_row[index_rows] = np.arange(len(index_rows))
    top = np.where(found.top >= 0, item_of_row[np.maximum(found.top, 0)], -1)
    return retrieval_metrics(Rankings(found.ranks, top), positives,
                             data.item_counts(train_rows), ks, bootstrap)


def format_side_by_side(exact: dict[str, float], approximate: dict[str, float]) -> str:
    """Headline metrics (recall, NDCG, coverage at every K) exact against index, with the
    relative change."""
    names = [n for n in exact if n.split("@")[0] in ("recall", "ndcg", "coverage")
             and "/" not in n and n in approximate]
    width = max(map(len, names), default=0)
    lines = [f"{'':{width}}    exact    index   change"]
    for name in names:
        a, b = exact[name], approximate[name]
        change = f"{(b / a - 1) * 100:+.1f}%" if a > 0 else "n/a"
        lines.append(f"{name:{width}}  {a:7.4f}  {b:7.4f}  {change:>7}")
    return "\n".join(lines)
