"""Benchmark of the Retriever's memory: the candidates table memory-mapped
from one copy per node (``shared_table: true``, the default) against one
in-memory copy per process (``false``, as before), at ``--users`` users with
``--per-user`` candidates each (prints figures; never asserts).

Per mode and size, a fresh spawned process (a stand-in for one Retriever
replica) opens the published table with ``candidates_job.open_candidates``,
times ``--queries`` look-ups of random users (``lookup`` and ``tolist``, what
``Retriever.candidates`` does; p50 / p99), then touches every page of the
table (what a replica does over time, as every user gets asked) and times
them again (a mapped page's first touch in a process costs a page fault;
later ones do not). Its memory (psutil, minus what it held before opening):
USS (pages only it holds), PSS, and anonymous memory (its heap). This process keeps the node copy mapped and
touched meanwhile, as another replica on the node would, so mapped pages are
shared and stay out of the replica's USS. The node's cost with the shared
table is the replicas' USS plus the node copy once (``cache_mib``, in the
page cache). Figures go to ``<out>/candidates_memory.json``.

    python benchmarks/candidates_memory.py                        # 100k, 1M users
    python benchmarks/candidates_memory.py --users 20000 --queries 500  # smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candidates import synthetic_table, write_table  # noqa: E402

from dynamix_ray.alure.candidates_job import open_candidates  # noqa: E402
from dynamix_ray.histories import NODE_CACHE_ENV  # noqa: E402
from dynamix_ray.serve.loadgen import p50_p99  # noqa: E402


def memory_mib() -> dict[str, float]:
    """This process's RSS, USS, PSS and anonymous memory, in MiB."""
    import psutil

    m = psutil.Process().memory_full_info()
    with open("/proc/self/smaps_rollup") as fh:
        anon_kb = next(int(ln.split()[1]) for ln in fh if ln.startswith("Anonymous:"))
    return {
        "rss_mib": m.rss / 2**20,
        "uss_mib": m.uss / 2**20,
        "pss_mib": m.pss / 2**20,
        "anon_mib": anon_kb / 2**10,
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 1) for k in after}


def touch_all(table: Any) -> int:
    """Read every page of the table's arrays (a checksum, so nothing is
    skipped)."""
    return int(table.user_id.sum() + table.offsets.sum() + table.ad_id.sum()) + int(
        table.score.sum()
    )


def lookup_latency(
    table: Any, users: int, queries: int, k: int, seed: int
) -> dict[str, float]:
    """p50 / p99 of ``queries`` look-ups of random users, one at a time."""
    rng = np.random.default_rng(seed)
    lat = []
    for u in rng.integers(0, users, queries) * 7 + 1:  # synthetic_table's ids
        t0 = time.perf_counter()
        ads, scores = table.lookup(int(u), k)
        ads.tolist(), scores.tolist()
        lat.append(1000 * (time.perf_counter() - t0))
    return p50_p99(lat)


def replica(url: str, shared: bool, users: int, queries: int, k: int, conn) -> None:
    """One stand-in Retriever replica (a spawned process): open, look up,
    touch everything; its figures go back through ``conn``."""
    before = memory_mib()
    t0 = time.perf_counter()
    table = open_candidates(url, shared)
    open_s = time.perf_counter() - t0
    opened = memory_mib()
    cold = lookup_latency(table, users, queries, k, seed=2)
    looked = memory_mib()
    touch_all(table)
    touched = memory_mib()
    warm = lookup_latency(table, users, queries, k, seed=3)
    conn.send(
        {
            "open_s": round(open_s, 2),
            "lookup_ms": cold,
            "lookup_after_touching_all_ms": warm,
            "opened": _delta(opened, before),
            "after_lookups": _delta(looked, before),
            "after_touching_all": _delta(touched, before),
        }
    )
    conn.close()


def measure(url: str, shared: bool, users: int, queries: int, k: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=replica, args=(url, shared, users, queries, k, there))
    proc.start()
    got = here.recv()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the replica process failed (exit code {proc.exitcode})")
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="100000,1000000")
    p.add_argument("--per-user", type=int, default=50)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--out", default="bench_out/candidates_memory")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cands-mem-"))
    os.environ[NODE_CACHE_ENV] = str(work / "node-cache")  # the replicas inherit it
    rows = []
    for n in (int(x) for x in args.users.split(",") if x):
        url = str(work / f"table_{n}")
        table = synthetic_table(n, args.per_user)
        write_table(table, url)
        del table
        t0 = time.perf_counter()
        node_copy = open_candidates(url, shared=True)  # builds the node's copy
        build_s = time.perf_counter() - t0
        touch_all(node_copy)  # "another replica" holding every page
        cache = work / "node-cache"
        cache_mib = sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20
        for shared in (False, True):
            row = {
                "users": n,
                "candidates": n * args.per_user,
                "shared": shared,
                "cache_mib": round(cache_mib, 1),
                "build_s": round(build_s, 1),
                **measure(url, shared, n, args.queries, args.k),
            }
            rows.append(row)
            a, lat = row["after_touching_all"], row["lookup_ms"]
            print(
                f"{n:>9,} users, {row['candidates']:>11,} candidates, "
                f"shared={shared!s:5}: replica USS +{a['uss_mib']} MiB "
                f"(anon +{a['anon_mib']}, PSS +{a['pss_mib']}) after touching "
                f"all, +{row['after_lookups']['uss_mib']} MiB after "
                f"{args.queries} look-ups; look-up {lat} (after touching all "
                f"{row['lookup_after_touching_all_ms']}); open "
                f"{row['open_s']} s; node copy {row['cache_mib']} MiB",
                flush=True,
            )
        del node_copy
        shutil.rmtree(url, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates_memory.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'candidates_memory.json'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
