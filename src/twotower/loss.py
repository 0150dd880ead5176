"""The sampling-bias-corrected in-batch softmax (DESIGN section 1).

For queries ``u_i`` and their positive items ``v_i`` of one batch, every item of the
batch is a candidate for every query. The corrected logit of query ``i`` against item
``j`` is ``<u_i, v_j> / tau - log p_j`` on every column (the positive's too), so a
constant factor in ``p`` cancels; the loss is the reward-weighted mean cross-entropy.

The ``[batch, batch]`` score matrix dominates the cost of a large batch, so it is touched
as few times as possible: correction and masked hits are the bias of one ``addmm``, the
positive's logit comes from its own embeddings, and accidental hits are found by sorting
the ids, never through a ``[batch, batch]`` comparison.
"""

from __future__ import annotations

import torch

__all__ = ["in_batch_softmax_loss"]


def _accidental_hits(candidate_ids: torch.Tensor,
                     positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, columns)`` where candidate ``j`` is the same item as query ``i``'s positive
    without being that positive: by sorting, so the cost grows with the number of such pairs
    rather than with ``batch * num_candidates``."""
    order = torch.argsort(candidate_ids)
    ids = candidate_ids[order]
    wanted = candidate_ids[positives]
    first = torch.searchsorted(ids, wanted)
    count = torch.searchsorted(ids, wanted, right=True) - first
    queries = torch.repeat_interleave(torch.arange(len(positives), device=ids.device), count)
    start = torch.cumsum(count, 0) - count
    within = torch.arange(len(queries), device=ids.device) - start[queries]
    columns = order[first[queries] + within]
    keep = columns != positives[queries]
    return queries[keep], columns[keep]


class _LogSumExp(torch.autograd.Function):
    """``logsumexp_j(<q_i, c_j> + bias_j)`` per query, the pairs ``hits`` left out, in one
    ``[batch, candidates]`` buffer: the scores become their exponentials in place, which
    (with each row's sum) is all the backward needs for the softmax."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, candidate: torch.Tensor, bias: torch.Tensor,
                hits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scores = torch.addmm(bias, query, candidate.T)
        scores[hits] = -torch.inf
        top = scores.amax(dim=1, keepdim=True)
        exp = scores.sub_(top).exp_()
        total = exp.sum(dim=1, keepdim=True)
        ctx.save_for_backward(query, candidate, exp, total)
        return (top + total.log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        if getattr(ctx, "done", False):
            raise RuntimeError("the in-batch softmax loss supports one backward pass only "
                               "(its buffer is reused for the gradient)")
        ctx.done = True
        query, candidate, exp, total = ctx.saved_tensors
        # The softmax times the incoming gradient, in place: a fresh [batch, batch] tensor
        # costs as much as the matrix product that follows (the memory is page-faulted in).
        weighted = exp.mul_(grad[:, None] / total)
        return weighted @ candidate, weighted.T @ query, None, None


def in_batch_softmax_loss(
    query: torch.Tensor,
    candidate: torch.Tensor,
    candidate_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    reward: torch.Tensor | None = None,
    temperature: float = 1.0,
    remove_accidental_hits: bool = True,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-(1/B) sum_i r_i log softmax_j(s_c(x_i, y_j))[i]``.

    Args:
        query: ``[batch, dim]`` query embeddings.
        candidate: ``[num_candidates, dim]`` candidate embeddings; without ``positives``
            ``num_candidates == batch`` and candidate ``i`` is query ``i``'s positive.
        candidate_ids: ``[num_candidates]`` item keys; where item ``j`` is the same item as the
            positive of query ``i`` (``j != i``) it is not a negative and is masked out.
        log_q: ``[num_candidates]`` log sampling probability of each candidate (None: none).
        reward: ``[batch]`` non-negative weight of each example (None: all ones).
        temperature: ``tau``; scores are ``<u, v> / tau``.
        positives: ``[batch]`` column of each query's positive among the candidates (None:
            query ``i``'s is candidate ``i``). With candidates gathered from every worker of
            a distributed step, a worker's queries point into that global batch.
    """
    labels = torch.arange(len(query), device=query.device) if positives is None else positives
    scaled = query / temperature
    bias = torch.zeros(len(candidate), dtype=query.dtype, device=query.device) if log_q is None \
        else -log_q.to(query.dtype)
    positive = (scaled * candidate[labels]).sum(dim=1) + bias[labels]  # s_c(x_i, y_i)
    none = torch.zeros(0, dtype=torch.int64, device=query.device)
    hits = (none, none)
    if remove_accidental_hits:
        if candidate_ids is None:
            raise ValueError("remove_accidental_hits needs candidate_ids")
        hits = _accidental_hits(candidate_ids, labels)
    losses = _LogSumExp.apply(scaled, candidate, bias, hits) - positive  # -log softmax_i(s_c)
    if reward is not None:
        losses = losses * reward.to(losses.dtype)
    return losses.mean()
