"""Training samples (SPEC §6): the plain-numpy core.

One sample per valid ad impression at time ``t`` of user ``u``:

* ``label``: ``u`` has a conversion on the *same* ``ad_id`` in
  ``[t - buffer_s, t + horizon_s]``;
* the candidate: the impression's own ad attributes;
* per history source, the user's last ``max_seq_len`` events with
  ``ts < t - buffer_s`` (strictly), newest last, right-aligned, with a mask;
* ``segment``: that of the user's last window that *ended* at or before ``t``
  (no look-ahead); users with none are passive (0).

Everything is vectorised over a set of complete users (a hash bucket): one
``searchsorted`` per source on a ``(user, ts)`` composite key gives each
sample's history slice, and a broadcast turns slices into ``(N, L)`` gather
indices. :func:`reference_samples` is the per-sample loop the kernel must equal.
The Ray Data shell that feeds Ray Train (bucketing, streaming, splits) builds on
these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.io import resolve, user_bucket
from dynamix_ray.schema import SOURCES
from dynamix_ray.segments.stats import _near_mask

__all__ = [
    "HISTORY_SOURCES",
    "SampleConfig",
    "build_samples",
    "eval_boundary_ms",
    "read_segment_rows",
    "sample_dataset",
    "history_index",
    "reference_samples",
    "segment_at",
    "segment_rows",
    "time_split",
]

#: History sources and the attributes a sample carries for each: the integer
#: attributes of the schema (``dwell_ms`` becomes ``ln(1 + dwell_ms)``; the
#: conversions' string ``kind`` is not carried).
HISTORY_SOURCES: dict[str, tuple[str, ...]] = {
    name: (("dwell_ms",) if src.has_dwell else ())
    + tuple(a for a, t in src.attributes.items() if pa.types.is_integer(t))
    for name, src in SOURCES.items()
}
CANDIDATE_ATTRIBUTES = tuple(SOURCES["ad_impressions"].attributes)
HISTORY_SOURCES_ALL = tuple(HISTORY_SOURCES)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class SampleConfig:
    """Args: ``max_seq_len`` events per source; ``buffer_s``/``horizon_s`` as in
    the statistic (SPEC §2); ``eval_days`` last days held out for evaluation."""

    max_seq_len: int = 64
    buffer_s: int = 60
    horizon_s: int = 300
    eval_days: int = 1

    def __post_init__(self) -> None:
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")


def _codes(user_id: np.ndarray, uniques: pd.Index) -> np.ndarray:
    return uniques.get_indexer(np.asarray(user_id, dtype=np.int64)).astype(np.int64)


def history_index(
    code: np.ndarray,
    bound_ms: np.ndarray,
    ev_code: np.ndarray,
    ev_ts_ms: np.ndarray,
    max_len: int,
) -> np.ndarray:
    """Gather indices of each query's last ``max_len`` events before its bound.

    Args:
        code: (N,) user code of each query.
        bound_ms: (N,) exclusive upper bound on event time (``t - buffer``).
        ev_code, ev_ts_ms: (M,) events, **sorted by (code, ts)**.
        max_len: L.

    Returns:
        (N, L) int64 indices into the events, ``-1`` where padded; the events of
        a row are in time order, newest last, right-aligned.
    """
    n = len(code)
    if n == 0 or len(ev_code) == 0:
        return np.full((n, max_len), -1, dtype=np.int64)
    base = min(int(ev_ts_ms.min()), int(bound_ms.min()))
    span = max(int(ev_ts_ms.max()), int(bound_ms.max())) - base + 1
    if (int(max(code.max(), ev_code.max())) + 1) * span >= 1 << 62:
        raise OverflowError("too many users x time span for one block; bucket finer")
    keys = ev_code * span + (ev_ts_ms - base)
    hi = np.searchsorted(keys, code * span + (bound_ms - base), side="left")
    lo = np.searchsorted(keys, code * span, side="left")
    count = np.minimum(hi - lo, max_len)
    cols = np.arange(max_len)
    idx = hi[:, None] - max_len + cols[None, :]
    return np.where(cols[None, :] >= (max_len - count)[:, None], idx, -1)


def segment_at(
    code: np.ndarray,
    t_ms: np.ndarray,
    seg_code: np.ndarray,
    seg_window_end_ms: np.ndarray,
    seg_value: np.ndarray,
    fill: float = 0,
) -> np.ndarray:
    """Segment of the last window of the user that ended at or before ``t``.

    Args:
        code, t_ms: (N,) queries.
        seg_code, seg_window_end_ms, seg_value: (S,) segment rows, any order;
            ``seg_code`` -1 for users not among the queries' users.
            ``seg_value`` may be any per-window column (e.g. ``corr``).
        fill: the value where the user has no ended window.
    Returns:
        (N,) of ``seg_value``'s dtype; ``fill`` (0: passive) where the user has
        no ended window.
    """
    out = np.full(len(code), fill, dtype=np.asarray(seg_value).dtype)
    keep = seg_code >= 0
    if len(code) == 0 or not keep.any():
        return out
    sc, se, sv = seg_code[keep], seg_window_end_ms[keep], seg_value[keep]
    base = min(int(se.min()), int(t_ms.min()))
    span = max(int(se.max()), int(t_ms.max())) - base + 1
    keys = sc * span + (se - base)
    order = np.argsort(keys, kind="stable")
    keys, sv, sc = keys[order], sv[order], sc[order]
    pos = np.searchsorted(keys, code * span + (t_ms - base), side="right") - 1
    ok = (pos >= 0) & (sc[np.maximum(pos, 0)] == code)
    out[ok] = sv[pos[ok]]
    return out


def build_samples(
    impressions: Arrays,
    conversions: Arrays,
    history: dict[str, Arrays],
    segments: Arrays,
    cfg: SampleConfig,
) -> Arrays:
    """Samples of a set of complete users (all arrays of valid rows, any order).

    Args:
        impressions: ``user_id``, ``ts_ms``, the candidate attributes (and
            ``dwell_ms``, unused for the candidate: it is not known at request
            time).
        conversions: ``user_id``, ``ts_ms``, ``ad_id``.
        history: per source of :data:`HISTORY_SOURCES` present, ``user_id``,
            ``ts_ms`` and its attributes (``conversions`` may be passed here too).
        segments: ``user_id``, ``window_end_ms``, ``segment`` of the segment table.
        cfg: lengths and intervals.

    Returns:
        ``user_id``, ``t_ms``, ``label`` (float32), ``segment`` (int8), ``cand.<attr>``
        (N,), and per source ``<src>.<attr>`` (N, L), ``<src>.ts_ms`` (N, L),
        ``<src>.mask`` (N, L) bool. Rows are sorted by (user, t).
    """
    buffer_ms, horizon_ms = cfg.buffer_s * 1000, cfg.horizon_s * 1000
    imp_user = np.asarray(impressions["user_id"], dtype=np.int64)
    uniques = pd.Index(pd.unique(imp_user))
    code = _codes(imp_user, uniques)
    t_ms = np.asarray(impressions["ts_ms"], dtype=np.int64)
    order = np.lexsort((t_ms, imp_user))  # by (user_id, t)
    code, t_ms = code[order], t_ms[order]
    out: Arrays = {"user_id": imp_user[order], "t_ms": t_ms}

    # label: a conversion of the user on the same ad in [t - buffer, t + horizon]
    ad = np.asarray(impressions["ad_id"], dtype=np.int64)[order]
    conv_code = _codes(conversions["user_id"], uniques)
    conv_ad = np.asarray(conversions["ad_id"], dtype=np.int64)
    has = conv_code >= 0
    pair_imp, pair_uniques = pd.factorize(
        pd.MultiIndex.from_arrays([code, ad]), sort=False
    )
    pair_conv = pd.MultiIndex.from_arrays([conv_code[has], conv_ad[has]])
    pair_conv_code = pd.Index(pair_uniques).get_indexer(pair_conv).astype(np.int64)
    hit = pair_conv_code >= 0
    out["label"] = _near_mask(
        pair_imp.astype(np.int64),
        t_ms,
        pair_conv_code[hit],
        np.asarray(conversions["ts_ms"], dtype=np.int64)[has][hit],
        buffer_ms,
        horizon_ms,
    ).astype(np.float32)

    out["segment"] = segment_at(
        code,
        t_ms,
        _codes(segments["user_id"], uniques),
        np.asarray(segments["window_end_ms"], dtype=np.int64),
        np.asarray(segments["segment"], dtype=np.int8),
    )
    for attr in CANDIDATE_ATTRIBUTES:
        if attr in impressions:
            out[f"cand.{attr}"] = np.asarray(impressions[attr])[order]

    L = cfg.max_seq_len
    for src, attrs in HISTORY_SOURCES.items():
        if src not in history:
            continue
        ev = history[src]
        ev_code = _codes(ev["user_id"], uniques)
        ev_ts = np.asarray(ev["ts_ms"], dtype=np.int64)
        keep = np.flatnonzero(ev_code >= 0)
        ev_order = keep[np.lexsort((ev_ts[keep], ev_code[keep]))]
        idx = history_index(
            code, t_ms - buffer_ms, ev_code[ev_order], ev_ts[ev_order], L
        )
        mask = idx >= 0
        safe = np.where(mask, idx, 0)
        out[f"{src}.mask"] = mask
        sorted_ts = ev_ts[ev_order]
        out[f"{src}.ts_ms"] = np.where(
            mask, sorted_ts[safe] if len(sorted_ts) else 0, 0
        )
        for attr in attrs:
            if attr not in ev:
                continue
            col = np.asarray(ev[attr])[ev_order]
            if attr == "dwell_ms":
                vals = np.log1p(col[safe]).astype(np.float32) if len(col) else 0.0
                out[f"{src}.dwell"] = np.where(mask, vals, 0.0).astype(np.float32)
            else:
                vals = col[safe] if len(col) else 0
                out[f"{src}.{attr}"] = np.where(mask, vals, 0).astype(np.int64)
    return out


def time_split(t_ms: np.ndarray, last_day_start_ms: int) -> np.ndarray:
    """True for evaluation rows: ``t`` on or after the start of the held-out days
    (train on earlier days, evaluate on the last; never a random row split)."""
    return np.asarray(t_ms) >= last_day_start_ms


def reference_samples(
    impressions: Arrays,
    conversions: Arrays,
    history: dict[str, Arrays],
    segments: Arrays,
    cfg: SampleConfig,
) -> list[dict]:
    """The per-sample loop :func:`build_samples` must equal (rows sorted by
    (user, t), as the kernel returns them)."""
    buffer_ms, horizon_ms = cfg.buffer_s * 1000, cfg.horizon_s * 1000
    rows = sorted(
        zip(
            impressions["user_id"].tolist(),
            impressions["ts_ms"].tolist(),
            impressions["ad_id"].tolist(),
            strict=True,
        ),
        key=lambda r: (r[0], r[1]),
    )
    out = []
    for u, t, ad in rows:
        label = any(
            cu == u and ca == ad and t - buffer_ms <= ct <= t + horizon_ms
            for cu, ct, ca in zip(
                conversions["user_id"].tolist(),
                conversions["ts_ms"].tolist(),
                conversions["ad_id"].tolist(),
                strict=True,
            )
        )
        ended = [
            (we, s)
            for su, we, s in zip(
                segments["user_id"].tolist(),
                segments["window_end_ms"].tolist(),
                segments["segment"].tolist(),
                strict=True,
            )
            if su == u and we <= t
        ]
        seg = max(ended)[1] if ended else 0
        hist = {}
        for src, ev in history.items():
            times = sorted(
                et
                for eu, et in zip(
                    ev["user_id"].tolist(), ev["ts_ms"].tolist(), strict=True
                )
                if eu == u and et < t - buffer_ms
            )
            hist[src] = times[-cfg.max_seq_len :]
        out.append(
            {
                "user_id": u,
                "t_ms": t,
                "label": float(label),
                "segment": seg,
                "hist_ts": hist,
            }
        )
    return out


# ---------------------------------------------------------------- Ray Data shell


def _read_bucket(
    fs: Any, paths: list[str], source: str, bucket: int, num_buckets: int
) -> dict[str, np.ndarray]:
    """Valid rows of ``source`` whose user falls in ``bucket``: its columns
    and the optional ``country``."""
    from dynamix_ray.schema import validate

    parts = []
    for p in paths:
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh)
        v = validate(
            table, SOURCES[source], p, [*SOURCES[source].attributes, "country"]
        )
        keep = user_bucket(v.valid.column("user_id").to_numpy(), num_buckets) == bucket
        parts.append(v.valid.filter(pa.array(keep)))
    if not parts:
        return {}
    table = pa.concat_tables(parts, promote_options="permissive")
    return {
        c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names
    }


def read_bucket_events(
    fs: Any, files: dict[str, list[str]], bucket: int, num_buckets: int, bucketed: bool
) -> dict[str, dict[str, np.ndarray]]:
    """Valid rows of every source for the users of one bucket (a bucketed layout
    reads only that bucket's files; a plain one reads all and filters)."""
    from dynamix_ray.io import group_by_bucket

    ev = {}
    for src, paths in files.items():
        if bucketed:
            paths = group_by_bucket(paths).get(bucket, [])
        ev[src] = _read_bucket(fs, paths, src, bucket, num_buckets)
    return ev


def _bucket_samples(
    batch: dict[str, np.ndarray],
    url: str,
    files: dict[str, list[str]],
    segments: dict[str, np.ndarray],
    num_buckets: int,
    bucketed: bool,
    cfg: SampleConfig,
) -> dict[str, np.ndarray]:
    """Ray Data map: the samples of one user bucket (SPEC §6)."""
    fs, _ = resolve(url)
    out = []
    for bucket in batch["bucket"].tolist():
        ev = read_bucket_events(fs, files, bucket, num_buckets, bucketed)
        if not ev.get("ad_impressions"):
            continue
        seg_keep = user_bucket(segments["user_id"], num_buckets) == bucket
        history = {s: ev[s] for s in HISTORY_SOURCES if ev.get(s)}
        out.append(
            build_samples(
                ev["ad_impressions"],
                ev.get("conversions") or _NO_CONVERSIONS,
                history,
                {k: v[seg_keep] for k, v in segments.items()},
                cfg,
            )
        )
    if not out:
        return {}
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


_NO_CONVERSIONS = {
    "user_id": np.zeros(0, np.int64),
    "ts_ms": np.zeros(0, np.int64),
    "ad_id": np.zeros(0, np.int64),
}


def read_segment_rows(segments_url: str) -> dict[str, np.ndarray]:
    """``user_id``, ``window_end_ms``, ``segment`` of a committed segment table."""
    from dynamix_ray.segments.pipeline import read_segments

    return segment_rows(read_segments(segments_url))


def segment_rows(t: pa.Table) -> dict[str, np.ndarray]:
    """``user_id``, ``window_end_ms``, ``segment`` of a segment table."""
    return {
        "user_id": t.column("user_id").to_numpy(),
        "window_end_ms": t.column("window_end").cast(pa.int64()).to_numpy(),
        "segment": t.column("segment").to_numpy(),
    }


#: Ad impressions (= samples) per user bucket of a plain (unbucketed) input:
#: blocks small enough to stream and to shuffle between.
SAMPLES_PER_BUCKET = 20_000


def default_sample_buckets(impressions: int) -> int:
    """User buckets of a plain input: at least one per CPU, about
    :data:`SAMPLES_PER_BUCKET` samples each."""
    from dynamix_ray.runtime import cluster_cpus

    return max(cluster_cpus(), -(-impressions // SAMPLES_PER_BUCKET))


def sample_dataset(
    events_url: str,
    segments_url: str,
    cfg: SampleConfig | None = None,
    num_buckets: int | None = None,
) -> Any:
    """A Ray Dataset of training samples, one Ray Data task per user bucket.

    Bucketed inputs (``generate --bucketed``) are read bucket by bucket; plain
    inputs are read by every bucket task and filtered to its users (fine for
    small data; bucket large inputs first).

    Returns:
        The (unmaterialised) dataset with the columns of :func:`build_samples`.
    """
    import ray

    from dynamix_ray.io import discover
    from dynamix_ray.runtime import ensure_ray

    cfg = cfg or SampleConfig()
    ensure_ray()
    ds = discover(events_url, list(HISTORY_SOURCES_ALL), required=["ad_impressions"])
    bucketed = ds.num_buckets is not None
    n = (
        ds.num_buckets
        if bucketed
        else (num_buckets or default_sample_buckets(ds.rows["ad_impressions"]))
    )
    assert n is not None
    segments = read_segment_rows(segments_url)
    return ray.data.from_items(
        [{"bucket": b} for b in range(n)], override_num_blocks=n
    ).map_batches(
        cast(Any, _bucket_samples),
        fn_args=(ds.url, ds.files, segments, n, bucketed, cfg),
        batch_size=1,
        batch_format="numpy",
    )


def eval_boundary_ms(t_ms: np.ndarray, eval_days: int) -> int:
    """UTC midnight starting the last ``eval_days`` *full* days of ``t_ms``.

    A last day holding under half the median rows per day (events spilling past
    midnight after the data's last day) is not a day to evaluate on.
    """
    day = np.asarray(t_ms) // 86_400_000
    first = int(day.min())
    counts = np.bincount(day - first)
    full = np.flatnonzero(counts >= 0.5 * np.median(counts[counts > 0]))
    last_full = first + int(full.max())
    return (last_full - eval_days + 1) * 86_400_000
