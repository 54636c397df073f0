"""``dynamix demo``: every stage end to end on small data, in plain phases.

1. generate events with planted truth;
2. segment them, and score the segments against the truth;
3. run every arm of both experiments briefly (Ray Train), with throughput
   and the epsilon sweep;
4. ALURE: embed users as of the last midnight, build the user graph,
   evaluate its candidates on the last day, precompute the candidates;
5. serve: start the app, send real requests (`/rank`, a malformed one,
   `/candidates`, `/healthz`), then a load whose active share rises;
6. write the report.

Each phase is a function that returns what it made; :func:`run_demo` calls
them in order and prints a line or two per phase (Ray's own logs go to its
session folder unless ``-v``: ``runtime.ensure_ray``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynamix_ray.alure.candidates import CandidateConfig
from dynamix_ray.alure.candidates_job import run_candidates
from dynamix_ray.alure.embed import EmbedConfig, read_embeddings, run_embed
from dynamix_ray.alure.evaluate import evaluate_retrieval, retrieval_summary
from dynamix_ray.alure.graph import build_u2u, read_u2u
from dynamix_ray.config import GenerateConfig
from dynamix_ray.events import open_store
from dynamix_ray.experiments import ARMS, ExperimentConfig, run_experiment
from dynamix_ray.io import resolve, write_json
from dynamix_ray.report import experiment_summary, write_report
from dynamix_ray.runtime import apply_ray_log_levels
from dynamix_ray.samples import SampleConfig
from dynamix_ray.schema import CANDIDATE_ATTRIBUTES
from dynamix_ray.segments.pipeline import read_segments, run_segment
from dynamix_ray.serve.loadgen import Traffic, record_autoscaling
from dynamix_ray.synth import generate, read_truth_users, segment_recovery

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Args:
    users / days / seed: the generated data.
    seeds: training seeds per arm.
    samples: the sample settings of every run (shorter histories than
        ``dynamix train``'s default, so the demo fits in minutes).
    alure: run the ALURE phase (and serve ``/candidates``).
    serve / port / load_s / load_qps: the serving phase: its HTTP port on
        127.0.0.1, seconds per load phase, open-loop requests per second.
    """

    users: int = 800
    days: int = 4
    seed: int = 0
    seeds: tuple[int, ...] = (0,)
    samples: SampleConfig = field(default_factory=lambda: SampleConfig(max_seq_len=32))
    alure: bool = True
    serve: bool = True
    port: int = 8000
    load_s: float = 25.0
    load_qps: float = 30.0

    @property
    def phases(self) -> int:
        return 4 + int(self.alure) + int(self.serve)


#: Arms the demo leaves out: the selection reading of Table 3 is measured by
#: benchmarks/sensitivity.sh and request_cost.py (docs/experiments.md); its
#: run would take ``make demo`` past 10 minutes on 2 cores.
DEMO_SKIPS = ("boost-selective-only",)


def _segment(out: str, events: str) -> str:
    """Phase 2: the segment table, and its recovery of the planted truth."""
    seg = f"{out}/segments_run"
    result = run_segment(events, seg, progress=True)
    print(result.summary())
    rec = segment_recovery(read_truth_users(events), read_segments(seg))
    print(
        f"planted-truth recovery over {rec['eligible_rows']:,} eligible rows: "
        f"precision {rec['precision']:.3f}, recall {rec['recall']:.3f} "
        f"(planted active share {rec['planted_active_share']:.3f})"
    )
    return seg


def _experiments(cfg: DemoConfig, events: str, seg: str, exp_out: str) -> dict:
    """Phase 3: both tables' arms, briefly."""
    r = run_experiment(
        events,
        seg,
        exp_out,
        ExperimentConfig(
            kind="all",
            skip_arms=DEMO_SKIPS,
            seeds=cfg.seeds,
            samples=cfg.samples,
            qps_requests=30,
            qps_rounds=3,
            step_batches=10,
            step_rounds=2,
        ),
    )
    print(experiment_summary(r))
    return r


