"""LazyAdam against torch's SparseAdam, its exact reference: the same weights and state."""

import copy

import pytest
import torch
from torch import nn

from twotower.lazy_adam import LazyAdam


def _table(seed: int) -> nn.EmbeddingBag:
    torch.manual_seed(seed)
    return nn.EmbeddingBag(50, 8, mode="sum", sparse=True)


def _step(table: nn.EmbeddingBag, optimizer: torch.optim.Optimizer, step: int) -> None:
    """A batch that repeats rows and leaves most of the table untouched."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 20 if step % 2 else 50, (16, 5), generator=g)
    target = torch.randn(16, 8, generator=g)
    optimizer.zero_grad(set_to_none=True)
    ((table(ids) - target) ** 2).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("maximize", [False, True])
def test_matches_sparse_adam_exactly(maximize):
    ours, reference = _table(0), _table(0)
    lazy = LazyAdam(ours.parameters(), lr=0.01, maximize=maximize)
    sparse = torch.optim.SparseAdam(reference.parameters(), lr=0.01, maximize=maximize)
    for step in range(12):
        _step(ours, lazy, step)
        _step(reference, sparse, step)
        assert torch.equal(ours.weight, reference.weight), f"weights differ after step {step}"
    mine, theirs = lazy.state[ours.weight], sparse.state[reference.weight]
    assert mine["step"] == theirs["step"] == 12
    assert torch.equal(mine["exp_avg"], theirs["exp_avg"])
    assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])


def test_untouched_rows_keep_weights_and_moments():
    table = _table(1)
    before = table.weight.detach().clone()
    optimizer = LazyAdam(table.parameters(), lr=0.1)
    optimizer.zero_grad()
    table(torch.tensor([[3, 3, 7]])).sum().backward()
    optimizer.step()
    changed = (table.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 7]
    assert optimizer.state[table.weight]["exp_avg"][[0, 1, 2, 4]].abs().sum() == 0


def test_state_interchangeable_with_sparse_adam():
    """A checkpoint of SparseAdam resumes under LazyAdam with the same result."""
    ours, reference = _table(2), _table(2)
    sparse = torch.optim.SparseAdam(reference.parameters(), lr=0.01)
    for step in range(3):
        _step(reference, sparse, step)
    ours.load_state_dict(reference.state_dict())
    lazy = LazyAdam(ours.parameters(), lr=0.01)
    lazy.load_state_dict(copy.deepcopy(sparse.state_dict()))  # as from a file: no shared moments
    for step in range(3, 6):
        _step(ours, lazy, step)
        _step(reference, sparse, step)
    assert torch.equal(ours.weight, reference.weight)


def test_dense_gradient_refused():
    layer = nn.Linear(2, 2)
    optimizer = LazyAdam(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
