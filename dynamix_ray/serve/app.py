"""The Ray Serve application (SPEC §5): a router and two rankers.

::

    HTTP ─► Router (FastAPI ingress: validate, segment look-up, metrics)
              ├─ active user  ─► ActiveRanker   (own checkpoint, policy, replicas,
              │                                  autoscaling, @serve.batch)
              ├─ passive user ─► PassiveRanker  (the same, configured apart)
              └─ /candidates  ─► Retriever      (ALURE u2u; optional)

Nothing happens at import: :func:`build_app` turns a typed :class:`AppConfig`
(or the ``args`` of ``serve_configs/dynamix.yaml``) into the application. The
router holds the segment table in a :class:`~dynamix_ray.serve.store.SegmentStore`
and polls its version every ``reload_interval_s``; a newer table is read in a
background thread and swapped in with one reference assignment, so requests
never wait for or fail on a reload.

Endpoints: ``POST /rank``, ``POST /candidates``, ``GET /healthz``, and
FastAPI's ``/docs`` and ``/openapi.json``. Metrics (``ray.util.metrics``, on
Ray's Prometheus endpoint): ``dynamix_requests_total{route, segment, code}``,
``dynamix_request_latency_ms{route, segment}``, and the rankers' batch sizes
and forward times.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods'
# annotations after Serve wraps them, where string annotations do not resolve.
import asyncio
import logging
import os
import threading
import time
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynamix_ray.features import POLICIES
from dynamix_ray.io import absolute_url
from dynamix_ray.serve.api import (
    CandidatesRequest,
    CandidatesResponse,
    RankRequest,
    RankResponse,
    error_body,
)
from dynamix_ray.serve.ranker import (
    CANDIDATE_ATTRIBUTES,
    SEGMENT_NAMES,
    RankerDeployment,
)
from dynamix_ray.serve.store import SegmentStore, read_segment_store, segments_version

__all__ = ["AppConfig", "DeploymentOptions", "RankerSpec", "Router", "build_app"]

log = logging.getLogger("ray.serve")

#: Serve's switch for where a process's handles route requests (see
#: ``AppConfig.handles_on_replica_loop``).
SEPARATE_LOOP_ENV = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"


class DeploymentOptions(BaseModel):
    """Serve options of one deployment (``autoscaling_config`` wins over
    ``num_replicas``)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(1, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0.25}
    )
    max_ongoing_requests: int = Field(32, ge=1)

    def serve_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling_config is not None:
            out["autoscaling_config"] = self.autoscaling_config
        elif self.num_replicas is not None:
            out["num_replicas"] = self.num_replicas
        return out


class RankerSpec(DeploymentOptions):
    """One ranker: its checkpoint and policy (default: the checkpoint's), its
    batching and its deployment options."""

    checkpoint: str
    policy: str | None = None
    removed: list[str] | None = None
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    use_gpu: bool = False

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str | None) -> str | None:
        if v is not None and v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; expected one of {POLICIES}")
        return v


class RetrieverSpec(DeploymentOptions):
    """ALURE u2u retrieval: a ``dynamix u2u`` OUT and the events it came from."""

    u2u: str
    events: str
    cap: int = Field(1500, ge=1)


