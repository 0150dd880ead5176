"""The sampling-bias-corrected in-batch softmax (DESIGN section 1).

For queries ``u_i`` and their positive items ``v_i`` of one batch, every item of the
batch is a candidate for every query. The corrected logit of query ``i`` against item
``j`` is ``<u_i, v_j> / tau - log p_j`` on every column (the positive's too), so a
constant factor in ``p`` cancels; the loss is the reward-weighted mean cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["in_batch_softmax_loss"]


def in_batch_softmax_loss(
    query: torch.Tensor,
    candidate: torch.Tensor,
    candidate_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    reward: torch.Tensor | None = None,
    temperature: float = 1.0,
    remove_accidental_hits: bool = True,
) -> torch.Tensor:
    """``-(1/B) sum_i r_i log softmax_j(s_c(x_i, y_j))[i]``.

    Args:
        query: ``[batch, dim]`` query embeddings.
        candidate: ``[batch, dim]`` embeddings of each query's positive item.
        candidate_ids: ``[batch]`` item keys; where item ``j`` is the same item as the
            positive of query ``i`` (``j != i``) it is not a negative and is masked out.
        log_q: ``[batch]`` log sampling probability of each candidate (None: no correction).
        reward: ``[batch]`` non-negative weight of each example (None: all ones).
        temperature: ``tau``; scores are ``<u, v> / tau``.
    """
    scores = query @ candidate.T / temperature
    if log_q is not None:
        scores = scores - log_q.to(scores.dtype)[None, :]
    if remove_accidental_hits:
        if candidate_ids is None:
            raise ValueError("remove_accidental_hits needs candidate_ids")
        hits = candidate_ids[:, None] == candidate_ids[None, :]
        hits.fill_diagonal_(False)
        scores = scores.masked_fill(hits, torch.finfo(scores.dtype).min)
    labels = torch.arange(len(query), device=query.device)
    losses = F.cross_entropy(scores, labels, reduction="none")
    if reward is not None:
        losses = losses * reward.to(losses.dtype)
    return losses.mean()
