"""The one history rule and its gather: vectorised kernels beside plain loops,
Hypothesis on ties, bounds and ids/timestamps at the int64 limits; the
training loader's parts equal the full sample builder, per policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.gather import (
    SourceEvents,
    gather,
    history_window,
    reference_window,
    segmented_searchsorted,
)
from dynamix_ray.histories import cut_histories

I64 = np.iinfo(np.int64)


@st.composite
def sorted_slices(draw):
    n = draw(st.integers(0, 6))
    values, lo, hi = [], [], []
    for _ in range(n):
        k = draw(st.integers(0, 8))
        vals = sorted(
            draw(st.lists(st.integers(I64.min, I64.max), min_size=k, max_size=k))
        )
        lo.append(len(values))
        values.extend(vals)
        hi.append(len(values))
    q = [draw(st.integers(I64.min, I64.max)) for _ in range(n)]
    return (
        np.array(values, np.int64),
        np.array(lo, np.int64),
        np.array(hi, np.int64),
        np.array(q, np.int64),
    )


@settings(max_examples=300, deadline=None)
@given(data=sorted_slices(), side=st.sampled_from(["left", "right"]))
def test_segmented_searchsorted_equals_numpy_per_slice(data, side):
    values, lo, hi, q = data
    got = segmented_searchsorted(values, lo, hi, q, side)
    for i in range(len(q)):
        want = lo[i] + np.searchsorted(values[lo[i] : hi[i]], q[i], side)
        assert got[i] == want


@st.composite
def events(draw):
    users = draw(
        st.lists(st.sampled_from([I64.min, -3, 0, 5, I64.max]), min_size=0, max_size=25)
    )
    ts = [
        draw(st.sampled_from([I64.min, -1, 0, 10, 11, I64.max - 1, I64.max]))
        for _ in users
    ]
    uid = np.array(users, np.int64)
    t = np.array(ts, np.int64)
    order = np.lexsort((t, uid))
    cols = {"x": np.arange(len(uid), dtype=np.int64)[order] + 1}
    return SourceEvents.from_arrays(uid[order], t[order], cols)


@settings(max_examples=300, deadline=None)
@given(
    ev=events(),
    queries=st.lists(
        st.tuples(
            st.sampled_from([I64.min, -3, 0, 5, 6, I64.max]),
            st.sampled_from([I64.min, 0, 10, 11, 12, I64.max]),
        ),
        max_size=8,
    ),
    max_len=st.integers(1, 5),
)
def test_history_window_equals_the_plain_loop(ev, queries, max_len):
    """Ids and timestamps at the int64 limits: no composite key overflows."""
    users = np.array([q[0] for q in queries], np.int64)
    bound = np.array([q[1] for q in queries], np.int64)
    start, count = history_window(ev, users, bound, max_len)
    for i, (u, b) in enumerate(queries):
        want = reference_window(ev, u, b, max_len)
        assert list(range(start[i], start[i] + count[i])) == want
    g = gather(ev, start, count, ["x"])
    w = g["mask"].shape[1]
    for i in range(len(queries)):
        n = int(count[i])
        assert g["mask"][i].tolist() == [False] * (w - n) + [True] * n
        assert (
            g["x"][i][w - n :].tolist()
            == ev.columns["x"][start[i] : start[i] + n].tolist()
        )
        assert (g["x"][i][: w - n] == 0).all() and (g["ts_ms"][i][: w - n] == 0).all()


def test_unsorted_events_are_an_error_that_names_the_row():
    with pytest.raises(ValueError, match="not sorted by"):
        SourceEvents.from_arrays(np.array([1, 1]), np.array([5, 4]), {})


def test_gather_width_is_the_longest_window_and_dwell_is_log1p():
    ev = SourceEvents.from_arrays(
        np.array([1, 1, 1, 2]),
        np.array([1, 2, 3, 1]),
        {"dwell_ms": np.array([0.0, 1.0, np.e - 1, 5.0]), "a": np.array([4, 5, 6, 7])},
    )
    start, count = history_window(ev, np.array([1, 2, 9]), np.array([3, 9, 9]), 8)
    g = gather(ev, start, count, ["dwell_ms", "a"])
    assert g["mask"].shape == (3, 2)  # user 1 has 2 events before 3: W = 2
    np.testing.assert_allclose(g["dwell"][0], [0.0, np.log(2.0)])
    assert g["a"].tolist() == [[4, 5], [0, 7], [0, 0]]
    assert g["dwell"].dtype == np.float32


@settings(max_examples=200, deadline=None)
@given(
    ev=events(), as_of=st.sampled_from([I64.min, 0, 11, I64.max]), n=st.integers(1, 4)
)
def test_cut_histories_keep_each_users_last_events_before_as_of(ev, as_of, n):
    cut = cut_histories(ev, as_of, n)
    for u in np.unique(ev.user_id):
        want = reference_window(ev, int(u), as_of, n)
        lo, hi = cut.user_slices(np.array([u]))
        got = cut.columns["x"][lo[0] : hi[0]].tolist()
        assert got == ev.columns["x"][want].tolist()
    assert (np.diff(cut.offsets) > 0).all()  # users without events left out


# ------------------------------------------------------ the training loader


@pytest.fixture(scope="module")
def store_and_samples(ray_session, tmp_path_factory):
    from dynamix_ray.config import GenerateConfig, SegmentConfig
    from dynamix_ray.samples import run_samples
    from dynamix_ray.segments.pipeline import run_segment
    from dynamix_ray.synth import generate

    root = tmp_path_factory.mktemp("loader")
    events = str(root / "events")
    generate(events, GenerateConfig(users=80, days=3, seed=11), progress=None)
    run_segment(events, str(root / "seg"), SegmentConfig(num_buckets=3), progress=False)
    table = run_samples(events, str(root / "seg"), str(root / "train"), progress=False)
    return events, table


def _all_rows(table):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(f) for f in table.files("train")])
    return {c: t.column(c).to_numpy() for c in t.column_names}


@pytest.mark.parametrize(
    ("policy", "lens"),
    [
        ("baseline", ()),
        ("remove-active", ()),
        ("boost-all", ()),
        ("boost-selective", ()),
        ("boost-selective-only", ()),
        # per-source lengths (SampleConfig.seq_lens): one rule for both paths
        ("boost-all", (("organic_impressions", 4), ("page_views", 2))),
    ],
)
def test_loader_parts_equal_the_full_builder_and_hold_only_the_policys_columns(
    store_and_samples, policy, lens
):
    from dynamix_ray.alure.evaluate import read_events_frame
    from dynamix_ray.events import open_store
    from dynamix_ray.features import policy_features
    from dynamix_ray.loader import LoaderSpec, SegmentBatcher, store_features
    from dynamix_ray.samples import HISTORY_SOURCES, SampleConfig, build_samples
    from dynamix_ray.segments.pipeline import read_segments

    events, table = store_and_samples
    store = open_store(table.store_url)
    removed = ("campaign_id", "media_type", "surface", "position")
    spec = LoaderSpec.of(
        store, policy=policy, removed=removed, max_seq_len=6, seq_lens=lens
    )
    batcher = SegmentBatcher(spec)
    rows = _all_rows(table)
    perm = np.random.default_rng(0).permutation(len(rows["label"]))[:700]
    parts = batcher({k: v[perm] for k, v in rows.items()})
    assert set(parts) == set(np.unique(rows["segment"][perm]).tolist())

    ev = {s: read_events_frame(store.url, s).to_dict("series") for s in HISTORY_SOURCES}
    ev = {s: {k: np.asarray(v) for k, v in d.items()} for s, d in ev.items()}
    from dynamix_ray.samples import segment_rows

    full = build_samples(
        ev["ad_impressions"],
        ev["conversions"],
        ev,
        segment_rows(read_segments(table.meta["segments"])),
        cfg := SampleConfig(max_seq_len=6, seq_lens=lens),
    )
    index = {
        (u, t, a): i
        for i, (u, t, a) in enumerate(
            zip(full["user_id"], full["t_ms"], full["cand.ad_id"], strict=True)
        )
    }
    available = store_features(store)
    for seg, part in parts.items():
        fs = policy_features(policy, seg, removed, available)
        want_cols = {
            f"{s}.{'dwell' if a == 'dwell_ms' else a}"
            for s in fs.enabled_sources
            for a in fs.attrs(s)
        } | {f"{s}.{k}" for s in fs.enabled_sources for k in ("mask", "ts_ms")}
        got_cols = {k for k in part if part[k].ndim == 2}
        assert got_cols == want_cols  # only what the policy uses is gathered
        for j in range(len(part["label"])):
            i = index[(part["user_id"][j], part["t_ms"][j], part["cand.ad_id"][j])]
            assert full["label"][i] == part["label"][j] and full["segment"][i] == seg
            for k in got_cols:
                w, L = part[k].shape[1], cfg.seq_len(k.split(".")[0])
                assert full[k].shape[1] == L and w <= L
                assert (full[k][i][: L - w] == 0).all()  # nothing cut off
                np.testing.assert_array_equal(full[k][i][L - w :], part[k][j])


def test_removing_features_moves_fewer_bytes(store_and_samples):
    from dynamix_ray.events import open_store
    from dynamix_ray.loader import LoaderSpec, SegmentBatcher

    _, table = store_and_samples
    store = open_store(table.store_url)
    rows = _all_rows(table)
    batch = {k: v[:512] for k, v in rows.items()}
    removed = ("campaign_id", "media_type", "surface", "position")
    nbytes = {}
    for policy in ("baseline", "remove-active", "remove-passive", "boost-all"):
        b = SegmentBatcher(LoaderSpec.of(store, policy=policy, removed=removed))
        b(batch)
        nbytes[policy] = b.last_nbytes
    assert nbytes["remove-active"] < nbytes["baseline"]
    assert nbytes["remove-passive"] < nbytes["baseline"]
    assert nbytes["boost-all"] > nbytes["baseline"]


def test_event_cache_stays_within_its_budget(store_and_samples):
    from dynamix_ray.events import open_store
    from dynamix_ray.loader import EventCache

    _, table = store_and_samples
    store = open_store(table.store_url)
    one = EventCache(store, {"ad_impressions": ("ad_id",)}).get(0)
    size = sum(e.nbytes for e in one.values())
    cache = EventCache(store, {"ad_impressions": ("ad_id",)}, max_bytes=int(size * 1.5))
    for b in (0, 1, 2, 0, 1, 2):
        cache.get(b)
        assert len(cache._cache) == 1 or cache.nbytes <= cache.max_bytes
    assert cache.loads == 6  # a budget of one bucket: every switch reloads
