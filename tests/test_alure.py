"""ALURE: user histories, the user tower over Ray Data, the faiss graph and u2u
candidates, each beside a plain reference; end to end on tiny generated data."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.alure.candidates import (
    CandidateConfig,
    adjusted_rand_index,
    purity,
    u2u_candidates,
)
from dynamix_ray.alure.embed import EmbedConfig, read_embeddings, run_embed
from dynamix_ray.alure.evaluate import GENERATORS
from dynamix_ray.alure.graph import (
    DEFAULT_PROBE,
    USERS_PER_LIST,
    U2UConfig,
    build_u2u,
    default_k1,
    default_probe,
    exact_neighbors,
    ivf_index,
    neighbor_recall,
    read_u2u,
    search,
)
from dynamix_ray.cli import main as dynamix
from dynamix_ray.config import GenerateConfig
from dynamix_ray.histories import mode_by_user, user_histories
from dynamix_ray.io import read_json, resolve, version_folder
from dynamix_ray.model import ModelConfig
from dynamix_ray.model.checkpoint import load_checkpoint
from dynamix_ray.samples import SampleConfig
from dynamix_ray.segments.pipeline import run_segment
from dynamix_ray.synth import generate
from dynamix_ray.train import TrainConfig, run_train

DAY = 86_400_000

# ------------------------------------------------------------------ histories


@st.composite
def _events(draw):
    n = draw(st.integers(0, 40))
    users = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    return {
        "user_id": np.array(users, np.int64),
        "ts_ms": np.array(ts, np.int64),
        "ad_id": np.arange(n, dtype=np.int64),
        "dwell_ms": np.full(n, 1000.0),
        "country": np.array([u % 3 for u in users], np.int16),
    }


@settings(max_examples=60, deadline=None)
@given(
    ev=_events(),
    as_of=st.integers(0, 10_001),
    seq=st.integers(1, 6),
    per_source=st.booleans(),
)
def test_histories_hold_the_last_events_strictly_before_as_of(
    ev, as_of, seq, per_source
):
    """One length for all sources, or per source (a checkpoint's
    ``SampleConfig.lengths()``, what ``dynamix embed`` passes)."""
    lengths = {"ad_impressions": seq, "page_views": 6} if per_source else seq
    h = user_histories({"ad_impressions": ev}, as_of, lengths)
    if len(h["user_id"]):
        assert h["ad_impressions.mask"].shape[1] == seq
    before = ev["ts_ms"] < as_of
    assert h["user_id"].tolist() == sorted(set(ev["user_id"][before].tolist()))
    for i, u in enumerate(h["user_id"]):
        mine = np.sort(ev["ts_ms"][(ev["user_id"] == u) & before])[-seq:]
        mask = h["ad_impressions.mask"][i]
        got = h["ad_impressions.ts_ms"][i][mask]
        assert (got < as_of).all()  # no event at or after as_of
        assert sorted(got.tolist()) == mine.tolist()


@settings(max_examples=60, deadline=None)
@given(ev=_events(), since=st.integers(0, 10_000))
def test_incremental_histories_only_for_users_with_new_events(ev, since):
    as_of = 10_001
    h = user_histories({"ad_impressions": ev}, as_of, 4, since_ms=since)
    new = (ev["ts_ms"] >= since) & (ev["ts_ms"] < as_of)
    assert h["user_id"].tolist() == sorted(set(ev["user_id"][new].tolist()))


@settings(max_examples=80, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=40),
    users=st.lists(st.integers(0, 8), unique=True, max_size=9),
)
def test_mode_by_user_equals_a_counter(pairs, users):
    users = np.array(sorted(users), np.int64)
    uid = np.array([p[0] for p in pairs], np.int64)
    val = np.array([p[1] for p in pairs], np.int64)
    got = mode_by_user(users, uid, val)
    for i, u in enumerate(users):
        counts: dict[int, int] = defaultdict(int)
        for a, b in pairs:
            if a == u:
                counts[b] += 1
        want = min(counts, key=lambda v: (-counts[v], v)) if counts else -1
        assert got[i] == want


# ------------------------------------------------------------------ graph


def _clustered(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    x = centers[rng.integers(0, k, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_neighbors_equal_numpy_brute_force():
    x = _clustered(300, 8, 5, 0)
    ids = np.arange(1000, 1300, dtype=np.int64)
    got, sims = exact_neighbors(x, ids, x[:50], ids[:50], 5)
    s = x[:50] @ x.T
    s[np.arange(50), np.arange(50)] = -np.inf  # self excluded
    want = ids[np.argsort(-s, axis=1, kind="stable")[:, :5]]
    assert (got == want).mean() > 0.99  # float ties may swap
    assert np.allclose(
        np.sort(sims, 1),
        np.sort(np.take_along_axis(s, np.argsort(-s, 1)[:, :5], 1), 1),
        atol=1e-5,
    )
    assert not (got == ids[:50, None]).any()


def test_default_graph_work_per_query_is_bounded():
    # k1 grows with the users and the probe does not: a query scans about
    # DEFAULT_PROBE * USERS_PER_LIST users at any size (not 1/8 of them)
    for n in (10**5, 10**6, 10**8):
        k1 = default_k1(n)
        scanned = default_probe(k1) * n / k1
        assert (
            0.5 * DEFAULT_PROBE * USERS_PER_LIST
            <= scanned
            <= DEFAULT_PROBE * USERS_PER_LIST
        )
    assert default_k1(10) == 1 and default_probe(1) == 1
    assert default_probe(100, 40) == 40 and default_probe(8, 40) == 8


def test_hnsw_centroids_search_like_the_flat_ones():
    # above hnsw_above the centroids are found through an HNSW graph, for
    # k-means' assignment and as the coarse quantizer; forced here at 64
    import faiss

    x = _clustered(6000, 16, 30, 2)
    ids = np.arange(6000, dtype=np.int64)
    q = np.arange(0, 6000, 30)
    exact, _ = exact_neighbors(x, ids, x[q], ids[q], 10)
    flat = ivf_index(x, ids, k1=100, probe=10)
    hnsw = ivf_index(x, ids, k1=100, probe=10, hnsw_above=64)
    assert isinstance(faiss.downcast_index(hnsw.quantizer), faiss.IndexHNSWFlat)
    assert isinstance(faiss.downcast_index(flat.quantizer), faiss.IndexFlatIP)
    r_flat = neighbor_recall(search(flat, x[q], ids[q], 10, nprobe=10)[0], exact)
    r_hnsw = neighbor_recall(search(hnsw, x[q], ids[q], 10, nprobe=10)[0], exact)
    assert r_hnsw >= 0.9 and r_hnsw >= r_flat - 0.03
    # it survives serialisation (the search tasks load it from storage)
    back = faiss.deserialize_index(faiss.serialize_index(hnsw))
    got, _ = search(back, x[q], ids[q], 10, nprobe=10)
    assert neighbor_recall(got, exact) == r_hnsw


def test_ivf_recall_is_high_and_probing_everything_is_exact():
    x = _clustered(4000, 16, 20, 1)
    ids = np.arange(4000, dtype=np.int64)
    q = np.arange(0, 4000, 20)
    index = ivf_index(x, ids, k1=40)
    exact, _ = exact_neighbors(x, ids, x[q], ids[q], 10)
    all_probe, _ = search(index, x[q], ids[q], 10, nprobe=40)
    assert neighbor_recall(all_probe, exact) > 0.999
    some, _ = search(index, x[q], ids[q], 10, nprobe=8)
    assert neighbor_recall(some, exact) >= 0.9


def test_neighbor_recall_counts_overlap():
    a = np.array([[1, 2, 3], [4, 5, -1]])
    e = np.array([[1, 2, 9], [4, 6, 7]])
    assert neighbor_recall(a, e) == pytest.approx(3 / 6)


# ------------------------------------------------------------------ candidates


def _reference_candidates(edges, conv, ads, as_of, cfg, seen=frozenset()):
    """Per user, a list of (ad, score) built with plain loops; ``seen``:
    (user, ad) pairs left out before the cap."""
    adv = dict(zip(ads["ad_id"], ads["advertiser_id"], strict=True))
    pop: dict[int, int] = defaultdict(int)
    for a, t in zip(conv["ad_id"], conv["ts_ms"], strict=True):
        if t < as_of:
            pop[a] += 1
    by_adv: dict[int, list[int]] = defaultdict(list)
    for a in sorted(adv, key=lambda a: (adv[a], -pop[a], a)):
        by_adv[adv[a]].append(a)
    out = {}
    for u in sorted(set(edges["user_id"])):
        direct: dict[int, float] = defaultdict(float)
        for _, e in edges[edges["user_id"] == u].iterrows():
            for _, c in conv[conv["user_id"] == e["neighbor_id"]].iterrows():
                if c["ts_ms"] < as_of:
                    age = (as_of - c["ts_ms"]) / 1000.0
                    direct[c["ad_id"]] += e["similarity"] * 2 ** (
                        -age / cfg.half_life_s
                    )
        scores = dict(direct)
        best_adv: dict[int, float] = {}
        for a, s in direct.items():
            best_adv[adv[a]] = max(best_adv.get(adv[a], -np.inf), s)
        for v, s in best_adv.items():
            for a in by_adv[v][: cfg.per_advertiser]:
                scores[a] = max(scores.get(a, -np.inf), s * cfg.advertiser_weight)
        ranked = [a for a in scores if (u, a) not in seen]
        ranked = sorted(ranked, key=lambda a: (-scores[a], a))[: cfg.cap]
        if ranked:
            out[u] = [(a, scores[a]) for a in ranked]
    return out


@settings(max_examples=40, deadline=None)
@given(
    edges=st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 6), st.floats(0.0, 1.0)),
        max_size=12,
        unique_by=lambda e: (e[0], e[1]),
    ),
    conv=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 2000), st.integers(0, 9)),
        max_size=20,
    ),
    cap=st.integers(1, 8),
    per_adv=st.integers(0, 3),
    seen=st.sets(st.tuples(st.integers(1, 4), st.integers(0, 9)), max_size=8),
)
def test_u2u_candidates_equal_a_plain_reference(edges, conv, cap, per_adv, seen):
    edges_df = pd.DataFrame(edges, columns=["user_id", "neighbor_id", "similarity"])
    conv_df = pd.DataFrame(conv, columns=["user_id", "ts_ms", "ad_id"])
    ads = pd.DataFrame({"ad_id": np.arange(10), "advertiser_id": np.arange(10) % 3})
    cfg = CandidateConfig(cap=cap, per_advertiser=per_adv, half_life_s=1.0)
    seen_df = pd.DataFrame(sorted(seen), columns=["user_id", "ad_id"], dtype=np.int64)
    got = u2u_candidates(edges_df, conv_df, ads, 1500, cfg, seen=seen_df)
    want = _reference_candidates(edges_df, conv_df, ads, 1500, cfg, seen)
    assert sorted(set(got["user_id"])) == sorted(want)
    for u, rows in want.items():
        mine = got[got["user_id"] == u]
        assert mine["rank"].tolist() == list(range(1, len(rows) + 1))
        assert mine["ad_id"].tolist() == [a for a, _ in rows]
        assert np.allclose(mine["score"], [s for _, s in rows])


def test_cluster_scores():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, (a + 1) % 3) == pytest.approx(1.0)  # renamed
    # sklearn's documented example: [0,0,1,1] vs [0,0,1,2] -> 0.5714...
    assert adjusted_rand_index(
        np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
    ) == pytest.approx(0.5714285714)
    assert purity(np.array([0, 0, 1, 1]), np.array([5, 6, 7, 7])) == 0.75


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("alure")
    events, segs, run = (str(root / p) for p in ("events", "segs", "run"))
    generate(events, GenerateConfig(users=150, days=3, seed=4), progress=None)
    run_segment(events, segs, progress=False)
    model = ModelConfig(
        emb_dim=8, d_model=16, user_dim=16, head_hidden=32, max_seq_len=8
    )
    run_train(
        events,
        segs,
        run,
        TrainConfig(
            epochs=1,
            batch_size=256,
            model=model,
            samples=SampleConfig(max_seq_len=8),
            importance_rows=0,
        ),
    )
    start = json.loads((root / "events" / "_truth" / "truth.json").read_text())
    return events, run, root, start


def test_embed_runs_the_user_tower_and_is_incremental(trained, tmp_path):
    import torch

    from dynamix_ray.alure.evaluate import read_events_frame
    from dynamix_ray.features import available_features, to_model_batch

    events, run, _, _ = trained
    imp = read_events_frame(events, "ad_impressions", ["user_id", "ts_ms"])
    day0 = int(imp["ts_ms"].min()) // DAY * DAY
    out = str(tmp_path / "emb")
    m1 = run_embed(events, run, out, EmbedConfig(as_of_ms=day0 + DAY), progress=False)
    t1 = read_embeddings(out)
    assert m1["embedded_this_run"] == t1.num_rows == m1["users"]
    x = np.stack(t1.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert t1.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert "country" in t1.column_names

    # the same numbers as the model's user tower run here on the same histories
    model, mcfg, _ = load_checkpoint(run)
    ev = {
        src: {c: f[c].to_numpy() for c in f.columns}
        for src in (
            "ad_impressions",
            "conversions",
            "organic_impressions",
            "page_views",
        )
        for f in [read_events_frame(events, src)]
    }
    h = user_histories(ev, day0 + DAY, mcfg.max_seq_len)
    with torch.no_grad():
        want = model.user_tower(
            to_model_batch(h), available_features(h), normalize=True
        )
    assert h["user_id"].tolist() == t1.column("user_id").to_pylist()
    assert np.allclose(x, want.numpy(), atol=1e-5)

    # an hour later: only users with events in that hour are re-embedded
    later = day0 + DAY + 3_600_000
    m2 = run_embed(events, run, out, EmbedConfig(as_of_ms=later), progress=False)
    t2 = read_embeddings(out).to_pandas().set_index("user_id")
    assert m2["incremental_since_ms"] == day0 + DAY
    assert m2["embedded_this_run"] + m2["kept_from_previous"] == len(t2)
    assert m2["kept_from_previous"] > 0 and m2["embedded_this_run"] > 0
    as_of = read_embeddings(out).column("as_of").cast(pa.int64()).to_numpy()
    assert set(np.unique(as_of)) == {day0 + DAY, later}
    first = t1.to_pandas().set_index("user_id")
    kept = t2.index[as_of == day0 + DAY]
    assert len(kept) == m2["kept_from_previous"]
    for u in kept[:5]:
        assert np.allclose(t2.loc[u, "embedding"], first.loc[u, "embedding"])
    with pytest.raises(ValueError, match="before the previous run"):
        run_embed(events, run, out, EmbedConfig(as_of_ms=day0), progress=False)

    # a re-run with no new event embeds nobody and keeps everyone
    m3 = run_embed(events, run, out, EmbedConfig(as_of_ms=later), progress=False)
    assert m3["embedded_this_run"] == 0 and m3["kept_from_previous"] == m2["users"]

    # rows of a run from before the events had a country column are kept too
    import pyarrow.parquet as pq

    for p in (tmp_path / "emb" / "embeddings").rglob("*.parquet"):
        t = pq.read_table(p)
        pq.write_table(t.drop_columns(["country"]), p)
    m4 = run_embed(
        events, run, out, EmbedConfig(as_of_ms=later + 3_600_000), progress=False
    )
    t4 = read_embeddings(out)
    assert m4["users"] == m2["users"] == t4.num_rows
    assert t4.column("country").null_count == 0


def test_u2u_graph_and_evaluation_end_to_end(trained, tmp_path, capsys):
    events, run, _, truth = trained
    emb = str(tmp_path / "emb")
    # nothing after the end of the data is held out: a clear error
    assert dynamix(["embed", events, run, emb, "--no-progress"]) == 0
    code = dynamix(
        ["u2u", emb, str(tmp_path / "g0"), "--no-progress", "--eval", events]
    )
    assert code == 2 and "nothing is held out" in capsys.readouterr().err
    # the last of the 3 days held out, the day before validates
    start = dt.date.fromisoformat(truth["config"]["start"])
    last_day = (start + dt.timedelta(days=2)).isoformat()
    args = ["embed", events, run, emb, "--no-progress", "--as-of", last_day, "--full"]
    assert dynamix(args) == 0
    out = str(tmp_path / "graph")
    code = dynamix(
        ["u2u", emb, out, "--k2", "5", "--no-progress", "--eval", events, "--cap", "50"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "R@50" in text and "planted clusters" in text and "blend weights" in text
    edges = read_u2u(out).to_pandas()
    table = read_embeddings(emb).to_pandas()
    fs, root = resolve(str(tmp_path / "graph"))
    meta = read_json(fs, f"{version_folder(fs, root, 'u2u')}/_meta.json")
    assert 0.0 <= meta["recall_at_k2"] <= 1.0
    assert (edges["user_id"] != edges["neighbor_id"]).all()
    assert edges.groupby("user_id").size().max() <= 5
    # neighbours stay within a country
    country = dict(zip(table["user_id"], table["country"], strict=True))
    assert all(
        country[u] == country[v]
        for u, v in zip(edges["user_id"], edges["neighbor_id"], strict=True)
    )
    assert set(meta["groups"]) == {str(c) for c in table["country"].unique()}
    ev = json.loads((tmp_path / "graph" / "u2u_eval.json").read_text())
    names = set(GENERATORS)
    assert set(ev["generators"]) == names and set(ev["recall"]["50"]) == names
    assert set(ev["generators"]["u2u"]) == {"50"}  # K above --cap left out
    assert sum(ev["blend_weights"].values()) == pytest.approx(1.0)
    assert ev["holdout"]["days"] > 0 and ev["users_evaluated"] > 0


def test_u2u_writes_to_memory_filesystem(ray_session):
    x = _clustered(500, 8, 4, 3)
    table = pa.table(
        {
            "user_id": pa.array(np.arange(500, dtype=np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
        }
    )
    meta = build_u2u(table, "memory://u2u_test", U2UConfig(k2=4), progress=False)
    edges = read_u2u("memory://u2u_test")
    assert meta["edges"] == edges.num_rows == 500 * 4
    assert meta["recall_at_k2"] >= 0.9


@settings(max_examples=100, deadline=None)
@given(
    n_users=st.integers(0, 5),
    n_days=st.integers(1, 4),
    queries=st.lists(
        st.tuples(st.integers(-1, 7), st.integers(-2, 5 * 24)), max_size=20
    ),
)
def test_daily_embeddings_are_those_of_the_last_midnight_before_the_sample(
    n_users, n_days, queries
):
    """A sample at t gets the embedding made at the last midnight <= t (built
    from events before it: nothing at or after t), zeros before the first
    midnight or for users never embedded."""
    from dynamix_ray.alure.feature import attach_daily

    users = np.arange(n_users, dtype=np.int64) * 2  # odd ids: never embedded
    days = np.arange(1, n_days + 1, dtype=np.int64) * DAY
    emb = np.random.default_rng(0).normal(size=(n_days, n_users, 3)).astype(np.float32)
    uid = np.array([q[0] for q in queries], np.int64)
    t = np.array([q[1] for q in queries], np.int64) * 3_600_000
    got = attach_daily(users, days, emb, uid, t)
    for i, (u, ts) in enumerate(zip(uid, t, strict=True)):
        past = [d for d in range(n_days) if days[d] <= ts]
        if u in users and past:
            np.testing.assert_array_equal(got[i], emb[past[-1], list(users).index(u)])
        else:
            assert not got[i].any()


def test_training_with_the_daily_alure_embedding(trained, tmp_path):
    """`dynamix embed --daily`, then a baseline trained with the embedding as a
    head input: the checkpoint's model takes it (ext_dim = E)."""
    from dynamix_ray.alure.feature import read_daily
    from dynamix_ray.model.checkpoint import load_checkpoint

    events, run, root, _ = trained
    daily = str(tmp_path / "daily")
    assert dynamix(["embed", events, run, daily, "--daily", "--no-progress"]) == 0
    d = read_daily(daily)
    assert len(d.days_ms) >= 2 and d.dim == 16
    assert (np.abs(d.emb[-1]).sum(axis=1) > 0).mean() > 0.9  # most users embedded
    out = str(tmp_path / "with_alure")
    model = ModelConfig(
        emb_dim=8, d_model=16, user_dim=16, head_hidden=32, max_seq_len=8
    )
    m = run_train(
        events,
        str(root / "segs"),
        out,
        TrainConfig(
            epochs=1,
            batch_size=256,
            model=model,
            samples=SampleConfig(max_seq_len=8),
            importance_rows=0,
            alure=daily,
        ),
    )
    assert 0 < m["ne"] < 2
    _, cfg, _ = load_checkpoint(out)
    assert cfg.ext_dim == 16
