"""Benchmark of ``dynamix u2u``: neighbour recall against exact search and
build time at 100k and 1M users (prints figures; never asserts times).

The embeddings are synthetic: ``--clusters`` Gaussian interest clusters on the
unit sphere in ``--dim`` dimensions (the user tower's default width), users
spread over ``--countries`` countries, so the graph is built per country as in
the paper. For each size: the k-means + IVF build per country, the queries
sharded over Ray Data, the recall of the IVF neighbours against faiss exact
search on ``--recall-sample`` queries per country, at the defaults
(``U2UConfig()``: bounded work per query) and at ALURE's k1 = 400 / 50
probed, side by side (``--configs``). Figures go to ``<out>/u2u_bench.json``.

    python benchmarks/u2u.py                  # 100k and 1M users
    python benchmarks/u2u.py --sizes 20000    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dynamix_ray.alure.graph import U2UConfig, build_u2u


def synthetic_embeddings(
    n: int, dim: int, clusters: int, countries: int, noise: float, seed: int
) -> pa.Table:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)]
    x += noise * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return pa.table(
        {
            "user_id": pa.array(np.arange(n, dtype=np.int64) * 7 + 1),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1)), dim
            ),
            "country": pa.array(rng.integers(0, countries, n).astype(np.int16)),
        }
    )


#: ALURE's own settings: k1 = 400 clusters per country, 50 probed.
PAPER = (400, 50)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="users, comma-separated")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--countries", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.35, help="spread around a center")
    p.add_argument("--recall-sample", type=int, default=1000)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument(
        "--configs",
        default="default,paper",
        help="default: dynamix u2u's defaults (bounded work per query); paper: "
        "k1 = 400, 50 clusters probed (ALURE's settings); comma-separated, each "
        "size runs every one",
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        table = synthetic_embeddings(
            n, args.dim, args.clusters, args.countries, args.noise, seed=n
        )
        for name in args.configs.split(","):
            k1, probe = PAPER if name == "paper" else (None, None)
            cfg = U2UConfig(k1=k1, k1_probe=probe, recall_sample=args.recall_sample)
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                meta = build_u2u(table, d, cfg, progress=False)
                wall = time.perf_counter() - t0
            g = next(iter(meta["groups"].values()))
            row = {
                "users": n,
                "config": name,
                "countries": len(meta["groups"]),
                "k1": g["k1"],
                "k1_probe": g["k1_probe"],
                "k2": cfg.k2,
                "recall_at_k2": meta["recall_at_k2"],
                "build_s": meta["build_s"],
                "query_s": meta["query_s"],
                "wall_s": wall,
                "edges": meta["edges"],
            }
            results.append(row)
            print(
                f"{n:>9,} users {name:8s} ({row['countries']} countries, k1={row['k1']}, "
                f"probe={row['k1_probe']}, k2={row['k2']}): recall@{cfg.k2} "
                f"{row['recall_at_k2']:.4f} (target >= 0.95), k-means+index+recall "
                f"{row['build_s']:.1f} s, sharded queries {row['query_s']:.1f} s, "
                f"total {wall:.1f} s",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "u2u_bench.json"
    path.write_text(
        json.dumps(
            {
                "config": vars(args),
                "results": results,
                "ray_version": ray.__version__,
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
