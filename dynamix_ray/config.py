"""Typed configuration with the papers' defaults; the one place each default lives.

The CLI (``cli.py``) and the Ray-job entry points (``pipelines/``) map their flags
onto these dataclasses; nothing else holds a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "GENERATE_PRESETS",
    "GenerateConfig",
    "SegmentConfig",
    "parse_duration_s",
    "format_duration",
]

_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration_s(text: str | int | float) -> float:
    """Parse ``"6h"``, ``"30m"``, ``"300s"``, ``"1d"``, ``"250ms"`` or a number (s).

    >>> parse_duration_s("6h")
    21600.0
    """
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"cannot read duration {text!r}: expected a number with an optional unit "
            "ms, s, m, h or d (e.g. '6h', '30m', '300s', '1d')"
        )
    value, unit = match.groups()
    return float(value) * _UNITS_S[unit or "s"]


def format_duration(seconds: float) -> str:
    """Inverse of :func:`parse_duration_s` for whole units (``21600 -> '6h'``)."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_S[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class SegmentConfig:
    """Parameters of the DynamiX statistic (docs/contract.md §2, paper §3.1–3.2).

    Args:
        window_s: segmentation window length; windows tile time aligned to UTC
            midnight of the first event.
        buffer_s: logging buffer: conversions up to this long *before* an
            impression still mark it near (paper: 60 s).
        horizon_s: forecast horizon s: conversions up to this long after an
            impression mark it near.
        min_dwell_ms / max_dwell_ms: denoising bounds on dwell time (inclusive).
        min_events: minimum near and far impressions for a non-null ``corr``.
        epsilon: fixed threshold on ``|corr|``; ``None`` calibrates it.
        active_fraction: target active share of eligible (user, window) rows
            when calibrating epsilon (paper: ~66.67%).
        active_traffic: calibrate instead to this share of ad *traffic*: the
            ad impressions of active (user, window) rows over all valid ad
            impressions, eligible or not (the paper's "66.67% of the
            ad-traffic users ... at any given time"). ``None``: calibrate on
            ``active_fraction``. ``_meta.json`` records both shares either way.
        num_buckets: hash buckets for unbucketed input (``None``: from the data
            size and the cluster's CPUs).
    """

    window_s: int = 6 * 3600
    buffer_s: int = 60
    horizon_s: int = 300
    min_dwell_ms: float = 250.0
    max_dwell_ms: float = 600_000.0
    min_events: int = 2
    epsilon: float | None = None
    active_fraction: float = 0.6667
    active_traffic: float | None = None
    num_buckets: int | None = None

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window must be positive, got {self.window_s} s")
        if self.buffer_s < 0 or self.horizon_s < 0:
            raise ValueError(
                f"buffer_s and horizon_s must be >= 0, got {self.buffer_s}, "
                f"{self.horizon_s}"
            )
        if not 0 <= self.min_dwell_ms <= self.max_dwell_ms:
            raise ValueError(
                "need 0 <= min_dwell_ms <= max_dwell_ms, got "
                f"{self.min_dwell_ms} and {self.max_dwell_ms}"
            )
        if self.min_events < 2:
            raise ValueError(
                f"min_events must be >= 2 (a sample variance needs 2), got "
                f"{self.min_events}"
            )
        if self.epsilon is not None and self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if not 0.0 < self.active_fraction < 1.0:
            raise ValueError(
                f"active_fraction must be in (0, 1), got {self.active_fraction}"
            )
        if self.active_traffic is not None and not 0.0 < self.active_traffic < 1.0:
            raise ValueError(
                f"active_traffic must be in (0, 1), got {self.active_traffic}"
            )
        if self.active_traffic is not None and self.epsilon is not None:
            raise ValueError("give epsilon or active_traffic, not both")
        if self.num_buckets is not None and self.num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {self.num_buckets}")

    @property
    def window_ms(self) -> int:
        return int(self.window_s * 1000)


