"""The DynamiX statistic (docs/contract.md §2): a vectorised kernel and its plain reference.

Pipeline per (user, window) group:

1. ``keep``: ``min_dwell_ms <= dwell_ms <= max_dwell_ms`` (else *filtered*).
2. ``near``: the user has a conversion in the closed ``[t - buffer, t + horizon]``.
3. ``x = ln(dwell_ms)``; per group and label the count, mean and ``m2`` (sum of
   squared deviations from the mean). ``(n, mean, m2)`` are the mergeable
   sufficient statistics (Chan et al.): :func:`merge_stats` combines partial
   statistics of the same group exactly, so days and windows add up without
   re-reading events.
4. :func:`finalize` turns them into the docs/contract.md §3 columns: variances (ddof=1),
   ``corr`` (Eq. 8), ``w_mle`` (Eq. 7, equal variances) and ``segment`` (Eq. 9).

:func:`compute_stats` is the fast kernel (hash factorisation, one
``searchsorted`` against the user's sorted conversions, ``bincount``);
:func:`reference_stats` is the obvious per-user loop it must equal.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd

from dynamix_ray.config import SegmentConfig

__all__ = [
    "STAT_COLUMNS",
    "compute_stats",
    "empty_stats",
    "finalize",
    "merge_stats",
    "near_mask",
    "reference_stats",
    "window_origin_ms",
]

Stats = dict[str, np.ndarray]

#: Columns of a partial-statistics table, one row per (user, window).
STAT_COLUMNS = (
    "user_id",
    "window_start_ms",
    "n_near",
    "n_far",
    "mean_near",
    "mean_far",
    "m2_near",
    "m2_far",
    "n_filtered",
)

_DAY_MS = 86_400_000


def window_origin_ms(cfg: SegmentConfig, first_ts_ms: int | None) -> int:
    """Start of the window grid: UTC midnight of the first event's day.

    When the window divides a day every UTC midnight is on the same grid, so the
    origin is the epoch and no global pass is needed (``first_ts_ms`` unused).
    """
    if _DAY_MS % cfg.window_ms == 0 or first_ts_ms is None:
        return 0
    return (first_ts_ms // _DAY_MS) * _DAY_MS


def empty_stats() -> Stats:
    """Partial statistics of no group (the columns, typed, with no row)."""
    out: Stats = {c: np.zeros(0, dtype=np.int64) for c in STAT_COLUMNS}
    for c in ("mean_near", "mean_far", "m2_near", "m2_far"):
        out[c] = np.zeros(0, dtype=np.float64)
    return out


def near_mask(
    code: np.ndarray,
    ts_ms: np.ndarray,
    conv_code: np.ndarray,
    conv_ts_ms: np.ndarray,
    buffer_ms: int,
    horizon_ms: int,
) -> np.ndarray:
    """``near[i]``: user ``code[i]`` has a conversion in ``[ts-buffer, ts+horizon]``.

    The one near/far rule (docs/contract.md §2 step 2): the statistic, the samples' label
    (with codes of (user, ad) pairs) and the generator all call it.

    One composite key ``code * span + (ts - base)`` orders conversions by user then
    time; one ``searchsorted`` per impression finds the first conversion at or
    after ``ts - buffer`` and checks it is not after ``ts + horizon``.
    """
    near = np.zeros(len(ts_ms), dtype=bool)
    if len(conv_ts_ms) == 0 or len(ts_ms) == 0:
        return near
    slots = _near_by_slots(code, ts_ms, conv_code, conv_ts_ms, buffer_ms, horizon_ms)
    if slots is not None:
        return slots
    base = min(int(ts_ms.min()), int(conv_ts_ms.min())) - buffer_ms
    span = max(int(ts_ms.max()), int(conv_ts_ms.max())) - base + horizon_ms + 1
    n_codes = int(max(code.max(), conv_code.max())) + 1
    # Keys must not overflow int64: process users in blocks when they would.
    block = max(1, (1 << 62) // span)
    for lo_code in range(0, n_codes, block):
        hi_code = lo_code + block
        imp_sel: slice | np.ndarray
        conv_sel: slice | np.ndarray
        if lo_code == 0 and hi_code >= n_codes:
            imp_sel, conv_sel = slice(None), slice(None)
        else:
            imp_sel = np.flatnonzero((code >= lo_code) & (code < hi_code))
            conv_sel = np.flatnonzero((conv_code >= lo_code) & (conv_code < hi_code))
        ck = np.sort(
            (conv_code[conv_sel] - lo_code) * span + (conv_ts_ms[conv_sel] - base)
        )
        if len(ck) == 0:
            continue
        key = (code[imp_sel] - lo_code) * span + (ts_ms[imp_sel] - base)
        idx = np.searchsorted(ck, key - buffer_ms, side="left")
        hit = ck[np.minimum(idx, len(ck) - 1)] <= key + horizon_ms
        near[imp_sel] = (idx < len(ck)) & hit
    return near


def _near_by_slots(
    code: np.ndarray,
    ts_ms: np.ndarray,
    conv_code: np.ndarray,
    conv_ts_ms: np.ndarray,
    buffer_ms: int,
    horizon_ms: int,
) -> np.ndarray | None:
    """:func:`near_mask` with two hash probes per impression instead of a binary
    search (about twice as fast); ``None`` where it does not apply.

    Time is cut into slots of width ``G = buffer + horizon`` from ``base``. The
    closed interval ``[t - buffer, t + horizon]`` starts in slot ``s`` (that of
    ``t - buffer``) and ends before slot ``s + 2``. Every conversion in slot ``s``
    is before the slot's end ``<= t - buffer + G = t + horizon``, so one of them
    is in the interval iff the slot's *latest* is ``>= t - buffer``; every one in
    slot ``s + 1`` is after ``t - buffer``, so one is in the interval iff the
    slot's *earliest* is ``<= t + horizon``. Exact, integer arithmetic only.
    """
    width = buffer_ms + horizon_ms
    if width <= 0:
        return None
    base = min(int(ts_ms.min()) - buffer_ms, int(conv_ts_ms.min()))
    n_slots = (max(int(ts_ms.max()), int(conv_ts_ms.max())) - base) // width + 2
    n_codes = int(max(code.max(), conv_code.max())) + 1
    if n_codes * n_slots >= 1 << 62:
        return None
    conv_key = conv_code * n_slots + (conv_ts_ms - base) // width
    order = np.argsort(conv_key, kind="stable")
    conv_key, conv_t = conv_key[order], conv_ts_ms[order]
    starts = np.flatnonzero(np.r_[True, conv_key[1:] != conv_key[:-1]])
    latest = np.maximum.reduceat(conv_t, starts)
    earliest = np.minimum.reduceat(conv_t, starts)
    index = pd.Index(conv_key[starts])
    lo = ts_ms - buffer_ms
    key = code * n_slots + (lo - base) // width
    first = index.get_indexer(key)
    second = index.get_indexer(key + 1)
    return ((first >= 0) & (latest[first] >= lo)) | (
        (second >= 0) & (earliest[second] <= ts_ms + horizon_ms)
    )


def compute_stats(
    user_id: np.ndarray,
    ts_ms: np.ndarray,
    dwell_ms: np.ndarray,
    conv_user_id: np.ndarray,
    conv_ts_ms: np.ndarray,
    cfg: SegmentConfig,
    origin_ms: int = 0,
) -> Stats:
    """Partial statistics of valid ad impressions of a set of *complete* users.

    Args:
        user_id, ts_ms, dwell_ms: (N,) valid ad impressions (any order).
        conv_user_id, conv_ts_ms: (M,) valid conversions of (at least) the same
            users; conversions of other users are ignored.
        cfg: denoising bounds, buffer, horizon and window.
        origin_ms: start of the window grid (:func:`window_origin_ms`).

    Returns:
        Columns :data:`STAT_COLUMNS`, one row per (user, window) with at least one
        valid impression (kept or filtered), in no particular order.
    """
    n = len(user_id)
    if n == 0:
        return empty_stats()
    user_id = np.asarray(user_id, dtype=np.int64)
    ts_ms = np.asarray(ts_ms, dtype=np.int64)
    dwell_ms = np.asarray(dwell_ms, dtype=np.float64)

    code, uniques = pd.factorize(user_id, sort=False)
    code = code.astype(np.int64, copy=False)
    n_users = len(uniques)
    widx = (ts_ms - origin_ms) // cfg.window_ms
    w_min = int(widx.min())
    n_win = int(widx.max()) - w_min + 1
    dense_key = code * n_win + (widx - w_min)
    if n_users * n_win <= 4 * n + 1024:
        group, n_groups = dense_key, n_users * n_win
        group_key = None
    else:
        group, group_key = pd.factorize(dense_key, sort=False)
        group = group.astype(np.int64, copy=False)
        n_groups = len(group_key)

    keep = (dwell_ms >= cfg.min_dwell_ms) & (dwell_ms <= cfg.max_dwell_ms)
    conv_user_id = np.asarray(conv_user_id, dtype=np.int64)
    conv_code = pd.Index(uniques).get_indexer(conv_user_id).astype(np.int64)
    has_user = conv_code >= 0
    k_idx = np.flatnonzero(keep)
    near = near_mask(
        code[k_idx],
        ts_ms[k_idx],
        conv_code[has_user],
        np.asarray(conv_ts_ms, dtype=np.int64)[has_user],
        int(cfg.buffer_s * 1000),
        int(cfg.horizon_s * 1000),
    )

    x = np.log(dwell_ms[k_idx])
    slot = group[k_idx] * 2 + near  # (K,) slot 2g = far, 2g+1 = near
    counts = np.bincount(slot, minlength=2 * n_groups)
    sums = np.bincount(slot, weights=x, minlength=2 * n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    dev = x - means[slot]
    # float even with no kept impression (bincount of an empty array is int64)
    m2 = np.bincount(slot, weights=dev * dev, minlength=2 * n_groups).astype(np.float64)
    n_filtered = np.bincount(group[~keep], minlength=n_groups)

    rows = np.flatnonzero(counts[0::2] + counts[1::2] + n_filtered)
    dense = rows if group_key is None else np.asarray(group_key)[rows]
    return {
        "user_id": np.asarray(uniques)[dense // n_win].astype(np.int64),
        "window_start_ms": origin_ms + (dense % n_win + w_min) * cfg.window_ms,
        "n_near": counts[1::2][rows].astype(np.int64),
        "n_far": counts[0::2][rows].astype(np.int64),
        "mean_near": np.nan_to_num(means[1::2][rows], nan=0.0),
        "mean_far": np.nan_to_num(means[0::2][rows], nan=0.0),
        "m2_near": m2[1::2][rows],
        "m2_far": m2[0::2][rows],
        "n_filtered": n_filtered[rows].astype(np.int64),
    }


def reference_stats(
    user_id: np.ndarray,
    ts_ms: np.ndarray,
    dwell_ms: np.ndarray,
    conv_user_id: np.ndarray,
    conv_ts_ms: np.ndarray,
    cfg: SegmentConfig,
    origin_ms: int = 0,
) -> Stats:
    """The obvious per-user loop that :func:`compute_stats` must equal."""
    convs: dict[int, list[int]] = defaultdict(list)
    for u, t in zip(conv_user_id.tolist(), conv_ts_ms.tolist(), strict=True):
        convs[int(u)].append(int(t))
    buffer_ms, horizon_ms = int(cfg.buffer_s * 1000), int(cfg.horizon_s * 1000)
    groups: dict[tuple[int, int], dict[str, list[float] | int]] = {}
    for u, t, d in zip(
        user_id.tolist(), ts_ms.tolist(), dwell_ms.tolist(), strict=True
    ):
        start = origin_ms + ((t - origin_ms) // cfg.window_ms) * cfg.window_ms
        g = groups.setdefault((u, start), {"near": [], "far": [], "filtered": 0})
        if not cfg.min_dwell_ms <= d <= cfg.max_dwell_ms:
            g["filtered"] = int(g["filtered"]) + 1  # type: ignore[call-overload,arg-type]
            continue
        is_near = any(t - buffer_ms <= c <= t + horizon_ms for c in convs[u])
        g["near" if is_near else "far"].append(math.log(d))  # type: ignore[union-attr]
    out: dict[str, list[float]] = {c: [] for c in STAT_COLUMNS}
    for (u, start), g in sorted(groups.items()):
        out["user_id"].append(u)
        out["window_start_ms"].append(start)
        out["n_filtered"].append(g["filtered"])  # type: ignore[arg-type]
        for label in ("near", "far"):
            xs: list[float] = g[label]  # type: ignore[assignment]
            mean = math.fsum(xs) / len(xs) if xs else 0.0
            out[f"n_{label}"].append(len(xs))
            out[f"mean_{label}"].append(mean)
            out[f"m2_{label}"].append(math.fsum((x - mean) ** 2 for x in xs))
    return {
        c: np.asarray(v, dtype=np.float64 if c.startswith(("mean", "m2")) else np.int64)
        for c, v in out.items()
    }


def merge_stats(*parts: Stats) -> Stats:
    """Merge partial statistics of the same (user, window) groups exactly.

    ``n = sum n_i``, ``mean = sum n_i mean_i / n``,
    ``m2 = sum (m2_i + n_i (mean_i - mean)^2)`` — the pairwise-update formula of
    Chan et al. generalised to any number of parts.
    """
    cat = {c: np.concatenate([p[c] for p in parts]) for c in STAT_COLUMNS}
    if len(cat["user_id"]) == 0:
        return empty_stats()
    keys = pd.MultiIndex.from_arrays([cat["user_id"], cat["window_start_ms"]])
    gid, uniq = pd.factorize(keys, sort=True)
    n_groups = len(uniq)
    out: Stats = {
        "user_id": np.asarray(uniq.get_level_values(0), dtype=np.int64),
        "window_start_ms": np.asarray(uniq.get_level_values(1), dtype=np.int64),
        "n_filtered": np.bincount(gid, cat["n_filtered"], n_groups).astype(np.int64),
    }
    for label in ("near", "far"):
        n_i = cat[f"n_{label}"].astype(np.float64)
        mean_i, m2_i = cat[f"mean_{label}"], cat[f"m2_{label}"]
        n = np.bincount(gid, n_i, n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nan_to_num(np.bincount(gid, n_i * mean_i, n_groups) / n)
        dev = mean_i - mean[gid]
        out[f"n_{label}"] = n.astype(np.int64)
        out[f"mean_{label}"] = mean
        out[f"m2_{label}"] = np.bincount(gid, m2_i + n_i * dev * dev, n_groups)
    return out


def finalize(stats: Stats, cfg: SegmentConfig, epsilon: float) -> dict[str, np.ndarray]:
    """docs/contract.md §3 columns from partial statistics; rows without kept impressions go.

    Nullable float columns are returned as float64 with NaN for null. ``w_mle``
    is null where ``corr`` is, and where the pooled variance is 0 (all kept dwell
    times of the group equal within each label: the weight is undefined).
    """
    rows = np.flatnonzero(stats["n_near"] + stats["n_far"] > 0)
    n_near = stats["n_near"][rows]
    n_far = stats["n_far"][rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_near = np.where(n_near > 0, stats["mean_near"][rows], np.nan)
        mean_far = np.where(n_far > 0, stats["mean_far"][rows], np.nan)
        var_near = np.where(n_near > 1, stats["m2_near"][rows] / (n_near - 1), np.nan)
        var_far = np.where(n_far > 1, stats["m2_far"][rows] / (n_far - 1), np.nan)
        eligible = (n_near >= cfg.min_events) & (n_far >= cfg.min_events)
        corr = np.where(eligible, mean_near - mean_far, np.nan)
        pooled = (stats["m2_near"][rows] + stats["m2_far"][rows]) / (n_near + n_far - 2)
        w_mle = np.where(eligible & (pooled > 0), corr / pooled, np.nan)
    segment = (eligible & (np.abs(np.nan_to_num(corr)) > epsilon)).astype(np.int8)
    return {
        "user_id": stats["user_id"][rows],
        "window_start_ms": stats["window_start_ms"][rows],
        "window_end_ms": stats["window_start_ms"][rows] + cfg.window_ms,
        "n_near": n_near,
        "n_far": n_far,
        "mean_near": mean_near,
        "mean_far": mean_far,
        "var_near": var_near,
        "var_far": var_far,
        "corr": corr,
        "w_mle": w_mle,
        "segment": segment,
    }
