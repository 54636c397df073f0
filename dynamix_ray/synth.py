"""Synthetic EBFs with planted, recorded ground truth (``dynamix generate``).

What is planted (all of it written to ``OUT/_truth/``):

* **Segments.** A share of users (default 2/3) is *active*: the log dwell time
  of an ad impression rises by ``delta`` (0.7–1.4) when the user converts within
  ``[t - 60 s, t + 300 s]`` — exactly the statistic's *near* definition. Some of
  them (*switchers*, default 1/6 of all users) are active only during a 12-hour
  block of the day, as in the paper's Fig. 4; the rest are *passive* (no rise).
* **Logging skew and outliers.** A conversion is logged between 60 s before and
  300 s after its impression; a few dwell times are milliseconds or hours.
* **Interest.** Each user has a latent cluster that drives which ads (hence
  categories, advertisers, semantic ids), organic content and pages they see,
  and raises the conversion rate on ads of that cluster. Organic impressions and
  page views carry the cluster (so boosting them can help), fully while the
  user is planted active and ``passive_history_signal`` as much while
  passive (the paper's passive users: their engagement history carries
  little of their intent). Ad impressions keep the platform's targeting for
  everyone (the candidate ads, hence the labels, follow it); a passive
  user's dwell carries nothing already. ``campaign_id``,
  ``media_type``, ``surface`` and ``position`` of ad impressions are drawn
  independently of everything: they carry no signal.
* **Popularity and campaigns** (off by default, ``ad_zipf``,
  ``campaign_days``): Zipf-distributed ad popularity, the same order among all
  ads and within each cluster, and campaigns that start and end; an
  impression shows only ads live on its day. ``_truth/ads.parquet`` records
  each ad's ``popularity`` (its share of impressions when everything is live),
  ``start_ms`` and ``end_ms``.
* **Bad rows** at ``bad_row_rate``: null user ids, out-of-range timestamps, NaN
  and negative dwell times, counted per reason in ``_truth/truth.json``.

Generated in chunks of users (bounded memory: spans over 7 days take
proportionally fewer users a chunk), deterministic per seed and chunk size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from dynamix_ray.config import GenerateConfig
from dynamix_ray.io import (
    resolve,
    user_bucket,
    write_bucketing,
    write_json,
    write_parquet,
)
from dynamix_ray.segments.stats import near_mask

__all__ = [
    "NO_SIGNAL_ATTRIBUTES",
    "generate",
    "planted_active",
    "planted_rows",
    "read_truth_users",
    "segment_recovery",
]

log = logging.getLogger(__name__)

#: Ad-impression attributes drawn independently of user, ad and label.
NO_SIGNAL_ATTRIBUTES = ("campaign_id", "media_type", "surface", "position")
KINDS = ("passive", "active", "switcher")
CONVERSION_KINDS = ("click", "like", "share", "comment", "purchase")
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
_BUFFER_MS, _HORIZON_MS = 60_000, 300_000
_SWITCH_HOURS = 12
#: Share of an active user's organic and page events from their own cluster.
_ENGAGEMENT_OWN = 0.7
_AD_ID0, _CONTENT_ID0, _PAGE_ID0 = 1_000_000, 5_000_000, 9_000_000


def _start_ms(cfg: GenerateConfig) -> int:
    return int(np.datetime64(cfg.start, "ms").astype(np.int64))


def planted_active(
    kind: np.ndarray,
    switch_start_hour: np.ndarray,
    window_start_ms: np.ndarray,
    window_ms: int,
) -> np.ndarray:
    """Planted truth per (user, window): active users always; switchers when at
    least half of the window's hours fall in their active block.

    Args:
        kind: (N,) 0 passive, 1 active, 2 switcher (index into ``KINDS``).
        switch_start_hour: (N,) first UTC hour of a switcher's active block.
        window_start_ms: (N,) window starts, epoch ms.
    """
    hours = max(1, window_ms // _HOUR_MS)
    start_hour = (window_start_ms // _HOUR_MS) % 24
    in_block = np.zeros(len(kind), dtype=np.int64)
    for h in range(hours):
        in_block += ((start_hour + h - switch_start_hour) % 24) < _SWITCH_HOURS
    switcher_on = in_block * 2 >= hours
    return (kind == 1) | ((kind == 2) & switcher_on)


def _catalog(cfg: GenerateConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = cfg.n_clusters
    idx = np.arange(cfg.n_ads)
    cluster = idx % c
    n_adv = max(c, cfg.n_ads // 10)
    ads = {
        "ad_id": _AD_ID0 + idx,
        "cluster": cluster,
        # advertisers and categories belong to one cluster each
        "advertiser_id": 100 + (rng.integers(0, n_adv // c, cfg.n_ads) * c + cluster),
        "category_id": (cluster * 8 + rng.integers(0, 8, cfg.n_ads)).astype(np.int32),
        "sem_id_1": 10 + cluster,
        "sem_id_2": 1000 + cluster * 16 + rng.integers(0, 16, cfg.n_ads),
        "sem_id_3": 100_000 + cluster * 256 + rng.integers(0, 256, cfg.n_ads),
    }
    # drawn only when asked for, so that the default world stays as it was
    weight = np.ones(cfg.n_ads)
    if cfg.ad_zipf > 0:
        rank = rng.permutation(cfg.n_ads) + 1
        weight = rank.astype(np.float64) ** -cfg.ad_zipf
    ads["popularity"] = weight / weight.sum()
    t0 = _start_ms(cfg)
    if cfg.campaign_days > 0:
        life = np.maximum(1, np.round(rng.exponential(cfg.campaign_days, cfg.n_ads)))
        start = rng.integers(0, cfg.days + life.astype(np.int64)) - life + 1
        start = start.astype(np.int64)
        ads["start_ms"] = t0 + start * _DAY_MS
        ads["end_ms"] = t0 + (start + life.astype(np.int64)) * _DAY_MS
    else:
        ads["start_ms"] = np.full(cfg.n_ads, t0, np.int64)
        ads["end_ms"] = np.full(cfg.n_ads, t0 + cfg.days * _DAY_MS, np.int64)
    return ads


def _draw_ads(
    cfg: GenerateConfig,
    ads: dict[str, np.ndarray],
    rng: np.random.Generator,
    user_cluster: np.ndarray,
    ts: np.ndarray,
) -> np.ndarray:
    """Ad index per impression: from the user's cluster (``own_cluster_share``)
    or from all ads, among the ads live on the impression's day, each with
    weight ``popularity``. A day on which none of a group's ads is live falls
    back to all of the group's ads."""
    c, m = cfg.n_clusters, len(ts)
    own = rng.random(m) < cfg.own_cluster_share
    if cfg.ad_zipf == 0 and cfg.campaign_days == 0:  # uniform: the original draws
        return np.where(
            own,
            user_cluster + c * rng.integers(0, cfg.n_ads // c, m),
            rng.integers(0, cfg.n_ads, m),
        )
    u = rng.random(m)
    t0 = _start_ms(cfg)
    day = (ts - t0) // _DAY_MS
    group = np.where(own, user_cluster, c)  # c: all ads
    key = day * (c + 1) + group
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    out = np.empty(m, np.int64)
    idx = np.arange(cfg.n_ads)
    for sl in np.split(order, bounds):
        if not len(sl):
            continue
        d, g = divmod(int(key[sl[0]]), c + 1)
        members = idx if g == c else idx[idx % c == g]
        day_ms = t0 + d * _DAY_MS
        live = (ads["start_ms"][members] <= day_ms) & (ads["end_ms"][members] > day_ms)
        if live.any():
            members = members[live]
        cum = np.cumsum(ads["popularity"][members])
        pick = np.searchsorted(cum, u[sl] * cum[-1], side="right")
        out[sl] = members[np.minimum(pick, len(members) - 1)]
    return out


def _users(cfg: GenerateConfig, rng: np.random.Generator, first: int, n: int) -> dict:
    u = np.arange(first, first + n, dtype=np.int64)
    r = rng.random(n)
    kind = np.where(
        r < cfg.switcher_share, 2, np.where(r < cfg.active_share, 1, 0)
    ).astype(np.int8)
    return {
        "user_id": 1_000_000 + u * 7,  # sparse ids: nothing may assume 0..N-1
        "cluster": rng.integers(0, cfg.n_clusters, n),
        "country": rng.integers(0, max(1, cfg.n_countries), n).astype(np.int16),
        "kind": kind,
        "delta": np.where(kind > 0, rng.uniform(0.7, 1.4, n), 0.0),
        # the same draw for any spread: 24 is the old world bit for bit
        "switch_start_hour": np.where(
            kind == 2, rng.integers(0, 24, n) * cfg.switch_spread_h // 24, -1
        ),
        "rate": rng.lognormal(0.0, 0.4, n) / np.exp(0.08),  # mean 1
        "dwell_mu": rng.normal(np.log(6000.0), 0.3, n),
        "dwell_sigma": rng.uniform(0.5, 0.8, n),
    }


def _planted_on(users: dict, uidx: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(M,) whether each event's user is planted active at its hour: active
    users always, switchers inside their 12-hour block."""
    hour = (ts // _HOUR_MS) % 24
    kind = users["kind"][uidx]
    return (kind == 1) | (
        (kind == 2) & (((hour - users["switch_start_hour"][uidx]) % 24) < _SWITCH_HOURS)
    )


def _sessions(
    rng: np.random.Generator,
    rate: np.ndarray,
    per_day: float,
    days: int,
    t0: int,
    per_session: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Event times in bursts: (user index, ts_ms) of each event, per day sessions."""
    n = len(rate)
    n_sess = rng.poisson(np.repeat(rate * per_day / per_session, days))
    sess_user = np.repeat(np.repeat(np.arange(n), days), n_sess)
    sess_day = np.repeat(np.tile(np.arange(days), n), n_sess)
    sess_start = t0 + sess_day * _DAY_MS + rng.integers(0, _DAY_MS, len(sess_user))
    size = 1 + rng.poisson(per_session - 1, len(sess_user))
    ev_sess = np.repeat(np.arange(len(sess_user)), size)
    gaps = (rng.exponential(25_000.0, len(ev_sess)) + 3_000).astype(np.int64)
    csum = np.cumsum(gaps)
    first = np.repeat(np.cumsum(size) - size, size)
    offset = csum - csum[first]
    return sess_user[ev_sess], sess_start[ev_sess] + offset


def _interest_events(
    rng: np.random.Generator,
    cfg: GenerateConfig,
    users: dict,
    t0: int,
    rate_vs_ads: float,
    per_session: float,
    items_per_cluster: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Organic or page events: (user index, ts_ms, cluster, item index); 70% of
    items come from the user's own interest cluster while the user is planted
    active, ``70% * passive_history_signal`` while passive."""
    c = cfg.n_clusters
    uidx, ts = _sessions(
        rng,
        users["rate"],
        cfg.impressions_per_user_day * rate_vs_ads,
        cfg.days,
        t0,
        per_session,
    )
    n = len(uidx)
    own: float | np.ndarray = _ENGAGEMENT_OWN
    if cfg.passive_history_signal != 1.0:  # else the old world, bit for bit
        on = _planted_on(users, uidx, ts)
        own = np.where(
            on, _ENGAGEMENT_OWN, _ENGAGEMENT_OWN * cfg.passive_history_signal
        )
    cluster = np.where(
        rng.random(n) < own, users["cluster"][uidx], rng.integers(0, c, n)
    )
    return uidx, ts, cluster, cluster + c * rng.integers(0, items_per_cluster, n)


def _chunk(
    cfg: GenerateConfig, ads: dict[str, np.ndarray], chunk: int, first: int, n: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, int]]:
    rng = np.random.default_rng([cfg.seed, chunk])
    users = _users(cfg, rng, first, n)
    t0 = _start_ms(cfg)
    c = cfg.n_clusters

    # ---- ad impressions
    iu, its = _sessions(
        rng, users["rate"], cfg.impressions_per_user_day, cfg.days, t0, 8.0
    )
    m = len(iu)
    ad_idx = _draw_ads(cfg, ads, rng, users["cluster"][iu], its)
    match = ads["cluster"][ad_idx] == users["cluster"][iu]
    converts = rng.random(m) < np.where(match, cfg.conv_rate_match, cfg.conv_rate_other)
    ci = np.flatnonzero(converts)
    delay = rng.uniform(-_BUFFER_MS, _HORIZON_MS, len(ci)).astype(np.int64)
    conv_user, conv_ts, conv_ad = iu[ci], its[ci] + delay, ad_idx[ci]

    near = near_mask(iu, its, conv_user, conv_ts, _BUFFER_MS, _HORIZON_MS)
    on = _planted_on(users, iu, its)
    sigma = users["dwell_sigma"][iu]
    if cfg.near_sigma_scale != 1.0:  # else the old world, bit for bit
        sigma = sigma * np.where(near & on, cfg.near_sigma_scale, 1.0)
    log_dwell = (
        users["dwell_mu"][iu]
        + sigma * rng.standard_normal(m)
        + users["delta"][iu] * (near & on)
    )
    dwell = np.exp(log_dwell)
    r = rng.random(m)
    dwell = np.where(r < 0.003, rng.uniform(1, 50, m), dwell)  # ms: mis-logged
    dwell = np.where(r > 0.998, rng.uniform(3.6e6, 1.8e7, m), dwell)  # hours
    planted = {"dwell_outliers": int(((r < 0.003) | (r > 0.998)).sum())}

    imp = {
        "user_id": users["user_id"][iu],
        "ts": its,
        "dwell_ms": np.round(dwell, 1),
        "ad_id": ads["ad_id"][ad_idx],
        "advertiser_id": ads["advertiser_id"][ad_idx],
        "campaign_id": rng.integers(1, 2001, m),
        "category_id": ads["category_id"][ad_idx],
        "sem_id_1": ads["sem_id_1"][ad_idx],
        "sem_id_2": ads["sem_id_2"][ad_idx],
        "sem_id_3": ads["sem_id_3"][ad_idx],
        "media_type": rng.integers(0, 4, m).astype(np.int8),
        "surface": rng.integers(0, 3, m).astype(np.int8),
        "position": rng.integers(0, 20, m).astype(np.int16),
    }
    conv = {
        "user_id": users["user_id"][conv_user],
        "ts": conv_ts,
        "ad_id": ads["ad_id"][conv_ad],
        "kind": np.asarray(CONVERSION_KINDS, dtype=object)[
            rng.integers(0, len(CONVERSION_KINDS), len(ci))
        ],
    }

    # ---- organic impressions and page views: carry the interest cluster
    ou, ots, _, content = _interest_events(rng, cfg, users, t0, 0.8, 6.0, 2000)
    k = len(ou)
    organic = {
        "user_id": users["user_id"][ou],
        "ts": ots,
        "dwell_ms": np.round(np.exp(rng.normal(np.log(4000.0), 0.8, k)), 1),
        "content_id": _CONTENT_ID0 + content,
        "media_type": rng.integers(0, 4, k).astype(np.int8),
        "position": rng.integers(0, 20, k).astype(np.int16),
        "author_id": 500 + (content % (50 * c)),
    }
    pu, pts, p_cluster, page = _interest_events(rng, cfg, users, t0, 0.4, 4.0, 500)
    q = len(pu)
    pages = {
        "user_id": users["user_id"][pu],
        "ts": pts,
        "page_id": _PAGE_ID0 + page,
        "sem_id_1": 10 + p_cluster,
        "sem_id_2": 1000 + p_cluster * 16 + rng.integers(0, 16, q),
        "media_type": rng.integers(0, 4, q).astype(np.int8),
    }
    sources = {
        "ad_impressions": imp,
        "conversions": conv,
        **(
            {"organic_impressions": organic, "page_views": pages}
            if cfg.engagement
            else {}
        ),
    }
    if cfg.n_countries > 0:
        for src, idx in (
            ("ad_impressions", iu),
            ("conversions", conv_user),
            ("organic_impressions", ou),
            ("page_views", pu),
        ):
            if src in sources:
                sources[src]["country"] = users["country"][idx]
    planted.update(_plant_bad_rows(cfg, rng, sources))
    return sources, users, planted


def _plant_bad_rows(
    cfg: GenerateConfig, rng: np.random.Generator, sources: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """Turn a few rows of every source into rejects; return counts per reason.

    ``user_id`` becomes a masked array entry (null), so the user's other rows keep
    their ids. Reasons are assigned so that each bad row has exactly one.
    """
    counts: dict[str, int] = {}
    for src, cols in sources.items():
        n = len(cols["user_id"])
        bad = rng.random(n) < cfg.bad_row_rate
        reasons = ["null_user_id", "ts_out_of_range"]
        if "dwell_ms" in cols:
            reasons += ["dwell_not_finite", "dwell_negative"]
        which = rng.integers(0, len(reasons), n)
        null_user = np.zeros(n, dtype=bool)
        for i, reason in enumerate(reasons):
            sel = bad & (which == i)
            counts[f"{src}/{reason}"] = int(sel.sum())
            if reason == "null_user_id":
                null_user |= sel
            elif reason == "ts_out_of_range":
                cols["ts"] = np.where(sel, cols["ts"] - 40 * 365 * _DAY_MS, cols["ts"])
            elif reason == "dwell_not_finite":
                cols["dwell_ms"] = np.where(sel, np.nan, cols["dwell_ms"])
            else:
                cols["dwell_ms"] = np.where(sel, -cols["dwell_ms"], cols["dwell_ms"])
        cols["_null_user"] = null_user
    return counts


def _to_table(cols: dict[str, Any], ts_type: str, order: np.ndarray) -> pa.Table:
    data: dict[str, pa.Array] = {}
    null_user = cols["_null_user"][order]
    for name, values in cols.items():
        if name == "_null_user":
            continue
        v = np.asarray(values)[order]
        if name == "user_id":
            data[name] = pa.array(v, pa.int64(), mask=null_user)
        elif name == "ts":
            arr = pa.array(v, pa.int64())
            data[name] = (
                arr.cast(pa.timestamp("ms", tz="UTC"))
                if ts_type == "timestamp"
                else arr
            )
        elif v.dtype == object:
            data[name] = pa.array(v, pa.string())
        else:
            data[name] = pa.array(v)
    return pa.table(data)


def generate(
    out_url: str,
    cfg: GenerateConfig | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Write the four EBF sources and ``_truth/`` under ``out_url``.

    Returns:
        The truth summary also written to ``_truth/truth.json``.
    """
    cfg = cfg or GenerateConfig()
    fs, root = resolve(out_url)
    fs.makedirs(root, exist_ok=True)
    t_start = time.perf_counter()
    ads = _catalog(cfg, np.random.default_rng([cfg.seed, 1 << 30]))
    rows: dict[str, int] = {}
    planted: dict[str, int] = {}
    user_parts = []
    # a chunk's events grow with the span: over 7 days, fewer users a chunk
    per_chunk = min(cfg.chunk_users, max(1, cfg.chunk_users * 7 // cfg.days))
    n_chunks = (cfg.users + per_chunk - 1) // per_chunk
    for chunk in range(n_chunks):
        first = chunk * per_chunk
        n = min(per_chunk, cfg.users - first)
        sources, users, counts = _chunk(cfg, ads, chunk, first, n)
        for k, v in counts.items():
            planted[k] = planted.get(k, 0) + v
        for src, cols in sources.items():
            order = np.argsort(cols["ts"], kind="stable")  # logs arrive in time order
            table = _to_table(cols, cfg.ts_type, order)
            rows[src] = rows.get(src, 0) + table.num_rows
            if cfg.bucketed:
                uid = table.column("user_id").fill_null(0).to_numpy()
                bucket = user_bucket(uid, cfg.bucketed)
                # null user ids land in bucket of id 0; they are rejects anyway
                for b in np.unique(bucket):
                    part = table.take(pa.array(np.flatnonzero(bucket == b)))
                    write_parquet(
                        fs,
                        f"{root}/{src}/bucket={b:05d}/part-{chunk:05d}.parquet",
                        part,
                    )
            else:
                write_parquet(fs, f"{root}/{src}/part-{chunk:05d}.parquet", table)
        user_parts.append(
            pa.table({k: v for k, v in users.items() if k not in ("rate",)})
        )
        if progress:
            progress(
                f"generate: chunk {chunk + 1}/{n_chunks} ({first + n:,} users, "
                f"{rows['ad_impressions']:,} ad impressions, "
                f"{time.perf_counter() - t_start:.1f} s)"
            )
    if cfg.bucketed:
        write_bucketing(fs, root, cfg.bucketed)
    write_parquet(fs, f"{root}/_truth/users.parquet", pa.concat_tables(user_parts))
    write_parquet(fs, f"{root}/_truth/ads.parquet", pa.table(ads))
    truth = {
        "config": asdict(cfg),
        "rows": rows,
        "planted": planted,
        "no_signal_attributes": list(NO_SIGNAL_ATTRIBUTES),
        "kinds": list(KINDS),
        "switch_hours": _SWITCH_HOURS,
        "dwell_effect": "log dwell += delta when near (conversion in [t-60s, t+300s])",
        "near_sigma_scale": cfg.near_sigma_scale,
        "passive_history_signal": cfg.passive_history_signal,
        "engagement_own_cluster": {
            "active": _ENGAGEMENT_OWN,
            "passive": _ENGAGEMENT_OWN * cfg.passive_history_signal,
        },
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(fs, f"{root}/_truth/truth.json", truth)
    return truth


def read_truth_users(events_url: str) -> pa.Table:
    """``_truth/users.parquet`` of a generated dataset."""
    import pyarrow.parquet as pq

    fs, root = resolve(events_url)
    with fs.open(f"{root}/_truth/users.parquet", "rb") as fh:
        return pq.read_table(fh)


def planted_rows(
    truth_users: pa.Table, segments: pa.Table
) -> tuple[np.ndarray, np.ndarray]:
    """Per segment-table row: the planted truth (active) and whether the row
    is eligible (non-null ``corr``); both (S,) bool."""
    uid = truth_users.column("user_id").to_numpy()
    order = np.argsort(uid)
    seg_uid = segments.column("user_id").to_numpy()
    pos = order[np.searchsorted(uid, seg_uid, sorter=order)]
    window_start = segments.column("window_start").cast(pa.int64()).to_numpy()
    window_ms = (
        int(
            (
                segments.column("window_end").cast(pa.int64()).to_numpy()[:1]
                - window_start[:1]
            )[0]
        )
        if segments.num_rows
        else _DAY_MS // 4
    )
    truth = planted_active(
        truth_users.column("kind").to_numpy()[pos],
        truth_users.column("switch_start_hour").to_numpy()[pos],
        window_start,
        window_ms,
    )
    eligible = segments.column("corr").is_valid().to_numpy(zero_copy_only=False)
    return truth, eligible


def segment_recovery(truth_users: pa.Table, segments: pa.Table) -> dict[str, float]:
    """Precision and recall of ``segment == 1`` against the planted truth, over
    eligible rows (non-null ``corr``), plus the planted active share there."""
    truth, eligible = planted_rows(truth_users, segments)
    pred = segments.column("segment").to_numpy().astype(bool)
    t, p = truth[eligible], pred[eligible]
    tp = int((t & p).sum())
    return {
        "eligible_rows": int(eligible.sum()),
        "precision": tp / max(1, int(p.sum())),
        "recall": tp / max(1, int(t.sum())),
        "planted_active_share": float(t.mean()) if len(t) else 0.0,
        "predicted_active_share": float(p.mean()) if len(p) else 0.0,
    }
