"""Benchmark of ``dynamix segment`` against one DuckDB query and a naive Ray Data
per-user pandas ``map_groups`` (prints figures; never asserts times).

Side by side, on the same generated events (cached under ``--out``):

* (a) ``run_segment`` from bucketed input (``--buckets`` hash buckets by user),
* (b) ``run_segment`` from unbucketed input (shuffle by user inside the pipeline),
* (c) the same statistic as ONE DuckDB SQL query over the unbucketed Parquet,
* (d) naive Ray Data ``groupby("user_id").map_groups(pandas fn)`` on a subset of
  users (about ``--naive-impressions`` ad impressions), extrapolated linearly.

(a), (b) and (c) must produce identical tables (counts exactly, floats to 1e-9
relative/absolute, segments equal except where ``|corr|`` is within 1e-9 of
epsilon); the mismatch counts are printed with the wall times (medians of
``--reps``), the ratios (a)/(c), (b)/(c), (d)/(a) against their targets, and the
peak memory (sum of RSS over the driver and every Ray process, sampled by a
background thread). Figures go to ``<out>/segment_bench.json``.

    python benchmarks/segment.py            # 20M impressions, 100k users
    python benchmarks/segment.py --quick    # 20k users: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dynamix_ray.config import GenerateConfig, SegmentConfig
from dynamix_ray.schema import TS_MAX_MS, TS_MIN_MS
from dynamix_ray.segments.pipeline import read_segments, run_segment
from dynamix_ray.segments.stats import window_origin_ms
from dynamix_ray.synth import generate

TARGETS = {"a_over_c": 1.0, "b_over_c": 3.0, "d_over_a": 100.0, "peak_gib": 8.0}
TOL = 1e-9
FLOAT_COLUMNS = ("mean_near", "mean_far", "var_near", "var_far", "corr", "w_mle")
COUNT_COLUMNS = ("n_near", "n_far")
GIB = 1024**3


# ------------------------------------------------------------------ memory


class PeakRSS:
    """Background sampler of the summed RSS of this process and all descendants
    (the Ray GCS, raylet, object store and workers of a local cluster)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.phase_peak = 0
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.sample()
            self.peak = max(self.peak, rss)
            self.phase_peak = max(self.phase_peak, rss)
            self._stop.wait(self.interval_s)

    def start(self) -> PeakRSS:
        self._thread.start()
        return self

    def new_phase(self) -> None:
        self.phase_peak = self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ data


def cached_dataset(root: Path, cfg: GenerateConfig) -> tuple[str, dict[str, Any]]:
    """Generate ``cfg`` into ``root`` unless a complete copy is already there."""
    truth_file = root / "_truth" / "truth.json"
    if not truth_file.exists():
        if root.exists():
            shutil.rmtree(root)
        print(f"generating {root} ...", flush=True)
        generate(str(root), cfg, progress=None)
    return str(root), json.loads(truth_file.read_text())


def user_subset(plain: str, root: Path, target_impressions: int) -> tuple[str, int]:
    """The first users (by id) of ``plain`` holding about ``target_impressions``
    ad impressions, both sources, as a small dataset (cached)."""
    done = root / "_subset.json"
    if done.exists():
        info = json.loads(done.read_text())
        return str(root), int(info["impressions"])
    if root.exists():
        shutil.rmtree(root)
    imp = pads.dataset(f"{plain}/ad_impressions", format="parquet")
    users = imp.to_table(columns=["user_id"]).column("user_id").drop_null().to_numpy()
    ids, counts = np.unique(users, return_counts=True)
    n_users = int(np.searchsorted(np.cumsum(counts), target_impressions)) + 1
    max_id = int(ids[min(n_users, len(ids)) - 1])
    flt = pads.field("user_id") <= max_id
    n_imp = 0
    for src in ("ad_impressions", "conversions"):
        t = pads.dataset(f"{plain}/{src}", format="parquet").to_table(filter=flt)
        n_imp = t.num_rows if src == "ad_impressions" else n_imp
        (root / src).mkdir(parents=True)
        for i, part in enumerate(np.array_split(np.arange(t.num_rows), 4)):
            pq.write_table(t.take(pa.array(part)), root / src / f"part-{i}.parquet")
    done.write_text(json.dumps({"users": n_users, "impressions": n_imp}))
    return str(root), n_imp


# ------------------------------------------------------------------ (a), (b)


