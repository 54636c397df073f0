"""Bounded load against the Serve app on loopback: request bodies, closed- and
open-loop clients, and the autoscaling timeline (replicas of each ranker over
time while the active share of traffic changes).

Used by ``benchmarks/serve_load.py`` and by ``dynamix demo`` (whose report
plots the timeline). Every load is bounded in time and count and stops by
itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES

__all__ = [
    "DEPLOYMENTS",
    "RANKERS",
    "Traffic",
    "compute_shares",
    "closed_loop",
    "open_loop",
    "pct",
    "record_autoscaling",
    "replica_counts",
    "replica_cpu_seconds",
    "summarize",
]

RANKERS = ("ActiveRanker", "PassiveRanker")
#: The deployments whose replicas the autoscaling timeline records.
DEPLOYMENTS = ("Router", *RANKERS)


class Traffic:
    """``/rank`` requests for active and passive users at the histories' instant.

    Args:
        events: dataset root (the candidates come from its ad catalog).
        histories: a ``dynamix histories`` OUT or its loaded
            :class:`~dynamix_ray.histories.HistoryStore` (users and the instant).
        segments: a ``dynamix segment`` OUT (each user's segment then).
        n_candidates: ads per request.
        bodies_per_segment: JSON bodies encoded up front for :meth:`pick`.
    """

    def __init__(
        self,
        events: str,
        histories: Any,
        segments: str,
        n_candidates: int,
        seed: int = 0,
        bodies_per_segment: int = 64,
    ) -> None:
        from dynamix_ray.alure.evaluate import read_events_frame
        from dynamix_ray.histories import read_histories
        from dynamix_ray.serve.store import read_segment_store

        hist = read_histories(histories) if isinstance(histories, str) else histories
        store = read_segment_store(segments)
        self.ts = hist.as_of_ms
        seg = store.lookup(hist.user_id, np.full(len(hist), self.ts))
        self.users = {1: hist.user_id[seg == 1], 0: hist.user_id[seg == 0]}
        if not len(hist.user_id):
            raise ValueError(f"{histories}: no users to send requests for")
        ads = read_events_frame(events, "ad_impressions", list(CANDIDATE_ATTRIBUTES))
        self.catalog = ads.drop_duplicates("ad_id")[
            list(CANDIDATE_ATTRIBUTES)
        ].to_numpy()
        self.rng = np.random.default_rng(seed)
        self.n = min(n_candidates, len(self.catalog))
        self.bodies = {
            s: [self._body(s) for _ in range(bodies_per_segment)]
            for s in (0, 1)
            if len(self.users[s])
        }

    def cands(self) -> np.ndarray:
        idx = self.rng.choice(len(self.catalog), self.n, replace=False)
        return self.catalog[idx].astype(np.int64)

    def _segment(self, active_share: float) -> int:
        """1 with probability ``active_share`` (the other segment when one
        has no users)."""
        s = 1 if self.rng.random() < active_share else 0
        return s if len(self.users[s]) else 1 - s

    def request(self, active_share: float) -> tuple[int, int, int, np.ndarray]:
        """A fresh request as arrays: (segment, user_id, ts_ms, (C, A) ads)."""
        s = self._segment(active_share)
        return s, int(self.rng.choice(self.users[s])), self.ts, self.cands()

    def _body(self, segment: int) -> tuple[int, np.ndarray, bytes]:
        user = int(self.rng.choice(self.users[segment]))
        c = self.cands()
        body = {
            "user_id": user,
            "ts": self.ts,
            "candidates": [
                dict(zip(CANDIDATE_ATTRIBUTES, map(int, r), strict=True)) for r in c
            ],
        }
        return user, c, json.dumps(body).encode()

    def pick(self, active_share: float) -> tuple[int, bytes]:
        """(segment, one of the encoded bodies) with P(active) = ``active_share``."""
        s = self._segment(active_share)
        _, _, b = self.bodies[s][int(self.rng.integers(len(self.bodies[s])))]
        return s, b


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def p50_p99(lat_ms: list[float], ndigits: int = 4) -> dict[str, float | None]:
    """``{"p50_ms", "p99_ms"}`` of latencies, rounded (the benchmarks' rows)."""
    return {
        f"p{q}_ms": None if (v := pct(lat_ms, q)) is None else round(v, ndigits)
        for q in (50, 99)
    }


def summarize(lat_ms: list[float], errors: int, wall_s: float) -> dict[str, Any]:
    return {
        "requests": len(lat_ms) + errors,
        "ok": len(lat_ms),
        "errors": errors,
        "qps": len(lat_ms) / wall_s if wall_s else 0.0,
        "p50_ms": pct(lat_ms, 50),
        "p95_ms": pct(lat_ms, 95),
        "p99_ms": pct(lat_ms, 99),
    }


async def closed_loop(
    url: str, bodies: Any, concurrency: int, duration_s: float, max_requests: int
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last is
    answered, for ``duration_s`` (at most ``max_requests`` in all)."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    sent = 0
    end = time.perf_counter() + duration_s
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=60)
    ) as s:

        async def client() -> None:
            nonlocal errors, sent
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                body = bodies()
                t0 = time.perf_counter()
                try:
                    async with s.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    lat.append(1000 * (time.perf_counter() - t0))
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(lat, errors, wall)


async def open_loop(
    url: str,
    traffic: Traffic,
    rate: float,
    duration_s: float,
    share_at: Callable[[float], float],
    events: dict[float, Any] | None = None,
    max_outstanding: int = 256,
) -> list[dict[str, Any]]:
    """Requests at a fixed rate (``share_at(t)``: active share at second t);
    ``events``: {second: callable} run once in a thread at that time. Returns
    one record per request: start second, latency, status, segment."""
    import aiohttp

    records: list[dict[str, Any]] = []
    pending = dict(events or {})
    sem = asyncio.Semaphore(max_outstanding)
    conn = aiohttp.TCPConnector(limit=max_outstanding)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=60)
    ) as s:

        async def one(t_rel: float, seg: int, body: bytes) -> None:
            async with sem:
                t0 = time.perf_counter()
                status: Any
                try:
                    async with s.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as r:
                        await r.read()
                        status = r.status
                except aiohttp.ClientError as e:
                    status = f"client error: {type(e).__name__}"
                records.append(
                    {
                        "t": t_rel,
                        "ms": 1000 * (time.perf_counter() - t0),
                        "status": status,
                        "segment": seg,
                    }
                )

        tasks = []
        start = time.perf_counter()
        i = 0
        while True:
            t_rel = i / rate
            if t_rel >= duration_s:
                break
            for at in [a for a in pending if a <= t_rel]:
                tasks.append(asyncio.ensure_future(asyncio.to_thread(pending.pop(at))))
            delay = start + t_rel - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            seg, body = traffic.pick(share_at(t_rel))
            tasks.append(asyncio.ensure_future(one(t_rel, seg, body)))
            i += 1
        await asyncio.gather(*tasks)
    return records


