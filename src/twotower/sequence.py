"""A small self-attention encoder for ordered histories (the ``sequence`` feature kind).

A mean over a user's last items forgets which came last, and for predicting the next
item the newest ones matter most. As in SASRec (Kang and McAuley, 2018), the item
embeddings get a learned embedding of their recency and pass through a few
Transformer layers, and the newest item's output is the feature's vector: as in SASRec,
whose last position is the query, the newest item's own embedding reaches the output
through the residual path instead of having to be picked out by attention (on a log
whose next item follows from the newest one, that output learns it far better than a
summary token's). A learned "now" token sits in front of the history, as context every
position can attend to and as the output when the history is empty (a user's first
event). The history holds only events before the query's own, so every position may
attend to every other: no causal mask is needed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SequenceEncoder"]


class SequenceEncoder(nn.Module):
    """``([batch, length, dim] item embeddings newest first, [batch, length] mask) ->
    [batch, dim]``."""

    def __init__(self, dim: int, length: int, layers: int = 2, heads: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"a sequence encoder of width {dim} cannot split into {heads} "
                             "attention heads")
        self.now = nn.Parameter(torch.zeros(dim))
        self.recency = nn.Embedding(length + 1, dim)  # 0: the now token, p: the p-th newest
        nn.init.normal_(self.recency.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim * 2, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = items.shape
        now = self.now.expand(batch, 1, dim)
        x = torch.cat([now, items], dim=1) + self.recency.weight[:length + 1]
        padding = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=mask.device),
                             ~mask], dim=1)
        out = self.encoder(x, src_key_padding_mask=padding)
        # The newest item's output (position 1) when there is one, else the now token's.
        newest = mask.any(dim=1).long()
        return self.norm(out[torch.arange(batch, device=out.device), newest])