def time_run_segment(events: str, out: str, cfg: SegmentConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = run_segment(events, out, cfg, progress=False)
    return time.perf_counter() - t0, result.meta


# ------------------------------------------------------------------ (c) DuckDB


def _ts_ms_sql(files_glob: str, con: Any) -> str:
    """SQL turning ``ts`` (Parquet timestamp of any unit, or int ms) into int ms."""
    kind = con.execute(
        f"SELECT typeof(ts) FROM read_parquet('{files_glob}') LIMIT 1"
    ).fetchone()[0]
    if kind.upper().startswith("TIMESTAMP"):
        # epoch_ms truncates toward zero; floor like the pipeline (ts >= 1970 here)
        return "epoch_ms(ts)"
    return "CAST(ts AS BIGINT)"


def duckdb_sql(
    plain: str, cfg: SegmentConfig, epsilon: float, origin: int, out_file: str, con: Any
) -> str:
    """docs/contract.md §2 as one query: validation, denoising, ASOF near-labels, per (user,
    window) moments, corr, w_mle and segment; written to ``out_file``."""
    imp_glob = f"{plain}/ad_impressions/**/*.parquet"
    conv_glob = f"{plain}/conversions/**/*.parquet"
    imp_ts, conv_ts = _ts_ms_sql(imp_glob, con), _ts_ms_sql(conv_glob, con)
    buffer_ms, horizon_ms = int(cfg.buffer_s * 1000), int(cfg.horizon_s * 1000)
    me = cfg.min_events
    return f"""
COPY (
WITH imp AS (
    SELECT user_id, {imp_ts} AS ts_ms, CAST(dwell_ms AS DOUBLE) AS dwell_ms
    FROM read_parquet('{imp_glob}')
),
kept AS (
    SELECT user_id, ts_ms, dwell_ms FROM imp
    WHERE user_id IS NOT NULL AND ts_ms IS NOT NULL
      AND ts_ms >= {TS_MIN_MS} AND ts_ms < {TS_MAX_MS}
      AND isfinite(dwell_ms) AND dwell_ms >= 0
      AND dwell_ms >= {cfg.min_dwell_ms} AND dwell_ms <= {cfg.max_dwell_ms}
),
conv AS (
    SELECT user_id, ts_ms FROM (
        SELECT user_id, {conv_ts} AS ts_ms FROM read_parquet('{conv_glob}')
    )
    WHERE user_id IS NOT NULL AND ts_ms IS NOT NULL
      AND ts_ms >= {TS_MIN_MS} AND ts_ms < {TS_MAX_MS}
),
labelled AS (
    -- first conversion at or after t - buffer; near if it is not after t + horizon
    SELECT k.user_id,
           (k.ts_ms - {origin}) // {cfg.window_ms} AS w,
           ln(k.dwell_ms) AS x,
           coalesce(c.ts_ms <= k.ts_ms + {horizon_ms}, false) AS near
    FROM kept k ASOF LEFT JOIN conv c
      ON k.user_id = c.user_id AND k.ts_ms - {buffer_ms} <= c.ts_ms
),
g AS (
    SELECT user_id, w,
           count(*) FILTER (WHERE near) AS n_near,
           count(*) FILTER (WHERE NOT near) AS n_far,
           avg(x) FILTER (WHERE near) AS mean_near,
           avg(x) FILTER (WHERE NOT near) AS mean_far,
           var_samp(x) FILTER (WHERE near) AS var_near,
           var_samp(x) FILTER (WHERE NOT near) AS var_far
    FROM labelled GROUP BY user_id, w
),
f AS (
    SELECT *,
           CASE WHEN n_near >= {me} AND n_far >= {me}
                THEN mean_near - mean_far END AS corr,
           (coalesce((n_near - 1) * var_near, 0) + coalesce((n_far - 1) * var_far, 0))
               / (n_near + n_far - 2) AS pooled
    FROM g
)
SELECT user_id,
       {origin} + w * {cfg.window_ms} AS window_start_ms,
       {origin} + (w + 1) * {cfg.window_ms} AS window_end_ms,
       n_near, n_far, mean_near, mean_far, var_near, var_far, corr,
       CASE WHEN corr IS NOT NULL AND pooled > 0 THEN corr / pooled END AS w_mle,
       CAST(CASE WHEN abs(corr) > {epsilon!r} THEN 1 ELSE 0 END AS TINYINT) AS segment
FROM f
) TO '{out_file}' (FORMAT parquet)
"""


def time_duckdb(
    plain: str, cfg: SegmentConfig, epsilon: float, origin: int, out_file: str
) -> float:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count()}")
    sql = duckdb_sql(plain, cfg, epsilon, origin, out_file, con)
    t0 = time.perf_counter()
    con.execute(sql)
    wall = time.perf_counter() - t0
    con.close()
    return wall


# ------------------------------------------------------------------ (d) naive