def replica_counts(app_name: str = "dynamix") -> dict[str, int]:
    """RUNNING replicas of the router and each ranker of the Serve
    application ``app_name``."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    out = {}
    for name in DEPLOYMENTS:
        d = app.deployments.get(name) if app else None
        states = d.replica_states if d else {}
        out[name] = int(sum(n for s, n in states.items() if str(s).endswith("RUNNING")))
    return out


def replica_cpu_seconds(app_name: str = "dynamix") -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) each live replica process of the router and
    the rankers has used so far, ``{deployment: {pid: seconds}}``, found by
    the process title Ray gives a Serve replica (``ray::ServeReplica:<app>:
    <deployment>``). Local processes only: the benchmark's one-node cluster."""
    import psutil

    out: dict[str, dict[int, float]] = {name: {} for name in DEPLOYMENTS}
    tags = {f"ServeReplica:{app_name}:{name}": name for name in DEPLOYMENTS}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or ())
            for tag, name in tags.items():
                at = title.find(tag)
                end = at + len(tag)
                if at >= 0 and (end == len(title) or not title[end].isalnum()):
                    cpu = proc.cpu_times()
                    out[name][proc.pid] = cpu.user + cpu.system
                    break
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def compute_shares(
    timeline: list[dict[str, Any]], phases: list[tuple[str, float, float]]
) -> dict[str, dict[str, float | None]]:
    """Per phase ``(name, start_s, end_s)``: each deployment's replica-seconds
    (running replicas integrated over the timeline's samples, each held until
    the next sample) and the active ranker's share of the two rankers'
    replica-seconds (``None`` when neither ran)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, lo, hi in phases:
        sums = dict.fromkeys(DEPLOYMENTS, 0.0)
        for row, nxt in zip(timeline, timeline[1:], strict=False):
            dt = max(0.0, min(nxt["t"], hi) - max(row["t"], lo))
            for d in DEPLOYMENTS:
                sums[d] += dt * row.get(d, 0)
        rankers = sums["ActiveRanker"] + sums["PassiveRanker"]
        out[name] = {
            **{f"{d}_replica_s": round(v, 3) for d, v in sums.items()},
            "active_replica_share": sums["ActiveRanker"] / rankers if rankers else None,
        }
    return out


def record_autoscaling(
    base_url: str,
    traffic: Traffic,
    rate: float,
    phase_s: float,
    app_name: str = "dynamix",
    shares: tuple[float, float] = (1 / 3, 2 / 3),
) -> dict[str, Any]:
    """Open-loop load at ``rate`` QPS for two phases of ``phase_s`` seconds,
    the active share going ``shares[0]`` -> ``shares[1]``, while a thread
    samples the running replicas of the router and each ranker (and the
    router's in-flight calls from ``/healthz``) every 0.5 s, and the CPU
    seconds of every replica process (:func:`replica_cpu_seconds`).

    Returns:
        ``rate_qps``, ``phase_s``, ``shares``, ``requests``, ``errors``,
        ``timeline`` (``[{"t", "Router", "ActiveRanker", "PassiveRanker",
        "inflight"}]``), per phase the replica counts in its second half, and
        ``compute`` (:func:`compute_shares` per phase and overall, the share
        of requests that went to active users, and each deployment's CPU
        seconds per request of its own segment's traffic: the router's per
        request, each ranker's per request it ranked).
    """
    import requests

    timeline: list[dict[str, Any]] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    first: dict[int, float] = {}  # pid -> CPU seconds when first seen
    last: dict[int, tuple[str, float]] = {}  # pid -> (deployment, latest)

    def sample_cpu() -> None:
        for name, procs in replica_cpu_seconds(app_name).items():
            for pid, cpu in procs.items():
                first.setdefault(pid, cpu)
                last[pid] = (name, cpu)

    def sample() -> None:
        s = requests.Session()
        while not stop.is_set():
            sample_cpu()
            row: dict[str, Any] = {
                "t": time.perf_counter() - t0,
                **replica_counts(app_name),
            }
            try:  # the router's in-flight calls per ranker, right now
                row["inflight"] = s.get(f"{base_url}/healthz", timeout=5).json()[
                    "inflight"
                ]
            except (requests.RequestException, ValueError, KeyError):
                row["inflight"] = None  # a missed sample, not a failure
            timeline.append(row)
            stop.wait(0.5)

    sample_cpu()  # the baseline of the replicas running before the load
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        recs = asyncio.run(
            open_loop(
                f"{base_url}/rank",
                traffic,
                rate,
                2 * phase_s,
                lambda t: shares[0] if t < phase_s else shares[1],
            )
        )
    finally:
        stop.set()
        th.join()
    sample_cpu()
    ok = [r for r in recs if r["status"] == 200]
    phases = {}
    for name, lo, hi in (("first", 0.0, phase_s), ("second", phase_s, 2 * phase_s)):
        rows = [x for x in timeline if lo + 0.5 * phase_s <= x["t"] < hi]
        phases[name] = {
            f"{r}_{k}": (
                (max(x[r] for x in rows) if k == "max" else rows[-1][r])
                if rows
                else None
            )
            for r in DEPLOYMENTS
            for k in ("max", "end")
        }
    cpu = dict.fromkeys(DEPLOYMENTS, 0.0)
    for pid, (name, latest) in last.items():
        cpu[name] += latest - first[pid]
    by_seg = {seg: sum(r["segment"] == seg for r in ok) for seg in (0, 1)}
    served = {
        "Router": len(ok),
        "ActiveRanker": by_seg[1],
        "PassiveRanker": by_seg[0],
    }
    compute = {
        "phases": compute_shares(
            timeline,
            [
                ("first", 0.0, phase_s),
                ("second", phase_s, 2 * phase_s),
                ("all", 0.0, 2 * phase_s),
            ],
        ),
        "active_traffic_share": by_seg[1] / len(ok) if ok else None,
        "active_traffic_share_by_phase": {
            name: (
                sum(r["segment"] for r in rows) / len(rows)
                if (rows := [r for r in ok if lo <= r["t"] < hi])
                else None
            )
            for name, lo, hi in (
                ("first", 0.0, phase_s),
                ("second", phase_s, 2 * phase_s),
            )
        },
        "cpu_s": {d: round(v, 3) for d, v in cpu.items()},
        "cpu_ms_per_request": {
            d: (1000 * cpu[d] / served[d] if served[d] else None) for d in DEPLOYMENTS
        },
        "active_cpu_share": (
            cpu["ActiveRanker"] / (cpu["ActiveRanker"] + cpu["PassiveRanker"])
            if cpu["ActiveRanker"] + cpu["PassiveRanker"] > 0
            else None
        ),
    }
    return {
        "rate_qps": rate,
        "phase_s": phase_s,
        "shares": list(shares),
        "requests": len(recs),
        "errors": len(recs) - len(ok),
        "timeline": timeline,
        "phases": phases,
        "compute": compute,
    }