@dataclass(frozen=True)
class GenerateConfig:
    """Sizes and planted structure of the synthetic EBFs (see ``synth.py``).

    Args:
        users / days / seed: size and determinism.
        impressions_per_user_day: mean ad impressions per user and day.
        active_share: users whose dwell rises shortly before a conversion
            (default 2/3); the rest are passive (no such rise).
        switcher_share: share of *all* users, taken from the active ones, whose
            rise holds only in a block of hours of the day (paper Fig. 4).
        n_clusters: latent interest clusters driving ads, content and pages.
        own_cluster_share: share of a user's ad impressions drawn from their
            own cluster (the rest from all ads).
        conv_rate_match / conv_rate_other: conversion probability of an ad
            impression whose ad is / is not in the user's cluster. With the
            defaults the best possible model (one that knows the cluster) has
            NE ~0.90 against the base rate.
        n_countries: values of the optional ``country`` column (0 = no column).
        ts_type: ``"ms"`` (int64 epoch ms) or ``"timestamp"`` (Parquet timestamp).
        bucketed: write each source partitioned by user-id hash into this many
            buckets (``bucket=K/`` folders), or ``0`` for plain files.
        chunk_users: users generated and written per chunk (bounds memory).
        start: first day, ISO date (UTC midnight).
        bad_row_rate: share of rows made invalid on purpose (rejects).
        engagement: also write organic impressions and page views (the
            statistic reads only ad impressions and conversions: a benchmark
            of it at hundreds of millions of rows can leave them out).
        ad_zipf: exponent s of the ads' Zipf popularity: the ad of popularity
            rank r (a random order of all ads) is shown with weight r^-s,
            among all ads and within its interest cluster alike. 0: every ad
            equally often (no popularity skew).
        campaign_days: mean life of an ad's campaign in days (exponential,
            at least one day; starts spread so that as many ads are live on
            every day); an impression shows only ads live that day. 0: every
            ad is live the whole span.
        switch_spread_h: switchers start their 12-hour active block at a
            random hour among the first ``switch_spread_h`` of the UTC day
            (24: any hour, so the active share is flat over the day; fewer:
            the share moves with the clock, the diurnal mix of
            docs/segments.md).
        passive_history_signal: how much of a user's conversion intent (the
            interest cluster) their organic impressions and page views carry
            while the user is planted passive, as a share of what they carry
            while active: an active user's engagement events come from their
            own cluster 70% of the time, a passive user's ``70% * this``,
            the rest from any cluster. The default, 0.1, follows the paper's
            passive users, whose engagement history "carries little" of
            their intent; 1.0 is the world before this knob, bit for bit
            (passive histories as predictive as active ones).
        near_sigma_scale: the spread of an active user's log dwell on near
            impressions, as a multiple of its spread on far ones (1: one
            variance, which Eq. 7 assumes; the unequal-variance ablation of
            docs/segments.md uses others).
    """

    users: int = 2000
    days: int = 7
    seed: int = 0
    impressions_per_user_day: float = 30.0
    active_share: float = 2.0 / 3.0
    switcher_share: float = 1.0 / 6.0
    n_clusters: int = 16
    own_cluster_share: float = 0.6
    conv_rate_match: float = 0.08
    conv_rate_other: float = 0.002
    n_ads: int = 5000
    n_countries: int = 4
    ts_type: str = "ms"
    bucketed: int = 0
    chunk_users: int = 20_000
    start: str = "2026-01-05"
    bad_row_rate: float = 0.0005
    engagement: bool = True
    ad_zipf: float = 0.0
    campaign_days: float = 0.0
    near_sigma_scale: float = 1.0
    switch_spread_h: int = 24
    passive_history_signal: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.switch_spread_h <= 24:
            raise ValueError(
                f"switch_spread_h must be in 1..24, got {self.switch_spread_h}"
            )
        if self.near_sigma_scale <= 0:
            raise ValueError(
                f"near_sigma_scale must be > 0, got {self.near_sigma_scale}"
            )
        if self.users < 1 or self.days < 1:
            raise ValueError(f"need users >= 1 and days >= 1, got {self}")
        if self.ts_type not in ("ms", "timestamp"):
            raise ValueError(
                f"ts_type must be 'ms' or 'timestamp', got {self.ts_type!r}"
            )
        if not 0 <= self.switcher_share <= self.active_share <= 1:
            raise ValueError("need 0 <= switcher_share <= active_share <= 1")
        if self.bucketed < 0:
            raise ValueError(f"bucketed must be >= 0, got {self.bucketed}")
        if self.ad_zipf < 0 or self.campaign_days < 0:
            raise ValueError(
                f"ad_zipf and campaign_days must be >= 0, got {self.ad_zipf}, "
                f"{self.campaign_days}"
            )
        for name in (
            "own_cluster_share",
            "conv_rate_match",
            "conv_rate_other",
            "passive_history_signal",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


#: Named worlds of ``dynamix generate --preset`` (explicit flags override).
#: ``paper``: the paper's regime (docs/experiments.md, "The paper's world").
#: 120 ad impressions a user-day put ~31 in a 6-hour window with one (the
#: sessions are bursty), and ~82% of ad traffic in windows with 2 near and
#: 2 far impressions (30 a day: ~47%). Switchers (1/6 of users) are active
#: half the day, so 3/4 of users planted active puts 2/3 of them, and of the
#: traffic, active at any hour (7/12 always + 1/12); the default 2/3 puts 7/12.
GENERATE_PRESETS: dict[str, dict[str, float]] = {
    "demo": {},
    "paper": {"impressions_per_user_day": 120.0, "active_share": 0.75},
}
