"""Retrieval generators, metrics, and the choices made on a validation period,
each beside a plain-loop reference; the generator's planted popularity."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.alure.candidates import not_seen
from dynamix_ray.alure.retrieval import (
    RetrievalConfig,
    blend,
    choose_blend_weights,
    choose_half_life,
    decay,
    item_cf,
    new_pairs,
    popular,
    random_ads,
    retrieval_metrics,
    seen_pairs,
)
from dynamix_ray.config import GenerateConfig
from dynamix_ray.synth import generate

DAY = 86_400_000

_conv = st.lists(
    st.tuples(st.integers(1, 6), st.integers(0, 10 * DAY), st.integers(0, 11)),
    max_size=40,
)


def _frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "ts_ms", "ad_id"], dtype=np.int64)
    return df.assign(country=df["user_id"] % 2)


def _users(ids) -> pd.DataFrame:
    ids = np.asarray(sorted(set(ids)), np.int64)
    return pd.DataFrame({"user_id": ids, "country": ids % 2})


def _lists(cands: pd.DataFrame) -> dict[int, list[int]]:
    return {
        u: g.sort_values("rank")["ad_id"].tolist() for u, g in cands.groupby("user_id")
    }


def _well_formed(cands: pd.DataFrame, seen: pd.DataFrame, cap: int) -> None:
    assert not_seen(cands, seen).all()
    for _, g in cands.groupby("user_id"):
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
        assert len(g) <= cap and g["ad_id"].is_unique
        assert (np.diff(g["score"].to_numpy()) <= 0).all()


# ------------------------------------------------------------------ metrics


def _reference_metrics(cands, truth, k, catalog):
    lists = _lists(cands)
    want = defaultdict(set)
    for u, a in zip(truth["user_id"], truth["ad_id"], strict=True):
        want[u].add(a)
    rec, ndcg, hit, shown = [], [], [], set()
    for u, items in want.items():
        top = lists.get(u, [])[:k]
        shown |= set(top)
        hits = [r for r, a in enumerate(top, 1) if a in items]
        rec.append(len(hits) / len(items))
        ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(items), k) + 1))
        ndcg.append(sum(1 / math.log2(r + 1) for r in hits) / ideal)
        hit.append(bool(hits))
    return {
        "recall": np.mean(rec),
        "ndcg": np.mean(ndcg),
        "hit_rate": np.mean(hit),
        "coverage": len(shown) / catalog,
    }


@settings(max_examples=60, deadline=None)
@given(
    cand=st.lists(
        st.tuples(st.integers(1, 5), st.integers(0, 15)),
        max_size=40,
        unique=True,
    ),
    truth=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 15)), min_size=1),
    k=st.integers(1, 6),
)
def test_metrics_equal_a_plain_reference(cand, truth, k):
    c = pd.DataFrame(cand, columns=["user_id", "ad_id"])
    c["score"] = 1.0
    c["rank"] = c.groupby("user_id").cumcount() + 1
    t = pd.DataFrame(truth, columns=["user_id", "ad_id"])
    got = retrieval_metrics(c, t, (k,), 16)[str(k)]
    want = _reference_metrics(c, t, k, 16)
    for name, v in want.items():
        assert got[name] == pytest.approx(v), name


def test_new_pairs_leave_out_what_was_converted_before():
    conv = _frame(
        [
            (1, 0, 10),
            (1, 5 * DAY, 10),
            (1, 5 * DAY, 11),
            (2, 6 * DAY, 10),
            (2, 9 * DAY, 12),
        ]
    )
    got = new_pairs(conv, 5 * DAY, 8 * DAY)
    assert sorted(zip(got["user_id"], got["ad_id"], strict=True)) == [(1, 11), (2, 10)]
    assert len(seen_pairs(conv, 5 * DAY)) == 1


# ------------------------------------------------------------------ generators


def _reference_popular(conv, users, at, cap, h, seen, by):
    score: dict = defaultdict(float)
    for _u, t, a, c in conv[["user_id", "ts_ms", "ad_id", "country"]].itertuples(
        index=False
    ):
        if t < at:
            w = 1.0 if not np.isfinite(h) else 2 ** (-(at - t) / 1000 / h)
            score[(c if by else None, a)] += w
    out = {}
    seen_set = set(zip(seen["user_id"], seen["ad_id"], strict=True))
    for u, c in users[["user_id", "country"]].itertuples(index=False):
        g = c if by else None
        ads = [a for (gg, a) in score if gg == g and (u, a) not in seen_set]
        ranked = sorted(ads, key=lambda a: (-score[(g, a)], a))[:cap]
        if ranked:
            out[u] = ranked
    return out


@settings(max_examples=40, deadline=None)
@given(
    conv=_conv,
    cap=st.integers(1, 6),
    h=st.sampled_from([DAY / 1000, float("inf")]),
    by=st.booleans(),
)
def test_popular_equals_a_plain_reference_and_skips_seen(conv, cap, h, by):
    df = _frame(conv)
    at = 6 * DAY
    users = _users(range(1, 7))
    seen = seen_pairs(df, at)
    got = popular(df, users, at, cap, h, seen, "country" if by else None)
    _well_formed(got, seen, cap)
    want = _reference_popular(df, users, at, cap, h, seen, by)
    assert _lists(got) == want


def _reference_item_cf(conv, users, at, cap, h, seen):
    before = conv[conv["ts_ms"] < at]
    last: dict = {}
    for u, t, a in before[["user_id", "ts_ms", "ad_id"]].itertuples(index=False):
        last[(u, a)] = max(last.get((u, a), -1), t)
    items: dict = defaultdict(set)
    for u, a in last:
        items[a].add(u)
    sim = {
        (i, j): len(items[i] & items[j]) / math.sqrt(len(items[i]) * len(items[j]))
        for i in items
        for j in items
        if i != j and items[i] & items[j]
    }
    seen_set = set(zip(seen["user_id"], seen["ad_id"], strict=True))
    out = {}
    for u in users["user_id"]:
        score: dict = defaultdict(float)
        for (uu, i), t in last.items():
            if uu != u:
                continue
            w = 1.0 if not np.isfinite(h) else 2 ** (-(at - t) / 1000 / h)
            for (a, j), s in sim.items():
                if a == i:
                    score[j] += w * s
        ranked = sorted(
            (j for j in score if (u, j) not in seen_set), key=lambda j: (-score[j], j)
        )[:cap]
        if ranked:
            out[u] = ranked
    return out


@settings(max_examples=40, deadline=None)
@given(conv=_conv, cap=st.integers(1, 6), h=st.sampled_from([DAY / 1000, float("inf")]))
def test_item_cf_equals_a_plain_reference(conv, cap, h):
    df = _frame(conv)
    at = 6 * DAY
    users = _users(range(1, 7))
    seen = seen_pairs(df, at)
    got = item_cf(df, users, at, cap, h, seen, neighbours=100, history=100)
    _well_formed(got, seen, cap)
    assert _lists(got) == _reference_item_cf(df, users, at, cap, h, seen)


def test_random_ads_skip_seen_and_fill_the_cap():
    conv = _frame([(1, 0, a) for a in range(5)])
    seen = seen_pairs(conv, DAY)
    got = random_ads(np.arange(10), _users([1, 2]), 5, seen, seed=3)
    _well_formed(got, seen, 5)
    assert _lists(got)[1] and set(_lists(got)[1]) == set(range(5, 10))
    assert len(_lists(got)[2]) == 5


def test_decay_halves_per_half_life_and_infinity_counts():
    assert decay(np.array([0, 1000]), 2000, 1.0).tolist() == [0.25, 0.5]
    assert decay(np.array([0]), 10**12, float("inf")).tolist() == [1.0]


# ------------------------------------------------------------------ choices


def test_choose_half_life_takes_the_best_recall_on_validation():
    truth = pd.DataFrame({"user_id": [1], "ad_id": [7]})

    def gen(at, h):  # the right ad ranks first only at h == 2
        ad = 7 if h == 2 else 8
        return pd.DataFrame(
            {"user_id": [1], "ad_id": [ad], "score": [1.0], "rank": [1]}
        )

    best, sweep = choose_half_life(gen, truth, 0, (1.0, 2.0, 4.0), 1)
    assert best == 2.0 and list(sweep.values()) == [0.0, 1.0, 0.0]


def _reference_blend(lists, weights, cap, c):
    score: dict = defaultdict(float)
    for name, lst in lists.items():
        for u, a, r in lst[["user_id", "ad_id", "rank"]].itertuples(index=False):
            if weights[name] > 0:
                score[(u, a)] += weights[name] / (c + r)
    out = {}
    for u in sorted({u for u, _ in score}):
        ads = sorted(
            (a for uu, a in score if uu == u), key=lambda a: (-score[(u, a)], a)
        )
        out[u] = ads[:cap]
    return out


def _ranked(rows):
    df = pd.DataFrame(rows, columns=["user_id", "ad_id"]).drop_duplicates()
    df["rank"] = df.groupby("user_id").cumcount() + 1
    df["score"] = -df["rank"].astype(float)
    return df


@settings(max_examples=40, deadline=None)
@given(
    a=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 9)), max_size=20),
    b=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 9)), max_size=20),
    truth=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 9)), min_size=1),
    k=st.integers(1, 4),
)
def test_blend_and_the_weight_search_equal_plain_references(a, b, truth, k):
    lists = {"x": _ranked(a), "y": _ranked(b)}
    if not len(lists["x"]) or not len(lists["y"]):
        return
    w = {"x": 0.3, "y": 0.7}
    got = blend(lists, w, 5, 60.0)
    assert _lists(got) == _reference_blend(lists, w, 5, 60.0)
    t = pd.DataFrame(truth, columns=["user_id", "ad_id"])
    weights, best = choose_blend_weights(lists, t, k, step=0.25, depth=100)
    # the fast search's recall is the plain path's for its weights, and no
    # grid point does better through the plain path
    plain = {}
    for wx in (0.0, 0.25, 0.5, 0.75, 1.0):
        ww = {"x": wx, "y": 1.0 - wx}
        plain[wx] = retrieval_metrics(blend(lists, ww, 100), t, (k,), 10)[str(k)][
            "recall"
        ]
    assert best == pytest.approx(plain[weights["x"]])
    assert best == pytest.approx(max(plain.values()))


def test_retrieval_config_refuses_what_cannot_work():
    with pytest.raises(ValueError):
        RetrievalConfig(ks=(50, 2000), cap=1500)
    with pytest.raises(ValueError):
        RetrievalConfig(holdout_days=0)


# ------------------------------------------------------------------ the world


def _skewed(**size) -> GenerateConfig:
    """A small world with Zipf popularity and 5-day campaigns."""
    return GenerateConfig(
        impressions_per_user_day=10, ad_zipf=1.0, campaign_days=5, **size
    )


def test_planted_popularity_and_campaigns(tmp_path):
    cfg = _skewed(users=400, days=14, seed=2, n_ads=1000)
    generate(str(tmp_path / "w"), cfg, progress=None)
    ads = pq.read_table(tmp_path / "w" / "_truth" / "ads.parquet").to_pandas()
    assert ads["popularity"].sum() == pytest.approx(1.0)
    assert (ads["end_ms"] - ads["start_ms"] >= DAY).all()
    imp = pq.read_table(tmp_path / "w" / "ad_impressions").to_pandas()
    imp = imp[imp["ts"] > 10**12]  # the planted bad timestamps aside
    m = imp.merge(ads[["ad_id", "start_ms", "end_ms"]], on="ad_id")
    live = (m["ts"] >= m["start_ms"]) & (m["ts"] < m["end_ms"])
    assert live.mean() > 0.99  # only a day with no live ad of a cluster falls back
    conv = pq.read_table(tmp_path / "w" / "conversions").to_pandas()
    per_ad = conv.groupby("ad_id").size().sort_values(ascending=False)
    assert per_ad.iloc[:50].sum() / per_ad.sum() > 0.25  # 5% of ads
    skewed = _popular_over_random(conv)
    generate(str(tmp_path / "u"), replace(cfg, ad_zipf=0.0, campaign_days=0.0), None)
    uniform = _popular_over_random(
        pq.read_table(tmp_path / "u" / "conversions").to_pandas()
    )
    # (uniform is above 1 too: users are drawn into clusters of unequal sizes)
    assert skewed > 2.5 and skewed > 1.5 * uniform, (skewed, uniform)


def _popular_over_random(conv: pd.DataFrame) -> float:
    """recall@50 of most-popular over random's on the last 4 days."""
    conv = conv.rename(columns={"ts": "ts_ms"}).dropna(subset=["user_id"])
    conv = conv[conv["ts_ms"] > 10**12]
    at = int(conv["ts_ms"].max()) - 4 * DAY
    truth = new_pairs(conv, at, None)
    users = _users(truth["user_id"].astype(np.int64))
    seen = seen_pairs(conv, at)
    pop = popular(conv, users, at, 50, 2 * DAY / 1000, seen)
    rnd = random_ads(np.arange(1_000_000, 1_001_000), users, 50, seen)
    r_pop = retrieval_metrics(pop, truth, (50,), 1000)["50"]["recall"]
    r_rnd = retrieval_metrics(rnd, truth, (50,), 1000)["50"]["recall"]
    return r_pop / r_rnd


