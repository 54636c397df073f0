"""The Serve app over real HTTP on 127.0.0.1: routing by segment, validation
(bad input never reaches a model), fuzzing, /candidates, segment reloads under
load, and a killed ranker replica. Traffic is bounded and stops by itself."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamix_ray.alure.candidates import CandidateConfig, u2u_candidates
from dynamix_ray.alure.candidates_job import run_candidates
from dynamix_ray.alure.embed import embeddings_table
from dynamix_ray.alure.evaluate import read_events_frame
from dynamix_ray.alure.graph import U2UConfig, build_u2u, read_u2u
from dynamix_ray.config import SegmentConfig
from dynamix_ray.histories import read_histories, run_histories
from dynamix_ray.localcluster import _free_ports
from dynamix_ray.model import DynamixCTR, ModelConfig
from dynamix_ray.model.checkpoint import save_checkpoint
from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
from dynamix_ray.segments.pipeline import run_segment
from dynamix_ray.serve.store import read_segment_store

TINY = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=8)
MAX_CANDIDATES = 20
MAX_BODY = 16 * 1024
CAND = {a: i + 1 for i, a in enumerate(CANDIDATE_ATTRIBUTES)}


def _app_config(root, tiny_events, active_replicas: int = 1) -> dict:
    ranker = {
        "checkpoint": str(root / "ckpt"),
        "num_replicas": active_replicas,
        "ray_actor_options": {"num_cpus": 0.1},
        "max_batch_size": 4,
    }
    return {
        "segments": str(root / "segs"),
        "histories": str(root / "hist"),
        "active": ranker,
        "passive": {**ranker, "num_replicas": 1},
        "router": {"ray_actor_options": {"num_cpus": 0.1}},
        "candidates": {
            "table": str(root / "cands"),
            "ray_actor_options": {"num_cpus": 0.1},
            "reload_interval_s": 0.5,
        },
        "max_candidates": MAX_CANDIDATES,
        "max_body_bytes": MAX_BODY,
        "reload_interval_s": 0.5,
    }


@pytest.fixture(scope="module")
def app(ray_session, tiny_events, tmp_path_factory):
    from ray import serve

    from dynamix_ray.serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    run_segment(tiny_events, str(root / "segs"), progress=False)
    run_histories(tiny_events, str(root / "hist"), None, 8, progress=False)
    save_checkpoint(str(root / "ckpt"), DynamixCTR(TINY).eval(), TINY)
    users = read_histories(str(root / "hist")).user_id
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(users), 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = embeddings_table({"user_id": users, "embedding": emb}, 0, "test", 8)
    build_u2u(table, str(root / "u2u"), U2UConfig(k2=5), progress=False)
    run_candidates(str(root / "u2u"), tiny_events, str(root / "cands"), progress=False)

    (port,) = _free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = _app_config(root, tiny_events)
    serve.run(build_app(cfg), name="dynamix", route_prefix="/")
    session = requests.Session()
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{port}",
        http=session,
        root=root,
        events=tiny_events,
        cfg=cfg,
    )
    session.close()
    serve.shutdown()


def _stats() -> dict[str, int]:
    from ray import serve

    out = {}
    for name in ("ActiveRanker", "PassiveRanker"):
        h = serve.get_deployment_handle(name, app_name="dynamix")
        out[name] = h.stats.remote().result(timeout_s=30)["requests"]
    return out


def _rank(app, body, **kw):
    return app.http.post(f"{app.url}/rank", json=body, timeout=30, **kw)


def test_requests_go_to_their_segments_ranker(app):
    store = read_segment_store(str(app.root / "segs"))
    active = np.flatnonzero(store.segment == 1)
    assert len(active), "the tiny data has no active window"
    user, since = int(store.user_id[active[0]]), int(store.window_end_ms[active[0]])
    before = _stats()
    cands = [CAND, {**CAND, "ad_id": 99}, {**CAND, "surface": 0}]
    r = _rank(app, {"user_id": user, "ts": since, "candidates": cands})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["segment"] == "active" and body["user_id"] == user
    assert len(body["scores"]) == 3 and all(0 < s < 1 for s in body["scores"])
    assert body["model_version"]
    # just before that window ended, and for a user nobody knows: passive
    for u, ts in ((user, since - 1), (10**15, since)):
        r = _rank(app, {"user_id": u, "ts": ts, "candidates": [CAND]})
        assert r.status_code == 200 and r.json()["segment"] == "passive", r.text
    after = _stats()
    assert after["ActiveRanker"] - before["ActiveRanker"] == 1
    assert after["PassiveRanker"] - before["PassiveRanker"] == 2


def _bad_requests():
    ok = {"user_id": 5, "ts": 1_700_000_000_000, "candidates": [CAND]}
    no_ad = {k: v for k, v in CAND.items() if k != "ad_id"}
    cases = [
        ({k: v for k, v in ok.items() if k != "user_id"}, "user_id"),
        ({**ok, "user_id": "5"}, "user_id"),
        ({**ok, "user_id": True}, "user_id"),
        ({**ok, "user_id": 2**63}, "user_id"),
        ({**ok, "user_id": -(2**63) - 1}, "user_id"),
        ({**ok, "ts": 5}, "ts"),
        ({**ok, "ts": "yesterday"}, "ts"),
        ({**ok, "candidates": []}, "candidates"),
        ({**ok, "candidates": [CAND] * (MAX_CANDIDATES + 1)}, "candidates"),
        ({**ok, "candidates": CAND}, "candidates"),
        ({**ok, "candidates": [no_ad]}, "candidates[0].ad_id"),
        (
            {**ok, "candidates": [CAND, {**CAND, "media_type": 300}]},
            "candidates[1].media_type",
        ),
        ({**ok, "candidates": [{**CAND, "position": 1.5}]}, "candidates[0].position"),
        (
            {**ok, "candidates": [{**CAND, "category_id": 2**40}]},
            "candidates[0].category_id",
        ),
        ({**ok, "candidates": [{**CAND, "colour": 3}]}, "candidates[0].colour"),
        ({**ok, "debug": 1}, "debug"),
        ([ok], "body"),
        (None, "body"),
    ]
    return [(json.dumps(b).encode(), f) for b, f in cases] + [
        (b"{not json", "body"),
        (b"", "body"),
        (b'{"user_id": 5, "candidates": [' + b"1," * MAX_BODY + b"1]}", "body"),
    ]


def test_bad_requests_get_4xx_naming_the_field_and_never_reach_a_model(app):
    before = _stats()
    for body, field in _bad_requests():
        r = app.http.post(
            f"{app.url}/rank",
            data=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:200])
        assert field in r.json()["error"], (body[:80], r.text[:300])
    # a chunked body (no Content-Length) over the limit is cut off while it streams
    chunks = (b'{"user_id": 5, "pad": "' + b"x" * 4096 for _ in range(8))
    r = app.http.post(f"{app.url}/rank", data=chunks, timeout=30)
    assert r.status_code == 413, r.text
    r = app.http.get(f"{app.url}/rank", timeout=30)
    assert r.status_code == 405 and "GET /rank" in r.json()["error"]
    r = app.http.get(f"{app.url}/nowhere", timeout=30)
    assert r.status_code == 404 and r.json()["error"]
    assert _stats() == before


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def mutated_requests(draw):
    """A valid request with some fields replaced, dropped or added."""
    cands = [dict(CAND) for _ in range(draw(st.integers(0, 3)))]
    body = {
        "user_id": draw(st.integers(0, 500)),
        "ts": 1_700_000_000_000,
        "candidates": cands,
    }
    for _ in range(draw(st.integers(1, 3))):
        target = (
            body if not cands or draw(st.booleans()) else draw(st.sampled_from(cands))
        )
        key = draw(st.sampled_from([*target.keys(), "extra"]))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(field_values)
    return body


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=json_values | mutated_requests())
def test_fuzzed_requests_never_get_a_5xx(app, body):
    # json.dumps writes NaN / Infinity, which are not JSON: those must be 4xx too
    r = app.http.post(
        f"{app.url}/rank",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code == 200:
        assert len(r.json()["scores"]) == len(body["candidates"])
    else:
        assert r.json()["error"]


def test_healthz_and_openapi(app):
    h = app.http.get(f"{app.url}/healthz", timeout=30).json()
    assert h["status"] == "ok" and h["segments"]["change_rows"] > 0
    # the defaults: gRPC between deployments, the Router's handles routing on
    # its replica's own loop (the env var reached the Router's process)
    assert h["handles"] == {"transport": "grpc", "on_replica_loop": True}
    spec = app.http.get(f"{app.url}/openapi.json", timeout=30).json()
    assert {"/rank", "/candidates", "/healthz"} <= set(spec["paths"])
    assert app.http.get(f"{app.url}/docs", timeout=30).status_code == 200


def test_metrics_reach_rays_prometheus_endpoint(app):
    """Requests per segment and status, latency and batch sizes, as exported
    by Ray's metrics agent (what Prometheus scrapes)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    _rank(app, {"user_id": 10**15, "candidates": [CAND]})
    _rank(app, {"user_id": "x", "candidates": [CAND]})
    want = [
        ("ray_dynamix_requests_total", 'segment="passive"', 'code="200"'),
        ("ray_dynamix_requests_total", 'code="422"'),
        ("ray_dynamix_request_latency_ms_bucket", 'route="/rank"'),
        ("ray_dynamix_ranker_batch_requests_bucket", 'deployment="PassiveRanker"'),
        ("ray_dynamix_ranker_batch_rows_bucket",),
        ("ray_dynamix_ranker_forward_ms_bucket",),
    ]

    def exported() -> list[tuple[str, ...]]:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [x for x in text.splitlines() if not x.startswith("#")]
        return [w for w in want if not any(all(p in x for p in w) for x in lines)]

    assert _wait(lambda: not exported(), 60), exported()


