"""The Ray Serve application (docs/contract.md §5): a router and two rankers.

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

Endpoints: ``POST /rank``, ``POST /candidates``, ``GET /healthz``,
``/openapi.json`` (every status the app answers, documented) and ``/docs``
(Swagger UI served from the package, no CDN).

Bounded under abuse and overload (docs/serving.md): bodies are capped
(413) and parsed from bytes with the candidate cap in the schema (a 1 MiB body
of empty candidates is a small 422 in milliseconds); every router -> ranker
call has a deadline (504); queues are bounded (``max_queued_requests``) and
a full one sheds load with 503 + ``Retry-After``; a ranker's bug is a 500
with its traceback logged, apart from an unavailable replica (503), and one
failing request never fails its batch mates. Metrics (``ray.util.metrics``, on
Ray's Prometheus endpoint): ``dynamix_requests_total{route, segment, code}``,
``dynamix_request_latency_ms{route, segment}``, and the rankers' batch sizes
and forward times.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods'
# annotations after Serve wraps them, where string annotations do not resolve.
import asyncio
import hmac
import logging
import os
import threading
import time
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynamix_ray.features import POLICIES
from dynamix_ray.io import absolute_url
from dynamix_ray.online import RedisHistories, is_redis_url
from dynamix_ray.serve.api import (
    CandidatesRequest,
    CandidatesResponse,
    ErrorBody,
    RankRequest,
    RankResponse,
    error_body,
    openapi_schemas,
    rank_request_model,
)
from dynamix_ray.serve.ranker import (
    CANDIDATE_ATTRIBUTES,
    SEGMENT_NAMES,
    RankerDeployment,
)
from dynamix_ray.serve.store import (
    SegmentStore,
    TableWatch,
    read_segment_store,
    segments_version,
)

__all__ = [
    "AppConfig",
    "DeploymentOptions",
    "RankerSpec",
    "Router",
    "build_app",
    "router_autoscaling",
]

log = logging.getLogger("ray.serve")

#: Seconds the HTTP proxy waits beyond a request's model-call deadline.
PROXY_GRACE_S = 1.0

#: In-flight requests per Router replica the Router's autoscaling aims at: a
#: third of its default ``max_ongoing_requests`` (96), so a new replica starts
#: well before the queue fills (docs/serving.md, "Autoscaling the router").
ROUTER_TARGET_ONGOING = 32


def router_autoscaling(
    max_replicas: int, target_ongoing: float = ROUTER_TARGET_ONGOING
) -> dict[str, Any]:
    """The Router's ``autoscaling_config`` between 1 and ``max_replicas``: it
    scales on its own in-flight requests (the whole app's traffic), each
    ranker on its segment's."""
    return {
        "min_replicas": 1,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing,
        "upscale_delay_s": 5,
        "downscale_delay_s": 15,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 5,
    }


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
    #: Requests waiting for a replica, per caller, at most (-1: unbounded,
    #: Serve's default); past it the caller gets 503 + Retry-After.
    max_queued_requests: int = Field(64, ge=-1)

    def serve_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
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
    #: histories memory-mapped from one copy per node (``False``: each
    #: replica reads its own copy into memory, as before; for comparison)
    shared_histories: bool = True

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str | None) -> str | None:
        if v is not None and v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; expected one of {POLICIES}")
        return v


