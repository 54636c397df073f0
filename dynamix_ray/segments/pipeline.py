"""``dynamix segment``: the statistic on Ray Data (SPEC §2–3).

Flow (every step a Ray Data operator, the logic in ``stats.py``):

* **bucketed input** (``_bucketing.json`` at the root, written by
  ``dynamix generate --bucketed N``): one task per bucket reads that bucket's
  impression and conversion files, validates them and runs the kernel. No
  shuffle.
* **unbucketed input**: ``read_parquet`` of both sources -> validate and tag each
  row with the hash bucket of its user -> ``groupby("bucket",
  num_partitions=B).map_groups`` runs the kernel once per *bucket* (a few dozen
  groups of whole users, numpy batches: not a per-user pandas group).
* statistics are materialised once; epsilon is calibrated from their ``|corr|``
  (a cheap global step, no second pass over events); ``finalize`` adds the SPEC
  §3 columns; the table, rejects and ``_meta.json`` are committed atomically.

``memory://`` inputs are read in the driver (Ray workers cannot see them), then
go through the same bucketing and kernel.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray import __version__
from dynamix_ray.config import SegmentConfig, format_duration
from dynamix_ray.io import (
    Dataset,
    atomic_output,
    discover,
    fingerprint,
    is_process_local,
    pyarrow_fs,
    resolve,
    user_bucket,
    write_json,
    write_parquet,
)
from dynamix_ray.schema import REJECT_SCHEMA, SOURCES, Validated, validate
from dynamix_ray.segments.epsilon import calibrate_epsilon
from dynamix_ray.segments.stats import (
    STAT_COLUMNS,
    compute_stats,
    finalize,
    window_origin_ms,
)

__all__ = ["SEGMENT_SCHEMA", "SegmentResult", "read_segments", "run_segment"]

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
_EVENT_COLUMNS = ("user_id", "ts_ms", "dwell_ms", "is_conv")


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
            f"  mode           {m['mode']}, {m['num_buckets']} buckets",
            f"  impressions    {c['impressions']:,} valid, {c['filtered']:,} "
            "filtered by dwell bounds",
            f"  conversions    {c['conversions']:,} valid",
            f"  rejected rows  {c['rejected_total']:,} ({rej})",
            f"  rows           {c['rows']:,} (user, window) rows, {c['users']:,} users",
            f"  eligible       {c['eligible']:,} rows with non-null corr",
            f"  epsilon        {m['epsilon']:.6g} ({m['epsilon_source']})",
            f"  active share   {c['active_share_eligible']:.4f} of eligible rows, "
            f"{c['active_share_rows']:.4f} of all rows",
            f"  wall time      {m['wall_s']:.1f} s",
            f"  output         {self.segments_path}",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- read


def read_validated(
    fs: Any, paths: list[str], source_name: str, columns: list[str]
) -> Validated:
    """Read ``columns`` of each file and validate them (rejects name the file)."""
    source = SOURCES[source_name]
    valid, rejects = [], []
    for p in paths:
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh, columns=columns)
        v = validate(table, source, p, columns=[])
        valid.append(v.valid)
        rejects.append(v.rejects)
    if not valid:
        empty = {"user_id": pa.int64(), "ts_ms": pa.int64()}
        if source.has_dwell:
            empty["dwell_ms"] = pa.float64()
        return Validated(pa.schema(empty).empty_table(), REJECT_SCHEMA.empty_table())
    return Validated(pa.concat_tables(valid), pa.concat_tables(rejects))


def _events(imp: pa.Table, conv: pa.Table) -> dict[str, np.ndarray]:
    """Impressions and conversions as one column set (``is_conv`` tells them apart)."""
    n_imp, n_conv = imp.num_rows, conv.num_rows
    return {
        "user_id": np.concatenate(
            [imp.column("user_id").to_numpy(), conv.column("user_id").to_numpy()]
        ),
        "ts_ms": np.concatenate(
            [imp.column("ts_ms").to_numpy(), conv.column("ts_ms").to_numpy()]
        ),
        "dwell_ms": np.concatenate(
            [imp.column("dwell_ms").to_numpy(), np.full(n_conv, np.nan)]
        ),
        "is_conv": np.concatenate(
            [np.zeros(n_imp, dtype=np.int8), np.ones(n_conv, dtype=np.int8)]
        ),
    }


def _stats_of_events(
    batch: dict[str, np.ndarray], cfg: SegmentConfig, origin_ms: int
) -> dict[str, np.ndarray]:
    """Kernel over a batch holding all events of its users (both sources)."""
    conv = batch["is_conv"].astype(bool)
    imp = ~conv
    return compute_stats(
        batch["user_id"][imp],
        batch["ts_ms"][imp],
        batch["dwell_ms"][imp],
        batch["user_id"][conv],
        batch["ts_ms"][conv],
        cfg,
        origin_ms,
    )


def _write_rejects(fs: Any, folder: str, rejects: pa.Table, name: str) -> None:
    """Write rejects under a name derived from their content, so that a retried
    task overwrites its own file instead of adding a duplicate."""
    if rejects.num_rows == 0:
        return
    digest = hashlib.sha1(name.encode())
    for col in ("reason", "user_id", "ts_ms", "file"):
        digest.update(str(rejects.column(col).to_pylist()[:1000]).encode())
    write_parquet(fs, f"{folder}/{name}-{digest.hexdigest()[:12]}.parquet", rejects)


def _bucket_stats(
    batch: dict[str, np.ndarray],
    cfg: SegmentConfig,
    origin_ms: int,
    url: str,
    rejects_dir: str,
) -> dict[str, np.ndarray]:
    """Ray Data task: bucket rows (file lists) -> their partial statistics.

    A plain function (Ray tasks, not actors), so idle stages hold no CPU.
    """
    fs, _ = resolve(url)
    parts = []
    for bucket, imp_paths, conv_paths in zip(
        batch["bucket"], batch["imp_paths"], batch["conv_paths"], strict=True
    ):
        imp = read_validated(
            fs, _split(imp_paths), "ad_impressions", ["user_id", "ts", "dwell_ms"]
        )
        conv = read_validated(fs, _split(conv_paths), "conversions", ["user_id", "ts"])
        for v, src in ((imp, "ad_impressions"), (conv, "conversions")):
            _write_rejects(fs, rejects_dir, v.rejects, f"{src}-b{bucket}")
        parts.append(_stats_of_events(_events(imp.valid, conv.valid), cfg, origin_ms))
    return {c: np.concatenate([p[c] for p in parts]) for c in STAT_COLUMNS}


def _split(paths: str) -> list[str]:
    return [p for p in str(paths).split("\n") if p]


def _validate_tag(
    table: pa.Table, source: str, url: str, rejects_dir: str, num_buckets: int
) -> pa.Table:
    """Ray Data task: validate a batch of one source, write its rejects, and tag
    every valid row with its user's hash bucket."""
    fs, _ = resolve(url)
    v = validate(table, SOURCES[source], "", columns=[])
    _write_rejects(fs, rejects_dir, v.rejects, source)
    return _tag(v.valid, source == "conversions", num_buckets)


