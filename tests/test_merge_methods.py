"""Merge rules on hand-made tensors: linear, TIES (worked by hand), slerp, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from recfound.merge.methods import MergeMethod, linear, merge, slerp, ties


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def state(**tensors: list) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in tensors.items()}


def test_linear_one_input_is_exact_and_two_is_mean() -> None:
    a = {"experts": torch.randn(4, 3).to(torch.bfloat16), "router": torch.randn(5)}
    out = linear([a])
    assert all(torch.equal(out[k], a[k]) and out[k].dtype == a[k].dtype for k in a)
    b = {"experts": torch.randn(4, 3).to(torch.bfloat16), "router": torch.randn(5)}
    c = {k: torch.randn_like(v, dtype=torch.float32) for k, v in a.items()}
    a32 = {k: v.float() for k, v in a.items()}
    assert torch.equal(linear([a32, c])["router"], (a32["router"] + c["router"]) / 2)
    assert_close(linear([a, b])["experts"], ((a["experts"].float() + b["experts"].float()) / 2).bfloat16())
    assert_close(linear([a32, c], weights=[1, 3])["router"], 0.25 * a32["router"] + 0.75 * c["router"])


# TIES worked example, density 0.8 (keep round(0.8 * n) entries per tensor), scale 1.
# experts (n=5 -> keep 4), base 10 everywhere:
#   tau1 = [ 1, -2,     3, 0.5, -1   ]  trim |0.5|   -> [ 1, -2,  3, 0, -1]
#   tau2 = [ 2,  1,    -1, 4,    0.125] trim |0.125| -> [ 2,  1, -1, 4,  0]
#   tau3 = [-4, -1, -0.25, 2,    1   ]  trim |0.25|  -> [-4, -1,  0, 2,  1]
#   sum of trimmed = [-1, -2, 2, 6, 0] -> elected sign [-, -, +, +, 0]
#   [0] sign conflict: two positives (1, 2) lose to the larger mass of -4 -> mean(-4)        = -4
#   [1] -2 and -1 agree, +1 dropped                                       -> mean(-2, -1)     = -1.5
#   [2]  3 agrees, -1 dropped, tau3 trimmed                                -> mean(3)          = 3
#   [3]  4 and 2 agree, tau1's 0.5 trimmed (would give 2.1667 untrimmed)   -> mean(4, 2)       = 3
#   [4] sum is 0: no entry agrees with sign 0                              -> 0
#   theta = 10 + [-4, -1.5, 3, 3, 0] = [6, 8.5, 13, 13, 10]
# router (2x2, n=4 -> keep round(3.2) = 3; trimming is per tensor, so these small values are not cut), base 0:
#   tau1 = [0.25, -0.125, 0.5, 0.0625] -> [0.25, -0.125, 0.5,  0    ]
#   tau2 = [0.25,  0.5, -0.0625, 0.125] -> [0.25,  0.5,   0,    0.125]
#   tau3 = [-0.125, 0.25, 0.25,  0.5 ] -> [0,     0.25,  0.25, 0.5  ]
#   sums all positive; agreeing means: [0.25, (0.5+0.25)/2, (0.5+0.25)/2, (0.125+0.5)/2]
TIES_BASE = state(experts=[10.0] * 5, router=[[0.0, 0.0], [0.0, 0.0]])
TIES_STATES = [
    state(experts=[11.0, 8.0, 13.0, 10.5, 9.0], router=[[0.25, -0.125], [0.5, 0.0625]]),
    state(experts=[12.0, 11.0, 9.0, 14.0, 10.125], router=[[0.25, 0.5], [-0.0625, 0.125]]),
    state(experts=[6.0, 9.0, 9.75, 12.0, 11.0], router=[[-0.125, 0.25], [0.25, 0.5]]),
]


def test_ties_worked_example() -> None:
    out = ties(TIES_STATES, TIES_BASE, density=0.8)
    assert out["experts"].tolist() == [6.0, 8.5, 13.0, 13.0, 10.0]
    assert out["router"].tolist() == [[0.25, 0.375], [0.375, 0.3125]]
    halved = merge(MergeMethod.TIES, TIES_STATES, TIES_BASE, density=0.8, scale=0.5)
    assert halved["experts"].tolist() == [8.0, 9.25, 11.5, 11.5, 10.0]


def test_ties_identical_inputs_full_density_round_trip() -> None:
    base = {"experts": torch.randn(6, 4), "table": torch.randn(3, 8).bfloat16()}
    theta = {k: (v.float() + torch.randn(v.shape)).to(v.dtype) for k, v in base.items()}
    out = ties([theta, theta, theta], base, density=1.0)
    for k in theta:
        assert out[k].dtype == theta[k].dtype
        assert_close(out[k], theta[k])


def test_slerp_endpoints_norm_and_colinear_fallback() -> None:
    a, b = {"w": torch.randn(3, 5)}, {"w": torch.randn(3, 5)}
    assert torch.equal(slerp(a, b, t=0.0)["w"], a["w"])
    assert torch.equal(slerp(a, b, t=1.0)["w"], b["w"])

    x, y = state(w=[2.0, 0.0]), state(w=[0.0, 2.0])
    mid = slerp(x, y, t=0.6)["w"]
    assert mid.norm().item() == pytest.approx(2.0)
    assert mid.tolist() == pytest.approx([2 * math.cos(0.3 * math.pi), 2 * math.sin(0.3 * math.pi)])

    v = torch.tensor([1.0, -2.0, 3.0])
    for other in (2 * v, -v, torch.zeros(3)):
        got = slerp({"w": v}, {"w": other}, t=0.6)["w"]
        assert torch.isfinite(got).all()
        assert_close(got, 0.4 * v + 0.6 * other)


def test_validation_names_the_key() -> None:
    a = state(experts=[1.0, 2.0], router=[1.0])
    with pytest.raises(ValueError, match="'router'"):
        linear([a, state(experts=[1.0, 2.0])])
    with pytest.raises(ValueError, match="'experts'"):
        linear([a, state(experts=[1.0, 2.0, 3.0], router=[1.0])])
    with pytest.raises(ValueError, match="'router'"):
        slerp(a, {"experts": a["experts"], "router": a["router"].double()})
    with pytest.raises(ValueError, match="'experts'"):
        ties([a], {"experts": torch.tensor([1.0]), "router": a["router"]})
    with pytest.raises(ValueError, match="needs base"):
        merge(MergeMethod.TIES, [a, a])
    with pytest.raises(ValueError, match="exactly two"):
        merge(MergeMethod.SLERP, [a, a, a])
    with pytest.raises(ValueError, match="does not use base"):
        merge(MergeMethod.LINEAR, [a], base=a)
    assert torch.equal(merge("linear", [a, a])["experts"], a["experts"])
