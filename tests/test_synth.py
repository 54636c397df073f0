"""The generator is deterministic and plants what ``_truth/`` says it does."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from dynamix_ray.config import GenerateConfig
from dynamix_ray.io import read_bucketing, resolve, user_bucket
from dynamix_ray.synth import NO_SIGNAL_ATTRIBUTES, generate, read_truth_users


def _read(root: str, source: str) -> pa.Table:
    fs, path = resolve(root)
    return pads.dataset(f"{path}/{source}", filesystem=fs, format="parquet").to_table()


def test_same_seed_same_data_other_seed_other_data():
    roots = [f"memory://synth-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for root, seed in zip(roots, (1, 1, 2), strict=True):
        generate(root, GenerateConfig(users=80, days=2, seed=seed), progress=None)
    a, b, c = (_read(r, "ad_impressions") for r in roots)
    assert a.to_pandas().equals(b.to_pandas())  # NaN-aware (planted NaN dwell)
    assert not a.to_pandas().equals(c.to_pandas())


def test_bucketed_layout_holds_each_user_in_its_hash_bucket(tmp_path):
    root = str(tmp_path)
    generate(root, GenerateConfig(users=120, days=2, bucketed=4), progress=None)
    fs, path = resolve(root)
    assert read_bucketing(fs, path) == 4
    for source in ("ad_impressions", "conversions"):
        for f in fs.find(f"{path}/{source}"):
            bucket = int(f.split("bucket=")[1].split("/")[0])
            uid = pa.parquet.read_table(f).column("user_id").drop_null().to_numpy()
            assert (user_bucket(uid, 4) == bucket).all()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("planted"))
    truth = generate(root, GenerateConfig(users=1500, days=3, seed=5), progress=None)
    return root, truth


def test_truth_records_shares_and_bad_rows(planted):
    root, truth = planted
    users = read_truth_users(root)
    kind = users.column("kind").to_numpy()
    assert abs((kind > 0).mean() - 2 / 3) < 0.05  # active incl. switchers
    assert abs((kind == 2).mean() - 1 / 6) < 0.04
    imp = _read(root, "ad_impressions")
    assert imp.num_rows == truth["rows"]["ad_impressions"]
    nulls = imp.column("user_id").null_count
    assert nulls == truth["planted"]["ad_impressions/null_user_id"]
    assert "country" in imp.column_names
    saved = json.loads(resolve(root)[0].cat(f"{resolve(root)[1]}/_truth/truth.json"))
    assert saved["no_signal_attributes"] == list(NO_SIGNAL_ATTRIBUTES)


def test_no_signal_attributes_do_not_move_the_conversion_rate(planted):
    """Conversion rate per value of a no-signal attribute stays within noise,
    while a signal attribute (category, tied to the user's cluster) moves it."""
    root, _ = planted
    imp = _read(root, "ad_impressions").to_pandas()
    conv = _read(root, "conversions").to_pandas()
    key = ["user_id", "ad_id"]
    imp["label"] = imp.set_index(key).index.isin(conv.set_index(key).index)
    for attr in NO_SIGNAL_ATTRIBUTES:
        rates = imp.groupby(attr)["label"].agg(["mean", "count"])
        rates = rates[rates["count"] > 2000]
        p = imp["label"].mean()
        sd = np.sqrt(p * (1 - p) / rates["count"])
        assert (np.abs(rates["mean"] - p) < 5 * sd).all(), attr
    users = read_truth_users(root).to_pandas()[["user_id", "cluster"]]
    imp = imp.merge(users, on="user_id")
    match = imp["sem_id_1"] - 10 == imp["cluster"]
    assert imp.loc[match, "label"].mean() > 3 * imp.loc[~match, "label"].mean()


def _digest(root: str) -> str:
    """sha256 of a generated world's ad impressions and conversions."""
    import hashlib

    h = hashlib.sha256()
    for src in ("ad_impressions", "conversions"):
        t = _read(root, src)
        for c in t.column_names:
            a = t.column(c).to_pandas().to_numpy()
            h.update(c.encode())
            h.update(
                "\0".join(map(str, a)).encode() if a.dtype == object else a.tobytes()
            )
    return h.hexdigest()[:16]


#: Digests of worlds drawn by the generator before ``near_sigma_scale`` and
#: ``switch_spread_h`` existed (commit b88c5fb): their defaults must draw
#: these worlds again, bit for bit.
OLD_WORLDS = {
    "users=400, days=3, seed=4": "12e5aec7a2d8696c",
    "users=600, days=1, seed=3, switcher_share=0.5": "2bab20fee26d9448",
}


#: Digests of the organic impressions and page views of the same worlds,
#: drawn before ``passive_history_signal`` existed (commit a960eaf): a signal
#: of 1.0 must draw them again, bit for bit.
OLD_ENGAGEMENT = {
    "users=400, days=3, seed=4": "5e0fa00941d3fbfd",
    "users=600, days=1, seed=3, switcher_share=0.5": "7ed9599aa42d4bea",
}


def _engagement_digest(root: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for src in ("organic_impressions", "page_views"):
        t = _read(root, src)
        for c in t.column_names:
            h.update(c.encode())
            h.update(t.column(c).to_pandas().to_numpy().tobytes())
    return h.hexdigest()[:16]


def test_passive_history_signal_makes_passive_engagement_noise():
    """The paper's passive users: their organic impressions and page views
    carry little of their interest (default 0.1), an active user's carry it
    as before; 1.0 draws the world before the knob, bit for bit, and the ad
    impressions and conversions never change with it."""
    from dynamix_ray.synth import _CONTENT_ID0

    key = "users=400, days=3, seed=4"
    roots = {}
    for signal in (1.0, 0.1):
        roots[signal] = f"memory://synth-{uuid.uuid4().hex[:8]}"
        cfg = GenerateConfig(users=400, days=3, seed=4, passive_history_signal=signal)
        generate(roots[signal], cfg, None)
    assert _engagement_digest(roots[1.0]) == OLD_ENGAGEMENT[key]
    assert _digest(roots[0.1]) == _digest(roots[1.0]) == OLD_WORLDS[key]
    truth = json.loads(
        resolve(roots[0.1])[0].cat_file(f"{resolve(roots[0.1])[1]}/_truth/truth.json")
    )
    assert truth["engagement_own_cluster"] == pytest.approx(
        {"active": 0.7, "passive": 0.07}
    )
    users = read_truth_users(roots[0.1]).to_pandas().set_index("user_id")
    own = {}
    for signal, root in roots.items():
        org = _read(root, "organic_impressions").to_pandas().dropna(subset=["user_id"])
        org = org[org["user_id"].isin(users.index)]
        cluster = (org["content_id"] - _CONTENT_ID0) % 16
        kind = org["user_id"].map(users["kind"]).to_numpy()
        same = cluster.to_numpy() == org["user_id"].map(users["cluster"]).to_numpy()
        own[signal] = {k: float(same[kind == k].mean()) for k in (0, 1)}
    chance = 1 / 16
    # passive: 0.7 * signal of their own cluster, plus chance from the rest
    assert own[0.1][0] == pytest.approx(0.07 + 0.93 * chance, abs=0.02)
    assert own[1.0][0] == pytest.approx(0.7 + 0.3 * chance, abs=0.02)
    for signal in roots:  # active users keep their signal
        assert own[signal][1] == pytest.approx(0.7 + 0.3 * chance, abs=0.02)


def test_switchers_engagement_follows_their_active_block():
    """A switcher is passive outside its 12-hour block: its page views carry
    the cluster inside the block only; at 1.0, the old world bit for bit."""
    from dynamix_ray.synth import _HOUR_MS, _PAGE_ID0, _SWITCH_HOURS

    key = "users=600, days=1, seed=3, switcher_share=0.5"
    roots = {}
    for signal in (1.0, 0.1):
        roots[signal] = f"memory://synth-{uuid.uuid4().hex[:8]}"
        cfg = GenerateConfig(
            users=600, days=1, seed=3, switcher_share=0.5, passive_history_signal=signal
        )
        generate(roots[signal], cfg, None)
    assert _engagement_digest(roots[1.0]) == OLD_ENGAGEMENT[key]
    users = read_truth_users(roots[0.1]).to_pandas().set_index("user_id")
    pages = _read(roots[0.1], "page_views").to_pandas().dropna(subset=["user_id"])
    pages = pages[pages["user_id"].isin(users.index[users["kind"] == 2])]
    u = users.loc[pages["user_id"].to_numpy()]
    hour = (pages["ts"].to_numpy() // _HOUR_MS) % 24
    inside = ((hour - u["switch_start_hour"].to_numpy()) % 24) < _SWITCH_HOURS
    cluster = (pages["page_id"].to_numpy() - _PAGE_ID0) % 16
    same = cluster == u["cluster"].to_numpy()
    chance = 1 / 16
    assert same[inside].mean() == pytest.approx(0.7 + 0.3 * chance, abs=0.03)
    assert same[~inside].mean() == pytest.approx(0.07 + 0.93 * chance, abs=0.03)


def test_near_sigma_scale_widens_active_users_near_dwell_only():
    """``near_sigma_scale`` plants unequal variances (docs/segments.md): the
    active users' near log-dwell spreads wider than their far one; the
    default draws the world of the generator before the knob, bit for bit."""
    from dynamix_ray.config import SegmentConfig
    from dynamix_ray.segments.pipeline import read_segments, run_segment

    roots = [f"memory://synth-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for root, scale in zip(roots, (1.0, 2.5, None), strict=True):
        kw = {} if scale is None else {"near_sigma_scale": scale}
        generate(root, GenerateConfig(users=400, days=3, seed=4, **kw), None)
    key = "users=400, days=3, seed=4"
    assert _digest(roots[0]) == _digest(roots[2]) == OLD_WORLDS[key]
    ratios = []
    for root in roots[:2]:
        run_segment(root, f"{root}/out", SegmentConfig(epsilon=0.3), progress=False)
        seg = read_segments(f"{root}/out").to_pandas()
        kind = read_truth_users(root).to_pandas().set_index("user_id")["kind"]
        seg = seg[(seg["n_near"] >= 5) & (seg["n_far"] >= 5)]
        active = seg[seg["user_id"].map(kind).to_numpy() == 1]
        ratios.append(float((active["var_near"] / active["var_far"]).median()))
    assert ratios[0] < 1.5 < 4.0 < ratios[1]


def test_switch_spread_makes_the_active_share_follow_the_clock():
    """``switch_spread_h`` (docs/segments.md): with the switchers' blocks
    starting within 2 hours, a planted-active share swings over the UTC day;
    the default (24) draws the world of the generator before the knob."""
    from dynamix_ray.synth import planted_active

    roots = [f"memory://synth-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    cfgs = [
        GenerateConfig(users=600, days=1, seed=3, switcher_share=0.5),
        GenerateConfig(
            users=600, days=1, seed=3, switcher_share=0.5, switch_spread_h=2
        ),
        GenerateConfig(
            users=600, days=1, seed=3, switcher_share=0.5, switch_spread_h=24
        ),
    ]
    for root, cfg in zip(roots, cfgs, strict=True):
        generate(root, cfg, None)
    key = "users=600, days=1, seed=3, switcher_share=0.5"
    assert _digest(roots[0]) == _digest(roots[2]) == OLD_WORLDS[key]
    swings = []
    for root in roots[:2]:
        users = read_truth_users(root)
        kind = users.column("kind").to_numpy()
        start = users.column("switch_start_hour").to_numpy()
        hours = np.arange(24) * 3_600_000
        share = [
            planted_active(kind, start, np.full(len(kind), h), 3_600_000).mean()
            for h in hours
        ]
        swings.append(max(share) - min(share))
    assert swings[0] < 0.15 < 0.4 < swings[1]
