"""torch-rechub's side of ``bench_throughput.py`` (runs in its own virtual environment).

The towers are torch-rechub's ``DSSM`` (its ``EmbeddingLayer``, ``MLP`` and L2
normalisation) at the quickstart sizes; the loss is the full in-batch softmax with logQ
correction and accidental-hit removal, written in plain torch. (torch-rechub's
``MatchTrainer`` samples in-batch negatives with a Python loop per row, and ``YoutubeSBC``
builds a ``[batch, batch, dim]`` cosine tensor: both far slower, so not what we time.)
Reads the batches ``bench_throughput.py`` wrote; prints one JSON line per batch size.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from peer_run import DIM, HIDDEN, LR, OUTPUT, TEMPERATURE, load, parse_args, report
from torch_rechub.basic.features import SequenceFeature, SparseFeature
from torch_rechub.models.matching import DSSM


def model(sizes: dict) -> DSSM:
    item = SparseFeature("item", int(sizes["item"]), DIM)
    user_features = [SparseFeature("user", int(sizes["user"]), DIM),
                     SequenceFeature("history", int(sizes["item"]), DIM, pooling="mean",
                                     shared_with="item", padding_idx=0)]
    item_features = [item, SparseFeature("channel", int(sizes["channel"]), DIM),
                     SparseFeature("category", int(sizes["category"]), DIM)]
    params = {"dims": [HIDDEN, OUTPUT]}
    return DSSM(user_features, item_features, params, params)


def loss_fn(net: DSSM, x: dict) -> torch.Tensor:
    scores = net.user_tower(x) @ net.item_tower(x).T / TEMPERATURE - x["log_q"][None, :]
    hits = x["item"][:, None] == x["item"][None, :]
    hits.fill_diagonal_(False)
    scores = scores.masked_fill(hits, torch.finfo(scores.dtype).min)
    labels = torch.arange(len(scores))
    return (F.cross_entropy(scores, labels, reduction="none") * x["reward"]).mean()


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    sizes, columns = load(args.data)
    data = {k: torch.from_numpy(v) for k, v in columns.items()}
    for batch, steps in zip(args.batch, args.steps, strict=True):
        torch.manual_seed(0)
        net = model(sizes)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        net.train()
        for step in range(args.warm_up + steps):
            if step == args.warm_up:
                started = time.perf_counter()
            x = {k: v[step * batch:(step + 1) * batch] for k, v in data.items()}
            loss = loss_fn(net, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
        seconds = time.perf_counter() - started
        report("torch-rechub DSSM", batch, steps, torch.get_num_threads(), seconds)


if __name__ == "__main__":
    main()