def test_the_default_world_has_no_popularity_skew(tmp_path):
    generate(str(tmp_path / "u"), GenerateConfig(users=20, days=2, n_ads=100), None)
    ads = pq.read_table(tmp_path / "u" / "_truth" / "ads.parquet").to_pandas()
    assert np.allclose(ads["popularity"], 1 / 100)
    assert ads["start_ms"].nunique() == 1 and ads["end_ms"].nunique() == 1


# ------------------------------------------------------------------ the protocol


def test_evaluation_end_to_end_with_a_planted_graph(tmp_path):
    """The protocol on a skewed world, with the u2u graph of the planted
    clusters (each user's neighbours: users of their cluster and country):
    every generator scored, choices recorded, the report's table drawn."""
    import pyarrow as pa

    from dynamix_ray.alure.evaluate import (
        GENERATORS,
        evaluate_retrieval,
        retrieval_summary,
    )
    from dynamix_ray.report import retrieval_html

    cfg = _skewed(users=300, days=12, seed=1, n_ads=800)
    generate(str(tmp_path / "w"), cfg, progress=None)
    users = pq.read_table(tmp_path / "w" / "_truth" / "users.parquet").to_pandas()
    rng = np.random.default_rng(0)
    rows = []
    for _, g in users.groupby(["cluster", "country"]):
        ids = g["user_id"].to_numpy()
        for u in ids:
            others = ids[ids != u]
            nb = rng.choice(others, min(10, len(others)), replace=False)
            rows.append(
                pd.DataFrame({"user_id": u, "neighbor_id": nb, "similarity": 0.9})
            )
    edges = pa.Table.from_pandas(pd.concat(rows), preserve_index=False)
    emb = pa.table(
        {
            "user_id": users["user_id"].to_numpy(),
            "country": users["country"].to_numpy(),
            "embedding": pa.array([[1.0, 0.0]] * len(users), pa.list_(pa.float32(), 2)),
        }
    )
    start = int(np.datetime64(cfg.start, "ms").astype(np.int64))
    as_of = start + 9 * DAY
    ev = evaluate_retrieval(
        str(tmp_path / "w"),
        emb,
        edges,
        as_of,
        RetrievalConfig(holdout_days=3, half_lives_s=(DAY / 1000, float("inf"))),
    )
    names = set(GENERATORS)
    assert set(ev["generators"]) == names
    assert ev["holdout"]["days"] == 3 and ev["validation"]["days"] == 3
    assert sum(ev["blend_weights"].values()) == pytest.approx(1.0)
    assert ev["blend"]["weights"] == ev["blend_weights"]
    r = ev["recall"]["200"]
    assert r["u2u"] > r["most_popular"] > r["random"]
    assert ev["union_recall"]["200"] >= r["blend"] - 1e-12
    for by_k in ev["generators"].values():
        assert all(0 <= v["recall"] <= 1 and 0 <= v["ndcg"] <= 1 for v in by_k.values())
    text = retrieval_summary(ev)
    assert "held out 3 days" in text and "blend weights" in text
    page = retrieval_html(ev)
    assert page.count("<tr><td>") == len(names) and "recall@1500" in page