class RetrieverSpec(DeploymentOptions):
    """ALURE u2u retrieval: a ``dynamix candidates`` OUT (every user's
    candidates, precomputed); ``cap`` bounds ``k``."""

    table: str
    cap: int = Field(1500, ge=1)
    #: how often the Retriever checks for a newer published version
    reload_interval_s: float = Field(60.0, gt=0)
    #: the table memory-mapped from one copy per node (``False``: each
    #: replica reads its own copy into memory, as before; for comparison)
    shared_table: bool = True


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
        reload_interval_s: how often the router checks for a new segment table
            (a version that failed to load is retried with backoff from here).
        request_timeout_s: the deadline of a request's model call, retries
            included; past it the answer is 504.
        max_reload_failures: ``/healthz`` is 503 after this many reloads in a
            row failed.
        max_table_age_s: ``/healthz`` is 503 when the loaded segment table was
            published longer ago than this (``None``: no bound).
        retry_after_s: the ``Retry-After`` of a 503.
        api_key_env: the name of an environment variable (in the Router's
            process) holding the API key; when set, /rank and /candidates need
            ``Authorization: Bearer <key>`` (401 otherwise). ``dynamix serve``
            refuses a non-loopback host without it (or
            ``--allow-unauthenticated``).
        retries: re-sends of a request whose ranker replica died (ranking is
            idempotent), within the deadline.
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
            # (ongoing + queued) ~ the app's capacity x the deadline, so what
            # is admitted is served in time (docs/serving.md, "Sizing")
            max_ongoing_requests=96,
            max_queued_requests=32,
        )
    )
    candidates: RetrieverSpec | None = None
    max_candidates: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    reload_interval_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(2.0, gt=0)
    max_reload_failures: int = Field(3, ge=1)
    max_table_age_s: float | None = Field(None, gt=0)
    retry_after_s: int = Field(1, ge=1)
    api_key_env: str | None = None
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
            d["candidates"]["table"] = absolute_url(d["candidates"]["table"])
        return AppConfig.model_validate(d)

    @property
    def proxy_timeout_s(self) -> float:
        """Serve's end-to-end HTTP timeout (``http_options.request_timeout_s``)
        for this app: the model-call deadline plus :data:`PROXY_GRACE_S`. It
        bounds the time a request may wait in Serve's queues before the
        router even sees it (answered 408 by Serve's proxy)."""
        return self.request_timeout_s + PROXY_GRACE_S

    def path_problems(self) -> list[str]:
        """What is wrong with the paths, one line each naming the path and
        what it should be (empty: all good). ``dynamix serve`` checks this
        before Ray and Serve start, so a wrong path fails in seconds."""
        from dynamix_ray.io import published_version
        from dynamix_ray.model.checkpoint import resolve_checkpoint

        problems: list[str] = []

        def published(url: str, part: str) -> None:
            try:
                published_version(url, part)
            except FileNotFoundError as e:
                problems.append(f"{part}: {e}")
            except Exception as e:  # noqa: BLE001 - reported, with its path
                problems.append(
                    f"{part}: {url}: cannot read it ({type(e).__name__}: {e})"
                )

        published(self.segments, "segments")
        if is_redis_url(self.histories):
            try:
                RedisHistories.connect(self.histories).check()
            except Exception as e:  # noqa: BLE001 - reported, with its URL
                problems.append(f"histories: {type(e).__name__}: {e}")
        else:
            published(self.histories, "histories")
        for name in ("active", "passive"):
            try:
                resolve_checkpoint(getattr(self, name).checkpoint)
            except FileNotFoundError as e:
                problems.append(f"{name}.checkpoint: {e}")
        if self.candidates is not None:
            published(self.candidates.table, "candidates")
        return problems


api = FastAPI(
    title="DynamiX ranking",
    description="Segment-routed CTR ranking (DynamiX) and u2u retrieval (ALURE).",
    version="1",
    docs_url=None,  # served below from the package's own Swagger UI assets
    redoc_url=None,
)


def _swagger_assets() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)


api.mount("/docs-assets", StaticFiles(directory=_swagger_assets()), name="docs-assets")


@api.get("/docs", include_in_schema=False)
async def _docs() -> HTMLResponse:
    # relative URLs: they resolve under any route prefix
    return get_swagger_ui_html(
        openapi_url="openapi.json",
        title="DynamiX ranking",
        swagger_js_url="docs-assets/swagger-ui-bundle.js",
        swagger_css_url="docs-assets/swagger-ui.css",
        swagger_favicon_url="docs-assets/favicon-32x32.png",
    )


