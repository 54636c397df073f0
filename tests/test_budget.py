"""Epsilon from a compute budget (segments/budget.py): bisection against a
brute-force search, and the feedback loop holding the budget while the mix
drifts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.segments.budget import (
    BudgetController,
    SegmentCost,
    active_share,
    epsilon_for_budget,
    expected_cost,
)


def _brute_share(values, weights, cost, budget):
    """The active share of the best epsilon among 0 and every value."""
    cands = np.unique(np.r_[0.0, values[~np.isnan(values)]])
    ok = [e for e in cands if expected_cost(values, e, cost, weights) <= budget]
    pick = min(ok) if cost.active > cost.passive else max(ok)
    return active_share(values, pick, weights)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(float("nan")), st.floats(0, 3, allow_nan=False)),
        min_size=1,
        max_size=40,
    ),
    st.data(),
)
def test_bisection_finds_the_share_a_brute_force_search_finds(vals, data):
    values = np.array(vals)
    weights = np.array(
        data.draw(st.lists(st.integers(1, 5), min_size=len(vals), max_size=len(vals))),
        float,
    )
    cost = SegmentCost(
        passive=data.draw(st.floats(0.5, 2.0)), active=data.draw(st.floats(0.5, 2.0))
    )
    lo = min(cost.at(0.0), cost.at(active_share(values, 0.0, weights)))
    hi = max(cost.at(0.0), cost.at(active_share(values, 0.0, weights)))
    budget = lo + data.draw(st.floats(0, 1)) * (hi - lo)
    choice = epsilon_for_budget(values, cost, budget, weights)
    assert choice.cost <= budget + 1e-12
    assert choice.active_share == pytest.approx(
        _brute_share(values, weights, cost, budget), abs=1e-12
    )


def test_a_budget_below_the_cheapest_mix_is_refused():
    v = np.array([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="below the cheapest"):
        epsilon_for_budget(v, SegmentCost(passive=1.0, active=2.0), 0.9)
    # active cheaper: the cheapest mix is everyone active
    with pytest.raises(ValueError, match="below the cheapest"):
        epsilon_for_budget(v, SegmentCost(passive=2.0, active=1.0), 0.9)


def test_the_controller_holds_the_budget_while_the_mix_drifts():
    """Interval by interval the mix's |corr| drifts up (more users would be
    active at a fixed epsilon): the fixed threshold overspends, the
    controller comes back to the budget."""
    rng = np.random.default_rng(0)
    cost = SegmentCost(passive=1.0, active=2.0)
    start = rng.exponential(0.3, 5000)
    budget = cost.at(0.5)
    eps0 = epsilon_for_budget(start, cost, budget).epsilon
    ctl = BudgetController(budget, cost, eps0)
    fixed, controlled = [], []
    for t in range(40):
        mix = rng.exponential(0.3 * (1 + 0.03 * t), 5000)
        fixed.append(expected_cost(mix, eps0, cost))
        spent = expected_cost(mix, ctl.epsilon, cost)
        controlled.append(spent)
        ctl.update(spent)
    assert fixed[-1] > 1.1 * budget  # the fixed epsilon overspends
    late = np.abs(np.array(controlled[-10:]) - budget) / budget
    assert late.max() < 0.03 and late.mean() < 0.015
    assert ctl.epsilon > eps0
