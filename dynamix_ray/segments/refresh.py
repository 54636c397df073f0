"""``dynamix segment --incremental``: fold new event files into the published
segment table (docs/data-path.md, "Incremental refresh").

Flow (a refresh of ``OUT`` written by ``dynamix segment EVENTS OUT``):

1. **new files**: the input files the event store ``OUT/events`` does not hold
   yet (its file manifest, ``events.new_input_files``) are bucketed, with the
   same shuffle, into a delta part of the store (``events.append_delta``);
2. **touched groups**: per bucket, the (user, window) groups the new events
   can change: the window of each new impression, and for each new conversion
   at ``c`` the windows of ``[c - horizon, c + buffer]``, where the
   impressions it can turn near lie (docs/contract.md §2 step 2);
3. **recompute**: those groups' partial statistics from all their users'
   events (old parts and new), by the same kernel (``stats.compute_stats``);
   every other row of ``OUT/stats/`` is kept as it was. Only the touched rows
   are finalised again, with the published table's epsilon;
4. **publish**: a new version of ``segments`` and ``stats`` (``io.publish``)
   whose ``_meta.json`` names the store parts it holds (``store_parts``).

The result equals a full run with that epsilon on all the events
(tests/test_refresh.py). A refresh that dies after step 1 is finished by the
next one: the parts the table does not hold yet are what it folds in.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.config import SegmentConfig, format_duration
from dynamix_ray.events import (
    EventStore,
    append_delta,
    new_input_files,
    open_store,
)
from dynamix_ray.io import (
    discover,
    fingerprint,
    is_process_local,
    publish,
    resolve,
    url_of,
    version_folder,
    write_json,
)
from dynamix_ray.runtime import ensure_ray, map_items
from dynamix_ray.schema import SOURCES
from dynamix_ray.segments.pipeline import (
    ACTIVE_COUNTS,
    BUCKET_COUNTS,
    SEGMENT_SCHEMA,
    STAT_SOURCES,
    SegmentResult,
    active_counts,
    bucket_counts,
    bucket_path,
    read_segments_meta,
    run_segment,
    segment_table,
    shares,
    stat_column,
    write_table,
)
from dynamix_ray.segments.stats import (
    STAT_COLUMNS,
    Stats,
    compute_stats,
    empty_stats,
    window_origin_ms,
)

__all__ = [
    "read_table_or_none",
    "stats_of",
    "table_config",
    "REFRESH_PARAMS",
    "Fold",
    "table_counts",
    "fold",
    "run_refresh",
    "touched_groups",
]

log = logging.getLogger(__name__)

#: The statistic's parameters a refresh must share with the published table
#: (epsilon is the table's own: see :func:`run_refresh`).
REFRESH_PARAMS = (
    "window_s",
    "buffer_s",
    "horizon_s",
    "min_dwell_ms",
    "max_dwell_ms",
    "min_events",
)

_COUNTS = BUCKET_COUNTS + ACTIVE_COUNTS


def table_config(meta: dict[str, Any]) -> SegmentConfig:
    """The statistic's settings of a published table (its ``_meta.json``),
    with the table's epsilon."""
    params = {k: meta["params"][k] for k in REFRESH_PARAMS}
    return SegmentConfig(**params, epsilon=float(meta["epsilon"]))


