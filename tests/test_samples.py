"""Training samples: the vectorised builder equals the per-sample loop; no
history event at or after ``t - buffer``; segments only from ended windows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamix_ray.config import SegmentConfig
from dynamix_ray.samples import SampleConfig, build_samples, reference_samples
from dynamix_ray.schema import CANDIDATE_ATTRIBUTES

T0 = 1_767_571_200_000
H = 3_600_000
EDGES = [-60_000, -60_001, -59_999, 0, 300_000, 300_001, -1]


@st.composite
def user_events(draw):
    users = draw(st.lists(st.integers(1, 10**12), min_size=1, max_size=3, unique=True))
    n = draw(st.integers(0, 25))
    imp_user = np.array([draw(st.sampled_from(users)) for _ in range(n)], np.int64)
    imp_ts = np.array([T0 + draw(st.integers(0, 30 * H)) for _ in range(n)], np.int64)
    ads = np.array([draw(st.sampled_from([11, 12, 13])) for _ in range(n)], np.int64)
    conv_u, conv_t, conv_a = [], [], []
    for i in range(n):
        if draw(st.booleans()):
            conv_u.append(imp_user[i])
            conv_t.append(imp_ts[i] + draw(st.sampled_from(EDGES)))
            conv_a.append(draw(st.sampled_from([ads[i], ads[i], 99])))
    hist_u = [draw(st.sampled_from(users)) for _ in range(draw(st.integers(0, 30)))]
    # history events exactly at t - buffer, just before, and anywhere
    hist_t = []
    for _ in hist_u:
        if n and draw(st.booleans()):
            hist_t.append(
                int(imp_ts[draw(st.integers(0, n - 1))])
                + draw(st.sampled_from([-60_000, -60_001, 0, 5]))
            )
        else:
            hist_t.append(T0 + draw(st.integers(-5 * H, 30 * H)))
    seg_u, seg_end, seg_v = [], [], []
    for u in users:
        for w in range(draw(st.integers(0, 6))):
            seg_u.append(u)
            seg_end.append(T0 + (w + 1) * 6 * H)
            seg_v.append(draw(st.integers(0, 1)))
    return (
        {"user_id": imp_user, "ts_ms": imp_ts, "ad_id": ads},
        {
            "user_id": np.array(conv_u, np.int64),
            "ts_ms": np.array(conv_t, np.int64),
            "ad_id": np.array(conv_a, np.int64),
        },
        {
            "page_views": {
                "user_id": np.array(hist_u, np.int64),
                "ts_ms": np.array(hist_t, np.int64),
                "page_id": np.arange(len(hist_u), dtype=np.int64) + 1,
            },
            # same times, another source with dwell (ties of ts within a user)
            "organic_impressions": {
                "user_id": np.array(hist_u, np.int64),
                "ts_ms": np.array(hist_t, np.int64) // 2 * 2,
                "content_id": np.arange(len(hist_u), dtype=np.int64) + 7,
                "dwell_ms": np.array(
                    [draw(st.floats(0, 1e6)) for _ in hist_u], np.float64
                ),
            },
        },
        {
            "user_id": np.array(seg_u, np.int64),
            "window_end_ms": np.array(seg_end, np.int64),
            "segment": np.array(seg_v, np.int8),
        },
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ev=user_events(),
    max_len=st.integers(1, 6),
    page_len=st.one_of(st.none(), st.integers(1, 6)),
)
def test_builder_equals_reference(ev, max_len, page_len):
    """Every column: label, segment, candidate, and per source the history's
    timestamps and attribute values, right-aligned with zeroed padding, at one
    length for all sources or a shorter one for page views."""
    imps, convs, hist, segs = ev
    lens = () if page_len is None else (("page_views", min(page_len, max_len)),)
    cfg = SampleConfig(max_seq_len=max_len, seq_lens=lens)
    fast = build_samples(imps, convs, hist, segs, cfg)
    slow = reference_samples(imps, convs, hist, segs, cfg)
    assert len(fast["t_ms"]) == len(slow)
    checked = {"user_id", "t_ms", "label", "segment"}
    checked |= {f"cand.{a}" for a in CANDIDATE_ATTRIBUTES if a in imps}
    for src, cols in hist.items():
        checked |= {f"{src}.mask", f"{src}.ts_ms"}
        checked |= {
            f"{src}.dwell" if a == "dwell_ms" else f"{src}.{a}"
            for a in cols
            if a not in ("user_id", "ts_ms")
        }
    assert set(fast) == checked  # no column goes unchecked
    for i, row in enumerate(slow):
        assert fast["user_id"][i] == row["user_id"] and fast["t_ms"][i] == row["t_ms"]
        assert fast["label"][i] == row["label"]
        assert fast["segment"][i] == row["segment"]
        for a, v in row["cand"].items():
            assert fast[f"cand.{a}"][i] == v
        for src, want in row["hist"].items():
            mask = fast[f"{src}.mask"][i]
            n, L = int(mask.sum()), cfg.seq_len(src)
            assert len(mask) == L
            # right-aligned: padding first, events newest last
            assert not mask[: L - n].any() and mask[L - n :].all()
            assert fast[f"{src}.ts_ms"][i][mask].tolist() == want["ts_ms"]
            assert (fast[f"{src}.ts_ms"][i][~mask] == 0).all()
            for a, vals in want.items():
                if a == "ts_ms":
                    continue
                col = fast[f"{src}.dwell" if a == "dwell_ms" else f"{src}.{a}"][i]
                assert (col[~mask] == 0).all()
                if a == "dwell_ms":
                    np.testing.assert_allclose(
                        col[mask], np.log1p(vals), rtol=1e-6, atol=1e-6
                    )
                else:
                    assert col[mask].tolist() == vals


@settings(max_examples=150, deadline=None)
@given(ev=user_events())
def test_no_history_event_at_or_after_t_minus_buffer(ev):
    imps, convs, hist, segs = ev
    cfg = SampleConfig(max_seq_len=8)
    s = build_samples(imps, convs, hist, segs, cfg)
    bound = s["t_ms"][:, None] - cfg.buffer_s * 1000
    ts, mask = s["page_views.ts_ms"], s["page_views.mask"]
    assert (ts[mask] < np.broadcast_to(bound, ts.shape)[mask]).all()
    # and padding carries no values
    assert (ts[~mask] == 0).all() and (s["page_views.page_id"][~mask] == 0).all()


@settings(max_examples=150, deadline=None)
@given(ev=user_events())
def test_segment_never_comes_from_a_window_that_had_not_ended(ev):
    imps, convs, hist, segs = ev
    s = build_samples(imps, convs, hist, segs, SampleConfig())
    for u, t, seg in zip(s["user_id"], s["t_ms"], s["segment"], strict=True):
        ended = [
            (e, v)
            for su, e, v in zip(
                segs["user_id"], segs["window_end_ms"], segs["segment"], strict=True
            )
            if su == u and e <= t
        ]
        assert seg == (max(ended)[1] if ended else 0)


def test_window_ending_exactly_at_t_counts_and_one_ms_later_does_not():
    imps = {
        "user_id": np.array([5, 5], np.int64),
        "ts_ms": np.array([T0 + 6 * H, T0 + 6 * H - 1], np.int64),
        "ad_id": np.array([1, 1], np.int64),
    }
    empty = {
        "user_id": np.zeros(0, np.int64),
        "ts_ms": np.zeros(0, np.int64),
        "ad_id": np.zeros(0, np.int64),
    }
    segs = {
        "user_id": np.array([5], np.int64),
        "window_end_ms": np.array([T0 + 6 * H], np.int64),
        "segment": np.array([1], np.int8),
    }
    s = build_samples(imps, empty, {}, segs, SampleConfig())
    assert s["t_ms"].tolist() == [T0 + 6 * H - 1, T0 + 6 * H]
    assert s["segment"].tolist() == [0, 1]


def test_sample_table_on_ray_data_has_one_sample_per_valid_impression(
    ray_session, tmp_path
):
    """The Ray shell over a generated dataset (plain and bucketed layouts): one
    compact sample per valid ad impression, split by time, unique ids, the
    same rows either way, each bucket's segments joined."""
    import pyarrow.parquet as pq

    from dynamix_ray.config import GenerateConfig
    from dynamix_ray.samples import SAMPLE_SCHEMA, run_samples
    from dynamix_ray.segments.pipeline import run_segment
    from dynamix_ray.synth import generate

    rows = {}
    for layout, bucketed in (("plain", 0), ("bucketed", 3)):
        events, out = str(tmp_path / layout), str(tmp_path / f"{layout}-seg")
        generate(
            events,
            GenerateConfig(users=60, days=2, seed=4, bucketed=bucketed),
            progress=None,
        )
        cfg = SegmentConfig(num_buckets=3) if not bucketed else SegmentConfig()
        meta = run_segment(events, out, cfg, progress=False).meta
        table = run_samples(events, out, str(tmp_path / f"{layout}-s"), progress=False)
        got = {}
        for split in ("train", "eval"):
            parts = [pq.read_table(f) for f in table.files(split)]
            t = pa.concat_tables(parts)
            assert t.schema.equals(SAMPLE_SCHEMA)
            t_ms = t.column("t_ms").to_numpy()
            if split == "train":
                assert (t_ms < table.boundary_ms).all()
            else:
                assert (t_ms >= table.boundary_ms).all()
            got[split] = t
        both = pa.concat_tables(got.values())
        assert both.num_rows == meta["counts"]["impressions"]
        ids = both.column("sample_id").to_numpy()
        assert len(np.unique(ids)) == len(ids)
        np.testing.assert_array_equal(
            ids >> 40, both.column("bucket").to_numpy()
        )  # id = bucket << 40 | row
        t = both.sort_by([("user_id", "ascending"), ("t_ms", "ascending")])
        rows[layout] = {
            k: t.column(k).to_numpy() for k in ("user_id", "t_ms", "label", "segment")
        }
        assert table.boundary_ms % 86_400_000 == 0
        assert 0 < table.rows("eval") < both.num_rows
        # a re-run with the same inputs reuses the table
        again = run_samples(events, out, str(tmp_path / f"{layout}-s"), progress=False)
        assert again.meta["key"] == table.meta["key"]
        assert again.meta["wall_s"] == table.meta["wall_s"]
    for k in rows["plain"]:
        np.testing.assert_array_equal(rows["plain"][k], rows["bucketed"][k])


