"""Benchmark of ``/candidates``: the precomputed look-up against the former
per-call computation, and the precompute job's cost (prints figures; never
asserts times).

1. **Look-up latency** at ``--lookup-users`` users (100k and 1M), each with
   ``--per-user`` candidates: the Retriever's own work
   (``CandidateTable.lookup``, in this process) and one call through a Serve
   handle to a ``Retriever`` replica (the Serve hop included), p50 / p99 over
   ``--queries`` random users.
2. **The former per-call computation** (``u2u_candidates`` for one user over
   every conversion in memory, what ``/candidates`` did before) at 10^5 and
   10^6 conversions.
3. **The job** (``dynamix candidates``) at ``--job-users`` users (a ladder:
   the same code at 1x and 4x): wall time, per-phase seconds and candidate
   rows per second per core.

Figures go to ``<out>/candidates_bench.json``.

    python benchmarks/candidates.py
    python benchmarks/candidates.py --lookup-users 10000 --job-users 2000  # smoke
    python benchmarks/candidates.py --lookup-users "" --conversions "" --job-users 20000,80000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamix_ray.alure.candidates import CandidateConfig, u2u_candidates  # noqa: E402
from dynamix_ray.alure.candidates_job import (  # noqa: E402
    CANDIDATES_SCHEMA,
    CandidateTable,
    run_candidates,
)
from dynamix_ray.io import publish, resolve, write_json, write_parquet  # noqa: E402
from dynamix_ray.serve.loadgen import p50_p99  # noqa: E402


def synthetic_table(users: int, per_user: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    uid = np.repeat(np.arange(users, dtype=np.int64) * 7 + 1, per_user)
    return pa.table(
        {
            "user_id": uid,
            "ad_id": rng.integers(0, 10**7, len(uid)),
            "score": np.sort(rng.random(len(uid)))[::-1].copy(),
            "rank": np.tile(np.arange(1, per_user + 1, dtype=np.int32), users),
        },
        schema=CANDIDATES_SCHEMA,
    )


def lookup_latency(table: pa.Table, queries: int, k: int) -> dict[str, float]:
    t = CandidateTable.from_table(table, {"as_of_ms": 0}, "bench")
    rng = np.random.default_rng(1)
    users = rng.choice(t.user_id, queries)
    lat = []
    for u in users:
        t0 = time.perf_counter()
        t.lookup(int(u), k)
        lat.append(1000 * (time.perf_counter() - t0))
    return p50_p99(lat)


def handle_latency(out: str, users: int, queries: int, k: int) -> dict[str, float]:
    """One ``candidates`` call at a time through a Serve handle."""
    from ray import serve

    from dynamix_ray.serve.app import Retriever

    app = (
        serve.deployment(Retriever)
        .options(name="Retriever", ray_actor_options={"num_cpus": 0.5})
        .bind({"table": out})
    )
    handle = serve.run(app, name="cands_bench", route_prefix=None)
    rng = np.random.default_rng(2)
    lat = []
    for _ in range(20):  # warm-up
        handle.candidates.remote(1, k).result()
    for u in rng.integers(0, users, queries) * 7 + 1:  # synthetic_table's ids
        t0 = time.perf_counter()
        handle.candidates.remote(int(u), k).result()
        lat.append(1000 * (time.perf_counter() - t0))
    serve.delete("cands_bench")
    return p50_p99(lat)


def write_table(table: pa.Table, out: str) -> None:
    fs, root = resolve(out)
    with publish(fs, root, ["candidates"]) as v:
        n = table.num_rows
        step = max(1, n // 16)
        for i, lo in enumerate(range(0, n, step)):
            write_parquet(
                fs,
                f"{v.path('candidates')}/bucket={i:05d}/part-0.parquet",
                table.slice(lo, step),
            )
        write_json(fs, f"{v.path('candidates')}/_meta.json", {"as_of_ms": 0})


def per_call_computation(conversions: int, queries: int) -> dict[str, float]:
    """``u2u_candidates`` of one user (15 neighbours) over every conversion."""
    rng = np.random.default_rng(3)
    n_users = max(1000, conversions // 10)
    conv = pd.DataFrame(
        {
            "user_id": rng.integers(0, n_users, conversions),
            "ts_ms": rng.integers(0, 10**9, conversions),
            "ad_id": rng.integers(0, 50_000, conversions),
        }
    )
    ads = pd.DataFrame(
        {"ad_id": np.arange(50_000), "advertiser_id": np.arange(50_000) // 10}
    )
    lat = []
    for q in range(queries):
        edges = pd.DataFrame(
            {
                "user_id": np.full(15, q),
                "neighbor_id": rng.integers(0, n_users, 15),
                "similarity": rng.random(15).astype(np.float32),
            }
        )
        t0 = time.perf_counter()
        u2u_candidates(edges, conv, ads, 10**9, CandidateConfig(cap=100))
        lat.append(1000 * (time.perf_counter() - t0))
    return p50_p99(lat)


_SESSION_T0 = 0.0  # when main() started Ray: the workers to watch


def job_run(users: int, work: Path, with_blend: bool = False) -> dict:
    """``dynamix candidates`` at ``users`` users (random embeddings, the
    default graph): u2u alone, and with ``with_blend`` the blend too, each
    with its wall time and peak memory (driver, largest worker)."""
    from dynamix_ray.alure.embed import embeddings_table
    from dynamix_ray.alure.evaluate import read_events_frame
    from dynamix_ray.alure.graph import U2UConfig, build_u2u
    from dynamix_ray.config import GenerateConfig
    from dynamix_ray.events import run_bucket
    from dynamix_ray.runtime import cluster_cpus
    from dynamix_ray.synth import generate

    root = work / f"job_{users}"
    shutil.rmtree(root, ignore_errors=True)
    generate(str(root / "raw"), GenerateConfig(users=users, days=3, seed=5), None)
    buckets = max(2, users // 5000)
    store = run_bucket(str(root / "raw"), str(root / "events"), buckets, progress=False)
    ids = np.unique(
        read_events_frame(store.url, "ad_impressions", ["user_id"])["user_id"]
    )
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(ids), 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    build_u2u(
        embeddings_table({"user_id": ids, "embedding": emb}, 0, "bench", 32),
        str(root / "u2u"),
        U2UConfig(),
        progress=False,
    )
    from scale import Sampler

    from dynamix_ray.alure.retrieval import BlendSpec

    out = {"users": users, "buckets": buckets}
    cpus = cluster_cpus()
    # the blend the skewed world's evaluation chose (benchmarks/retrieval.py)
    spec = BlendSpec(
        weights={"u2u": 0.6, "most_popular": 0.1, "item_cf": 0.3},
        half_life_s={"u2u": 8 * 86_400.0, "most_popular": 86_400.0, "item_cf": None},
    )
    for name, blend in (("u2u", None), ("blend", spec)):
        if name == "blend" and not with_blend:
            continue
        mem = Sampler()
        mem.t0 = _SESSION_T0  # this session's workers started before the job
        with mem:
            t0 = time.perf_counter()
            meta = run_candidates(
                str(root / "u2u"),
                store.url,
                str(root / f"c_{name}"),
                progress=False,
                blend_spec=blend,
            )
            wall = time.perf_counter() - t0
        out[name] = {
            "edges": meta["edges"],
            "users": meta["users"],
            "rows": meta["rows"],
            "wall_s": round(wall, 2),
            "phase_s": meta["phase_s"],
            "rows_per_s_per_core": round(meta["rows"] / wall / cpus),
            "edges_per_s_per_core": round(meta["edges"] / wall / cpus),
            "driver_peak_gib": round(mem.driver / 2**30, 2),
            "largest_worker_gib": round(mem.worker / 2**30, 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lookup-users", default="100000,1000000")
    p.add_argument("--per-user", type=int, default=50)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--conversions", default="100000,1000000")
    p.add_argument("--job-users", default="5000,20000")
    p.add_argument(
        "--blend", action="store_true", help="also time `dynamix candidates --blend`"
    )
    p.add_argument("--out", default="bench_out/candidates")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args(argv)

    import ray

    global _SESSION_T0
    _SESSION_T0 = time.time()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(args.work or tempfile.mkdtemp(prefix="cands-bench-"))
    res: dict = {"lookup": [], "per_call": [], "job": []}
    for n in (int(x) for x in args.lookup_users.split(",") if x):
        table = synthetic_table(n, args.per_user)
        local = lookup_latency(table, args.queries, args.k)
        path = str(work / f"table_{n}")
        write_table(table, path)
        del table
        via = handle_latency(path, n, min(args.queries, 1000), args.k)
        row = {"users": n, "rows": n * args.per_user, "lookup": local, "handle": via}
        res["lookup"].append(row)
        print(
            f"look-up {n:>9,} users: in-process {local}, through a handle {via}",
            flush=True,
        )
        shutil.rmtree(path, ignore_errors=True)
    for c in (int(x) for x in args.conversions.split(",") if x):
        r = {"conversions": c, **per_call_computation(c, 30)}
        res["per_call"].append(r)
        print(f"former per-call computation at {c:>9,} conversions: {r}", flush=True)
    for n in (int(x) for x in args.job_users.split(",") if x):
        r = job_run(n, work, args.blend)
        res["job"].append(r)
        print(f"job at {n:,} users: {r}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates_bench.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'candidates_bench.json'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
