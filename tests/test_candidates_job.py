"""The precomputed u2u candidates (alure/candidates_job.py) equal the
one-process rule (candidates.u2u_candidates) for every user, on disk through
Ray and on memory:// in the driver; the look-up table answers like them."""

from __future__ import annotations

import numpy as np
import pytest

from dynamix_ray.alure.candidates import CandidateConfig, u2u_candidates
from dynamix_ray.alure.candidates_job import read_candidates, run_candidates
from dynamix_ray.alure.embed import embeddings_table
from dynamix_ray.alure.evaluate import read_events_frame
from dynamix_ray.alure.graph import U2UConfig, build_u2u, read_u2u
from dynamix_ray.config import GenerateConfig
from dynamix_ray.events import run_bucket
from dynamix_ray.synth import generate


@pytest.fixture(scope="module")
def graph(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("cands")
    generate(
        str(root / "raw"), GenerateConfig(users=300, days=3, seed=3), progress=None
    )
    store = run_bucket(str(root / "raw"), str(root / "events"), 3, progress=False)
    users = np.unique(
        read_events_frame(store.url, "ad_impressions", ["user_id"])["user_id"]
    )
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(users), 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = embeddings_table({"user_id": users, "embedding": emb}, 0, "t", 8)
    build_u2u(table, str(root / "u2u"), U2UConfig(k2=5), progress=False)
    return root, store.url


def _reference(root, events, as_of, cfg):
    edges = read_u2u(str(root / "u2u")).to_pandas()
    conv = read_events_frame(events, "conversions", ["user_id", "ts_ms", "ad_id"])
    ads = read_events_frame(events, "ad_impressions", ["ad_id", "advertiser_id"])
    return u2u_candidates(edges, conv, ads, as_of, cfg)


def _assert_table_equals(table, want) -> None:
    assert len(table) == want["user_id"].nunique()
    for user, w in want.groupby("user_id"):
        ads, scores = table.lookup(int(user), 10**9)
        assert ads.tolist() == w["ad_id"].tolist(), user
        np.testing.assert_allclose(scores, w["score"].to_numpy(), rtol=1e-9)


@pytest.mark.parametrize("cap", [10**6, 5])
def test_precomputed_candidates_equal_the_reference(graph, tmp_path, cap):
    root, events = graph
    cfg = CandidateConfig(cap=cap)
    conv = read_events_frame(events, "conversions", ["ts_ms"])
    as_of = int(np.quantile(conv["ts_ms"], 0.8))  # later conversions left out
    meta = run_candidates(
        str(root / "u2u"), events, str(tmp_path / "c"), cfg, as_of, progress=False
    )
    want = _reference(root, events, as_of, cfg)
    assert meta["rows"] == len(want) and meta["as_of_ms"] == as_of
    table = read_candidates(str(tmp_path / "c"))
    _assert_table_equals(table, want)
    assert table.as_of_ms == as_of
    if cap == 5:
        assert max(int(np.diff(table.offsets).max()), 0) == 5
    # k is a prefix of the ranking; unknown users have none
    user = int(want["user_id"].iloc[0])
    assert (
        table.lookup(user, 2)[0].tolist()
        == want[want.user_id == user].ad_id[:2].tolist()
    )
    assert len(table.lookup(10**15, 5)[0]) == 0
    # nothing of the scratch shuffle is left beside the published table
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["candidates"]


def test_precomputed_candidates_on_memory_run_in_the_driver(graph):
    """memory:// input and output: the same passes in this process."""
    import fsspec

    root, events = graph
    mem = fsspec.filesystem("memory")
    for p in (root / "u2u").rglob("*"):
        if p.is_file():
            mem.pipe_file(f"/candmem/u2u/{p.relative_to(root / 'u2u')}", p.read_bytes())
    meta = run_candidates(
        "memory://candmem/u2u", events, "memory://candmem/out", progress=False
    )
    want = _reference(root, events, meta["as_of_ms"], CandidateConfig())
    _assert_table_equals(read_candidates("memory://candmem/out"), want)
