"""The precomputed u2u candidates (alure/candidates_job.py) equal the
one-process rule (candidates.u2u_candidates) for every user, on disk through
Ray and on memory:// in the driver; the look-up table answers like them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from dynamix_ray.alure.candidates import CandidateConfig, u2u_candidates
from dynamix_ray.alure.candidates_job import read_candidates, run_candidates
from dynamix_ray.alure.embed import embeddings_table
from dynamix_ray.alure.evaluate import read_events_frame
from dynamix_ray.alure.graph import U2UConfig, build_u2u, read_u2u
from dynamix_ray.alure.retrieval import BlendSpec, seen_pairs
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


def _reference_blend(events, root, as_of, cfg, spec):
    """The blend of every user of the events, in one process, from the
    evaluation's generators (alure/retrieval.py)."""
    from dynamix_ray.alure.retrieval import blend, item_cf, popular, u2u

    edges = read_u2u(str(root / "u2u")).to_pandas()
    conv = read_events_frame(
        events, "conversions", ["user_id", "ts_ms", "ad_id", "country"]
    )
    imps = read_events_frame(
        events,
        "ad_impressions",
        ["user_id", "ts_ms", "ad_id", "advertiser_id", "country"],
    )
    ads = imps[["ad_id", "advertiser_id"]]
    both = pd.concat([imps, conv])[["user_id", "ts_ms", "country"]]
    both = both[both["ts_ms"] < as_of]
    users = (
        both.groupby(["user_id", "country"])
        .size()
        .reset_index(name="n")
        .sort_values(["user_id", "n", "country"], ascending=[True, False, True])
        .drop_duplicates("user_id")[["user_id", "country"]]
    )
    seen = seen_pairs(conv, as_of)
    h = spec.half_life
    lists = {
        "u2u": u2u(edges, conv, ads, users, as_of, cfg.cap, h("u2u"), seen, cfg),
        spec.popular: popular(
            conv, users, as_of, cfg.cap, h(spec.popular), seen, spec.popular_by
        ),
        "item_cf": item_cf(
            conv,
            users,
            as_of,
            cfg.cap,
            h("item_cf"),
            seen,
            spec.item_neighbours,
            spec.item_history,
        ),
    }
    return blend(lists, spec.weights, cfg.cap, spec.rrf_c)


@pytest.mark.parametrize("popular_name", ["most_popular", "most_popular_country"])
def test_precomputed_blend_equals_the_evaluated_one(graph, tmp_path, popular_name):
    root, events = graph
    conv = read_events_frame(events, "conversions", ["ts_ms"])
    as_of = int(np.quantile(conv["ts_ms"], 0.8))
    spec = BlendSpec(
        weights={"u2u": 0.5, popular_name: 0.2, "item_cf": 0.3},
        half_life_s={"u2u": 86_400.0, popular_name: None, "item_cf": 43_200.0},
        item_neighbours=20,
    )
    cfg = CandidateConfig(cap=30)
    meta = run_candidates(
        str(root / "u2u"), events, str(tmp_path / "b"), cfg, as_of, False, spec
    )
    want = _reference_blend(
        events, root, as_of, replace(cfg, half_life_s=86_400.0), spec
    )
    assert meta["blend"]["weights"] == spec.weights
    assert meta["rows"] == len(want)
    _assert_table_equals(read_candidates(str(tmp_path / "b")), want)
    # nobody is offered an ad they converted on before
    got = read_candidates(str(tmp_path / "b"))
    seen = seen_pairs(read_events_frame(events, "conversions", None), as_of)
    for u, a in seen.head(200).itertuples(index=False):
        assert a not in got.lookup(int(u), 10**6)[0].tolist()


def test_blend_spec_comes_from_the_evaluation_and_refuses_nonsense():
    ev = {
        "blend": {
            "weights": {"u2u": 1.0, "most_popular": 0.0, "item_cf": 0.0},
            "half_life_s": {"u2u": None, "most_popular": 1.0, "item_cf": 2.0},
        }
    }
    spec = BlendSpec.from_evaluation(ev)
    assert spec.half_life("u2u") == float("inf") and spec.popular_by is None
    with pytest.raises(ValueError, match="re-run"):
        BlendSpec.from_evaluation({})
    with pytest.raises(ValueError, match="one of most_popular"):
        BlendSpec({"u2u": 1.0}, {"u2u": None})
    with pytest.raises(ValueError, match="not all 0"):
        BlendSpec(
            {"u2u": 0.0, "most_popular": 0.0, "item_cf": 0.0},
            {"u2u": None, "most_popular": None, "item_cf": None},
        )
