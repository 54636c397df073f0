"""Benchmark of ``dynamix segment --incremental`` against a full re-run
(issue 17 §1; docs/data-path.md, "Incremental refresh"). Prints what it
measured; never asserts a time.

On generated events (cached under ``--out``), a share ``--new-share`` of the
rows is held back as *new files*, two ways:

* ``newest``: the rows after the ``1 - share`` quantile of time (the next hour
  or two of a week: what a periodic refresh sees);
* ``late``: a random ``share`` of the rows, from any time (late events landing
  in old windows: the worst case, every window may be touched).

Per way and repetition: a full ``dynamix segment`` of the old files (the
published table), then the new files are added and (1) the refresh and (2) a
full run on all the files (a new store, as a re-run without ``--incremental``
has to build) are timed, side by side; their tables are compared (counts
exactly, floats to 1e-9). Figures (medians of ``--reps``) go to
``<out>/refresh_bench.json``.

    python benchmarks/refresh.py                 # 100k users, 7 days: ~20M impressions
    python benchmarks/refresh.py --users 20000   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
from segment import cached_dataset  # noqa: E402  (benchmarks share helpers)

from dynamix_ray.config import GenerateConfig, SegmentConfig  # noqa: E402
from dynamix_ray.segments.pipeline import read_segments, run_segment  # noqa: E402
from dynamix_ray.segments.refresh import run_refresh  # noqa: E402

TOL = 1e-9
TARGET = 0.05  # refresh / full run, with 1% new events


def split(plain: str, root: Path, share: float, way: str, seed: int) -> dict:
    """``root/old`` (every source's rows but the held-back share) and
    ``root/new`` (those, one file per source); cached."""
    done = root / "_split.json"
    if done.exists():
        return json.loads(done.read_text())
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    imp = pq.read_table(f"{plain}/ad_impressions", columns=["ts"])
    cut = int(np.quantile(imp.column("ts").to_numpy(), 1 - share))
    rows = {"old": 0, "new": 0}
    for src_dir in sorted(Path(plain).iterdir()):
        if src_dir.name.startswith("_") or not src_dir.is_dir():
            continue
        new_parts = []
        for f in sorted(src_dir.rglob("*.parquet")):
            t = pq.read_table(f)
            if way == "newest":
                is_new = t.column("ts").to_numpy() >= cut
            else:
                is_new = rng.random(t.num_rows) < share
            rel = f.relative_to(plain)
            (root / "old" / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t.filter(pa.array(~is_new)), root / "old" / rel)
            new_parts.append(t.filter(pa.array(is_new)))
            rows["old"] += int((~is_new).sum())
            rows["new"] += int(is_new.sum())
        (root / "new" / src_dir.name).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.concat_tables(new_parts), root / "new" / src_dir.name / "new.parquet"
        )
    info = {"way": way, "share": share, "cut_ms": cut, "rows": rows}
    done.write_text(json.dumps(info))
    return info


def _link_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*.parquet"):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)


def compare(a: str, b: str) -> dict[str, int]:
    """Rows that differ between two published segment tables."""
    return compare_tables(read_segments(a), read_segments(b))


def compare_tables(x: pa.Table, y: pa.Table) -> dict[str, int]:
    """Rows that differ between two segment tables (floats beyond 1e-9)."""
    key = [("user_id", "ascending"), ("window_start", "ascending")]
    x, y = x.sort_by(key), y.sort_by(key)
    if x.num_rows != y.num_rows:
        return {"rows": abs(x.num_rows - y.num_rows)}
    bad = {}
    for name in x.column_names:
        u, v = x.column(name), y.column(name)
        if pa.types.is_floating(u.type):
            uu = u.to_numpy(zero_copy_only=False)
            vv = v.to_numpy(zero_copy_only=False)
            same = np.isclose(uu, vv, rtol=TOL, atol=TOL, equal_nan=True)
            bad[name] = int((~same).sum())
        else:
            bad[name] = int(
                (u.cast(pa.int64()).to_numpy() != v.cast(pa.int64()).to_numpy()).sum()
            )
    return {k: n for k, n in bad.items() if n}


def one_rep(split_root: Path, work: Path) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    events = work / "events"
    _link_tree(split_root / "old", events)
    t0 = time.perf_counter()
    run_segment(str(events), str(work / "out"), progress=False)
    first_s = time.perf_counter() - t0
    _link_tree(split_root / "new", events)
    t0 = time.perf_counter()
    refreshed = run_refresh(str(events), str(work / "out"), progress=False)
    refresh_s = time.perf_counter() - t0
    cfg = SegmentConfig(epsilon=refreshed.meta["epsilon"])
    t0 = time.perf_counter()
    full = run_segment(str(events), str(work / "full"), cfg, progress=False)
    full_s = time.perf_counter() - t0
    return {
        "first_s": first_s,
        "refresh_s": refresh_s,
        "full_s": full_s,
        "full_phase_s": full.meta["phase_s"],
        "refresh_phase_s": refreshed.meta["phase_s"],
        "refresh": refreshed.meta["refresh"],
        "rows": full.meta["counts"]["rows"],
        "impressions": full.meta["counts"]["impressions"],
        "mismatches": compare(str(work / "out"), str(work / "full")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--rate", type=float, default=28.6, help="ad impressions/user/day")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-share", type=float, default=0.01)
    p.add_argument(
        "--ways", default="newest,late", help="comma-separated: newest, late"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)

    import ray

    out = Path(args.out)
    tag = f"u{args.users}_d{args.days}_r{args.rate:g}_s{args.seed}"
    gen = GenerateConfig(
        users=args.users,
        days=args.days,
        impressions_per_user_day=args.rate,
        seed=args.seed,
    )
    plain, truth = cached_dataset(out / "data" / tag / "plain", gen)
    print(
        f"data: {truth['rows']['ad_impressions']:,} ad impressions, "
        f"{args.users:,} users, {args.days} days; {args.new_share:.1%} held back "
        "as new files",
        flush=True,
    )
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, Any] = {"args": vars(args), "ways": {}}
    for way in args.ways.split(","):
        root = out / "data" / tag / f"split_{way}_{args.new_share:g}"
        info = split(plain, root, args.new_share, way, args.seed)
        reps = []
        for i in range(args.reps):
            r = one_rep(root, out / "refresh_work")
            reps.append(r)
            print(
                f"  {way} rep {i}: refresh {r['refresh_s']:.2f} s, full "
                f"{r['full_s']:.2f} s ({r['refresh_s'] / r['full_s']:.3f}); "
                f"{r['refresh']['touched_groups']:,} of {r['rows']:,} groups; "
                f"mismatches {r['mismatches'] or 'none'}",
                flush=True,
            )
        med = {
            k: statistics.median(r[k] for r in reps)
            for k in ("refresh_s", "full_s", "first_s")
        }
        store_s = statistics.median(r["full_phase_s"]["store"] for r in reps)
        results["ways"][way] = {
            "split": info,
            "reps": reps,
            "median": med,
            "ratio": med["refresh_s"] / med["full_s"],
            "ratio_vs_statistic_only": med["refresh_s"] / (med["full_s"] - store_s),
        }
    (out / "refresh_bench.json").write_text(json.dumps(results, indent=2, default=str))
    print()
    print(
        "| new events | way | refresh | full run (store + statistic) | ratio "
        f"(target <= {TARGET:.0%}) | vs the statistic alone | groups recomputed | "
        "events read | equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for way, w in results["ways"].items():
        r0 = w["reps"][0]
        store_s = statistics.median(r["full_phase_s"]["store"] for r in w["reps"])
        print(
            f"| {w['split']['rows']['new']:,} ({args.new_share:.0%}) | {way} | "
            f"{w['median']['refresh_s']:.2f} s | {w['median']['full_s']:.2f} s "
            f"({store_s:.2f} + {w['median']['full_s'] - store_s:.2f}) | "
            f"{w['ratio']:.3f} | {w['ratio_vs_statistic_only']:.3f} | "
            f"{r0['refresh']['touched_groups']:,} of {r0['rows']:,} | "
            f"{r0['refresh']['events_read']:,} of {r0['impressions']:,} | "
            f"{'yes' if not any(r['mismatches'] for r in w['reps']) else 'NO'} |"
        )
    print(f"\nfigures: {out / 'refresh_bench.json'}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
