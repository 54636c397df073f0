"""Choosing epsilon (Eq. 9 threshold) from per-window statistics, not events."""

from __future__ import annotations

import numpy as np

__all__ = ["calibrate_epsilon"]


def calibrate_epsilon(abs_corr: np.ndarray, active_fraction: float) -> float:
    """Threshold such that the share of eligible rows with ``|corr| > eps`` is the
    closest achievable to ``active_fraction``.

    Args:
        abs_corr: (E,) ``|corr|`` of eligible (user, window) rows (no NaN).
        active_fraction: target active share in (0, 1).

    Returns:
        The midpoint between the largest passive and the smallest active value, so
        that float noise of a few ulps in ``corr`` cannot flip a segment. Equal
        values cannot be split: the closest achievable share wins. 0.0 when there
        is no eligible row.
    """
    a = np.asarray(abs_corr, dtype=np.float64)
    n = len(a)
    if n == 0:
        return 0.0
    if np.isnan(a).any():
        raise ValueError("abs_corr must not hold NaN: pass eligible rows only")
    # eps in [u_i, u_{i+1}) makes exactly above[i] rows active; ties cannot be
    # split, so pick the achievable share closest to the target.
    u, counts = np.unique(a, return_counts=True)
    above = n - np.cumsum(counts)
    mid = (u[:-1] + u[1:]) / 2.0
    mid = np.where(mid < u[1:], mid, u[:-1])  # adjacent floats: no midpoint
    thresholds = np.append(mid, u[-1])
    shares = above / n
    if u[0] > 0:  # everyone active is achievable with eps in [0, u_0)
        thresholds = np.insert(thresholds, 0, u[0] / 2.0)
        shares = np.insert(shares, 0, 1.0)
    best = int(np.argmin(np.abs(shares - active_fraction)))
    return float(thresholds[best])
