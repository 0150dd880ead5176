"""A small self-attention encoder for ordered histories (the ``sequence`` feature kind).

A mean over a user's last items forgets which came last, and for predicting the next
item the newest ones matter most. As in SASRec (Kang and McAuley, 2018), the item
embeddings get a learned embedding of their recency and pass through a few
Transformer layers; here a learned "now" token sits in front of the history and its
output is the feature's vector, so an empty history (a user's first event) is simply
the token alone. The history holds only events before the query's own, so every
position may attend to every other: no causal mask is needed.
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
        return self.norm(self.encoder(x, src_key_padding_mask=padding)[:, 0])
