"""Benchmark of the streaming segment updater (issue 17 §2; docs/data-path.md,
"Streaming updates"). Prints what it measured; never asserts.

A generated world (cached under ``--out``) is split by time. The first
``days - 1`` days are segmented as the published table. The last day is cut
into ``--files`` micro-batch files, one per slice of time, that a writer
thread drops into the input folder every ``--every-s`` seconds, as a log
shipper would. ``run_stream`` watches the folder with ``--updaters`` Ray
actors and publishes each batch's segment changes.

It reports the events folded per busy second of an updater (one updater is
one core's worth of work), the lag from a file appearing to its changes
being published (p50, p99), and whether the updaters' state, once the stream
has drained, equals a full ``dynamix segment`` of every file (with the
table's epsilon). Figures go to ``<out>/stream_bench.json``.

    python benchmarks/stream.py                 # 20k users, 7 days, 48 files
    python benchmarks/stream.py --users 4000    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
from refresh import compare_tables  # noqa: E402  (benchmarks share helpers)
from segment import cached_dataset  # noqa: E402

from dynamix_ray.config import GenerateConfig, SegmentConfig  # noqa: E402
from dynamix_ray.segments.pipeline import read_segments, run_segment  # noqa: E402
from dynamix_ray.segments.stream import run_stream, start_updaters  # noqa: E402

_DAY = 86_400_000


def split_last_day(
    plain: str, root: Path, files: int, gen: GenerateConfig
) -> tuple[Path, list[dict]]:
    """``root/old`` (all but the generated span's last day, both sources the
    statistic reads; rows with planted bad times stay there) and the last
    day's rows cut into ``files`` time slices (in memory)."""
    if root.exists():
        shutil.rmtree(root)
    start = int(np.datetime64(gen.start, "ms").astype(np.int64))
    cut, end = start + (gen.days - 1) * _DAY, start + gen.days * _DAY
    slices: list[dict[str, pa.Table]] = [{} for _ in range(files)]
    for src in ("ad_impressions", "conversions"):
        t = pq.read_table(f"{plain}/{src}")
        ts = t.column("ts").to_numpy()
        last = (ts >= cut) & (ts < end)
        old = t.filter(pa.array(~last))
        (root / "old" / src).mkdir(parents=True)
        pq.write_table(old, root / "old" / src / "part-0.parquet")
        k = np.where(last, (ts - cut) * files // _DAY, -1)
        for i in range(files):
            slices[i][src] = t.filter(pa.array(k == i))
    return root / "old", slices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=48, help="micro-batch files")
    p.add_argument("--every-s", type=float, default=1.0)
    p.add_argument("--updaters", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench_out/stream")
    args = p.parse_args(argv)

    import ray

    out = Path(args.out)
    gen = GenerateConfig(users=args.users, days=args.days, seed=args.seed)
    plain, _ = cached_dataset(out / f"data_u{args.users}_d{args.days}", gen)
    old, slices = split_last_day(plain, out / "work", args.files, gen)
    events = out / "work" / "events"
    shutil.copytree(old, events)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = str(out / "work" / "out")
    meta = run_segment(str(events), table, progress=False).meta
    t0 = time.perf_counter()
    updaters = start_updaters(table, args.updaters)
    ray.get([u.pid.remote() for u in updaters])
    start_s = time.perf_counter() - t0

    def writer() -> None:
        for i, sl in enumerate(slices):
            for src, t in sl.items():
                tmp = events / src / f".batch-{i:04d}.parquet"
                pq.write_table(t, tmp)
                os.replace(tmp, events / src / f"batch-{i:04d}.parquet")
            time.sleep(args.every_s)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    run = run_stream(str(events), table, updaters, idle_stop_s=3 * args.every_s + 2)
    w.join()
    got = pa.concat_tables(ray.get([u.segments.remote() for u in updaters]))
    full = str(out / "work" / "full")
    run_segment(
        str(events), full, SegmentConfig(epsilon=meta["epsilon"]), progress=False
    )
    mismatches = compare_tables(got, read_segments(full))
    s = run.summary()
    result = {
        "args": vars(args),
        "updaters_start_s": start_s,
        "stream": s,
        "lag_ms": run.lag_ms,
        "mismatches": mismatches,
    }
    (out / "stream_bench.json").write_text(json.dumps(result, indent=2))
    new_events = sum(t.num_rows for sl in slices for t in sl.values())
    print(
        f"\n{args.users:,} users; the last day ({new_events:,} impressions and "
        f"conversions) in {args.files} files, one every {args.every_s:g} s; "
        f"{len(updaters)} updaters (start and load: {start_s:.1f} s)"
    )
    print(
        "| batches | events | events/s per core (busy) | lag p50 | lag p99 | "
        "changes | equal to a full run |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {s['batches']} | {s['events']:,} | {s['events_per_busy_s']:,.0f} | "
        f"{s['lag_p50_ms']:.0f} ms | {s['lag_p99_ms']:.0f} ms | {s['changes']:,} | "
        f"{mismatches or 'yes'} |"
    )
    for u in updaters:
        ray.kill(u)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
