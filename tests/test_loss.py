"""Tests for the corrected in-batch softmax against losses written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from twotower import loss
from twotower.loss import in_batch_softmax_loss

log, exp = math.log, math.exp


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_two_by_two_by_hand():
    # u0 = (1, 0), u1 = (0, 1); v0 = (2, 1), v1 = (0, 3); tau = 0.5.
    # Scores <u_i, v_j> / tau: [[4, 0], [2, 6]]. log p = [log 0.5, log 0.1], subtracted on
    # every column, the positive's too. Rewards [1, 2].
    s00, s01 = 4 - log(0.5), 0 - log(0.1)
    s10, s11 = 2 - log(0.5), 6 - log(0.1)
    loss0 = -log(exp(s00) / (exp(s00) + exp(s01)))
    loss1 = -log(exp(s11) / (exp(s10) + exp(s11)))
    expected = (1 * loss0 + 2 * loss1) / 2

    got = in_batch_softmax_loss(
        t([[1, 0], [0, 1]]), t([[2, 1], [0, 3]]), candidate_ids=torch.tensor([10, 11]),
        log_q=t([log(0.5), log(0.1)]), reward=t([1, 2]), temperature=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_two_by_two_without_correction_or_reward():
    # Scores [[2, 1], [1, 3]] at tau = 1.
    loss0 = -log(exp(2) / (exp(2) + exp(1)))
    loss1 = -log(exp(3) / (exp(1) + exp(3)))
    got = in_batch_softmax_loss(t([[1, 0], [0, 1]]), t([[2, 1], [1, 3]]),
                                remove_accidental_hits=False)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-12)


# Three queries; queries 0 and 1 have the same positive item (key 7), query 2 item 9.
Q3 = [[1, 0], [0, 1], [1, 1]]
C3 = [[1, 2], [2, 0], [0, 1]]
IDS3 = torch.tensor([7, 7, 9])
LOGP3 = [log(0.2), log(0.2), log(0.5)]
R3 = [1.0, 0.5, 2.0]
TAU3 = 0.5


def _sc(i: int, j: int) -> float:
    """Corrected logit of query i against candidate j, by hand."""
    dot = Q3[i][0] * C3[j][0] + Q3[i][1] * C3[j][1]
    return dot / TAU3 - LOGP3[j]


def test_three_by_three_accidental_hit_masked_by_hand():
    # Query 0 does not see column 1 (its own item again); query 1 does not see column 0.
    loss0 = -log(exp(_sc(0, 0)) / (exp(_sc(0, 0)) + exp(_sc(0, 2))))
    loss1 = -log(exp(_sc(1, 1)) / (exp(_sc(1, 1)) + exp(_sc(1, 2))))
    loss2 = -log(exp(_sc(2, 2)) / (exp(_sc(2, 0)) + exp(_sc(2, 1)) + exp(_sc(2, 2))))
    expected = (R3[0] * loss0 + R3[1] * loss1 + R3[2] * loss2) / 3

    got = in_batch_softmax_loss(t(Q3), t(C3), IDS3, t(LOGP3), t(R3), temperature=TAU3)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_three_by_three_without_masking_by_hand():
    def full(i: int) -> float:
        return -log(exp(_sc(i, i)) / sum(exp(_sc(i, j)) for j in range(3)))

    expected = sum(R3[i] * full(i) for i in range(3)) / 3
    unmasked = in_batch_softmax_loss(t(Q3), t(C3), IDS3, t(LOGP3), t(R3), temperature=TAU3,
                                     remove_accidental_hits=False)
    masked = in_batch_softmax_loss(t(Q3), t(C3), IDS3, t(LOGP3), t(R3), temperature=TAU3)
    assert unmasked.item() == pytest.approx(expected, rel=1e-12)
    # The accidental hit is a (wrong) negative without masking: the loss is higher.
    assert unmasked.item() > masked.item() + 1e-3


def test_no_accidental_hits_masking_changes_nothing():
    ids = torch.tensor([1, 2, 3])
    a = in_batch_softmax_loss(t(Q3), t(C3), ids, t(LOGP3), t(R3), temperature=TAU3)
    b = in_batch_softmax_loss(t(Q3), t(C3), ids, t(LOGP3), t(R3), temperature=TAU3,
                              remove_accidental_hits=False)
    assert a.item() == b.item()


@pytest.mark.parametrize("shift", [-5.0, log(0.01), 3.0])
def test_constant_factor_in_p_cancels(shift):
    masked = in_batch_softmax_loss(t(Q3), t(C3), IDS3, t(LOGP3), t(R3), temperature=TAU3)
    shifted = in_batch_softmax_loss(t(Q3), t(C3), IDS3, t(LOGP3) + shift, t(R3),
                                    temperature=TAU3)
    assert shifted.item() == pytest.approx(masked.item(), rel=1e-12)
    # A constant log_q is the same as no correction at all.
    flat = torch.full((3,), shift, dtype=torch.float64)
    constant = in_batch_softmax_loss(t(Q3), t(C3), IDS3, flat, t(R3), temperature=TAU3)
    none = in_batch_softmax_loss(t(Q3), t(C3), IDS3, None, t(R3), temperature=TAU3)
    assert constant.item() == pytest.approx(none.item(), rel=1e-12)


def reference_loss(q, c, ids, log_q, reward, tau, mask) -> float:
    """The design's formula as a plain loop over Python floats."""
    total = 0.0
    for i in range(len(q)):
        logits = []
        for j in range(len(c)):
            if mask and j != i and ids[j] == ids[i]:
                continue
            dot = sum(a * b for a, b in zip(q[i], c[j], strict=True))
            logit = dot / tau - log_q[j]
            logits.append((j, logit))
        top = max(x for _, x in logits)
        log_norm = top + log(sum(exp(x - top) for _, x in logits))
        positive = next(x for j, x in logits if j == i)
        total += reward[i] * -(positive - log_norm)
    return total / len(q)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mask", [True, False])