#: Every status the app answers besides 200, as /openapi.json documents them.
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a body that is not UTF-8, a bad header"},
    401: {"model": ErrorBody, "description": "no or a wrong API key (when one is set)"},
    404: {"model": ErrorBody, "description": "not configured (u2u retrieval)"},
    405: {"model": ErrorBody, "description": "wrong method"},
    413: {"model": ErrorBody, "description": "body larger than max_body_bytes"},
    422: {
        "model": ErrorBody,
        "description": "invalid body; the message names the field",
    },
    500: {"model": ErrorBody, "description": "a bug in a model deployment (logged)"},
    503: {
        "model": ErrorBody,
        "description": "overloaded or no model replica (see Retry-After)",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
    504: {"model": ErrorBody, "description": "the request's deadline passed"},
    408: {
        "description": "Serve's proxy timeout: the request waited in Serve's "
        "queues past the deadline + 1 s (overload; Serve's own body)"
    },
}


def _json_body(model: str) -> dict[str, Any]:
    """``openapi_extra`` of a route that parses its body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model}"}
                }
            },
        }
    }


def _openapi(rank_model: type[BaseModel] = RankRequest) -> dict[str, Any]:
    """FastAPI's document with pydantic's own component schemas (exact int64
    bounds) and the app's candidate cap."""
    doc = get_openapi(
        title=api.title,
        version=api.version,
        description=api.description,
        routes=api.routes,
    )
    models: list[type[BaseModel]] = [
        rank_model,
        CandidatesRequest,
        RankResponse,
        CandidatesResponse,
        ErrorBody,
    ]
    doc.setdefault("components", {}).setdefault("schemas", {}).update(
        openapi_schemas(models)
    )
    return doc


api.openapi = _openapi  # type: ignore[method-assign]


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


async def _awaited(response: Any) -> Any:
    """A Serve response as a coroutine (what ``asyncio.wait_for`` takes)."""
    return await response


class Deadline(Exception):
    """A request's deadline passed before its model answered."""


