"""``dynamix segment``: the statistic on Ray Data, one task per user bucket
(docs/contract.md §2–3; docs/data-path.md, "Segments per bucket").

Flow (each pass a Ray Data task per bucket of the event store, the logic in
``stats.py``; nothing per row or per user reaches the driver):

1. **the store** (``events.py``): the input itself when it is an event store
   (``dynamix bucket``), else one built at ``OUT/events/`` (reused by a later
   run or by ``dynamix train`` on the same input);
2. **statistics**: per bucket, the kernel over its users' impressions and
   conversions; the partial statistics ``(n, mean, m2)`` per (user, window)
   are written to ``OUT/stats/bucket=K/`` (mergeable: ``stats.merge_stats``)
   and the task returns counts only;
3. **epsilon**: given, or calibrated exactly as :func:`epsilon.calibrate_epsilon`
   would on every eligible row (or :func:`epsilon.calibrate_epsilon_traffic`
   on every eligible row's impressions, ``--active-traffic``), but by a few passes of small questions over
   the buckets' statistics (``select.py``: histograms refined to the exact
   rank), so that no ``|corr|`` array is ever gathered;
4. **finalize**: per bucket, the docs/contract.md §3 columns into
   ``OUT/segments/bucket=K/part-0.parquet``; the sample builder joins them
   bucket by bucket.

``segments/`` (with its ``_meta.json``) and ``stats/`` are versioned tables
(``io.publish``): each run writes ``OUT/segments/<version>/``, and the pointer
``OUT/segments/_CURRENT.json``, put last, publishes it (docs/serving.md,
"Versioned tables"). ``memory://`` lives in one process: there every pass
runs in the driver, the same code.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray import __version__
from dynamix_ray.config import SegmentConfig, format_duration
from dynamix_ray.events import EventStore, ensure_store
from dynamix_ray.io import (
    check_complete,
    is_process_local,
    publish,
    published_version,
    read_json,
    resolve,
    url_of,
    version_folder,
    write_json,
    write_parquet,
)
from dynamix_ray.runtime import ensure_ray, map_items
from dynamix_ray.segments import select
from dynamix_ray.segments.epsilon import traffic_fraction
from dynamix_ray.segments.stats import (
    STAT_COLUMNS,
    compute_stats,
    finalize,
    window_origin_ms,
)

__all__ = [
    "ACTIVE_COUNTS",
    "BUCKET_COUNTS",
    "SEGMENT_SCHEMA",
    "STAT_SOURCES",
    "SegmentResult",
    "abs_corr",
    "active_counts",
    "bucket_counts",
    "calibration_values",
    "bucket_path",
    "read_segment_bucket",
    "read_segments",
    "read_segments_meta",
    "segments_pointer",
    "run_segment",
    "row_impressions",
    "segment_table",
    "shares",
    "stat_column",
    "write_table",
]

log = logging.getLogger(__name__)

_TS = pa.timestamp("ms", tz="UTC")
SEGMENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("window_start", _TS),
        ("window_end", _TS),
        ("n_near", pa.int64()),
        ("n_far", pa.int64()),
        ("mean_near", pa.float64()),
        ("mean_far", pa.float64()),
        ("var_near", pa.float64()),
        ("var_far", pa.float64()),
        ("corr", pa.float64()),
        ("w_mle", pa.float64()),
        ("segment", pa.int8()),
    ]
)


@dataclass
class SegmentResult:
    """What a run wrote and counted (also in ``segments/_meta.json``)."""

    out: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def segments_path(self) -> str:
        return f"{self.out.rstrip('/')}/segments"

    def summary(self) -> str:
        m, c = self.meta, self.meta["counts"]
        rej = ", ".join(f"{k}={v}" for k, v in sorted(c["rejected"].items())) or "none"
        lines = [
            "dynamix segment: done",
            f"  input          {m['input']} (fingerprint {m['input_fingerprint']})",
            f"  event store    {m['store']} ({m['mode']}, {m['num_buckets']} buckets)",
            f"  impressions    {c['impressions']:,} valid, {c['filtered']:,} "
            "filtered by dwell bounds",
            f"  conversions    {c['conversions']:,} valid",
            f"  rejected rows  {c['rejected_total']:,} ({rej})",
            f"  rows           {c['rows']:,} (user, window) rows, {c['users']:,} users",
            f"  eligible       {c['eligible']:,} rows with non-null corr",
            f"  epsilon        {m['epsilon']:.6g} ({m['epsilon_source']})",
            f"  active share   {c['active_share_eligible']:.4f} of eligible rows, "
            f"{c['active_share_rows']:.4f} of all rows, "
            f"{c['active_share_traffic']:.4f} of ad traffic "
            f"({c['eligible_share_traffic']:.4f} of traffic is eligible)",
            f"  wall time      {m['wall_s']:.1f} s",
            f"  output         {self.segments_path}",
        ]
        r = m.get("refresh")
        if r and r["up_to_date"]:
            lines[0] = "dynamix segment --incremental: up to date (no new file)"
        elif r:
            lines[0] = "dynamix segment --incremental: done"
            lines.insert(
                1,
                f"  refresh        {r['new_files']} new file(s); store part(s) "
                f"{', '.join(map(str, r['parts_folded']))} folded on top of version "
                f"{r['from_version']}: {r['touched_groups']:,} (user, window) "
                f"groups recomputed in {r['touched_buckets']} of {m['num_buckets']} "
                f"buckets ({r['events_read']:,} events read)",
            )
        return "\n".join(lines)


# ------------------------------------------------------------ per-bucket tasks

Columns = dict[str, np.ndarray]
#: The two sources the statistic reads, and their columns.
STAT_SOURCES = {
    "ad_impressions": ["user_id", "ts", "dwell_ms"],
    "conversions": ["user_id", "ts"],
}


#: How ``stats`` and ``segments`` files are written: lz4 without dictionary
#: pages (their columns are mostly distinct floats and ids; a dictionary
#: attempt was half the write time) wrote them 2.4x faster than zstd, at
#: 1.1x the bytes (benchmarks/refresh.py's data, docs/data-path.md).
TABLE_WRITE = {"compression": "lz4", "use_dictionary": False}


def write_table(fs: Any, path: str, table: pa.Table) -> None:
    """One bucket's ``stats`` or ``segments`` file (:data:`TABLE_WRITE`)."""
    write_parquet(fs, path, table, **TABLE_WRITE)  # type: ignore[arg-type]


