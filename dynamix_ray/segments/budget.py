"""Epsilon from a compute budget (docs/segments.md, "Epsilon from a compute
budget").

A request costs ``cost.active`` when its user's segment is active and
``cost.passive`` when it is passive (model FLOPs per sample from
``features.flops_by_segment``, or a measured per-stage cost). On a traffic
mix, each request carrying its user's ``|corr|`` (NaN: no value, passive),
the expected cost per request at threshold epsilon is::

    share(eps) * active + (1 - share(eps)) * passive,
    share(eps) = traffic share with |corr| > eps

and it is monotone in epsilon. :func:`epsilon_for_budget` finds, by
bisection, the epsilon whose expected cost comes closest to a budget without
going over it. :class:`BudgetController` is the feedback loop for live
traffic: each interval it compares the cost the router spent with the budget
and moves epsilon (a PI step on log epsilon), so the budget holds while the
active share drifts over the day. Plain numpy, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BudgetChoice",
    "BudgetController",
    "SegmentCost",
    "active_share",
    "epsilon_for_budget",
    "expected_cost",
]


@dataclass(frozen=True)
class SegmentCost:
    """What one request costs per segment, in any unit (FLOPs, seconds)."""

    passive: float
    active: float

    def __post_init__(self) -> None:
        if self.passive <= 0 or self.active <= 0:
            raise ValueError(f"costs must be > 0, got {self}")

    def at(self, share: float) -> float:
        """Cost per request when ``share`` of the traffic is active."""
        # passive + share * (active - passive): monotone in share in floats
        # too (equal costs give one cost), so bisection and a search agree
        return self.passive + share * (self.active - self.passive)


def active_share(
    values: np.ndarray, epsilon: float, weights: np.ndarray | None = None
) -> float:
    """Traffic share with ``value > epsilon`` (NaN: passive); ``weights``:
    requests per value (default 1 each)."""
    v = np.asarray(values, np.float64)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, np.float64)
    total = float(w.sum())
    if total <= 0:
        return 0.0
    return float(w[np.nan_to_num(v, nan=-np.inf) > epsilon].sum() / total)


def expected_cost(
    values: np.ndarray,
    epsilon: float,
    cost: SegmentCost,
    weights: np.ndarray | None = None,
) -> float:
    """Expected cost per request of the mix at ``epsilon``."""
    return cost.at(active_share(values, epsilon, weights))


@dataclass(frozen=True)
class BudgetChoice:
    """:func:`epsilon_for_budget`'s answer."""

    epsilon: float
    active_share: float
    cost: float  # per request, at epsilon
    budget: float  # per request
    iterations: int


def epsilon_for_budget(
    values: np.ndarray,
    cost: SegmentCost,
    budget: float,
    weights: np.ndarray | None = None,
) -> BudgetChoice:
    """The epsilon whose expected cost per request is the closest to
    ``budget`` (same unit as ``cost``) without exceeding it, by bisection
    over the candidate thresholds (0 and every value: the share only changes
    there), on the values sorted once.

    When the active segment costs more, a higher epsilon costs less: the
    answer is the smallest epsilon within budget. When it costs less, the
    answer is the largest one.

    Raises:
        ValueError: the budget is below what the mix can cost at any epsilon.
    """
    v = np.asarray(values, np.float64)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, np.float64)
    keep = ~np.isnan(v)
    order = np.argsort(v[keep], kind="stable")
    sv, sw = v[keep][order], w[keep][order]
    # weight above each candidate: the candidates are 0 and every value
    cands = np.unique(np.r_[0.0, sv])
    above = np.r_[np.cumsum(sw[::-1])[::-1], 0.0]
    total = float(w.sum())
    shares = above[np.searchsorted(sv, cands, side="right")] / (total or 1.0)
    costs = cost.passive + shares * (cost.active - cost.passive)  # as cost.at
    ok = costs <= budget
    if not ok.any():
        raise ValueError(
            f"a budget of {budget:.6g} per request is below the cheapest mix "
            f"({costs.min():.6g})"
        )
    # costs are monotone along the candidates: bisect for the first (dearer
    # active: costs fall) or the last (active cheaper: costs rise) within budget
    lo, hi, it = 0, len(cands) - 1, 0
    dearer_active = cost.active > cost.passive
    while lo < hi:
        it += 1
        if dearer_active:  # ok: False ... False True ... True; the first True
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok[mid] else (mid + 1, hi)
        else:  # ok: True ... True False ... False; the last True
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok[mid] else (lo, mid - 1)
    eps = float(cands[lo])
    share = float(shares[lo])
    return BudgetChoice(eps, share, cost.at(share), budget, it)


@dataclass
class BudgetController:
    """Moves epsilon to hold a compute budget on live traffic (PI on log
    epsilon, with the integral clamped so that it cannot wind up).

    Each interval, :meth:`update` gets the cost per request the router spent
    and returns the epsilon for the next interval. Spending over budget
    raises epsilon when active requests cost more (fewer become active), and
    lowers it when they cost less.

    Attributes:
        budget: the cost per request to hold.
        cost: the segments' costs (for the direction and the scale).
        epsilon: the current threshold (start from :func:`epsilon_for_budget`).
        kp, ki: gains on the error in active-share units,
            ``(spent - budget) / |active - passive|``, in log epsilon (with
            the defaults, tests/test_budget.py's drifting mix stays within
            3% of budget, 1.5% on average, once the controller has caught
            up; benchmarks/budget.py's figures are in the README).
        min_epsilon, max_epsilon: the range epsilon stays in.
    """

    budget: float
    cost: SegmentCost
    epsilon: float
    kp: float = 0.5
    ki: float = 2.0
    min_epsilon: float = 1e-4
    max_epsilon: float = 10.0
    _integral: float = field(default=0.0, repr=False)
    _base: float = field(default=float("nan"), repr=False)

    def __post_init__(self) -> None:
        self.epsilon = min(max(self.epsilon, self.min_epsilon), self.max_epsilon)
        self._base = math.log(self.epsilon)

    def update(self, spent_per_request: float) -> float:
        """The epsilon for the next interval, given this interval's spend."""
        gap = abs(self.cost.active - self.cost.passive)
        if gap == 0:
            return self.epsilon
        err = (spent_per_request - self.budget) / gap  # active-share units
        sign = 1.0 if self.cost.active > self.cost.passive else -1.0
        self._integral = float(np.clip(self._integral + err, -4.0, 4.0))
        log_eps = self._base + sign * (self.kp * err + self.ki * self._integral)
        lo, hi = math.log(self.min_epsilon), math.log(self.max_epsilon)
        self.epsilon = math.exp(min(max(log_eps, lo), hi))
        return self.epsilon