#: Failures of a deployment to take the call (no replica, a full queue, a
#: replica that died and stayed dead): 503, and the request may be re-sent.
_UNAVAILABLE = (
    BackPressureError,
    DeploymentUnavailableError,
    RayActorError,
    ActorUnavailableError,
)


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
        self.api_key: str | None = None
        if self.cfg.api_key_env:
            self.api_key = os.environ.get(self.cfg.api_key_env) or None
            if self.api_key is None:
                raise ValueError(
                    f"api_key_env: ${self.cfg.api_key_env} is not set in the "
                    "Router's process (set it on every node, or pass it in the "
                    "Router's runtime_env)"
                )
        self.rank_model = rank_request_model(self.cfg.max_candidates)
        url = self.cfg.segments
        self.watch: TableWatch[SegmentStore] = TableWatch(
            read=lambda: read_segment_store(url),
            version_of=lambda t: t.version,
            published_ms_of=lambda t: t.published_ms,
            retry_s=self.cfg.reload_interval_s,
            max_failures=self.cfg.max_reload_failures,
            max_age_s=self.cfg.max_table_age_s,
        )
        self.reload_segments()
        self.inflight = {"active": 0, "passive": 0}  # this router's calls now
        api.state.max_body_bytes = self.cfg.max_body_bytes
        api.state.router = self
        api.openapi_schema = None
        rank_model = self.rank_model
        api.openapi = lambda: _openapi(rank_model)  # type: ignore[method-assign]
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

    @property
    def segments(self) -> SegmentStore | None:
        return self.watch.current

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
        Errors keep the current table; they are counted and logged, and a
        version that failed waits (backoff) before it is read again."""
        url = self.cfg.segments
        return self.watch.refresh(lambda: segments_version(url), "segments")

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        got = request.headers.get("authorization", "")
        want = f"Bearer {self.api_key}"
        return hmac.compare_digest(got.encode(), want.encode())

    def _refuse(
        self, route: str, code: int, message: str, **headers: str
    ) -> JSONResponse:
        self.count(route, "none", code)
        return JSONResponse(
            status_code=code, content={"error": message}, headers=headers or None
        )

    async def _parse(
        self, request: Request, route: str, model: type[BaseModel]
    ) -> BaseModel | JSONResponse:
        """The request's body as ``model``, or the 401/422 answer."""
        if not self._authorized(request):
            return self._refuse(
                route,
                401,
                f"{route}: missing or wrong API key",
                **{"WWW-Authenticate": "Bearer"},
            )
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as e:
            self.count(route, "none", 422)
            return JSONResponse(
                status_code=422, content=error_body(cast(Any, e.errors()))
            )

    async def _call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        """The deployment's answer within the deadline; re-sent (within it)
        when the replica died. Raises :class:`Deadline`, the ``_UNAVAILABLE``
        errors, or the deployment's own error."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        for attempt in range(self.cfg.retries + 1):
            response = getattr(handle, method).remote(*args)
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(_awaited(response), max(left, 0.001))
            except TimeoutError as e:
                if isinstance(e, RayError):  # the ranker's own TimeoutError: a 500
                    raise
                response.cancel()
                raise Deadline(
                    f"no answer within {self.cfg.request_timeout_s} s"
                ) from None
            except (RayActorError, ActorUnavailableError):
                pause = 0.05 * 2**attempt
                if attempt == self.cfg.retries or time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    def _failed(self, route: str, segment: str, err: Exception) -> JSONResponse:
        """The answer to a valid request whose model call failed: 504 past
        the deadline, 503 + Retry-After when no replica could take it, 500
        (traceback logged) when the deployment itself raised."""
        if isinstance(err, Deadline):
            code, message = 504, f"{route}: {segment} model: {err}"
            log.warning("%s: %s deadline passed", route, segment)
        elif isinstance(err, _UNAVAILABLE):
            code = 503
            message = f"{route}: {segment} model unavailable ({type(err).__name__})"
            log.warning("%s: %s unavailable: %s", route, segment, err)
        else:
            code, message = 500, f"{route}: {segment} model failed (logged)"
            log.error("%s: %s model raised", route, segment, exc_info=err)
        self.count(route, segment, code)
        headers = {"Retry-After": str(self.cfg.retry_after_s)} if code == 503 else None
        return JSONResponse(
            status_code=code, content={"error": message}, headers=headers
        )

    @api.post(
        "/rank",
        response_model=RankResponse,
        responses=_ERRORS,
        openapi_extra=_json_body("RankRequest"),
    )
    async def rank(self, request: Request) -> Any:
        """Scores for each candidate, by the user's segment's ranker."""
        t0 = time.perf_counter()
        req = await self._parse(request, "/rank", self.rank_model)
        if isinstance(req, JSONResponse):
            return req
        assert isinstance(req, RankRequest)
        return await self.rank_parsed(req, t0)

    async def rank_parsed(self, req: RankRequest, t0: float | None = None) -> Any:
        """The answer to a validated request: what ``/rank`` does after
        parsing (benchmarks/serve_load.py calls it through the Router's handle
        to time the router -> ranker hop without HTTP)."""
        t0 = time.perf_counter() if t0 is None else t0
        table = self.segments
        if table is None:
            return self._refuse(
                "/rank",
                503,
                "/rank: no segment table is loaded yet",
                **{"Retry-After": str(self.cfg.retry_after_s)},
            )
        ts = req.ts if req.ts is not None else int(time.time() * 1000)
        seg = table.segment_of(req.user_id, ts)
        cands = np.array(
            [[getattr(c, a) for a in CANDIDATE_ATTRIBUTES] for c in req.candidates],
            np.int64,
        )
        name = SEGMENT_NAMES[seg]
        self.inflight[name] += 1
        try:
            out = await self._call(self.rankers[seg], "rank", req.user_id, ts, cands)
        except Exception as e:  # noqa: BLE001 - our failure, not the client's
            return self._failed("/rank", name, e)
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

    @api.post(
        "/candidates",
        response_model=CandidatesResponse,
        responses=_ERRORS,
        openapi_extra=_json_body("CandidatesRequest"),
    )
    async def candidates(self, request: Request) -> Any:
        """ALURE u2u ad candidates of the user (ads its neighbours converted on,
        plus their advertisers' other ads), best first, as of the table's
        ``as_of_ms``: a look-up of the precomputed table."""
        req = await self._parse(request, "/candidates", CandidatesRequest)
        if isinstance(req, JSONResponse):
            return req
        assert isinstance(req, CandidatesRequest)
        if self.retriever is None:
            return self._refuse(
                "/candidates",
                404,
                "candidates: u2u retrieval is not configured (the app config's "
                "`candidates`)",
            )
        try:
            out = await self._call(self.retriever, "candidates", req.user_id, req.k)
        except Exception as e:  # noqa: BLE001 - our failure, not the client's
            return self._failed("/candidates", "none", e)
        self.count("/candidates", "none", 200)
        return JSONResponse({"user_id": req.user_id, **out})

    @api.get(
        "/healthz", responses={503: {"model": ErrorBody, "description": "unhealthy"}}
    )
    async def healthz(self) -> JSONResponse:
        """200 with the segment table's version and age; 503 with the reason
        when none is loaded, the last reloads failed, or it is too old."""
        healthy, state = self.watch.health()
        table = self.segments
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unhealthy",
            "segments": {**(table.summary() if table else {}), **state},
            "inflight": dict(self.inflight),
            "handles": {
                "transport": "grpc" if self.cfg.grpc_handles else "actor_calls",
                # read in this process: what Serve's handles here really do
                "on_replica_loop": os.environ.get(SEPARATE_LOOP_ENV) == "0",
            },
        }
        if not healthy:
            body["error"] = f"/healthz: {state['reason']}"
        return JSONResponse(status_code=200 if healthy else 503, content=body)


class Retriever:
    """``/candidates``: one look-up per call in the precomputed table
    (``alure.candidates_job``), whatever the number of users or conversions.
    A newer published version is loaded in a thread and swapped in
    (:class:`~dynamix_ray.serve.store.TableWatch`: a broken one is retried
    with backoff while the last good table keeps answering). The table is
    memory-mapped from one copy per node (``shared_table``), so replicas on
    a node share it (``alure.candidates_job.open_candidates``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from dynamix_ray.alure.candidates_job import open_candidates
        from dynamix_ray.io import published_version

        cfg = RetrieverSpec.model_validate(spec)
        self.cap, url = cfg.cap, cfg.table
        self._version = lambda: str(published_version(url, "candidates")["version"])
        self.watch: TableWatch[Any] = TableWatch(
            read=lambda: open_candidates(url, cfg.shared_table),
            version_of=lambda t: t.version,
            published_ms_of=lambda t: t.published_ms,
            retry_s=cfg.reload_interval_s,
        )
        if not self.watch.poll(self._version()):
            raise RuntimeError(
                f"candidates: cannot load {url}: {self.watch.last_error}"
            )
        self._interval = cfg.reload_interval_s
        self._stop = threading.Event()
        threading.Thread(
            target=self._poll, name="candidates-reload", daemon=True
        ).start()

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self.watch.refresh(self._version, "candidates")

    def candidates(self, user_id: int, k: int) -> dict[str, Any]:
        table = self.watch.current
        assert table is not None  # loaded in __init__, only ever replaced
        ads, scores = table.lookup(user_id, min(k, self.cap))
        return {
            "ads": ads.tolist(),
            "scores": scores.tolist(),
            "as_of_ms": table.as_of_ms,
        }

    def health(self) -> dict[str, Any]:
        return self.watch.health()[1]


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