class AppConfig(BaseModel):
    """Everything :func:`build_app` needs (the YAML's ``args``).

    Args:
        segments: a ``dynamix segment`` output root (polled for new versions).
        histories: a ``dynamix histories`` output root (the rankers' features).
        active, passive: the two rankers.
        router: the ingress deployment's options.
        candidates: optional ALURE retrieval for ``/candidates``.
        max_candidates: candidates per ``/rank`` request at most.
        max_body_bytes: request bodies over this get 413.
        reload_interval_s: how often the router checks for a new segment table.
        retries: re-sends of a request whose ranker replica died (ranking is
            idempotent).
        grpc_handles: router -> ranker calls over Serve's direct gRPC transport
            (``handle.options(_by_reference=False)``, Ray 2.55+) instead of
            Ray actor calls (``False``); benchmarks/serve_load.py measures both.
        handles_on_replica_loop: Serve's request router behind the Router's
            handles runs on the Router replica's own event loop
            (``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`` in the Router's
            ``runtime_env``) instead of on a loop in a thread of its own: one
            thread hop less each way on every router -> ranker call
            (benchmarks/serve_load.py measures both). Safe here because the
            Router's handlers never block its loop.
    """

    model_config = ConfigDict(extra="forbid")

    segments: str
    histories: str
    active: RankerSpec
    passive: RankerSpec
    router: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            num_replicas=1,
            ray_actor_options={"num_cpus": 0.1},
            max_ongoing_requests=256,
        )
    )
    candidates: RetrieverSpec | None = None
    max_candidates: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    reload_interval_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)
    grpc_handles: bool = True
    handles_on_replica_loop: bool = True

    def absolute(self) -> "AppConfig":
        """Relative local paths made absolute (replicas run in other folders)."""
        d = self.model_dump()
        d["segments"], d["histories"] = (
            absolute_url(self.segments),
            absolute_url(self.histories),
        )
        for r in ("active", "passive"):
            d[r]["checkpoint"] = absolute_url(d[r]["checkpoint"])
        if d.get("candidates"):
            d["candidates"]["u2u"] = absolute_url(d["candidates"]["u2u"])
            d["candidates"]["events"] = absolute_url(d["candidates"]["events"])
        return AppConfig.model_validate(d)


