"""torch-rechub's side of ``bench_throughput.py`` (runs in its own virtual environment).

The towers are torch-rechub's ``DSSM`` (its ``EmbeddingLayer``, ``MLP`` and L2
normalisation) at the quickstart sizes; the loss is the full in-batch softmax with logQ
correction and accidental-hit removal, written in plain torch. (torch-rechub's
``MatchTrainer`` samples in-batch negatives with a Python loop per row, and ``YoutubeSBC``
builds a ``[batch, batch, dim]`` cosine tensor: both far slower, so not what we time.)
Reads the batches ``bench_throughput.py`` wrote; prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch_rechub.basic.features import SequenceFeature, SparseFeature
from torch_rechub.models.matching import DSSM

DIM, HIDDEN, OUTPUT, TEMPERATURE, LR = 32, 256, 64, 0.05, 0.005


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data")
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 10])
    parser.add_argument("--warm-up", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arrays = np.load(args.data)
    sizes = {k[len("size_"):]: arrays[k] for k in arrays.files if k.startswith("size_")}
    data = {k: torch.from_numpy(arrays[k]) for k in
            ("user", "history", "item", "channel", "category", "log_q", "reward")}
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
        print(json.dumps({"framework": "torch-rechub DSSM", "batch": batch, "steps": steps,
                          "processes": 1, "threads": torch.get_num_threads(),
                          "examples_per_second": steps * batch / seconds}), flush=True)


if __name__ == "__main__":
    main()