def test_segment_at_carries_any_window_column_with_a_fill():
    """The epsilon sweep asks segment_at for ``corr`` (float, NaN fill); ids
    and times near the int64 limits need no composite key."""
    from dynamix_ray.samples import segment_at

    big = np.iinfo(np.int64).max - 5
    user = np.array([7, 7, big, 9])
    t = np.array([5, 15, 15, 15])
    corr = segment_at(
        user,
        t,
        np.array([7, 7, big]),
        np.array([10, 20, 10]),
        np.array([0.5, -0.7, 0.2]),
        fill=np.nan,
    )
    np.testing.assert_array_equal(corr[1:3], [0.5, 0.2])
    assert np.isnan(corr[0]) and np.isnan(corr[3])
    far = np.iinfo(np.int64).max - 1
    got = segment_at(
        np.array([1, 1]),
        np.array([np.iinfo(np.int64).min + 2, far]),
        np.array([1, 1]),
        np.array([np.iinfo(np.int64).min + 1, far]),
        np.array([3, 4]),
    )
    assert got.tolist() == [3, 4]


def test_per_source_lengths_are_checked_and_survive_json():
    """``seq_lens`` is one rule with a clear error, and reads back from a
    checkpoint's or a JSON file's lists."""
    import json
    from dataclasses import asdict

    cfg = SampleConfig(max_seq_len=8, seq_lens={"page_views": 2, "conversions": 4})
    assert cfg.lengths() == {
        "ad_impressions": 8,
        "organic_impressions": 8,
        "page_views": 2,
        "conversions": 4,
    }
    back = SampleConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and back.seq_lens == (("conversions", 4), ("page_views", 2))
    with pytest.raises(ValueError, match="unknown sources"):
        SampleConfig(seq_lens={"clicks": 2})
    with pytest.raises(ValueError, match="max_seq_len=8"):
        SampleConfig(max_seq_len=8, seq_lens={"page_views": 9})
    with pytest.raises(ValueError, match="buffer_s and horizon_s"):
        SampleConfig(buffer_s=-5)
    with pytest.raises(ValueError, match="eval_days"):
        SampleConfig(eval_days=0)
    from dynamix_ray.samples import seq_len_of

    assert seq_len_of(np.int64(5), "page_views", 8) == 5  # numpy ints too
    assert seq_len_of({"page_views": 2}, "organic_impressions", 8) == 8


def test_prod_preset_makes_history_encoding_dominate():
    """``--preset prod`` (presets.py): the model and history lengths of
    docs/experiments.md; encoding the histories is most of a 100-candidate
    request's FLOPs, where the small model's is not."""
    from dynamix_ray.experiments import request_flops
    from dynamix_ray.model import FeatureSet, flops_per_sample
    from dynamix_ray.presets import model_preset

    model, samples = model_preset("prod", SampleConfig(max_seq_len=32))
    assert (model.n_layers, model.d_model, model.max_seq_len) == (2, 64, 256)
    assert samples.lengths()["page_views"] == 64
    capped = model_preset("prod", SampleConfig(), max_seq_len=100)[1]
    assert capped.lengths() == {
        "ad_impressions": 100,
        "organic_impressions": 100,
        "page_views": 64,
        "conversions": 64,
    }
    fs = FeatureSet()
    small = model_preset("small", SampleConfig(max_seq_len=32))[0]
    share = {}
    for name, cfg in (("prod", model), ("small", small)):
        seq = samples.lengths() if name == "prod" else None
        user = flops_per_sample(cfg, fs, seq, part="user_tower")
        share[name] = user / request_flops(cfg, fs, 100, seq)
    assert share["prod"] > 0.5 > share["small"]