def _naive_user(df: pd.DataFrame, cfg: SegmentConfig, origin: int) -> pd.DataFrame:
    """One user's events (both sources) -> their per-window statistic, in pandas."""
    cols = [
        "user_id",
        "window_start_ms",
        "n_near",
        "n_far",
        "mean_near",
        "mean_far",
        "var_near",
        "var_far",
    ]
    df = df[df["user_id"].notna() & df["ts"].notna()]
    df = df[(df["ts"] >= TS_MIN_MS) & (df["ts"] < TS_MAX_MS)]
    conv = np.sort(df.loc[df["is_conv"] == 1, "ts"].to_numpy(dtype=np.int64))
    imp = df[df["is_conv"] == 0]
    d = imp["dwell_ms"].astype(float)
    imp = imp[np.isfinite(d) & (d >= 0)]
    imp = imp[
        (imp["dwell_ms"] >= cfg.min_dwell_ms) & (imp["dwell_ms"] <= cfg.max_dwell_ms)
    ]
    if imp.empty:
        return pd.DataFrame({c: [] for c in cols})
    t = imp["ts"].to_numpy(dtype=np.int64)
    i = np.searchsorted(conv, t - int(cfg.buffer_s * 1000), side="left")
    near = (i < len(conv)) & (
        conv[np.minimum(i, max(len(conv) - 1, 0))] <= t + int(cfg.horizon_s * 1000)
        if len(conv)
        else False
    )
    imp = imp.assign(
        x=np.log(imp["dwell_ms"].astype(float)),
        near=near,
        window_start_ms=origin + ((t - origin) // cfg.window_ms) * cfg.window_ms,
    )
    agg = imp.groupby(["window_start_ms", "near"])["x"].agg(["count", "mean", "var"])
    agg = agg.unstack("near")
    out = pd.DataFrame({"window_start_ms": agg.index.to_numpy()})
    for label, flag in (("near", True), ("far", False)):
        for stat, name in (("count", "n"), ("mean", "mean"), ("var", "var")):
            key = (stat, flag)
            values = agg[key].to_numpy() if key in agg.columns else np.nan
            out[f"{name}_{label}"] = values
    out["n_near"] = out["n_near"].fillna(0).astype(np.int64)
    out["n_far"] = out["n_far"].fillna(0).astype(np.int64)
    out["user_id"] = int(imp["user_id"].iloc[0])
    return out[cols]


def time_naive(subset: str, cfg: SegmentConfig, origin: int) -> tuple[float, pa.Table]:
    import ray

    t0 = time.perf_counter()
    imp = (
        ray.data.read_parquet(f"{subset}/ad_impressions").select_columns(
            ["user_id", "ts", "dwell_ms"]
        )
    ).map_batches(lambda b: b.assign(is_conv=0), batch_format="pandas", batch_size=None)
    conv = (
        ray.data.read_parquet(f"{subset}/conversions").select_columns(["user_id", "ts"])
    ).map_batches(
        lambda b: b.assign(dwell_ms=np.nan, is_conv=1),
        batch_format="pandas",
        batch_size=None,
    )
    out = (
        imp.union(conv)
        .groupby("user_id")
        .map_groups(
            cast(Any, _naive_user), fn_args=(cfg, origin), batch_format="pandas"
        )
    )
    table = pa.concat_tables(
        [
            pa.Table.from_pandas(b, preserve_index=False)
            for b in out.iter_batches(batch_size=None, batch_format="pandas")
            if len(b)
        ]
    )
    return time.perf_counter() - t0, table


# ------------------------------------------------------------------ compare


def _as_frame(table: pa.Table) -> pd.DataFrame:
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
            name = f"{name}_ms"
        cols[name] = col.to_numpy(zero_copy_only=False)
    df = pd.DataFrame(cols)
    return df.sort_values(["user_id", "window_start_ms"], kind="stable").reset_index(
        drop=True
    )


def compare(ref: pd.DataFrame, other: pd.DataFrame, epsilon: float | None) -> dict:
    """Mismatch counts of ``other`` against ``ref`` (both sorted by key)."""
    out: dict[str, Any] = {"rows_ref": len(ref), "rows_other": len(other)}
    if len(ref) != len(other) or not (
        np.array_equal(ref["user_id"], other["user_id"])
        and np.array_equal(ref["window_start_ms"], other["window_start_ms"])
    ):
        keys = ["user_id", "window_start_ms"]
        merged = ref[keys].merge(other[keys], how="outer", indicator=True)
        out["key_mismatches"] = int((merged["_merge"] != "both").sum())
        ref = ref.merge(other[keys], on=keys)
        other = other.merge(ref[keys], on=keys)
    else:
        out["key_mismatches"] = 0
    for c in COUNT_COLUMNS:
        out[c] = int((ref[c].to_numpy() != other[c].to_numpy()).sum())
    for c in FLOAT_COLUMNS:
        if c not in other:
            continue
        a = ref[c].to_numpy(dtype=np.float64, na_value=np.nan)
        b = other[c].to_numpy(dtype=np.float64, na_value=np.nan)
        same = np.isclose(a, b, rtol=TOL, atol=TOL, equal_nan=True)
        out[c] = int((~same).sum())
    if epsilon is not None and "segment" in other:
        corr = ref["corr"].to_numpy(dtype=np.float64, na_value=np.nan)
        borderline = np.abs(np.abs(np.nan_to_num(corr, nan=-1.0)) - epsilon) <= TOL
        diff = ref["segment"].to_numpy() != other["segment"].to_numpy()
        out["segment"] = int((diff & ~borderline).sum())
        out["segment_borderline_rows"] = int(borderline.sum())
    out["total"] = int(
        out["key_mismatches"]
        + sum(out.get(c, 0) for c in (*COUNT_COLUMNS, *FLOAT_COLUMNS, "segment"))
    )
    return out


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--rate", type=float, default=28.6, help="ad impressions/user/day")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--buckets", type=int, default=16, help="buckets of layout (a)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of (a), (b), (c)")
    p.add_argument("--naive-impressions", type=int, default=2_000_000)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench_out")
    p.add_argument("--quick", action="store_true", help="20k users, 1 rep: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.reps = 20_000, 1
        args.naive_impressions = min(args.naive_impressions, 200_000)

    import ray

    out = Path(args.out)
    tag = f"u{args.users}_d{args.days}_r{args.rate:g}_s{args.seed}"
    data = out / "data" / tag
    gen = GenerateConfig(
        users=args.users,
        days=args.days,
        impressions_per_user_day=args.rate,
        seed=args.seed,
    )
    from dataclasses import replace

    bucketed, truth = cached_dataset(
        data / f"bucketed{args.buckets}", replace(gen, bucketed=args.buckets)
    )
    plain, _ = cached_dataset(data / "plain", gen)
    rows = truth["rows"]
    print(
        f"data: {rows['ad_impressions']:,} ad impressions, "
        f"{rows['conversions']:,} conversions, {args.users:,} users, "
        f"{args.days} days (cache {data})",
        flush=True,
    )
    subset, subset_imp = (None, 0)
    if not args.skip_naive:
        subset, subset_imp = user_subset(
            plain, data / f"subset_{args.naive_impressions}", args.naive_impressions
        )

    cfg = SegmentConfig()
    origin = window_origin_ms(cfg, None)
    if 86_400_000 % cfg.window_ms != 0:
        raise SystemExit("benchmark assumes a window that divides a day")
    work = out / "runs" / tag
    work.mkdir(parents=True, exist_ok=True)

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    mem = PeakRSS().start()
    phase_peak: dict[str, float] = {}
    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    metas: dict[str, dict] = {}
    try:
        # untimed: starts the Ray workers and their imports (not part of a run)
        run_segment(bucketed, str(work / "warmup"), cfg, progress=False)
        for rep in range(args.reps):
            for key, events in (("a", bucketed), ("b", plain)):
                mem.new_phase()
                wall, metas[key] = time_run_segment(events, str(work / key), cfg)
                times[key].append(wall)
                phase_peak[key] = max(phase_peak.get(key, 0), mem.phase_peak / GIB)
                print(f"  rep {rep + 1}: ({key}) {wall:7.2f} s", flush=True)
            epsilon = float(metas["a"]["epsilon"])
            mem.new_phase()
            wall = time_duckdb(
                plain, cfg, epsilon, origin, str(work / "duckdb.parquet")
            )
            times["c"].append(wall)
            phase_peak["c"] = max(phase_peak.get("c", 0), mem.phase_peak / GIB)
            print(f"  rep {rep + 1}: (c) {wall:7.2f} s", flush=True)

        naive_s = naive_extrap = None
        naive_cmp: dict[str, Any] | None = None
        if subset is not None:
            mem.new_phase()
            naive_s, naive_table = time_naive(subset, cfg, origin)
            phase_peak["d"] = mem.phase_peak / GIB
            naive_extrap = naive_s * rows["ad_impressions"] / max(1, subset_imp)
            print(
                f"  (d) {naive_s:7.2f} s on {subset_imp:,} impressions",
                flush=True,
            )
    finally:
        mem.stop()

    # ---- correctness: (b), (c) and (d) against (a)
    epsilon = float(metas["a"]["epsilon"])
    ref = _as_frame(read_segments(str(work / "a")))
    checks = {
        "b_vs_a": compare(ref, _as_frame(read_segments(str(work / "b"))), epsilon),
        "c_vs_a": compare(
            ref, _as_frame(pq.read_table(work / "duckdb.parquet")), epsilon
        ),
    }
    if subset is not None:
        naive_df = _as_frame(naive_table)
        sub_ref = ref[ref["user_id"].isin(np.unique(naive_df["user_id"]))]
        checks["d_vs_a_subset"] = compare(
            sub_ref.reset_index(drop=True), naive_df, None
        )
        naive_cmp = checks["d_vs_a_subset"]

    med = {k: statistics.median(v) for k, v in times.items()}
    ratios: dict[str, float | None] = {
        "a_over_c": med["a"] / med["c"],
        "b_over_c": med["b"] / med["c"],
        "d_over_a": (naive_extrap / med["a"]) if naive_extrap else None,
    }
    peak_gib = mem.peak / GIB
    a_c, b_c, d_a = med["a"] / med["c"], med["b"] / med["c"], ratios["d_over_a"]
    verdict = {
        "a_over_c": a_c <= TARGETS["a_over_c"],
        "b_over_c": b_c <= TARGETS["b_over_c"],
        "d_over_a": None if d_a is None else d_a >= TARGETS["d_over_a"],
        "peak_gib": peak_gib < TARGETS["peak_gib"],
    }

    def ok(flag: bool | None) -> str:
        return "n/a" if flag is None else ("meets target" if flag else "MISSES target")

    print()
    print(
        f"segment benchmark: {rows['ad_impressions']:,} ad impressions, "
        f"{rows['conversions']:,} conversions, {args.users:,} users, "
        f"{args.num_cpus} CPUs, median of {args.reps}"
    )
    print(
        f"  (a) run_segment, bucketed={args.buckets:<5} {med['a']:8.2f} s  "
        f"(runs: {', '.join(f'{t:.2f}' for t in times['a'])})"
    )
    print(
        f"  (b) run_segment, unbucketed   {med['b']:8.2f} s  "
        f"(runs: {', '.join(f'{t:.2f}' for t in times['b'])})"
    )
    print(
        f"  (c) DuckDB, one SQL query     {med['c']:8.2f} s  "
        f"(runs: {', '.join(f'{t:.2f}' for t in times['c'])})"
    )
    if naive_s is not None:
        print(
            f"  (d) naive Ray Data map_groups {naive_extrap:8.2f} s  EXTRAPOLATED "
            f"linearly from {naive_s:.2f} s measured on {subset_imp:,} impressions"
        )
    print(f"  (a)/(c) = {a_c:.3f}   target <= 1.0   {ok(verdict['a_over_c'])}")
    print(f"  (b)/(c) = {b_c:.3f}   target <= 3.0   {ok(verdict['b_over_c'])}")
    if d_a is not None:
        print(
            f"  (d)/(a) = {d_a:.1f}   target >= 100   "
            f"{ok(verdict['d_over_a'])}  (d extrapolated)"
        )
    print(
        f"  peak memory {peak_gib:.2f} GiB (sum of RSS, driver + Ray processes)  "
        f"target < 8 GiB   {ok(verdict['peak_gib'])}"
    )
    print(
        "  peak per phase: "
        + ", ".join(f"({k}) {v:.2f} GiB" for k, v in sorted(phase_peak.items()))
    )
    print(f"  epsilon {epsilon:.9g}, {len(ref):,} (user, window) rows")
    for name, c in checks.items():
        detail = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("total",))
        print(f"  mismatches {name}: {c['total']}  ({detail})")

    report = {
        "rows": rows,
        "users": args.users,
        "days": args.days,
        "rate": args.rate,
        "buckets": args.buckets,
        "num_cpus": args.num_cpus,
        "reps": args.reps,
        "times_s": times,
        "median_s": med,
        "naive": {
            "measured_s": naive_s,
            "impressions": subset_imp,
            "extrapolated_s": naive_extrap,
            "check": naive_cmp,
        },
        "ratios": ratios,
        "targets": TARGETS,
        "meets": verdict,
        "peak_rss_gib": peak_gib,
        "peak_rss_gib_per_phase": phase_peak,
        "epsilon": epsilon,
        "mismatches": checks,
        "modes": {k: m.get("mode") for k, m in metas.items()},
        "python": sys.version.split()[0],
        "ray": ray.__version__,
    }
    ray.shutdown()
    path = out / ("segment_bench_quick.json" if args.quick else "segment_bench.json")
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