def test_random_batches_match_reference_loop(seed, mask):
    g = torch.Generator().manual_seed(seed)
    b, d = 8, 4
    q = torch.randn(b, d, generator=g, dtype=torch.float64)
    c = torch.randn(b, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 4, (b,), generator=g)  # many accidental hits
    log_q = torch.log(torch.rand(b, generator=g, dtype=torch.float64))
    reward = torch.rand(b, generator=g, dtype=torch.float64) * 2
    tau = 0.3
    got = in_batch_softmax_loss(q, c, ids, log_q, reward, tau, mask)
    expected = reference_loss(q.tolist(), c.tolist(), ids.tolist(), log_q.tolist(),
                              reward.tolist(), tau, mask)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_gradient_finite_with_masked_entries():
    for dtype in (torch.float32, torch.float64):
        q = torch.tensor(Q3, dtype=dtype, requires_grad=True)
        c = torch.tensor(C3, dtype=dtype, requires_grad=True)
        # A tiny temperature makes the logits large; masking must still leave no inf/nan.
        loss = in_batch_softmax_loss(q, c, IDS3, torch.tensor(LOGP3, dtype=dtype),
                                     torch.tensor(R3, dtype=dtype), temperature=0.01)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


def test_masked_column_gets_no_gradient():
    # Query 0's only negative is column 2 once column 1 is masked, so with q1, q2 detached
    # the loss of query 0 alone must not push on candidate 1.
    q = t(Q3)
    c = t(C3).requires_grad_(True)
    weights = t([1.0, 0.0, 0.0])  # only query 0 counts
    in_batch_softmax_loss(q, c, IDS3, t(LOGP3), weights, TAU3).backward()
    assert c.grad[1].abs().max().item() == 0.0
    assert c.grad[0].abs().max().item() > 0 and c.grad[2].abs().max().item() > 0


def test_masking_needs_ids():
    with pytest.raises(ValueError, match="candidate_ids"):
        in_batch_softmax_loss(t(Q3), t(C3))


def _dense_reference(query, candidate, ids, log_q, reward, temperature, positives):
    """The loss written with a full ``[batch, candidates]`` mask, as the formula reads."""
    scores = query @ candidate.T / temperature - log_q[None, :]
    hits = ids[positives][:, None] == ids[None, :]
    hits[torch.arange(len(query)), positives] = False
    scores = scores.masked_fill(hits, torch.finfo(scores.dtype).min)
    return (torch.nn.functional.cross_entropy(scores, positives, reduction="none")
            * reward).mean()