def test_candidates_equal_the_batch_computation(app):
    """/candidates looks the precomputed table up; it equals the one-process
    rule (u2u_candidates) at the table's instant, for several users."""
    edges = read_u2u(str(app.root / "u2u")).to_pandas()
    conv = read_events_frame(app.events, "conversions", ["user_id", "ts_ms", "ad_id"])
    ads = read_events_frame(app.events, "ad_impressions", ["ad_id", "advertiser_id"])
    users = edges["user_id"].drop_duplicates().to_numpy()[:5]
    first = app.http.post(
        f"{app.url}/candidates", json={"user_id": int(users[0])}, timeout=30
    )
    as_of = first.json()["as_of_ms"]  # the table's: the end of the data
    assert as_of > int(conv["ts_ms"].max())
    want = u2u_candidates(edges, conv, ads, as_of, CandidateConfig(cap=7), users=users)
    assert want["user_id"].nunique() == len(users)
    for user in users:
        r = app.http.post(
            f"{app.url}/candidates", json={"user_id": int(user), "k": 7}, timeout=30
        )
        assert r.status_code == 200, r.text
        w = want[want["user_id"] == user]
        assert r.json()["ads"] == w["ad_id"].tolist() and len(w) > 0
        np.testing.assert_allclose(r.json()["scores"], w["score"], rtol=1e-9)
        assert r.json()["as_of_ms"] == as_of
    r = app.http.post(f"{app.url}/candidates", json={"user_id": 10**15}, timeout=30)
    assert r.status_code == 200 and r.json()["ads"] == []
    r = app.http.post(
        f"{app.url}/candidates", json={"user_id": int(user), "k": 0}, timeout=30
    )
    assert r.status_code == 422 and "k" in r.json()["error"]