def _alure(out: str, seg: str, checkpoint: str, as_of: int) -> str:
    """Phase 4: embeddings as of ``as_of`` (the experiments' evaluation
    boundary: the last full day is held out), the user graph, its retrieval
    evaluation on the held-out day, and the candidate table. Returns the
    candidates' output root."""

    store = open_store(f"{seg}/events")
    if store is None:
        raise FileNotFoundError(f"{seg}/events: the segment run left no event store")
    alure = f"{out}/alure"
    m = run_embed(store.url, checkpoint, alure, EmbedConfig(as_of_ms=as_of))
    print(
        f"embed: {m['users']:,} users as of the held-out day's start, "
        f"{m['wall_s']:.1f} s"
    )
    g = build_u2u(alure, alure)
    print(
        f"u2u: {g['edges']:,} edges, neighbour recall vs exact "
        f"{g['recall_at_k2']:.3f}, {g['build_s'] + g['query_s']:.1f} s"
    )
    ev = evaluate_retrieval(store.url, read_embeddings(alure), read_u2u(alure), as_of)
    afs, aroot = resolve(alure)
    write_json(afs, f"{aroot}/u2u_eval.json", ev)
    print("retrieval on the held-out day (docs/retrieval.md):")
    print(retrieval_summary(ev))
    c = run_candidates(alure, store.url, alure, CandidateConfig(), as_of)
    print(f"candidates: {c['rows']:,} for {c['users']:,} users, {c['wall_s']:.1f} s")
    return alure


def _post(http: Any, url: str, body: dict[str, Any]) -> Any:
    return http.post(url, json=body, timeout=60)


def _requests(url: str, traffic: Any, candidates: bool) -> None:
    """Real requests: two active and two passive users, an unknown one, a
    malformed request, one ``/candidates`` look-up, ``/healthz``."""
    import requests

    cands = [
        dict(zip(CANDIDATE_ATTRIBUTES, map(int, row), strict=True))
        for row in traffic.cands()[:20]
    ]
    users = [int(u) for u in traffic.users[1][:2]]
    users += [int(u) for u in traffic.users[0][:2]] + [10**15]
    with requests.Session() as http:
        for u in users:
            r = _post(
                http,
                f"{url}/rank",
                {"user_id": u, "ts": traffic.ts, "candidates": cands},
            )
            r.raise_for_status()
            body = r.json()
            best = int(np.argmax(body["scores"]))
            print(
                f"  POST /rank user {u}: {body['segment']}, {len(body['scores'])} "
                f"scores, best ad {cands[best]['ad_id']} "
                f"(p={body['scores'][best]:.4f}), model {body['model_version']}"
            )
        bad = {"user_id": users[0], "candidates": [{**cands[0], "media_type": 999}]}
        r = _post(http, f"{url}/rank", bad)
        print(f"  POST /rank malformed: HTTP {r.status_code}: {r.json()['error']}")
        if candidates:
            r = _post(http, f"{url}/candidates", {"user_id": users[0], "k": 5})
            r.raise_for_status()
            ads = r.json()["ads"]
            print(f"  POST /candidates user {users[0]}, k 5: ads {ads}")
        h = http.get(f"{url}/healthz", timeout=60).json()
        print(f"  GET /healthz: {h['status']}, segments {h['segments']['version']}")