def bucket_path(folder: str, bucket: int) -> str:
    """``FOLDER/bucket=KKKKK/part-0.parquet`` (in a version of ``segments`` or
    ``stats``)."""
    return f"{folder}/bucket={bucket:05d}/part-0.parquet"


def stat_column(
    tables: dict[str, pa.Table], src: str, col: str, dtype: Any
) -> np.ndarray:
    """Column ``col`` of source ``src`` of a ``read_bucket`` answer, as
    ``dtype`` (empty when the bucket has no row of ``src``)."""
    t = tables.get(src)
    if t is None:
        return np.zeros(0, dtype)
    return t.column(col).to_numpy().astype(dtype, copy=False)


def abs_corr(stats: Columns, min_events: int) -> np.ndarray:
    """``|corr|`` of the eligible rows, the same float operation as
    ``finalize``'s corr, so that segments can be counted from it exactly."""
    ok = _eligible(stats, min_events)
    return np.abs(stats["mean_near"][ok] - stats["mean_far"][ok])


def _eligible(stats: Columns, min_events: int) -> np.ndarray:
    """(S,) rows with the near and far impressions a ``corr`` needs."""
    return (stats["n_near"] >= min_events) & (stats["n_far"] >= min_events)


def row_impressions(stats: Columns) -> np.ndarray:
    """(S,) every valid ad impression of each row, kept or filtered by the
    dwell bounds: the row's ad *traffic*."""
    return np.asarray(stats["n_near"] + stats["n_far"] + stats["n_filtered"], np.int64)


