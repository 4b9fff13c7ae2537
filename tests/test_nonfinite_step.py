"""A step whose gradient norm is inf/NaN while the losses are finite must not reach the weights."""

import math

import pytest
import torch
from torch import nn

from recfound.train.engine import clipped_step


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_skips_the_update_and_clears_it(bad: float) -> None:
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.tensor([0.5, bad, 0.5])
    assert not clipped_step([weight], optimizer, clip=1.0)
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None  # untouched, nothing carried over
    assert not optimizer.state  # AdamW's moments never saw the bad gradient
    weight.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5, clipped to 1
    assert clipped_step([weight], optimizer, clip=1.0)
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), torch.ones(3))
