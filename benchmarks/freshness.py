"""Benchmark of the Redis online store (prints figures; never asserts):

1. **Freshness lag**: an event is appended (``RedisHistories.append``, what
   ``dynamix ingest`` and a stream consumer call) and a reader polls the
   user's histories until a request that may see it (``ts`` past the event
   + 60 s) does: the lag from the append's start to the first read that has
   it, p50 / p99 over ``--events`` events, with ``--writers`` background
   writers appending other users' events at ``--rate`` events/s.
2. **Read cost**: ``rows()`` of a ranker batch (8 users, every source) from
   Redis against the in-memory snapshot (``HistoryStore.rows``).
3. **Ingest rate**: the bootstrap of ``--users`` generated users (events/s).

A local ``redis-server`` on 127.0.0.1 (started and stopped here). Figures go
to ``<out>/freshness.json``.

    python benchmarks/freshness.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamix_ray.localcluster import _free_ports  # noqa: E402
from dynamix_ray.online import (  # noqa: E402
    RedisHistories,
    ingest,
    local_redis,
)
from dynamix_ray.serve.loadgen import p50_p99  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--events", type=int, default=500)
    p.add_argument("--rate", type=float, default=2000.0, help="background events/s")
    p.add_argument("--out", default="bench_out/freshness")
    args = p.parse_args(argv)

    from dynamix_ray.config import GenerateConfig
    from dynamix_ray.histories import read_histories, run_histories
    from dynamix_ray.synth import generate

    work = Path(tempfile.mkdtemp(prefix="fresh-"))
    res: dict = {}
    (port,) = _free_ports(1)
    with local_redis(port) as url:
        generate(
            str(work / "raw"), GenerateConfig(users=args.users, days=3, seed=4), None
        )
        m = ingest(str(work / "raw"), f"{url}?ns=bench", 64, progress=False)
        n = sum(m["events"].values())
        res["ingest"] = {
            "events": n,
            "wall_s": m["wall_s"],
            "events_per_s": round(n / m["wall_s"]),
        }
        print(f"ingest: {n:,} events in {m['wall_s']:.1f} s", flush=True)

        hist = RedisHistories.connect(f"{url}?ns=bench")
        stop = threading.Event()
        cols = {c: np.array([1]) for c in hist.columns["ad_impressions"]}
        writer = RedisHistories.connect(f"{url}?ns=bench")

        def background() -> None:
            rng = np.random.default_rng(1)
            gap = 1.0 / args.rate
            while not stop.is_set():
                t0 = time.perf_counter()
                u = int(rng.integers(10**12, 2 * 10**12))
                writer.append(
                    "ad_impressions",
                    np.array([u]),
                    np.array([int(time.time() * 1000)]),
                    cols,
                )
                time.sleep(max(0.0, gap - (time.perf_counter() - t0)))

        bg = threading.Thread(target=background, daemon=True)
        bg.start()
        lags = []
        for i in range(args.events):
            user = 3 * 10**12 + i
            t_event = int(time.time() * 1000)
            t0 = time.perf_counter()
            hist.append("ad_impressions", np.array([user]), np.array([t_event]), cols)
            while True:
                got = hist.rows(np.array([user]), np.array([t_event + 60_001]))
                if got["ad_impressions.mask"].any():
                    break
            lags.append(1000 * (time.perf_counter() - t0))
        stop.set()
        bg.join(5)
        res["freshness"] = {
            "events": args.events,
            "background_rate": args.rate,
            **p50_p99(lags),
        }
        print(
            f"freshness lag (append -> first read that has it): {res['freshness']}",
            flush=True,
        )

        run_histories(str(work / "raw"), str(work / "h"), None, 64, progress=False)
        snap = read_histories(str(work / "h"))
        rng = np.random.default_rng(2)
        batches = [rng.choice(snap.user_id, 8) for _ in range(300)]
        ts = np.full(8, snap.as_of_ms + 60_000)
        for name, store in (("snapshot", snap), ("redis", hist)):
            lat = []
            for b in batches:
                t0 = time.perf_counter()
                store.rows(b, ts)
                lat.append(1000 * (time.perf_counter() - t0))
            res[f"rows_{name}"] = p50_p99(lat)
            print(
                f"rows() of 8 users from the {name}: {res[f'rows_{name}']}", flush=True
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "freshness.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'freshness.json'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