def _tag(valid: pa.Table, is_conv: bool, num_buckets: int) -> pa.Table:
    user = valid.column("user_id").to_numpy()
    n = valid.num_rows
    dwell = valid.column("dwell_ms").to_numpy() if not is_conv else np.full(n, np.nan)
    return pa.table(
        {
            "user_id": user,
            "ts_ms": valid.column("ts_ms").to_numpy(),
            "dwell_ms": dwell,
            "is_conv": np.full(n, int(is_conv), dtype=np.int8),
            "bucket": user_bucket(user, num_buckets),
        }
    )


# ------------------------------------------------------------------ the pipeline


def _first_ts_ms(ds: Dataset) -> int | None:
    """Earliest valid impression time (only needed when the window does not divide
    a day; reads the ``ts`` column once)."""
    first = None
    v = read_validated(
        ds.fs,
        ds.files["ad_impressions"],
        "ad_impressions",
        ["user_id", "ts", "dwell_ms"],
    )
    if v.valid.num_rows:
        first = int(np.min(v.valid.column("ts_ms").to_numpy()))
    return first


def _finalize_batch(
    batch: dict[str, np.ndarray], cfg: SegmentConfig, epsilon: float
) -> pa.Table:
    cols = finalize(batch, cfg, epsilon)
    data: dict[str, pa.Array] = {}
    for f in SEGMENT_SCHEMA:
        if f.name in ("window_start", "window_end"):
            data[f.name] = pa.array(cols[f"{f.name}_ms"], pa.int64()).cast(f.type)
        else:
            data[f.name] = pa.array(cols[f.name], f.type, from_pandas=True)
    return pa.table(data, schema=SEGMENT_SCHEMA)


def _abs_corr(batch: dict[str, np.ndarray], min_events: int) -> dict[str, np.ndarray]:
    ok = (batch["n_near"] >= min_events) & (batch["n_far"] >= min_events)
    return {"abs_corr": np.abs(batch["mean_near"][ok] - batch["mean_far"][ok])}


