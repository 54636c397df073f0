"""Tiers with hysteresis and the unequal-variance statistic (the paper's open
questions 1 and 2; docs/segments.md, "Tiers and hysteresis").

* **Tiers.** ``k - 1`` increasing thresholds on a statistic's absolute value
  cut users into ``k`` tiers: tier ``j`` holds values above ``j`` of them
  (tier 0 is today's *passive*, and with one threshold, epsilon, tier 1 is
  *active*).
* **Hysteresis.** A user changes tier only when the value crosses a threshold
  by more than ``band``: up past ``theta`` needs ``> theta + band``, down past
  it ``< theta - band``. A window without a value (null: too few near or far
  impressions) is no evidence, so the tier stays; a user starts in tier 0.
  With ``band = 0`` and values in every window this is the plain cut, except
  at a value equal to a threshold, where the tier stays (the cut puts it
  below), and except that a null window keeps the last tier instead of
  falling to 0.
* **Statistics.** ``corr`` (Eq. 8, the mean difference), ``w_mle`` (Eq. 7,
  the equal-variance log-odds weight), and two with a variance per label:
  ``welch`` (Welch's t: the mean difference over
  ``sqrt(var_near / n_near + var_far / n_far)``) and ``jeffreys`` (the
  symmetric Kullback-Leibler divergence between the near and far normal fits,
  what a quadratic discriminant separates: it grows with the mean difference
  and with the variances' ratio alike).

:func:`hysteresis_tiers` is the vectorised scan (one numpy step per window
position, all users at once); :func:`reference_hysteresis_tiers` the plain
per-user loop it must equal.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = [
    "STATISTICS",
    "cut_tiers",
    "flips_per_user_day",
    "hysteresis_tiers",
    "reference_hysteresis_tiers",
    "statistic",
]

#: The statistics a tier can be cut on (columns of a docs/contract.md §3 table).
STATISTICS = ("corr", "w_mle", "welch", "jeffreys")
_DAY_MS = 86_400_000


def _np(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(
        table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64
    )


def statistic(segments: pa.Table, name: str) -> np.ndarray:
    """``|name|`` per row of a segment table, NaN where it is null.

    ``welch`` is null where either label has fewer than 2 impressions or both
    variances are 0, ``jeffreys`` where either variance is 0 or null;
    elsewhere rows follow the table's own nulls.

    Raises:
        ValueError: an unknown statistic.
    """
    if name not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}; choose from {STATISTICS}")
    if name in ("corr", "w_mle"):
        return np.abs(_np(segments, name))
    corr = _np(segments, "corr")
    vn, vf = _np(segments, "var_near"), _np(segments, "var_far")
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "welch":
            se2 = vn / _np(segments, "n_near") + vf / _np(segments, "n_far")
            return np.abs(np.where(se2 > 0, corr / np.sqrt(se2), np.nan))
        ok = (vn > 0) & (vf > 0)
        j = corr**2 * (1 / vn + 1 / vf) / 2 + (vn / vf + vf / vn) / 2 - 1
        return np.where(ok, j, np.nan)


def cut_tiers(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Tier per value without hysteresis: how many thresholds it exceeds
    (NaN: tier 0, as a null ``corr`` is passive)."""
    th = _thresholds(thresholds)
    tier = np.searchsorted(th, np.nan_to_num(values, nan=-np.inf), side="left")
    return tier.astype(np.int8)


def _thresholds(thresholds: np.ndarray) -> np.ndarray:
    th = np.asarray(thresholds, dtype=np.float64)
    if th.ndim != 1 or len(th) == 0 or (np.diff(th) <= 0).any():
        raise ValueError(f"thresholds must be increasing, got {list(th)}")
    return th


def _step(tier: np.ndarray, v: np.ndarray, th: np.ndarray, band: float) -> np.ndarray:
    """One window: each user's next tier from its current one and value."""
    up = np.searchsorted(th + band, v, side="left")  # thresholds passed by > band
    down = np.searchsorted(th - band, v, side="right")  # stays above theta - band
    nxt = np.where(up > tier, up, np.where(down < tier, down, tier))
    return np.where(np.isnan(v), tier, nxt)


def _order(user_id: np.ndarray, window_start_ms: np.ndarray) -> np.ndarray:
    return np.lexsort((window_start_ms, user_id))


def hysteresis_tiers(
    user_id: np.ndarray,
    window_start_ms: np.ndarray,
    values: np.ndarray,
    thresholds: np.ndarray,
    band: float,
) -> np.ndarray:
    """Tier per row (any order) with hysteresis: each user's rows in time
    order, the tier moving only when a value crosses a threshold by more
    than ``band`` (module docstring)."""
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    th = _thresholds(thresholds)
    n = len(user_id)
    out = np.zeros(n, dtype=np.int8)
    if n == 0:
        return out
    order = _order(user_id, window_start_ms)
    u = np.asarray(user_id)[order]
    v = np.asarray(values, dtype=np.float64)[order]
    first = np.r_[True, u[1:] != u[:-1]]
    starts = np.flatnonzero(first)
    lengths = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, lengths)  # row's rank in its user
    tier = np.zeros(len(starts), dtype=np.int64)
    by_pos = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[by_pos], np.arange(lengths.max() + 1))
    for k in range(lengths.max()):
        rows = by_pos[bounds[k] : bounds[k + 1]]  # the k-th row of every user
        users = np.searchsorted(starts, rows, side="right") - 1
        tier[users] = _step(tier[users], v[rows], th, band)
        out[order[rows]] = tier[users]
    return out


def reference_hysteresis_tiers(
    user_id: np.ndarray,
    window_start_ms: np.ndarray,
    values: np.ndarray,
    thresholds: np.ndarray,
    band: float,
) -> np.ndarray:
    """The obvious per-user loop :func:`hysteresis_tiers` must equal."""
    th = [float(x) for x in thresholds]
    out = np.zeros(len(user_id), dtype=np.int8)
    current: dict[int, int] = {}
    for i in _order(np.asarray(user_id), np.asarray(window_start_ms)).tolist():
        u, v = int(user_id[i]), float(values[i])
        t = current.get(u, 0)
        if v == v:  # not NaN
            while t < len(th) and v > th[t] + band:
                t += 1
            while t > 0 and v < th[t - 1] - band:
                t -= 1
        current[u] = t
        out[i] = t
    return out


def flips_per_user_day(
    user_id: np.ndarray, window_start_ms: np.ndarray, tier: np.ndarray
) -> float:
    """Tier changes between a user's consecutive rows, per (user, UTC day)
    the table holds rows for."""
    if len(user_id) == 0:
        return 0.0
    order = _order(user_id, window_start_ms)
    u, t = np.asarray(user_id)[order], np.asarray(tier)[order]
    flips = int(((u[1:] == u[:-1]) & (t[1:] != t[:-1])).sum())
    days = np.asarray(window_start_ms)[order] // _DAY_MS
    user_days = int((np.r_[True, (u[1:] != u[:-1]) | (days[1:] != days[:-1])]).sum())
    return flips / user_days
