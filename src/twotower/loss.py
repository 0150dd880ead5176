"""The sampling-bias-corrected in-batch softmax (DESIGN section 1).

For queries ``u_i`` and their positive items ``v_i`` of one batch, every item of the
batch is a candidate for every query. The corrected logit of query ``i`` against item
``j`` is ``<u_i, v_j> / tau - log p_j`` on every column (the positive's too), so a
constant factor in ``p`` cancels; the loss is the reward-weighted mean cross-entropy.

The ``[batch, candidates]`` score matrix dominates the cost of a large batch, so:

- an item the batch holds ``n`` times can be one candidate column that stands for ``n``
  (``candidate_counts``): ``n * exp(s) = exp(s + log n)``, the same softmax over fewer
  columns, and popular items repeat a lot in a batch;
- accidental hits are found by sorting the ids, never through a ``[batch, candidates]``
  comparison, and become sparse edits of the scores;
- the scores are made, exponentiated and summed in blocks of rows that stay in cache,
  inside one buffer that is reused from step to step (a fresh buffer of this size costs
  as much as the products: its memory is page-faulted in every time).
"""

from __future__ import annotations

import torch

__all__ = ["in_batch_softmax_loss"]

# Scores per block of rows: a block (4 bytes a score) stays within a core's L2 cache.
BLOCK_SCORES = 1 << 18

# One spare score buffer per (dtype, device), handed back by the backward pass.
_spare: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _buffer(rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least ``rows * columns`` elements: the spare one if it fits."""
    key = (like.dtype, like.device)
    spare = _spare.pop(key, None)
    if spare is not None and spare.numel() >= rows * columns:
        return spare
    return torch.empty(rows * columns, dtype=like.dtype, device=like.device)


def _give_back(buffer: torch.Tensor) -> None:
    key = (buffer.dtype, buffer.device)
    if key not in _spare or _spare[key].numel() < buffer.numel():
        _spare[key] = buffer


def _accidental_hits(candidate_ids: torch.Tensor,
                     positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, columns)`` where candidate ``j`` is the same item as query ``i``'s positive
    without being that positive, sorted by query: by sorting the ids, so the cost grows
    with the number of such pairs rather than with ``batch * num_candidates``."""
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


def _block_rows(num_columns: int, device: torch.device) -> int:
    if device.type != "cpu":
        return 1 << 62  # one block: GPU kernels want the whole matrix at once
    return max(1, BLOCK_SCORES // max(num_columns, 1))


class _LogSumExp(torch.autograd.Function):
    """``logsumexp_j(<q_i, c_j> + bias_j + edit_ij)`` per query, where the sparse ``edits``
    ``(rows sorted, columns, values)`` are added to single scores (``-inf`` removes one).

    The scores become their exponentials in place (with each row's sum, all the backward
    needs for the softmax), block by block while a block is in cache."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, candidate: torch.Tensor, bias: torch.Tensor,
                edits: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, columns = len(query), len(candidate)
        buffer = _buffer(rows, columns, query)
        exp = buffer[:rows * columns].view(rows, columns)
        edit_rows, edit_columns, edit_values = edits
        step = _block_rows(columns, query.device)
        starts = list(range(0, rows, step))
        bounds = torch.searchsorted(edit_rows, torch.tensor([*starts, rows],
                                                            device=edit_rows.device)).tolist()
        top = torch.empty(rows, 1, dtype=query.dtype, device=query.device)
        total = torch.empty_like(top)
        for block, start in enumerate(starts):
            stop = min(start + step, rows)
            scores = exp[start:stop]
            torch.addmm(bias, query[start:stop], candidate.T, out=scores)
            at = slice(bounds[block], bounds[block + 1])
            scores.index_put_((edit_rows[at] - start, edit_columns[at]), edit_values[at],
                              accumulate=True)
            torch.amax(scores, dim=1, keepdim=True, out=top[start:stop])
            scores.sub_(top[start:stop]).exp_()
            torch.sum(scores, dim=1, keepdim=True, out=total[start:stop])
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(query, candidate, exp, total)
            ctx.buffer = buffer
        else:
            _give_back(buffer)
        return (top + total.log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        if getattr(ctx, "done", False):
            raise RuntimeError("the in-batch softmax loss supports one backward pass only "
                               "(its buffer is reused for the gradient)")
        ctx.done = True
        query, candidate, exp, total = ctx.saved_tensors
        scale = grad[:, None] / total
        grad_query = torch.empty_like(query)
        grad_candidate = torch.zeros_like(candidate)
        step = _block_rows(len(candidate), query.device)
        for start in range(0, len(query), step):
            stop = min(start + step, len(query))
            weighted = exp[start:stop].mul_(scale[start:stop])  # the softmax times grad
            torch.mm(weighted, candidate, out=grad_query[start:stop])
            grad_candidate.addmm_(weighted.T, query[start:stop])
        _give_back(ctx.buffer)
        del ctx.buffer
        return grad_query, grad_candidate, None, None


def in_batch_softmax_loss(
    query: torch.Tensor,
    candidate: torch.Tensor,
    candidate_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    reward: torch.Tensor | None = None,
    temperature: float = 1.0,
    remove_accidental_hits: bool = True,
    positives: torch.Tensor | None = None,
    candidate_counts: torch.Tensor | None = None,
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
        candidate_counts: ``[num_candidates]`` how many of the batch's items each column
            stands for (None: one each). A batch that holds an item ``n`` times can pass it
            once with count ``n``: loss and gradients are those of the ``n`` copies. With
            ``remove_accidental_hits`` a query's own positive counts once, its other
            copies being accidental hits.
    """
    labels = torch.arange(len(query), device=query.device) if positives is None else positives
    scaled = query / temperature
    bias = torch.zeros(len(candidate), dtype=query.dtype, device=query.device) if log_q is None \
        else -log_q.to(query.dtype)
    positive = (scaled * candidate[labels]).sum(dim=1) + bias[labels]  # s_c(x_i, y_i)
    rows = columns = torch.zeros(0, dtype=torch.int64, device=query.device)
    values = torch.zeros(0, dtype=query.dtype, device=query.device)
    if remove_accidental_hits:
        if candidate_ids is None:
            raise ValueError("remove_accidental_hits needs candidate_ids")
        rows, columns = _accidental_hits(candidate_ids, labels)
        values = torch.full((len(rows),), -torch.inf, dtype=query.dtype, device=query.device)
    if candidate_counts is not None:
        if candidate_counts.shape != (len(candidate),) or bool((candidate_counts < 1).any()):
            raise ValueError(f"candidate_counts must hold one count >= 1 per candidate "
                             f"({len(candidate)}), got shape {tuple(candidate_counts.shape)} "
                             f"and minimum {candidate_counts.min().item()}")
        log_counts = candidate_counts.to(query.dtype).log()
        bias = bias + log_counts
        if remove_accidental_hits:  # the positive's column stands for itself alone
            own = torch.arange(len(query), device=query.device)
            rows, order = torch.cat([rows, own]).sort(stable=True)
            columns = torch.cat([columns, labels])[order]
            values = torch.cat([values, -log_counts[labels]])[order]
    losses = _LogSumExp.apply(scaled, candidate, bias, (rows, columns, values)) - positive
    if reward is not None:
        losses = losses * reward.to(losses.dtype)
    return losses.mean()
