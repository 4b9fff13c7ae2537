"""Merge rules over state dicts of TMoLE tensors (experts, routers, task table); the frozen base never enters.

Every rule works per tensor and returns tensors of the input dtype, computing in at least float32 so bf16
checkpoints do not lose precision in the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import torch

State = Mapping[str, torch.Tensor]


class MergeMethod(str, Enum):
    """How checkpoints are combined: plain average, TIES (sign-aware, sparse), or spherical interpolation."""

    LINEAR = "linear"
    TIES = "ties"
    SLERP = "slerp"


def _check_compatible(states: Sequence[State]) -> None:
    """Same keys, shapes and floating dtypes everywhere; the error names the first offending key."""
    if not states:
        raise ValueError("nothing to merge: no states given")
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            key = (missing or extra)[0]
            raise ValueError(f"key {key!r}: present in state {0 if missing else i} only (states 0 and {i} differ)")
    for key, tensor in ref.items():
        if not tensor.is_floating_point():
            raise ValueError(f"key {key!r}: cannot merge non-floating dtype {tensor.dtype}")
        for i, state in enumerate(states[1:], start=1):
            other = state[key]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ValueError(
                    f"key {key!r}: state {i} has {tuple(other.shape)} {other.dtype}, "
                    f"state 0 has {tuple(tensor.shape)} {tensor.dtype}"
                )


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def linear(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average ``Σ w_i θ_i / Σ w_i``; equal weights when none are given.

    The cheapest merge and a fair baseline: checkpoints of one run share a basin, so their average is usually
    at least as good as each of them.
    """
    _check_compatible(states)
    w = [1.0] * len(states) if weights is None else [float(x) for x in weights]
    if len(w) != len(states):
        raise ValueError(f"got {len(w)} weights for {len(states)} states")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    total = sum(w)
    out: dict[str, torch.Tensor] = {}
    for key, t in states[0].items():
        acc = sum(_work(s[key]) * (x / total) for s, x in zip(states, w, strict=True))
        out[key] = acc.to(t.dtype)
    return out


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``density`` fraction of largest-magnitude entries (at least one; ties at the cut stay)."""
    k = max(1, int(density * tau.numel() + 0.5))
    if k >= tau.numel():
        return tau
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties(states: Sequence[State], base: State, density: float = 0.8, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """TIES-Merging (Yadav et al. 2023) of checkpoints against the shared starting point ``base``.

    Per tensor, in the paper's order:

    1. task vectors ``τ_i = θ_i − θ_0``;
    2. trim: keep the top ``density`` fraction of each ``τ_i`` by magnitude (density · numel rounded half up, >= 1;
       entries tied with the cut-off magnitude are all kept), zero the rest;
    3. elect: per element, the sign of ``Σ_i τ̂_i`` over the trimmed vectors (the sign carrying more total mass,
       not the majority count);
    4. disjoint merge: mean of the trimmed entries whose sign matches the elected one; 0 where none match
       (including where the elected sign is 0);
    5. ``θ = θ_0 + scale · merged``.

    Trimming first drops small, noisy updates before they can vote; electing drops updates that would cancel
    each other; the mean over agreeing entries only (not over all checkpoints) keeps a parameter that one
    checkpoint moved at its full size. (RECFOUND.md lists elect before trim; this follows the paper.)
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    _check_compatible([base, *states])
    out: dict[str, torch.Tensor] = {}
    for key, theta0 in base.items():
        b = _work(theta0)
        trimmed = torch.stack([_trim(_work(s[key]) - b, density) for s in states])
        elected = trimmed.sum(dim=0).sign()
        agree = (trimmed.sign() == elected) & (trimmed != 0)
        count = agree.sum(dim=0)
        merged = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0) / count.clamp(min=1)
        out[key] = (b + scale * merged).to(theta0.dtype)
    return out


_COLINEAR = 0.9995
"""|cos| above which two tensors count as colinear and slerp falls back to lerp (the angle is ill-conditioned)."""


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    cos = torch.clamp((a.flatten() @ b.flatten()) / (na * nb), -1.0, 1.0)
    if cos.abs() > _COLINEAR:
        return (1 - t) * a + t * b
    omega = torch.arccos(cos)
    # Scalar coefficients first: at t=0 and t=1 they are exactly 1 and 0, so the endpoints come back bit-exact.
    ca, cb = torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega)
    return ca * a + cb * b


def slerp(a: State, b: State, t: float = 0.6) -> dict[str, torch.Tensor]:
    """Spherical interpolation per tensor from ``a`` (t=0) to ``b`` (t=1); linear for (nearly) colinear pairs.

    Unlike averaging, slerp keeps the norm of equal-norm tensors instead of shrinking it towards the chord's
    midpoint, so the merged adapter's update magnitude stays that of its parents. Only defined for two states.
    """
    if not 0 <= t <= 1:
        raise ValueError(f"t must be in [0, 1], got {t}")
    _check_compatible([a, b])
    return {key: _slerp(_work(x), _work(b[key]), t).to(x.dtype) for key, x in a.items()}


def merge(
    method: MergeMethod, states: Sequence[State], base: State | None = None, **params: Any
) -> dict[str, torch.Tensor]:
    """Dispatch to one merge rule; ``params`` are that rule's keyword arguments (density, scale, t, weights)."""
    method = MergeMethod(method)
    if method is MergeMethod.TIES:
        if base is None:
            raise ValueError("ties needs base: the starting adapter the task vectors are measured from")
        return ties(states, base, **params)
    if base is not None:
        raise ValueError(f"{method.value} does not use base; pass it only to ties")
    if method is MergeMethod.LINEAR:
        return linear(states, **params)
    if len(states) != 2:
        raise ValueError(f"slerp merges exactly two states, got {len(states)}")
    return slerp(states[0], states[1], **params)