def calibration_values(
    stats: Columns, cfg: SegmentConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """What one bucket gives the epsilon search (``select.answer``'s values
    and counts): the eligible rows' ``|corr|``, each counted once per row, or
    once per impression when calibrating to a share of traffic."""
    values = abs_corr(stats, cfg.min_events)
    if cfg.active_traffic is None:
        return values, None
    return values, row_impressions(stats)[_eligible(stats, cfg.min_events)]


def bucket_counts(stats: Columns, min_events: int) -> dict[str, int]:
    """One bucket's share of the table's counts (``_meta.json`` ``counts``):
    rows with a kept impression, eligible rows, impressions (all and of
    eligible rows), filtered ones and users (users never span buckets: the
    sum over buckets is exact)."""
    kept = (stats["n_near"] + stats["n_far"]) > 0
    imps = row_impressions(stats)
    return {
        "rows": int(kept.sum()),
        "eligible": len(abs_corr(stats, min_events)),
        "impressions": int(imps.sum()),
        "eligible_impressions": int(imps[_eligible(stats, min_events)].sum()),
        "filtered": int(stats["n_filtered"].sum()),
        "users": len(np.unique(stats["user_id"][kept])),
    }


#: The keys of :func:`bucket_counts` and of :func:`active_counts`: the
#: table's additive counts (``_meta.json`` ``counts``), summed over buckets.
BUCKET_COUNTS = (
    "rows",
    "eligible",
    "impressions",
    "eligible_impressions",
    "filtered",
    "users",
)
ACTIVE_COUNTS = ("active_rows", "active_impressions")


def active_counts(stats: Columns, min_events: int, epsilon: float) -> dict[str, int]:
    """One bucket's active rows and their impressions at ``epsilon``, from the
    same ``|corr|`` finalize compares with it."""
    ok = _eligible(stats, min_events)
    active = abs_corr(stats, min_events) > epsilon
    return {
        "active_rows": int(active.sum()),
        "active_impressions": int(row_impressions(stats)[ok][active].sum()),
    }


def shares(counts: dict[str, Any]) -> dict[str, float]:
    """The active shares ``_meta.json`` records, whichever one was the target:
    of eligible rows, of all rows, and of ad traffic (impressions)."""

    def ratio(a: str, b: str) -> float:
        return counts[a] / counts[b] if counts[b] else 0.0

    return {
        "active_share_eligible": ratio("active_rows", "eligible"),
        "active_share_rows": ratio("active_rows", "rows"),
        "active_share_traffic": ratio("active_impressions", "impressions"),
        "eligible_share_traffic": ratio("eligible_impressions", "impressions"),
    }


def _stats_task(
    item: dict[str, Any],
    store: EventStore,
    tables: dict[str, str],
    cfg: SegmentConfig,
    origin_ms: int,
) -> dict[str, Any]:
    """Pass 2: one bucket's partial statistics, written; counts returned."""
    b = item["bucket"]
    ev = store.read_bucket(b, dict(STAT_SOURCES), ordered=False)
    stats = compute_stats(
        stat_column(ev, "ad_impressions", "user_id", np.int64),
        stat_column(ev, "ad_impressions", "ts", np.int64),
        stat_column(ev, "ad_impressions", "dwell_ms", np.float64),
        stat_column(ev, "conversions", "user_id", np.int64),
        stat_column(ev, "conversions", "ts", np.int64),
        cfg,
        origin_ms,
    )
    fs, folder = resolve(tables["stats"])
    write_table(fs, bucket_path(folder, b), pa.table(stats))
    values, weights = calibration_values(stats, cfg)
    first = select.answer(values, select.first_question(), weights)
    # the calibration's first question, answered in this same pass
    return {"first_answer": first, **bucket_counts(stats, cfg.min_events)}


def _read_stats(tables: dict[str, str], bucket: int) -> Columns:
    fs, folder = resolve(tables["stats"])
    with fs.open(bucket_path(folder, bucket), "rb") as fh:
        t = pq.read_table(fh)
    return {c: t.column(c).to_numpy() for c in STAT_COLUMNS}


def _answer_task(
    item: dict[str, Any], tables: dict[str, str], cfg: SegmentConfig, question: Any
) -> Any:
    """A calibration pass: one bucket's answer to ``question`` about its
    eligible rows' ``|corr|`` (see ``select.py``)."""
    values, weights = calibration_values(_read_stats(tables, item["bucket"]), cfg)
    return select.answer(values, question, weights)


def _fold(question: Any, answers: Any) -> Any:
    """Merge answers as they arrive: the driver holds one merged answer, not
    one per bucket."""
    acc = select.merge(question, [])
    for a in answers:
        acc = select.merge(question, [acc, a])
    return acc


def _finalize_task(
    item: dict[str, Any], tables: dict[str, str], cfg: SegmentConfig, epsilon: float
) -> dict[str, Any]:
    """Pass 4: one bucket's docs/contract.md §3 rows, written; active rows and
    their impressions returned."""
    fs, folder = resolve(tables["segments"])
    stats = _read_stats(tables, item["bucket"])
    write_table(
        fs, bucket_path(folder, item["bucket"]), segment_table(stats, cfg, epsilon)
    )
    return active_counts(stats, cfg.min_events, epsilon)


# ------------------------------------------------------------------ the pipeline


def segment_table(stats: Columns, cfg: SegmentConfig, epsilon: float) -> pa.Table:
    """The docs/contract.md §3 table of partial statistics (``finalize``)."""
    cols = finalize(stats, cfg, epsilon)
    data: dict[str, pa.Array] = {}
    for f in SEGMENT_SCHEMA:
        if f.name in ("window_start", "window_end"):
            data[f.name] = pa.array(cols[f"{f.name}_ms"], pa.int64()).cast(f.type)
        else:
            data[f.name] = pa.array(cols[f.name], f.type, from_pandas=True)
    return pa.table(data, schema=SEGMENT_SCHEMA)


def run_segment(
    events_url: str,
    out_url: str,
    cfg: SegmentConfig | None = None,
    *,
    progress: bool = True,
) -> SegmentResult:
    """Segment users per window: ``OUT/segments/`` (docs/contract.md §3), ``OUT/stats/``.

    Args:
        events_url: an event store (``dynamix bucket``) or any docs/contract.md §1 dataset
            root (then bucketed once into ``OUT/events/``, rejects in
            ``OUT/events/rejects/``).
        out_url: output root; ``segments/`` and ``stats/`` are replaced
            atomically.
        cfg: statistic parameters (paper defaults).
        progress: progress bars and a log line per pass.

    Returns:
        :class:`SegmentResult` with the run's ``_meta.json`` content.
    """
    cfg = cfg or SegmentConfig()
    t0 = time.perf_counter()
    out_fs, out_root = resolve(out_url)
    say = log.info if progress else log.debug
    if not is_process_local(out_fs):
        ensure_ray()
    store = ensure_store(
        events_url,
        reuse=[f"{out_url.rstrip('/')}/events"],
        default_out=f"{out_url.rstrip('/')}/events",
        num_buckets=cfg.num_buckets,
        progress=progress,
    )
    store_fs, _ = resolve(store.url)
    local = is_process_local(store_fs) or is_process_local(out_fs)
    if "conversions" not in store.meta["sources"]:
        raise FileNotFoundError(
            f"{events_url}: no valid conversion (source 'conversions' is required)"
        )
    origin = window_origin_ms(cfg, store.meta["sources"]["ad_impressions"]["ts_min_ms"])
    items = store.bucket_items()
    # stats first: the segments pointer, put last, names a version whose
    # statistics are published too (what a refresh starts from)
    with publish(out_fs, out_root, ["stats", "segments"]) as version:
        # what the tasks resolve: this run's version folders
        tmp = {t: url_of(out_fs, version.path(t)) for t in ("segments", "stats")}
        counts: dict[str, Any] = dict.fromkeys(BUCKET_COUNTS, 0)
        first: list[Any] = []
        phases = {"store": time.perf_counter() - t0}
        t_phase = time.perf_counter()
        stats_stats: dict[str, float] = {}
        for r in map_items(
            _stats_task,
            items,
            (store, tmp, cfg, origin),
            local=local,
            name="segment: statistics",
            progress=progress,
            stats=stats_stats,
        ):
            for k in counts:
                counts[k] += r[k]
            # folded as they come: one histogram in the driver, not one a bucket
            first = [_fold(select.first_question(), [*first, r["first_answer"]])]
        phases["statistics"] = time.perf_counter() - t_phase
        phases["statistics_tasks"] = stats_stats["task_s"]
        say(
            "segment: statistics of %d buckets (%.1f s)",
            len(items),
            phases["statistics"],
        )
        t_phase = time.perf_counter()

        calibration: dict[str, Any] = {}
        if cfg.epsilon is None:

            def ask(question: Any) -> Any:
                if question == select.first_question():
                    return first[0] if first else select.merge(question, [])
                return _fold(
                    question,
                    map_items(
                        _answer_task,
                        items,
                        (tmp, cfg, question),
                        local=local,
                        name="segment: epsilon pass",
                        progress=False,
                    ),
                )

            if cfg.active_traffic is None:
                target = cfg.active_fraction
                eps_source = f"calibrated to active_fraction={cfg.active_fraction}"
            else:
                target = traffic_fraction(
                    cfg.active_traffic,
                    counts["eligible_impressions"],
                    counts["impressions"],
                )
                eps_source = f"calibrated to active_traffic={cfg.active_traffic}"
                if target > 1:
                    log.warning(
                        "segment: only %.4f of the ad traffic is in eligible "
                        "windows, below --active-traffic %s: every eligible row "
                        "is made active",
                        counts["eligible_impressions"] / max(1, counts["impressions"]),
                        cfg.active_traffic,
                    )
            epsilon, search = select.calibrate_epsilon_distributed_stats(ask, target)
            calibration = {
                **asdict(search),
                # the share of eligible rows (or their traffic) asked for
                "eligible_target": target if counts["eligible"] else None,
            }
        else:
            epsilon, eps_source = float(cfg.epsilon), "given"
        phases["epsilon"] = time.perf_counter() - t_phase
        t_phase = time.perf_counter()

        counts.update(dict.fromkeys(ACTIVE_COUNTS, 0))
        for r in map_items(
            _finalize_task,
            items,
            (tmp, cfg, epsilon),
            local=local,
            name="segment: finalize",
            progress=progress,
        ):
            for k, v in r.items():
                counts[k] += v
        phases["finalize"] = time.perf_counter() - t_phase
        rejected = store.rejected(STAT_SOURCES)
        counts.update(
            conversions=store.rows("conversions"),
            rejected=rejected,
            rejected_total=int(sum(rejected.values())),
            **shares(counts),
        )
        meta = {
            "input": events_url,
            "input_fingerprint": store.meta["input_fingerprint"],
            "store": store.url,
            "store_fingerprint": store.fingerprint,
            # the store's parts this table holds: a refresh folds in the others
            "store_parts": list(store.part_ids),
            "mode": store.meta["mode"],
            "num_buckets": store.num_buckets,
            "params": {
                **asdict(cfg),
                "window": format_duration(cfg.window_s),
                "window_origin_ms": origin,
            },
            "epsilon": epsilon,
            "epsilon_source": eps_source,
            "epsilon_calibration": calibration,
            "phase_s": phases,
            "counts": counts,
            "version": __version__,
            "python": sys.version.split()[0],
            "wall_s": time.perf_counter() - t0,
        }
        if not local:
            import ray

            meta["ray_version"] = ray.__version__
        write_json(out_fs, f"{version.path('segments')}/_meta.json", meta)
    return SegmentResult(out_url, meta)


def segments_pointer(out_url: str) -> dict[str, Any]:
    """The published version of ``OUT/segments/`` (``io.current_version``).

    Raises:
        FileNotFoundError: no segment table is published there.
    """
    return published_version(out_url, "segments")


def read_segments_meta(out_url: str, version: str | None = None) -> dict[str, Any]:
    """The ``_meta.json`` of the published (or the given) version of a
    ``dynamix segment`` output root: epsilon, params, input fingerprint,
    counts; ``table_version`` names the version read."""
    fs, root = resolve(out_url)
    version = version or str(segments_pointer(out_url)["version"])
    meta = dict(
        read_json(fs, f"{version_folder(fs, root, 'segments', version)}/_meta.json")
    )
    return {**meta, "table_version": version}


def read_segment_bucket(out_url: str, bucket: int, version: str) -> pa.Table:
    """Bucket ``bucket``'s rows of version ``version`` of a segment table
    (empty when the bucket had no kept impression). Tasks get the version
    the driver resolved, so that a publish mid-run cannot mix two tables."""
    fs, root = resolve(out_url)
    folder = version_folder(fs, root, "segments", version)
    if not fs.exists(f"{folder}/_meta.json"):  # collected, or never whole
        raise FileNotFoundError(f"{url_of(fs, folder)}: segment version is gone")
    path = bucket_path(folder, bucket)
    if not fs.exists(path):
        return SEGMENT_SCHEMA.empty_table()
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh).cast(SEGMENT_SCHEMA)


def read_segments(out_url: str, pointer: dict[str, Any] | None = None) -> pa.Table:
    """The published segment table of a ``dynamix segment`` output root (or
    the version of ``pointer``), checked against the counts its pointer
    recorded.

    Raises:
        FileNotFoundError: nothing is published.
        io.IncompleteTable: the version's files are not the ones published.
    """
    fs, root = resolve(out_url)
    pointer = pointer or segments_pointer(out_url)
    folder = check_complete(fs, root, "segments", pointer)
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh).cast(SEGMENT_SCHEMA))
    return pa.concat_tables(tables) if tables else SEGMENT_SCHEMA.empty_table()
