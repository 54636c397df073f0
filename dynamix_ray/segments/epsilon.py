"""Choosing epsilon (Eq. 9 threshold).

Two ways, both from per-window statistics, not events:

* :func:`calibrate_epsilon`: the active share of eligible (user, window) rows
  hits a target (paper: 66.67%); :func:`calibrate_epsilon_traffic`: the
  active share of ad *traffic* (impressions) does;
* the paper's own rule, "maximise NE separation between the two segments":
  :func:`ne_by_threshold` sweeps epsilon and measures a baseline model's NE on
  each side; :func:`separation_epsilon` picks the widest gap.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "calibrate_epsilon",
    "calibrate_epsilon_traffic",
    "traffic_fraction",
    "log_loss",
    "ne_by_threshold",
    "reference_ne_by_threshold",
    "separation_epsilon",
    "sweep_thresholds",
]


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


def traffic_fraction(
    active_traffic: float, eligible_impressions: int, impressions: int
) -> float:
    """The share of *eligible* traffic to make active so that ``active_traffic``
    of all traffic is: ineligible rows are passive whatever epsilon is.

    Above 1 when the eligible rows hold less traffic than the target; the
    calibration then makes every eligible row it can active (the closest
    achievable share), and ``_meta.json`` shows the share reached.
    """
    if eligible_impressions <= 0:
        return 1.0
    return float(active_traffic) * float(impressions) / float(eligible_impressions)


def calibrate_epsilon_traffic(
    abs_corr: np.ndarray,
    row_impressions: np.ndarray,
    impressions: int,
    active_traffic: float,
) -> float:
    """Threshold such that the ad impressions of rows with ``|corr| > eps`` are
    the closest achievable share ``active_traffic`` of all ``impressions``.

    The plain reference of the pipeline's traffic calibration: each eligible
    row counts once per impression (``calibrate_epsilon`` of the values
    repeated by their impressions), against the eligible share
    :func:`traffic_fraction` gives.

    Args:
        abs_corr: (E,) ``|corr|`` of eligible rows.
        row_impressions: (E,) ad impressions of each of those rows.
        impressions: every valid ad impression, eligible rows or not.
        active_traffic: target share of traffic in (0, 1).
    """
    w = np.asarray(row_impressions, np.int64)
    f = traffic_fraction(active_traffic, int(w.sum()), impressions)
    return calibrate_epsilon(np.repeat(np.asarray(abs_corr, np.float64), w), f)


def log_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) per-row binary log loss of logits (numerically stable)."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    return np.logaddexp(0.0, z) - y * z


def _ne_of(ll: float, n: float, pos: float) -> float:
    from dynamix_ray.model.metrics import ne_from_sums

    ne = ne_from_sums(ll, n, pos)
    return float("nan") if ne is None else ne


def ne_by_threshold(
    abs_corr: np.ndarray,
    ll: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    min_side_share: float = 0.05,
) -> dict[str, np.ndarray]:
    """NE of one model on each side of every threshold (the epsilon sweep).

    A row is on the active side when ``|corr| > eps``; rows with NaN ``|corr|``
    (no eligible window yet) are always passive, as the segmenter makes them.
    Suffix sums over rows sorted by ``|corr|`` give every threshold in one
    pass.

    Args:
        abs_corr: (N,) per evaluated row, ``|corr|`` of the user's last window
            ended at or before the row's time (NaN: none or not eligible).
        ll, labels: (N,) the model's per-row log loss and the labels.
        thresholds: (T,) epsilons to try.
        min_side_share: a side with fewer rows than this share gives NaN (its NE
            would be noise).

    Returns:
        ``epsilon``, ``active_share`` (of rows), ``ne_active``, ``ne_passive``
        and ``separation`` (``ne_passive - ne_active``), each (T,).
    """
    a = np.where(np.isnan(abs_corr), -np.inf, np.asarray(abs_corr, np.float64))
    order = np.argsort(a, kind="stable")
    a = a[order]
    ll_s = np.asarray(ll, np.float64)[order]
    y = np.asarray(labels, np.float64)[order]
    n = len(a)
    # suffix sums: [i] = sum over rows i..n-1 (rows with |corr| >= a[i])
    suf_ll = np.append(np.cumsum(ll_s[::-1])[::-1], 0.0)
    suf_pos = np.append(np.cumsum(y[::-1])[::-1], 0.0)
    t = np.asarray(thresholds, np.float64)
    first = np.searchsorted(a, t, side="right")  # first row with |corr| > eps
    n_act = (n - first).astype(np.float64)
    act = np.array(
        [_ne_of(suf_ll[i], n - i, suf_pos[i]) for i in first], dtype=np.float64
    )
    pas = np.array(
        [_ne_of(suf_ll[0] - suf_ll[i], i, suf_pos[0] - suf_pos[i]) for i in first],
        dtype=np.float64,
    )
    share = n_act / n if n else np.zeros(len(t))
    small = (share < min_side_share) | (share > 1 - min_side_share)
    act[small], pas[small] = np.nan, np.nan
    return {
        "epsilon": t,
        "active_share": share,
        "ne_active": act,
        "ne_passive": pas,
        "separation": pas - act,
    }


def reference_ne_by_threshold(
    abs_corr: np.ndarray,
    ll: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    min_side_share: float = 0.05,
) -> dict[str, np.ndarray]:
    """The obvious loop :func:`ne_by_threshold` must equal."""
    out: dict[str, list[float]] = {
        k: [] for k in ("active_share", "ne_active", "ne_passive")
    }
    n = len(abs_corr)
    for eps in thresholds:
        act = np.array(
            [not np.isnan(c) and c > eps for c in abs_corr], dtype=bool
        ).reshape(n)
        share = act.mean() if n else 0.0
        ok = min_side_share <= share <= 1 - min_side_share
        sides = []
        for sel in (act, ~act):
            sides.append(
                _ne_of(float(ll[sel].sum()), float(sel.sum()), float(labels[sel].sum()))
                if ok
                else float("nan")
            )
        out["active_share"].append(float(share))
        out["ne_active"].append(sides[0])
        out["ne_passive"].append(sides[1])
    res = {k: np.array(v, dtype=np.float64) for k, v in out.items()}
    res["epsilon"] = np.asarray(thresholds, np.float64)
    res["separation"] = res["ne_passive"] - res["ne_active"]
    return res


def separation_epsilon(sweep: dict[str, np.ndarray]) -> float | None:
    """The swept epsilon with the largest ``ne_passive - ne_active`` (the paper's
    "maximise NE separation between the two segments"); ``None`` when no
    threshold leaves both sides large enough."""
    sep = np.asarray(sweep["separation"], np.float64)
    if not np.isfinite(sep).any():
        return None
    return float(sweep["epsilon"][int(np.nanargmax(sep))])


def sweep_thresholds(abs_corr_eligible: np.ndarray, points: int = 37) -> np.ndarray:
    """Epsilons at evenly spaced active shares (2.5% .. 97.5%) of the eligible
    (user, window) rows' ``|corr|``: the sweep's grid."""
    a = np.asarray(abs_corr_eligible, np.float64)
    a = a[~np.isnan(a)]
    if len(a) == 0:
        return np.zeros(0)
    shares = np.linspace(0.025, 0.975, points)
    return np.unique(np.quantile(a, 1.0 - shares))