def _serve(
    cfg: DemoConfig, out: str, exp_out: str, seg: str, candidates: str | None
) -> str:
    """Phase 5: the app on the demo's outputs (both rankers on the
    boost-selective checkpoint, autoscaling 1-2 replicas each), real
    requests, then an open-loop load whose active share goes 1/3 -> 2/3.
    Returns the path of the replica timeline (JSON)."""
    from ray import serve

    from dynamix_ray.serve.app import AppConfig, build_app

    apply_ray_log_levels()  # Serve set its logger to INFO when imported

    auto = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 0.5,
        "upscale_delay_s": 2,
        "downscale_delay_s": 10,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 3,
    }
    ranker = {
        "checkpoint": f"{exp_out}/runs/boost-selective/seed{cfg.seeds[0]}",
        "ray_actor_options": {"num_cpus": 0.25},
        "autoscaling_config": auto,
    }
    histories = f"{exp_out}/histories"
    app_args: dict[str, Any] = {
        "segments": seg,
        "histories": histories,
        "active": ranker,
        "passive": ranker,
    }
    if candidates:
        app_args["candidates"] = {"table": candidates}
    app_cfg = AppConfig.model_validate(app_args)
    serve.start(
        http_options={
            "host": "127.0.0.1",
            "port": cfg.port,
            "request_timeout_s": app_cfg.proxy_timeout_s,
        }
    )
    try:
        serve.run(build_app(app_cfg), name="dynamix", route_prefix="/")
        url = f"http://127.0.0.1:{cfg.port}"
        traffic = Traffic(f"{out}/events", histories, seg, 100)
        _requests(url, traffic, candidates is not None)
        print(
            f"  load: {cfg.load_qps:.0f} QPS open loop, 100 candidates, active "
            f"share 1/3 for {cfg.load_s:.0f} s then 2/3 for {cfg.load_s:.0f} s ...",
            flush=True,
        )
        res = record_autoscaling(url, traffic, cfg.load_qps, cfg.load_s)
        print(
            f"  {res['requests'] - res['errors']}/{res['requests']} answered 200; "
            "most replicas (active, passive) in the second half of each phase: "
            + ", ".join(
                f"{k} ({v['ActiveRanker_max']}, {v['PassiveRanker_max']})"
                for k, v in res["phases"].items()
            )
        )
    finally:
        serve.shutdown()
    path = f"{out}/serving_timeline.json"
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)
    return path


def _steps(total: int) -> Callable[[str], None]:
    """A printer of numbered phase headers."""
    count = [0]

    def step(what: str) -> None:
        count[0] += 1
        print(f"\n== [{count[0]}/{total}] {what}", flush=True)

    return step


def run_demo(out: str, cfg: DemoConfig | None = None) -> str:
    """Every phase in order under ``out``; returns the report's path."""
    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    out = out.rstrip("/")
    events = f"{out}/events"
    exp_out = f"{out}/experiment"
    step = _steps(cfg.phases)
    step("generate")
    generate(events, GenerateConfig(users=cfg.users, days=cfg.days, seed=cfg.seed))
    step("segment")
    seg = _segment(out, events)
    step(
        f"experiments: {len(ARMS['all']) - len(DEMO_SKIPS)} arms x {len(cfg.seeds)} "
        "seed(s) on Ray "
        "Train (1 epoch), throughput, epsilon sweep"
    )
    results = _experiments(cfg, events, seg, exp_out)
    candidates = None
    if cfg.alure:
        step("ALURE: embed, user graph, retrieval evaluation, candidates")
        baseline = f"{exp_out}/runs/baseline/seed{cfg.seeds[0]}"
        held_out = int(results["inputs"]["eval_boundary_ms"])
        candidates = _alure(out, seg, baseline, held_out)
    timeline = None
    if cfg.serve:
        step(f"Ray Serve on 127.0.0.1:{cfg.port}: real requests, then a load")
        timeline = _serve(cfg, out, exp_out, seg, candidates)
    step("report")
    retrieval = f"{candidates}/u2u_eval.json" if candidates else None
    index = write_report(exp_out, None, timeline, retrieval)
    print(
        f"demo: done in {time.perf_counter() - t0:.0f} s; outputs under {out}/ "
        "(events/, segments_run/, experiment/"
        + (", alure/" if cfg.alure else "")
        + "). Serve them with `dynamix serve --config serve_configs/dynamix.yaml`."
        f"\nreport: {index}"
    )
    return index