def test_a_new_candidates_version_is_picked_up(app):
    user = int(read_u2u(str(app.root / "u2u")).column("user_id")[0].as_py())

    def as_of() -> int:
        r = app.http.post(f"{app.url}/candidates", json={"user_id": user}, timeout=30)
        assert r.status_code == 200, r.text
        return int(r.json()["as_of_ms"])

    before = as_of()
    run_candidates(
        str(app.root / "u2u"),
        app.events,
        str(app.root / "cands"),
        as_of_ms=before - 86_400_000,
        progress=False,
    )
    assert _wait(lambda: as_of() == before - 86_400_000, 30)


class _Load:
    """Sequential /rank requests from a thread until stopped (at most ``limit``)."""

    def __init__(self, app, users, limit: int = 3000) -> None:
        self.app, self.users, self.limit = app, users, limit
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        s = requests.Session()
        i = 0
        while not self.stop.is_set() and len(self.codes) < self.limit:
            body = {
                "user_id": int(self.users[i % len(self.users)]),
                "candidates": [CAND],
            }
            try:
                self.codes.append(
                    s.post(f"{self.app.url}/rank", json=body, timeout=30).status_code
                )
            except requests.RequestException:
                self.codes.append(-1)
            i += 1

    def __enter__(self) -> _Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)


