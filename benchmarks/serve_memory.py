"""Benchmark of ranker memory: per replica and per node, with the histories
memory-mapped from one copy per node (``shared_histories: true``, the
default) against one in-memory copy per replica (``false``, as before), at
``--users`` users and 1, 2, 4 replicas (prints figures; never asserts).

A synthetic published histories snapshot (every source, ``--events`` events a
user on average, at most ``--max-seq-len``) and a small random checkpoint;
only the ``ActiveRanker`` deployment runs. Per replica process (psutil):
RSS, USS (pages only it holds) and PSS (shared pages split among their
users). Mapped pages a replica never touched are not resident, so with the
shared store the node's cost is the replicas' USS plus the node cache's size
once (``cache_mib``, held by the page cache when read): ``node_mib``.
Figures go to ``<out>/serve_memory.json``.

    python benchmarks/serve_memory.py                       # 10k, 100k, 1M users
    python benchmarks/serve_memory.py --users 10000 --replicas 1,2   # smoke
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
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamix_ray.io import publish, resolve, write_json, write_parquet  # noqa: E402
from dynamix_ray.samples import HISTORY_SOURCES  # noqa: E402
from dynamix_ray.schema import SOURCES  # noqa: E402

_BUCKETS = 8


def synthetic_histories(out: str, users: int, events: int, seq: int) -> int:
    """A published ``dynamix histories`` version of random compact events;
    returns its bytes."""
    rng = np.random.default_rng(0)
    fs, root = resolve(out)
    ids = np.arange(users, dtype=np.int64) * 7 + 1
    with publish(fs, root, ["histories"]) as v:
        folder = v.path("histories")
        for src, attrs in HISTORY_SOURCES.items():
            n = np.minimum(rng.poisson(events, users), seq)
            uid = np.repeat(ids, n)
            ts = np.sort(rng.integers(0, 10**9, len(uid)))  # sorted per user below
            order = np.lexsort((ts, uid))
            uid, ts = uid[order], ts[order] + 1_700_000_000_000
            cols = {}
            for a in attrs:
                if a == "dwell_ms":
                    cols[a] = pa.array(rng.random(len(uid)) * 5000)
                else:
                    t = SOURCES[src].attributes[a]
                    hi = min(1000, np.iinfo(t.to_pandas_dtype()).max)
                    cols[a] = pa.array(rng.integers(0, hi, len(uid)), t)
            bucket = (uid // 7) % _BUCKETS
            for b in range(_BUCKETS):
                m = bucket == b
                t = pa.table(
                    {
                        "user_id": uid[m],
                        "ts": ts[m],
                        **{k: c.filter(pa.array(m)) for k, c in cols.items()},
                    }
                )
                write_parquet(fs, f"{folder}/{src}/bucket={b:05d}/part-0.parquet", t)
        write_json(
            fs,
            f"{folder}/_meta.json",
            {
                "as_of_ms": 1_700_000_000_000 + 10**9 + 1,
                "max_seq_len": seq,
                "users": users,
            },
        )
    return int(sum(f.stat().st_size for f in Path(out).rglob("*.parquet")))


def replica_memory(deployment: str) -> list[dict[str, float]]:
    import psutil
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] != "serve" or deployment not in a["name"]:
            continue
        pid = ray.get(
            ray.get_actor(a["name"], namespace="serve").__ray_call__.remote(
                lambda self: os.getpid()
            )
        )
        m = psutil.Process(pid).memory_full_info()
        out.append(
            {
                "rss_mib": m.rss / 2**20,
                "uss_mib": m.uss / 2**20,
                "pss_mib": m.pss / 2**20,
            }
        )
    return out


def measure(hist: str, ckpt: str, replicas: int, shared: bool) -> dict:
    from ray import serve

    from dynamix_ray.serve.ranker import RankerDeployment

    spec = {
        "checkpoint": ckpt,
        "shared_histories": shared,
        "max_batch_size": 8,
    }
    app = (
        serve.deployment(RankerDeployment)
        .options(
            name="ActiveRanker",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": 0.01},
        )
        .bind(spec, hist, 1)
    )
    t0 = time.perf_counter()
    handle = serve.run(app, name="mem_bench", route_prefix=None)
    start_s = time.perf_counter() - t0
    cands = np.ones((10, 10), np.int64)
    for u in range(20):  # touch the histories
        handle.rank.remote(u * 7 + 1, 1_700_000_000_000 + 10**9, cands).result()
    time.sleep(1)
    per = replica_memory("ActiveRanker")
    serve.delete("mem_bench")
    cache = Path(os.environ["DYNAMIX_NODE_CACHE"])
    cache_mib = (
        sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20 if shared else 0.0
    )
    return {
        "cache_mib": round(cache_mib, 1),
        "node_mib": round(sum(r["uss_mib"] for r in per) + cache_mib, 1),
        "replicas": replicas,
        "shared": shared,
        "start_s": round(start_s, 1),
        "per_replica": [{k: round(v, 1) for k, v in r.items()} for r in per],
        "max_uss_mib": round(max(r["uss_mib"] for r in per), 1),
        "node_pss_mib": round(sum(r["pss_mib"] for r in per), 1),
        "node_rss_mib": round(sum(r["rss_mib"] for r in per), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="10000,100000,1000000")
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--events", type=int, default=20, help="mean events a user a source")
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--out", default="bench_out/serve_memory")
    args = p.parse_args(argv)

    import ray

    from dynamix_ray.histories import NODE_CACHE_ENV
    from dynamix_ray.model import DynamixCTR, ModelConfig
    from dynamix_ray.model.checkpoint import save_checkpoint

    work = Path(tempfile.mkdtemp(prefix="serve-mem-"))
    os.environ[NODE_CACHE_ENV] = str(work / "node-cache")  # the workers inherit it
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = ModelConfig(max_seq_len=args.max_seq_len)
    ckpt = str(work / "ckpt")
    save_checkpoint(ckpt, DynamixCTR(cfg).eval(), cfg)
    rows = []
    for n in (int(x) for x in args.users.split(",")):
        hist = str(work / f"hist_{n}")
        size = synthetic_histories(hist, n, args.events, args.max_seq_len)
        for shared in (False, True):
            for r in (int(x) for x in args.replicas.split(",")):
                row = {
                    "users": n,
                    "parquet_mib": round(size / 2**20, 1),
                    **measure(hist, ckpt, r, shared),
                }
                rows.append(row)
                print(
                    f"{n:>9,} users, {r} replica(s), shared={shared}: max private "
                    f"(USS) {row['max_uss_mib']} MiB a replica, node "
                    f"{row['node_mib']} MiB (USS + cache {row['cache_mib']}), "
                    f"start {row['start_s']} s",
                    flush=True,
                )
        shutil.rmtree(hist, ignore_errors=True)
        shutil.rmtree(work / "node-cache", ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_memory.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'serve_memory.json'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
