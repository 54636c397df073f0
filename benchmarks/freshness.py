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
4. **Stream freshness**: a producer XADDs an event to a Redis stream and a
   ``dynamix ingest ...?stream= --follow`` process (the consumer, started
   here) applies it: the lag from the XADD to the first read that has it,
   p50 / p99, with the background writer publishing to the stream.
5. **Shards**: the same users ingested into one and into two servers: bytes
   per user on each server (``INFO memory``) and the batch read's latency.

Local ``redis-server``s on 127.0.0.1 (started and stopped here). Figures go
to ``<out>/freshness.json``.

    python benchmarks/freshness.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamix_ray.localcluster import _free_ports  # noqa: E402
from dynamix_ray.online import (  # noqa: E402
    RedisHistories,
    ingest,
    local_redis,
    publish_events,
    stop_process,
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
        cols = {c: np.array([1]) for c in hist.columns["ad_impressions"]}
        writer = RedisHistories.connect(f"{url}?ns=bench")

        def append(store: RedisHistories) -> Callable[[int, int], None]:
            def write(user: int, ts_ms: int) -> None:
                store.append(
                    "ad_impressions", np.array([user]), np.array([ts_ms]), cols
                )

            return write

        with background_writes(append(writer), args.rate):
            lags = lags_until_visible(hist, append(hist), args.events, 3 * 10**12)
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
        res["stream"] = stream_lag(url, args)
        print(f"stream freshness (XADD -> first read that has it): {res['stream']}")
        res["shards"] = shard_costs(url, str(work / "raw"), batches, args.users)
        for k, v in res["shards"].items():
            print(f"{k}: {v}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "freshness.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'freshness.json'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


@contextmanager
def background_writes(write: Callable[[int, int], None], rate: float) -> Iterator[None]:
    """``write(user, now_ms)`` of random other users at ``rate`` a second in
    a thread, for as long as the ``with`` block runs."""
    stop = threading.Event()

    def run() -> None:
        rng = np.random.default_rng(1)
        gap = 1.0 / rate
        while not stop.is_set():
            t0 = time.perf_counter()
            write(int(rng.integers(10**12, 2 * 10**12)), int(time.time() * 1000))
            time.sleep(max(0.0, gap - (time.perf_counter() - t0)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def lags_until_visible(
    hist: RedisHistories, write: Callable[[int, int], None], n: int, first_user: int
) -> list[float]:
    """Milliseconds from ``write``'s start to the first read of ``hist`` that
    has the event, for ``n`` events of new users from ``first_user`` on."""
    lags = []
    for i in range(n):
        user = first_user + i
        t_event = int(time.time() * 1000)
        t0 = time.perf_counter()
        write(user, t_event)
        while not hist.rows(np.array([user]), np.array([t_event + 60_001]))[
            "ad_impressions.mask"
        ].any():
            pass
        lags.append(1000 * (time.perf_counter() - t0))
    return lags


def stream_lag(url: str, args: argparse.Namespace) -> dict:
    """XADD -> visible, through a ``dynamix ingest --follow`` process."""
    import redis

    client = redis.Redis.from_url(url)
    target = f"{url}?ns=bench-stream"
    RedisHistories.create(target, RedisHistories.connect(f"{url}?ns=bench").columns, 64)
    hist = RedisHistories.connect(target)
    exe = Path(sys.executable).with_name("dynamix")
    proc = subprocess.Popen(
        [
            str(exe),
            "ingest",
            f"{url}?stream=bench-ev",
            target,
            "--follow",
            "--batch",
            "200",
            "--max-seq-len",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    cols = {c: np.array([1]) for c in hist.columns["ad_impressions"]}

    def publish(producer: Any) -> Callable[[int, int], None]:
        def write(user: int, ts_ms: int) -> None:
            publish_events(
                producer,
                "bench-ev",
                "ad_impressions",
                np.array([user]),
                np.array([ts_ms]),
                cols,
            )

        return write

    try:
        # the consumer is up once it applied a first event
        probe = 4 * 10**12
        publish(client)(probe, 0)
        deadline = time.monotonic() + 120
        while not hist.rows(np.array([probe]), np.array([120_000]))[
            "ad_impressions.mask"
        ].any():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stream consumer did not start")
            time.sleep(0.05)
        with background_writes(publish(redis.Redis.from_url(url)), args.rate):
            lags = lags_until_visible(hist, publish(client), args.events, 5 * 10**12)
    finally:
        stop_process(proc)
    dead = client.xlen("bench-ev:dead")
    return {
        "events": args.events,
        "background_rate": args.rate,
        "dead_letters": dead,
        **p50_p99(lags),
    }


def shard_costs(url: str, raw: str, batches: list, n_users: int) -> dict:
    """The same users in one server and in two: memory per user and reads."""
    import redis

    out: dict = {}
    (port,) = _free_ports(1)
    with local_redis(port) as second:
        fresh = []
        for u in (url, second):
            c = redis.Redis.from_url(u)
            c.flushdb()
            fresh.append(c)
        for name, target in (
            ("one_server", f"{url}?ns=s1"),
            ("two_shards", f"{url},{second}?ns=s2"),
        ):
            base = [c.info("memory")["used_memory"] for c in fresh]
            m = ingest(raw, target, 64, progress=False)
            hist = RedisHistories.connect(target)
            users = len(np.unique(np.concatenate(batches)))  # read sample
            used = [
                c.info("memory")["used_memory"] - b
                for c, b in zip(fresh, base, strict=True)
            ]
            ts = np.full(8, 2**62)
            lat = []
            for b in batches:
                t0 = time.perf_counter()
                hist.rows(b, ts)
                lat.append(1000 * (time.perf_counter() - t0))
            out[name] = {
                "events": sum(m["events"].values()),
                "ingest_s": m["wall_s"],
                "used_mib_per_server": [round(x / 2**20, 1) for x in used],
                "read_8_users_ms": p50_p99(lat),
                "bytes_per_user": round(sum(used) / n_users),
                "sampled_users": users,
            }
            for c in fresh:
                c.flushdb()
    return out


if __name__ == "__main__":
    sys.exit(main())
