"""The check after every optimizer step that no weight became NaN or infinite."""

import torch
from torch import nn

from twotower.train import _finite_after_step


def _stepped_model() -> nn.Module:
    """A sparse table whose rows 1 and 2 a batch touched, and a dense layer."""
    model = nn.Module()
    model.table = nn.EmbeddingBag(6, 3, mode="sum", sparse=True)
    model.dense = nn.Linear(3, 1)
    model.dense(model.table(torch.tensor([[1, 2, 2]]))).sum().backward()
    return model


def test_finite_weights_pass_even_when_their_sum_overflows():
    model = _stepped_model()
    with torch.no_grad():
        model.table.weight[1:3] = 3e38  # each finite, their float32 sum is not
    assert _finite_after_step(model)


def test_nan_or_inf_in_a_touched_row_is_caught():
    for bad in (float("nan"), float("inf"), -float("inf")):
        model = _stepped_model()
        with torch.no_grad():
            model.table.weight[2, 1] = bad
        assert not _finite_after_step(model), bad


def test_nan_in_a_dense_layer_is_caught():
    model = _stepped_model()
    with torch.no_grad():
        model.dense.bias[0] = float("nan")
    assert not _finite_after_step(model)


def test_rows_the_step_did_not_touch_are_not_read():
    """A step's cost must not grow with the table: only touched rows are checked."""
    model = _stepped_model()
    with torch.no_grad():
        model.table.weight[5] = float("nan")
    assert _finite_after_step(model)