api = FastAPI(
    title="DynamiX ranking",
    description="Segment-routed CTR ranking (DynamiX) and u2u retrieval (ALURE).",
    version="1",
)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count(request, 422)
    return JSONResponse(status_code=422, content=error_body(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 / 405 / 400 (e.g. a body that is not UTF-8): the same body shape."""
    _count(request, exc.status_code)
    return JSONResponse(
        status_code=exc.status_code,
        content={"error": f"{request.method} {request.url.path}: {exc.detail}"},
        headers=getattr(exc, "headers", None),
    )


_ROUTES = ("/rank", "/candidates", "/healthz")


def _count(request: Request, code: int, segment: str = "none") -> None:
    router = getattr(request.app.state, "router", None)
    if router is not None:
        router.count(request.url.path, segment, code)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``app.state.max_body_bytes``, by
    ``Content-Length`` or, for chunked bodies, as soon as they pass it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        limit = getattr(state, "max_body_bytes", 1 << 20)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await self._reject(
                    scope, send, 400, "body: Content-Length is not a number"
                )
                return
            if int(length) > limit:
                await self._reject(scope, send, 413, _too_large(limit))
                return
        # buffer the body (it is at most `limit` bytes), then replay it: an
        # error raised inside FastAPI's body reading would become a 400
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before its body was complete
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                await self._reject(scope, send, 413, _too_large(limit))
                return
            if not msg.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    @staticmethod
    async def _reject(scope: Any, send: Any, code: int, message: str) -> None:
        router = getattr(scope["app"].state, "router", None)
        if router is not None:
            router.count(scope.get("path", ""), "none", code)
        body = JSONResponse(status_code=code, content={"error": message})
        await body(scope, _drain, send)


def _too_large(limit: int) -> str:
    return f"body: larger than the limit of {limit} bytes"


async def _drain() -> Any:
    return {"type": "http.disconnect"}


def _replay(messages: list[Any], then: Any) -> Any:
    """An ASGI ``receive`` that returns ``messages``, then what ``then`` (the
    connection's own ``receive``: a real disconnect) returns."""
    pending = list(messages)

    async def receive() -> Any:
        return pending.pop(0) if pending else await then()

    return receive


api.add_middleware(BodyLimit)


@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    """Validates, looks the user's segment up, and calls that segment's ranker."""

    def __init__(
        self,
        config: dict[str, Any],
        active: DeploymentHandle,
        passive: DeploymentHandle,
        retriever: DeploymentHandle | None = None,
    ) -> None:
        from ray.util import metrics

        self.cfg = AppConfig.model_validate(config)
        if self.cfg.grpc_handles:
            active, passive = (
                h.options(_by_reference=False) for h in (active, passive)
            )
            if retriever is not None:
                retriever = retriever.options(_by_reference=False)
        self.rankers = {1: active, 0: passive}
        self.retriever = retriever
        self.segments: SegmentStore = read_segment_store(self.cfg.segments)
        self.reloads = self.reload_errors = 0
        self.inflight = {"active": 0, "passive": 0}  # this router's calls now
        self.last_reload_error: str | None = None
        api.state.max_body_bytes = self.cfg.max_body_bytes
        api.state.router = self
        self._requests = metrics.Counter(
            "dynamix_requests_total",
            "Requests by route, segment and HTTP status.",
            tag_keys=("route", "segment", "code"),
        )
        self._latency = metrics.Histogram(
            "dynamix_request_latency_ms",
            "Router latency of answered requests (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("route", "segment"),
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_segments, name="segment-reload", daemon=True
        )
        self._poller.start()

    def count(self, route: str, segment: str, code: int) -> None:
        """One request in ``dynamix_requests_total``; paths other than the
        app's routes share the label ``other`` (no series per stray path)."""
        route = route if route in _ROUTES else "other"
        self._requests.inc(tags={"route": route, "segment": segment, "code": str(code)})

    def _poll_segments(self) -> None:
        while not self._stop.wait(self.cfg.reload_interval_s):
            self.reload_segments()

    def reload_segments(self) -> bool:
        """Swap in the published segment table if it is newer; ``True`` if so.
        Errors keep the current table and are counted (``/healthz``)."""
        try:
            version = segments_version(self.cfg.segments)
            if version is None or version == self.segments.version:
                return False
            self.segments = read_segment_store(self.cfg.segments)  # one assignment
            self.reloads += 1
            log.info("segments: now version %s", self.segments.version)
            return True
        except Exception as e:  # noqa: BLE001 - keep serving the old table
            self.reload_errors += 1
            self.last_reload_error = f"{type(e).__name__}: {e}"
            log.warning("segments: reload failed, keeping the old table: %s", e)
            return False

    async def _call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        for attempt in range(self.cfg.retries + 1):
            try:
                return await getattr(handle, method).remote(*args)
            except (RayActorError, ActorUnavailableError):
                if attempt == self.cfg.retries:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _unavailable(self, route: str, segment: str, err: Exception) -> JSONResponse:
        """503 (counted, logged) when a ranker or the retriever failed after the
        retries: the request was valid."""
        self.count(route, segment, 503)
        log.warning("%s: %s failed: %s", route, segment, err)
        return JSONResponse(
            status_code=503,
            content={
                "error": f"{route}: {segment} model unavailable ({type(err).__name__})"
            },
        )

    @api.post("/rank", response_model=RankResponse)
    async def rank(self, req: RankRequest) -> Any:
        """Scores for each candidate, by the user's segment's ranker."""
        t0 = time.perf_counter()
        if len(req.candidates) > self.cfg.max_candidates:
            self.count("/rank", "none", 422)
            msg = f"at most {self.cfg.max_candidates} candidates, got {len(req.candidates)}"
            return JSONResponse(
                status_code=422,
                content=error_body(
                    [{"loc": ("body", "candidates"), "msg": msg, "type": "too_long"}]
                ),
            )
        ts = req.ts if req.ts is not None else int(time.time() * 1000)
        seg = self.segments.segment_of(req.user_id, ts)
        cands = np.array(
            [[getattr(c, a) for a in CANDIDATE_ATTRIBUTES] for c in req.candidates],
            np.int64,
        )
        name = SEGMENT_NAMES[seg]
        self.inflight[name] += 1
        try:
            out = await self._call(self.rankers[seg], "rank", req.user_id, ts, cands)
        except Exception as e:  # noqa: BLE001 - our failure, not the client's
            return self._unavailable("/rank", name, e)
        finally:
            self.inflight[name] -= 1
        self.count("/rank", name, 200)
        self._latency.observe(
            1000 * (time.perf_counter() - t0), tags={"route": "/rank", "segment": name}
        )
        # a Response skips FastAPI's re-validation of the response model (the
        # fields are built here from typed values; /openapi.json still shows it)
        return JSONResponse(
            {
                "user_id": req.user_id,
                "segment": name,
                "scores": out["scores"],
                "model_version": out["model_version"],
            }
        )

    @api.post("/candidates", response_model=CandidatesResponse)
    async def candidates(self, req: CandidatesRequest) -> Any:
        """ALURE u2u ad candidates of the user (ads its neighbours converted on,
        plus their advertisers' other ads), best first."""
        if self.retriever is None:
            self.count("/candidates", "none", 404)
            return JSONResponse(
                status_code=404,
                content={
                    "error": "candidates: u2u retrieval is not configured "
                    "(the app config's `candidates`)"
                },
            )
        ts = req.ts if req.ts is not None else int(time.time() * 1000)
        try:
            out = await self._call(self.retriever, "candidates", req.user_id, req.k, ts)
        except Exception as e:  # noqa: BLE001 - our failure, not the client's
            return self._unavailable("/candidates", "none", e)
        self.count("/candidates", "none", 200)
        return CandidatesResponse(user_id=req.user_id, **out)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "segments": self.segments.summary(),
            "segment_reloads": self.reloads,
            "segment_reload_errors": self.reload_errors,
            "last_reload_error": self.last_reload_error,
            "inflight": dict(self.inflight),
            "handles": {
                "transport": "grpc" if self.cfg.grpc_handles else "actor_calls",
                # read in this process: what Serve's handles here really do
                "on_replica_loop": os.environ.get(SEPARATE_LOOP_ENV) == "0",
            },
        }


class Retriever:
    """ALURE u2u candidates for one user per call (``/candidates``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from dynamix_ray.alure.evaluate import read_events_frame
        from dynamix_ray.alure.graph import read_u2u

        edges = read_u2u(spec["u2u"]).to_pandas().sort_values("user_id", kind="stable")
        self.edges = edges.reset_index(drop=True)
        self.edge_users = self.edges["user_id"].to_numpy()
        self.conversions = read_events_frame(
            spec["events"], "conversions", ["user_id", "ts_ms", "ad_id"]
        )
        ads = read_events_frame(
            spec["events"], "ad_impressions", ["ad_id", "advertiser_id"]
        )
        self.ads = ads.drop_duplicates("ad_id")
        self.cap = int(spec.get("cap", 1500))

    def candidates(self, user_id: int, k: int, ts_ms: int) -> dict[str, Any]:
        from dynamix_ray.alure.candidates import CandidateConfig, u2u_candidates

        lo, hi = np.searchsorted(self.edge_users, [user_id, user_id + 1])
        if hi == lo:
            return {"ads": [], "scores": []}
        got = u2u_candidates(
            self.edges.iloc[lo:hi],
            self.conversions,
            self.ads,
            ts_ms,
            CandidateConfig(cap=min(k, self.cap)),
        )
        return {
            "ads": got["ad_id"].astype(np.int64).tolist(),
            "scores": got["score"].astype(float).tolist(),
        }


def build_app(args: dict[str, Any] | AppConfig) -> serve.Application:
    """The application of ``args`` (an :class:`AppConfig` or its dict form);
    the import path of ``serve_configs/dynamix.yaml``."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    cfg = cfg.absolute()
    ranker = cast(Any, serve.deployment)(RankerDeployment)
    rankers = {}
    for segment, spec in ((1, cfg.active), (0, cfg.passive)):
        name = f"{SEGMENT_NAMES[segment].capitalize()}Ranker"
        rankers[segment] = ranker.options(name=name, **spec.serve_options()).bind(
            spec.model_dump(), cfg.histories, segment
        )
    retriever = None
    if cfg.candidates is not None:
        retriever = (
            cast(Any, serve.deployment)(Retriever)
            .options(name="Retriever", **cfg.candidates.serve_options())
            .bind(cfg.candidates.model_dump())
        )
    return (
        cast(Any, Router)
        .options(**router_options(cfg))
        .bind(cfg.model_dump(), rankers[1], rankers[0], retriever)
    )


def router_options(cfg: AppConfig) -> dict[str, Any]:
    """The Router's Serve options: ``cfg.router``'s, plus, with
    ``handles_on_replica_loop``, the env var that puts its handles' request
    router on the replica's loop (merged into any ``runtime_env`` given)."""
    out = cfg.router.serve_options()
    if cfg.handles_on_replica_loop:
        actor = dict(out["ray_actor_options"])
        runtime_env = dict(actor.get("runtime_env") or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars.setdefault(SEPARATE_LOOP_ENV, "0")
        runtime_env["env_vars"] = env_vars
        actor["runtime_env"] = runtime_env
        out["ray_actor_options"] = actor
    return out