def touched_groups(
    imp_user: np.ndarray,
    imp_ts: np.ndarray,
    conv_user: np.ndarray,
    conv_ts: np.ndarray,
    cfg: SegmentConfig,
    origin_ms: int,
) -> pd.MultiIndex:
    """The (user, window start) groups whose statistics new impressions and
    new conversions can change: each impression's window, and each
    conversion's windows of ``[c - horizon, c + buffer]`` (the impressions it
    makes near)."""
    w = cfg.window_ms

    def start(ts: np.ndarray) -> np.ndarray:
        return origin_ms + (ts - origin_ms) // w * w

    users, starts = [imp_user], [start(imp_ts)]
    if len(conv_ts):
        lo = start(conv_ts - int(cfg.horizon_s * 1000))
        hi = start(conv_ts + int(cfg.buffer_s * 1000))
        for k in range(int((hi - lo).max()) // w + 1):
            s = lo + k * w
            ok = s <= hi
            users.append(conv_user[ok])
            starts.append(s[ok])
    keys = pd.MultiIndex.from_arrays(
        [np.concatenate(users).astype(np.int64), np.concatenate(starts)]
    )
    return keys.unique()


def _keys(user: np.ndarray, start_ms: np.ndarray) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([user.astype(np.int64), start_ms.astype(np.int64)])


def read_table_or_none(fs: Any, path: str) -> pa.Table | None:
    """The Parquet table at ``path``, or ``None`` when there is none."""
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def stats_of(table: pa.Table | None) -> Stats:
    """A ``stats`` table's columns (none: no group)."""
    if table is None:
        return empty_stats()
    return {c: table.column(c).to_numpy() for c in STAT_COLUMNS}


def _take(stats: Stats, rows: np.ndarray) -> Stats:
    return {c: v[rows] for c, v in stats.items()}


def _concat(*parts: Stats) -> Stats:
    return {c: np.concatenate([p[c] for p in parts]) for c in STAT_COLUMNS}


def table_counts(stats: Stats, cfg: SegmentConfig, epsilon: float) -> dict[str, int]:
    """One bucket's share of the table's counts at ``epsilon``:
    ``pipeline.bucket_counts`` and ``pipeline.active_counts``."""
    return {
        **bucket_counts(stats, cfg.min_events),
        **active_counts(stats, cfg.min_events, epsilon),
    }


@dataclass(frozen=True)
class Fold:
    """:func:`fold`'s answer for one bucket."""

    stats: Stats  # the bucket's partial statistics after the new events
    fresh: Stats  # those of the touched groups, recomputed
    touched: pd.MultiIndex  # (user, window start) of the touched groups
    events_read: int  # events the recompute ran over


def fold(
    events: dict[str, pa.Table],
    new: dict[str, pa.Table],
    old_stats: Stats,
    cfg: SegmentConfig,
    origin_ms: int,
) -> Fold:
    """New events into one bucket's partial statistics (plain; the refresh's
    and the streaming updater's one rule).

    Args:
        events: every event of the bucket, old and new, as ``read_bucket``
            answers for :data:`pipeline.STAT_SOURCES` (any order).
        new: the new events alone (the same form).
        old_stats: the bucket's statistics before them.
    """
    imp_u = stat_column(new, "ad_impressions", "user_id", np.int64)
    conv_u = stat_column(new, "conversions", "user_id", np.int64)
    touched = touched_groups(
        imp_u,
        stat_column(new, "ad_impressions", "ts", np.int64),
        conv_u,
        stat_column(new, "conversions", "ts", np.int64),
        cfg,
        origin_ms,
    )
    users = np.unique(touched.get_level_values(0).to_numpy())
    cols: dict[str, np.ndarray] = {}
    for src, names in (
        ("ad_impressions", ("user_id", "ts", "dwell_ms")),
        ("conversions", ("user_id", "ts")),
    ):
        mine = np.isin(stat_column(events, src, "user_id", np.int64), users)
        for name in names:
            dtype = np.float64 if name == "dwell_ms" else np.int64
            cols[f"{src}.{name}"] = stat_column(events, src, name, dtype)[mine]
    iu, it = cols["ad_impressions.user_id"], cols["ad_impressions.ts"]
    start = origin_ms + (it - origin_ms) // cfg.window_ms * cfg.window_ms
    in_touched = _keys(iu, start).isin(touched)
    fresh = compute_stats(
        iu[in_touched],
        it[in_touched],
        cols["ad_impressions.dwell_ms"][in_touched],
        cols["conversions.user_id"],
        cols["conversions.ts"],
        cfg,
        origin_ms,
    )
    stay = ~_keys(old_stats["user_id"], old_stats["window_start_ms"]).isin(touched)
    stats = _concat(_take(old_stats, np.flatnonzero(stay)), fresh)
    read = int(in_touched.sum() + len(cols["conversions.ts"]))
    return Fold(stats, fresh, touched, read)


def _refresh_task(
    item: dict[str, Any],
    store: EventStore,
    done: list[int],
    pending: list[int],
    folders: dict[str, str],
    cfg: SegmentConfig,
    origin_ms: int,
    epsilon: float,
) -> dict[str, Any]:
    """One bucket: recompute its touched groups, keep the rest; write its
    ``stats`` and ``segments`` files in the new version; return the change of
    its counts and how much it touched."""
    b = item["bucket"]
    fs, _ = resolve(folders["new_stats"])
    paths = {
        k: bucket_path(resolve(folders[k])[1], b)
        for k in ("old_stats", "old_segments", "new_stats", "new_segments")
    }
    new = store.read_bucket(b, dict(STAT_SOURCES), parts=pending, ordered=False)
    imp_u = stat_column(new, "ad_impressions", "user_id", np.int64)
    conv_u = stat_column(new, "conversions", "user_id", np.int64)
    if len(imp_u) == 0 and len(conv_u) == 0:
        for src, dst in (("old_stats", "new_stats"), ("old_segments", "new_segments")):
            if fs.exists(paths[src]):
                fs.makedirs(posixpath.dirname(paths[dst]), exist_ok=True)
                fs.copy(paths[src], paths[dst])
        return {"delta": dict.fromkeys(_COUNTS, 0), "groups": 0, "events_read": 0}

    ev = store.read_bucket(
        b, dict(STAT_SOURCES), parts=[*done, *pending], ordered=False
    )
    old = stats_of(read_table_or_none(fs, paths["old_stats"]))
    f = fold(ev, new, old, cfg, origin_ms)
    touched, fresh, stats = f.touched, f.fresh, f.stats
    write_table(fs, paths["new_stats"], pa.table(stats))

    old_seg = read_table_or_none(fs, paths["old_segments"])
    fresh_seg = segment_table(fresh, cfg, epsilon)
    if old_seg is not None:
        old_seg = old_seg.cast(SEGMENT_SCHEMA)
        start_ms = old_seg.column("window_start").cast(pa.int64()).to_numpy()
        keep = ~_keys(old_seg.column("user_id").to_numpy(), start_ms).isin(touched)
        fresh_seg = pa.concat_tables([old_seg.filter(pa.array(keep)), fresh_seg])
    write_table(fs, paths["new_segments"], fresh_seg)

    before, after = table_counts(old, cfg, epsilon), table_counts(stats, cfg, epsilon)
    return {
        "delta": {k: after[k] - before[k] for k in _COUNTS},
        "groups": len(touched),
        "events_read": f.events_read,
    }


def _check_params(prev: dict[str, Any], cfg: SegmentConfig, out_url: str) -> None:
    """Raises ValueError when ``cfg`` asks for other statistic parameters, or
    another epsilon, than the published table was made with."""
    params = prev["params"]
    missing = [k for k in _COUNTS if k not in prev["counts"]]
    if missing:
        raise ValueError(
            f"{out_url}: the published table predates the counts {missing} "
            "(ad traffic per segment); run `dynamix segment` without "
            "--incremental once"
        )
    differ = [k for k in REFRESH_PARAMS if params.get(k) != getattr(cfg, k)]
    if cfg.epsilon is not None and cfg.epsilon != prev["epsilon"]:
        differ.append("epsilon")
    if cfg.active_traffic is not None and cfg.active_traffic != params.get(
        "active_traffic"
    ):
        differ.append("active_traffic")
    if cfg.num_buckets is not None and cfg.num_buckets != prev["num_buckets"]:
        differ.append("num_buckets")
    if differ:
        raise ValueError(
            f"{out_url}: the published table was made with other "
            f"{', '.join(differ)} ({', '.join(f'{k}={params.get(k, prev.get(k))}' for k in differ)}); "
            "a refresh keeps the table's settings: pass the same ones, or run "
            "`dynamix segment` without --incremental"
        )


def run_refresh(
    events_url: str,
    out_url: str,
    cfg: SegmentConfig | None = None,
    *,
    progress: bool = True,
) -> SegmentResult:
    """Fold the files added under ``events_url`` since the published table of
    ``out_url`` was made into a new version of it (module docstring).

    With nothing published at ``out_url`` this is :func:`run_segment`. The
    table keeps its epsilon (``cfg.epsilon`` must be ``None`` or equal); a full
    ``run_segment`` calibrates it again. When nothing is new the published
    version stays (``meta["refresh"]["up_to_date"]``).

    Raises:
        ValueError: ``events_url`` is an event store (a refresh reads a
            docs/contract.md §1 dataset root whose files are added to), other
            statistic parameters than the table's, a file the store holds has
            changed, or new events before a window grid that does not divide
            a day.
    """
    cfg = cfg or SegmentConfig()
    t0 = time.perf_counter()
    say = log.info if progress else log.debug
    try:
        prev = read_segments_meta(out_url)
    except FileNotFoundError:
        say("segment: nothing published at %s; a full run", out_url)
        return run_segment(events_url, out_url, cfg, progress=progress)
    _check_params(prev, cfg, out_url)
    if open_store(events_url) is not None:
        raise ValueError(
            f"{events_url} is an event store: a refresh adds the new files of a "
            "docs/contract.md §1 dataset root; segment that root"
        )
    store = open_store(prev["store"])
    if store is None:
        raise FileNotFoundError(f"{prev['store']}: the table's event store is gone")
    out_fs, out_root = resolve(out_url)
    if not is_process_local(out_fs):
        ensure_ray()
    ds = discover(events_url, list(SOURCES), required=["ad_impressions"])
    new_files = new_input_files(store, ds)
    phases: dict[str, float] = {}
    t_phase = time.perf_counter()
    held = list(prev.get("store_parts") or store.part_ids[:1])
    done = store.parts_named(held)  # ValueError when the store was rebuilt
    if new_files:
        store = append_delta(
            store, events_url, new_files, fingerprint(ds), progress=progress
        )
    phases["store"] = time.perf_counter() - t_phase
    pending = [
        p for i, p in zip(store.part_ids, store.parts, strict=True) if i not in held
    ]
    refresh: dict[str, Any] = {
        "from_version": prev["table_version"],
        "new_files": sum(len(f) for f in new_files.values()),
        "parts_folded": pending,
        "part_ids_folded": [
            i for i, p in zip(store.part_ids, store.parts, strict=True) if p in pending
        ],
    }
    if not pending:
        say("segment: %s is up to date with %s", out_url, events_url)
        meta = {**prev, "refresh": {**refresh, "up_to_date": True}}
        return SegmentResult(out_url, meta)
    origin = window_origin_ms(cfg, store.meta["sources"]["ad_impressions"]["ts_min_ms"])
    if origin != prev["params"]["window_origin_ms"]:
        raise ValueError(
            f"{events_url}: new events before the table's first day move the "
            f"{format_duration(cfg.window_s)} window grid (it does not divide a "
            "day); run `dynamix segment` without --incremental"
        )
    epsilon = float(prev["epsilon"])
    store_fs, _ = resolve(store.url)
    local = is_process_local(store_fs) or is_process_local(out_fs)
    old_stats = version_folder(out_fs, out_root, "stats", prev["table_version"])
    if not out_fs.exists(old_stats):
        raise FileNotFoundError(
            f"{url_of(out_fs, old_stats)}: the statistics of the published "
            "table are gone; run `dynamix segment` without --incremental"
        )
    # stats first, as run_segment does: the segments pointer goes up last
    with publish(out_fs, out_root, ["stats", "segments"]) as version:
        folders = {
            f"old_{t}": url_of(
                out_fs, version_folder(out_fs, out_root, t, prev["table_version"])
            )
            for t in ("segments", "stats")
        }
        folders.update(
            {f"new_{t}": url_of(out_fs, version.path(t)) for t in ("segments", "stats")}
        )
        t_phase = time.perf_counter()
        counts: dict[str, Any] = {k: int(prev["counts"][k]) for k in _COUNTS}
        groups = events_read = touched_buckets = 0
        task_stats: dict[str, float] = {}
        for r in map_items(
            _refresh_task,
            store.bucket_items(),
            (store, done, pending, folders, cfg, origin, epsilon),
            local=local,
            name="segment: refresh",
            progress=progress,
            stats=task_stats,
        ):
            for k in _COUNTS:
                counts[k] += r["delta"][k]
            groups += r["groups"]
            events_read += r["events_read"]
            touched_buckets += bool(r["groups"])
        phases["refresh"] = time.perf_counter() - t_phase
        phases["refresh_tasks"] = task_stats.get("task_s", 0.0)
        rejected = store.rejected(STAT_SOURCES)
        counts.update(
            conversions=store.rows("conversions"),
            rejected=rejected,
            rejected_total=int(sum(rejected.values())),
            **shares(counts),
        )
        source = prev["epsilon_source"]
        if not source.startswith("kept"):
            source = f"kept from version {prev['table_version']} ({source})"
        meta = {
            **{k: v for k, v in prev.items() if k != "table_version"},
            "input_fingerprint": store.meta["input_fingerprint"],
            "store_fingerprint": store.fingerprint,
            "store_parts": list(store.part_ids),
            "epsilon_source": source,
            "counts": counts,
            "phase_s": phases,
            "refresh": {
                **refresh,
                "touched_buckets": touched_buckets,
                "touched_groups": groups,
                "events_read": events_read,
                "up_to_date": False,
            },
            "wall_s": time.perf_counter() - t0,
        }
        write_json(out_fs, f"{version.path('segments')}/_meta.json", meta)
    say(
        "segment: refreshed %d of %d buckets (%d groups) in %.1f s",
        touched_buckets,
        store.num_buckets,
        groups,
        meta["wall_s"],
    )
    return SegmentResult(out_url, {**meta, "table_version": version.version})