def _block_counts(batch: dict[str, np.ndarray], min_events: int) -> dict[str, Any]:
    kept = (batch["n_near"] + batch["n_far"]) > 0
    ok = (batch["n_near"] >= min_events) & (batch["n_far"] >= min_events)
    return {
        "rows": np.array([int(kept.sum())]),
        "eligible": np.array([int(ok.sum())]),
        "impressions": np.array(
            [int((batch["n_near"] + batch["n_far"] + batch["n_filtered"]).sum())]
        ),
        "filtered": np.array([int(batch["n_filtered"].sum())]),
    }


def _users(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    kept = (batch["n_near"] + batch["n_far"]) > 0
    return {"user_id": np.unique(batch["user_id"][kept])}


def default_num_buckets(total_rows: int, cpus: int) -> int:
    """Enough buckets to keep every core busy and each bucket near 1M events."""
    return max(2 * cpus, math.ceil(total_rows / 1_000_000))


def run_segment(
    events_url: str,
    out_url: str,
    cfg: SegmentConfig | None = None,
    *,
    progress: bool = True,
) -> SegmentResult:
    """Segment users per window and write ``<out>/segments`` and ``<out>/rejects``.

    Args:
        events_url: dataset root (fsspec URL) with ``ad_impressions/`` and
            ``conversions/`` (SPEC §1).
        out_url: output root; ``segments/`` and ``rejects/`` are replaced atomically.
        cfg: statistic parameters (paper defaults).
        progress: Ray Data progress bars.

    Returns:
        :class:`SegmentResult` with the run's ``_meta.json`` content.
    """
    import ray

    from dynamix_ray.runtime import cluster_cpus, ensure_ray

    cfg = cfg or SegmentConfig()
    t0 = time.perf_counter()
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress

    ds = discover(
        events_url,
        ["ad_impressions", "conversions"],
        required=["ad_impressions", "conversions"],
    )
    out_fs, out_root = resolve(out_url)
    local = is_process_local(ds.fs) or is_process_local(out_fs)
    origin = window_origin_ms(
        cfg, None if 86_400_000 % cfg.window_ms == 0 else _first_ts_ms(ds)
    )
    total_rows = sum(ds.rows.values())

    with atomic_output(out_fs, out_root, ["segments", "rejects"]) as tmp:
        rejects_dir = f"{tmp}/rejects"
        stats_ds: Any
        events: Any
        if ds.num_buckets is not None and not local:
            mode, num_buckets = "bucketed", ds.num_buckets
            imp_b, conv_b = (
                ds.bucket_files("ad_impressions"),
                ds.bucket_files("conversions"),
            )
            items = [
                {
                    "bucket": b,
                    "imp_paths": "\n".join(imp_b.get(b, [])),
                    "conv_paths": "\n".join(conv_b.get(b, [])),
                }
                for b in sorted(set(imp_b) | set(conv_b))
            ]
            stats_ds = ray.data.from_items(items, override_num_blocks=len(items))
            stats_ds = stats_ds.map_batches(
                cast(Any, _bucket_stats),
                fn_args=(cfg, origin, ds.url, rejects_dir),
                batch_size=1,
                batch_format="numpy",
            )
        else:
            num_buckets = cfg.num_buckets or default_num_buckets(
                total_rows, cluster_cpus()
            )
            if local:
                mode = "driver-read (process-local filesystem)"
                tagged = []
                for src, cols in (
                    ("ad_impressions", ["user_id", "ts", "dwell_ms"]),
                    ("conversions", ["user_id", "ts"]),
                ):
                    v = read_validated(ds.fs, ds.files[src], src, cols)
                    write_parquet(out_fs, f"{rejects_dir}/{src}.parquet", v.rejects)
                    tagged.append(_tag(v.valid, src == "conversions", num_buckets))
                events = ray.data.from_arrow(pa.concat_tables(tagged))
            else:
                mode = "shuffled (hash buckets by user_id)"
                pafs = pyarrow_fs(ds.fs)
                parts = []
                for src, cols in (
                    ("ad_impressions", ["user_id", "ts", "dwell_ms"]),
                    ("conversions", ["user_id", "ts"]),
                ):
                    parts.append(
                        ray.data.read_parquet(
                            ds.files[src],
                            filesystem=pafs,
                            columns=cols,
                            partitioning=None,
                        ).map_batches(
                            cast(Any, _validate_tag),
                            fn_args=(src, ds.url, rejects_dir, num_buckets),
                            batch_format="pyarrow",
                            batch_size=None,
                        )
                    )
                events = parts[0].union(parts[1])
            stats_ds = events.groupby("bucket", num_partitions=num_buckets).map_groups(
                cast(Any, _stats_of_events),
                fn_args=(cfg, origin),
                batch_format="numpy",
            )
        stats_ds = stats_ds.materialize()

        # Global, cheap steps over the per-window statistics.
        if cfg.epsilon is None:
            abs_corr = np.concatenate(
                [np.zeros(0)]
                + [
                    b["abs_corr"]
                    for b in stats_ds.map_batches(
                        _abs_corr, fn_args=(cfg.min_events,), batch_format="numpy"
                    ).iter_batches(batch_size=None, batch_format="numpy")
                ]
            )
            epsilon = calibrate_epsilon(abs_corr, cfg.active_fraction)
            eps_source = f"calibrated to active_fraction={cfg.active_fraction}"
        else:
            epsilon, eps_source = float(cfg.epsilon), "given"
        counts: dict[str, Any] = _sum_counts(
            stats_ds.map_batches(
                _block_counts,
                fn_args=(cfg.min_events,),
                batch_format="numpy",
                batch_size=None,
            )
        )
        users = np.unique(
            np.concatenate(
                [np.zeros(0, dtype=np.int64)]
                + [
                    b["user_id"]
                    for b in stats_ds.map_batches(
                        _users, batch_format="numpy", batch_size=None
                    ).iter_batches(batch_size=None, batch_format="numpy")
                ]
            )
        )
        seg_ds = stats_ds.map_batches(
            _finalize_batch,
            fn_args=(cfg, epsilon),
            batch_format="numpy",
            batch_size=None,
        )
        active = _count_active(seg_ds)
        if local:
            tables = ray.get(seg_ds.to_arrow_refs())
            table = pa.concat_tables([t.cast(SEGMENT_SCHEMA) for t in tables])
            write_parquet(out_fs, f"{tmp}/segments/part-00000.parquet", table)
        else:
            seg_ds.write_parquet(f"{tmp}/segments", filesystem=pyarrow_fs(out_fs))

        rejected = _reject_counts(out_fs, rejects_dir)
        counts.update(
            users=int(len(users)),
            active_rows=active,
            conversions=ds.rows["conversions"] - rejected.pop("_conversions", 0),
            rejected=rejected,
            rejected_total=int(sum(rejected.values())),
            active_share_eligible=active / counts["eligible"]
            if counts["eligible"]
            else 0.0,
            active_share_rows=active / counts["rows"] if counts["rows"] else 0.0,
        )
        meta = {
            "input": events_url,
            "input_fingerprint": fingerprint(ds),
            "mode": mode,
            "num_buckets": num_buckets,
            "params": {
                **asdict(cfg),
                "window": format_duration(cfg.window_s),
                "window_origin_ms": origin,
            },
            "epsilon": epsilon,
            "epsilon_source": eps_source,
            "counts": counts,
            "version": __version__,
            "ray_version": ray.__version__,
            "python": sys.version.split()[0],
            "wall_s": time.perf_counter() - t0,
        }
        write_json(out_fs, f"{tmp}/segments/_meta.json", meta)
    result = SegmentResult(out_url, meta)
    return result


def _sum_counts(ds: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            total[k] = total.get(k, 0) + int(np.sum(v))
    for k in ("rows", "eligible", "impressions", "filtered"):
        total.setdefault(k, 0)
    return total


def _count_active(seg_ds: Any) -> int:
    return int(
        sum(
            int(np.sum(b["segment"]))
            for b in seg_ds.select_columns(["segment"]).iter_batches(
                batch_size=None, batch_format="numpy"
            )
        )
    )


def _reject_counts(fs: Any, folder: str) -> dict[str, int]:
    """Counts per reason of the rejects written so far; ``_conversions`` holds the
    number of rejected conversion rows (for the valid-conversions count)."""
    counts: dict[str, int] = {}
    n_conv = 0
    for p in sorted(fs.find(folder)) if fs.exists(folder) else []:
        if not p.endswith(".parquet"):
            continue
        with fs.open(p, "rb") as fh:
            t = pq.read_table(fh, columns=["source", "reason"])
        for src, reason in zip(
            t.column("source").to_pylist(), t.column("reason").to_pylist(), strict=True
        ):
            counts[reason] = counts.get(reason, 0) + 1
            n_conv += src == "conversions"
    counts["_conversions"] = n_conv
    return counts


def read_segments(out_url: str) -> pa.Table:
    """The committed segment table of a ``dynamix segment`` output root."""
    fs, root = resolve(out_url)
    folder = f"{root}/segments"
    if not fs.exists(f"{folder}/_meta.json"):
        raise FileNotFoundError(
            f"{out_url}: no committed segment table (no _meta.json)"
        )
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh).cast(SEGMENT_SCHEMA))
    return pa.concat_tables(tables) if tables else SEGMENT_SCHEMA.empty_table()
