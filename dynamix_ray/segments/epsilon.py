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
        that float noise of a few ulps in ``corr`` cannot flip a segment. 0.0 when
        there is no eligible row.
    """
    a = np.sort(np.asarray(abs_corr, dtype=np.float64))
    n = len(a)
    if n == 0:
        return 0.0
    if np.isnan(a).any():
        raise ValueError("abs_corr must not hold NaN: pass eligible rows only")
    k = int(round(active_fraction * n))  # rows to make active
    if k <= 0:
        return float(a[-1])
    if k >= n:
        return float(max(0.0, np.nextafter(a[0], -np.inf)))
    return float((a[n - k - 1] + a[n - k]) / 2.0)