def _wait(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_publishing_new_segments_under_load_loses_no_request(app):
    segs = str(app.root / "segs")
    old = read_segment_store(segs)
    users = np.unique(old.user_id)[:50]
    with _Load(app, users) as load:
        assert _wait(lambda: len(load.codes) > 10, 60)
        run_segment(app.events, segs, SegmentConfig(epsilon=0.05), progress=False)
        new = read_segment_store(segs)
        assert new.version != old.version
        swapped = _wait(
            lambda: (
                app.http.get(f"{app.url}/healthz", timeout=30).json()["segments"][
                    "version"
                ]
                == new.version
            ),
            30,
        )
        n_at_swap = len(load.codes)
        assert _wait(lambda: len(load.codes) > n_at_swap + 10, 60)
    assert swapped, "the router did not pick the new segment table up"
    assert load.codes and set(load.codes) == {200}, sorted(set(load.codes))
    # the router now answers from the new table
    moved = np.flatnonzero(new.segment == 1)
    user, ts = int(new.user_id[moved[0]]), int(new.window_end_ms[moved[0]])
    r = _rank(app, {"user_id": user, "ts": ts, "candidates": [CAND]})
    assert r.json()["segment"] == "active"


def test_a_killed_active_replica_loses_no_request(app):
    """Two active replicas; one is killed under load. The router re-sends the
    requests the dead replica held; the other replica (and the restarted one)
    serve the rest."""
    import ray
    from ray import serve

    from dynamix_ray.serve.app import build_app

    serve.run(
        build_app(_app_config(app.root, app.events, active_replicas=2)),
        name="dynamix",
        route_prefix="/",
    )
    store = read_segment_store(str(app.root / "segs"))
    now = int(time.time() * 1000)
    active_now = store.lookup(store.user_id, np.full(len(store.user_id), now)) == 1
    users = np.unique(store.user_id[active_now])
    assert len(users), "no user is active at the end of the tiny data"

    def replicas() -> list[str]:
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "ActiveRanker" in a["name"] and a["namespace"] == "serve"
        ]

    assert _wait(lambda: len(replicas()) == 2, 60), replicas()
    with _Load(app, users) as load:
        assert _wait(lambda: len(load.codes) > 30, 60)
        ray.kill(ray.get_actor(replicas()[0], namespace="serve"), no_restart=True)
        n_at_kill = len(load.codes)
        assert _wait(lambda: len(load.codes) > n_at_kill + 100, 90)
    failed = sum(c != 200 for c in load.codes)
    assert failed / len(load.codes) < 0.005, (failed, len(load.codes))


# ------------------------------------------------------------ OpenAPI fuzzing


def test_an_openapi_fuzzer_finds_nothing(app):
    """schemathesis drives every operation of /openapi.json, with schema-valid
    and with invalid requests: valid ones are accepted, invalid ones rejected
    with a 4xx, nothing is a 5xx, and every status answered is documented."""
    import schemathesis
    from schemathesis import GenerationMode, checks

    schema = schemathesis.openapi.from_url(f"{app.url}/openapi.json")
    wanted = [
        checks.not_a_server_error,
        checks.negative_data_rejection,
        checks.positive_data_acceptance,
        checks.status_code_conformance,
    ]
    failures, ran = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        # GET /healthz takes no input: there is no invalid request to make
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=20, deadline=None, derandomize=True, database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                case.call_and_validate(
                    base_url=app.url, session=app.http, checks=wanted, timeout=30
                )

            try:
                run()
            except Exception as e:  # noqa: BLE001 - collected, reported below
                failures.append(f"{operation.label} ({mode.value}): {e}")
            ran.append((operation.label, mode.value))
    assert {label for label, _ in ran} == {
        "POST /rank",
        "POST /candidates",
        "GET /healthz",
    }
    assert not failures, "\n\n".join(failures)


def test_grafana_dashboard_reads_only_metrics_the_app_exports():
    """docs/grafana-dynamix.json's queries name metrics the code defines
    (``ray_`` + the name given to ``ray.util.metrics``)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dash = json.loads((repo / "docs" / "grafana-dynamix.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"ray_(dynamix_[a-z_]+)", e)
    }
    code = "".join(p.read_text() for p in (repo / "dynamix_ray" / "serve").glob("*.py"))
    defined = set(re.findall(r'"(dynamix_[a-z_]+)",\s*\n\s*"', code))
    assert used and used <= defined, (used - defined, defined)