@pytest.mark.parametrize("seed", range(5))
def test_sorted_hit_masking_equals_the_dense_mask(seed):
    # Many repeats (popular items); queries pointing into a larger, gathered batch.
    g = torch.Generator().manual_seed(seed)
    num_candidates, batch, start = 40, 13, 9
    query = torch.randn(batch, 4, generator=g, dtype=torch.float64, requires_grad=True)
    candidate = torch.randn(num_candidates, 4, generator=g, dtype=torch.float64,
                            requires_grad=True)
    ids = torch.randint(0, 6, (num_candidates,), generator=g)
    log_q = torch.rand(num_candidates, generator=g, dtype=torch.float64).log()
    reward = torch.rand(batch, generator=g, dtype=torch.float64)
    positives = torch.arange(start, start + batch)
    got = in_batch_softmax_loss(query, candidate, ids, log_q, reward, 0.3, True, positives)
    grads = torch.autograd.grad(got, (query, candidate))
    expected = _dense_reference(query, candidate, ids, log_q, reward, 0.3, positives)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, b in zip(grads, torch.autograd.grad(expected, (query, candidate)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_second_backward_is_refused_not_wrong():
    query = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = in_batch_softmax_loss(query, torch.randn(4, 3, dtype=torch.float64),
                                 torch.arange(4))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def _duplicated_batch(seed: int, batch: int = 24, distinct: int = 5):
    """A batch whose candidates are a tower's output on repeated items: ``(weights, item
    features of each distinct item, item of each example, queries, log_q per item)``."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    features = torch.randn(distinct, 3, generator=g, dtype=torch.float64)
    items = torch.randint(0, distinct, (batch,), generator=g)
    query = torch.randn(batch, 4, generator=g, dtype=torch.float64, requires_grad=True)
    log_q = torch.rand(distinct, generator=g, dtype=torch.float64).log()
    return weights, features, items, query, log_q


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mask", [True, False])
def test_counted_columns_equal_the_repeated_batch(seed, mask):
    # Each distinct item once with its count: the loss, and the gradients of what made the
    # embeddings, are those of the batch with every copy as its own column.
    weights, features, items, query, log_q = _duplicated_batch(seed)
    reward = torch.rand(len(items), dtype=torch.float64)
    full = in_batch_softmax_loss(query, features[items] @ weights, items, log_q[items],
                                 reward, 0.3, mask)
    full_grads = torch.autograd.grad(full, (query, weights))
    distinct, positives, counts = torch.unique(items, return_inverse=True, return_counts=True)
    counted = in_batch_softmax_loss(query, features[distinct] @ weights, distinct,
                                    log_q[distinct], reward, 0.3, mask, positives, counts)
    assert counted.item() == pytest.approx(full.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(counted, (query, weights)), full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_blocks_of_rows_equal_one_block(monkeypatch):
    # Scores made block by block (here 3 rows of 7 columns at a time) equal the dense
    # formula, with masked hits and counted columns falling in different blocks.
    weights, features, items, query, log_q = _duplicated_batch(7, batch=40, distinct=7)
    distinct, positives, counts = torch.unique(items, return_inverse=True, return_counts=True)
    candidate = features[distinct] @ weights
    expected = in_batch_softmax_loss(query, candidate, distinct, log_q[distinct], None, 0.2,
                                     True, positives, counts)
    expected_grads = torch.autograd.grad(expected, (query, weights))
    monkeypatch.setattr(loss, "BLOCK_SCORES", 3 * len(distinct))
    got = in_batch_softmax_loss(query, features[distinct] @ weights, distinct,
                                log_q[distinct], None, 0.2, True, positives, counts)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(got, (query, weights)), expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_reused_score_buffer_is_never_shared():
    # Two losses alive at once (gradient accumulation) and one without gradients in
    # between each get their own scores; the gradients equal those of separate passes.
    g = torch.Generator().manual_seed(3)
    queries = [torch.randn(16, 4, generator=g, requires_grad=True) for _ in range(2)]
    candidate = torch.randn(16, 4, generator=g)
    ids = torch.arange(16)
    alone = []
    for q in queries:
        alone.append(torch.autograd.grad(in_batch_softmax_loss(q, candidate, ids), q)[0])
    first = in_batch_softmax_loss(queries[0], candidate, ids)
    second = in_batch_softmax_loss(queries[1], candidate, ids)
    with torch.no_grad():
        in_batch_softmax_loss(queries[0] * 3, candidate, ids)
    got = torch.autograd.grad(first + second, queries)
    for a, b in zip(got, alone, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("counts", [[1, 0, 2], [1, -1, 1], [1, 2]])
def test_bad_candidate_counts_are_refused(counts):
    with pytest.raises(ValueError, match="candidate_counts"):
        in_batch_softmax_loss(t(Q3), t(C3), IDS3, candidate_counts=torch.tensor(counts))
