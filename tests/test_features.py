"""Feature policies and the sample -> model batch adapter (no Ray, no files).

A tiny ``build_samples`` output of three users with all four sources is built
here; the model runs on tiny dimensions.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.features import (
    BASE_ATTRIBUTES,
    BOOSTABLE,
    POLICIES,
    available_features,
    flops_by_segment,
    lowest_importance,
    permutation_importance,
    policy_features,
    split_by_segment,
    to_model_batch,
)
from dynamix_ray.model import (
    CANDIDATE_ATTRIBUTES,
    DWELL,
    SOURCE_ATTRIBUTES,
    DynamixCTR,
    FeatureSet,
    ModelConfig,
)
from dynamix_ray.samples import SampleConfig, build_samples

T0 = 1_767_571_200_000
H = 3_600_000
L = 6
REMOVED = ("campaign_id", "media_type", "surface", "position")
TINY = ModelConfig(
    emb_dim=4,
    d_model=8,
    n_heads=2,
    mlp_ratio=2,
    max_seq_len=L,
    user_dim=8,
    head_hidden=16,
    default_num_buckets=64,
    num_buckets={"media_type": 8, "surface": 8, "position": 16, "kind": 8},
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _events(rng: np.random.Generator, users: list[int], n: int, attrs) -> dict:
    user = rng.choice(users, n).astype(np.int64)
    out = {"user_id": user, "ts_ms": T0 + rng.integers(0, 40 * H, n)}
    for a in attrs:
        if a == "dwell_ms":
            out[a] = rng.integers(100, 60_000, n).astype(np.int64)
        elif a == "kind":
            out[a] = rng.choice(np.array(["purchase", "lead"]), n)
        else:
            out[a] = rng.integers(1, 50, n).astype(np.int64)
    return out


@functools.cache
def tiny_samples() -> dict[str, np.ndarray]:
    """``build_samples`` of 3 users, all four sources, both segments."""
    rng = np.random.default_rng(3)
    users = [101, 202, 303]
    imps = _events(rng, users, 40, SOURCE_ATTRIBUTES["ad_impressions"])
    convs = _events(rng, users, 12, SOURCE_ATTRIBUTES["conversions"])
    convs["ad_id"][:6] = imps["ad_id"][:6]  # a few positives
    convs["user_id"][:6] = imps["user_id"][:6]
    convs["ts_ms"][:6] = imps["ts_ms"][:6] + 10_000
    history = {
        "ad_impressions": imps,
        "conversions": convs,
        "organic_impressions": _events(
            rng, users, 60, SOURCE_ATTRIBUTES["organic_impressions"]
        ),
        "page_views": _events(rng, users, 50, SOURCE_ATTRIBUTES["page_views"]),
    }
    # 101 active from hour 6, 202 always passive, 303 flips at hour 20
    segments = {
        "user_id": np.array([101, 202, 303, 303], np.int64),
        "window_end_ms": T0 + np.array([6, 6, 6, 20], np.int64) * H,
        "segment": np.array([1, 0, 1, 0], np.int8),
    }
    return build_samples(imps, convs, history, segments, SampleConfig(max_seq_len=L))


def _model() -> DynamixCTR:
    torch.manual_seed(0)
    return DynamixCTR(TINY).eval()


# ------------------------------------------------------------------- adapter


def test_available_features_is_what_the_samples_hold():
    fs = available_features(tiny_samples())
    assert fs.ad_impressions == SOURCE_ATTRIBUTES["ad_impressions"]
    assert len(fs.ad_impressions) == 11 and fs.ad_impressions[0] == DWELL
    assert fs.conversions == ("ad_id",)  # the samples carry no "kind"
    assert fs.organic_impressions == SOURCE_ATTRIBUTES["organic_impressions"]
    assert fs.page_views == SOURCE_ATTRIBUTES["page_views"]
    assert fs.candidate == CANDIDATE_ATTRIBUTES


def test_adapter_round_trips_the_columns_into_the_batch_contract():
    cols = tiny_samples()
    n = len(cols["t_ms"])
    batch = to_model_batch(cols)
    assert batch.t_ms.dtype == torch.int64 and batch.t_ms.shape == (n,)
    assert batch.label is not None and batch.label.dtype == torch.float32
    np.testing.assert_array_equal(batch.label.numpy(), cols["label"])
    assert batch.alure is None and len(batch) == n
    assert sorted(batch.cand) == sorted(CANDIDATE_ATTRIBUTES)
    for a, v in batch.cand.items():
        assert v.dtype == torch.int64 and v.shape == (n,)
        np.testing.assert_array_equal(v.numpy(), cols[f"cand.{a}"])
    assert sorted(batch.hist) == sorted(SOURCE_ATTRIBUTES)
    for src, h in batch.hist.items():
        assert h.mask.dtype == torch.bool and h.mask.shape == (n, L)
        np.testing.assert_array_equal(h.mask.numpy(), cols[f"{src}.mask"])
        np.testing.assert_array_equal(h.ts_ms.numpy(), cols[f"{src}.ts_ms"])
        for a, v in h.attrs.items():
            assert v.dtype == torch.int64 and v.shape == (n, L)
            np.testing.assert_array_equal(v.numpy(), cols[f"{src}.{a}"])
        assert (h.dwell is not None) == (f"{src}.dwell" in cols)
        if h.dwell is not None:
            assert h.dwell.dtype == torch.float32
    assert "kind" not in batch.hist["conversions"].attrs
    # rows() and to() keep every field
    two = batch.rows(torch.tensor([1, 0])).to("cpu")
    assert len(two) == 2 and torch.equal(two.t_ms, batch.t_ms[[1, 0]])
    assert torch.equal(
        two.hist["conversions"].mask, batch.hist["conversions"].mask[[1, 0]]
    )


def test_model_accepts_the_adapted_batch():
    cols = tiny_samples()
    with torch.no_grad():
        logits = _model()(to_model_batch(cols), available_features(cols))
    assert logits.shape == (len(cols["t_ms"]),)
    assert torch.isfinite(logits).all()


def test_adapter_with_missing_columns_and_sources():
    cols = dict(tiny_samples())
    for k in [k for k in cols if k.startswith("page_views.")]:
        del cols[k]
    del cols["organic_impressions.author_id"], cols["organic_impressions.dwell"]
    del cols["cand.surface"]
    fs = available_features(cols)
    assert fs.page_views == ()
    assert fs.organic_impressions == ("content_id", "media_type", "position")
    assert "surface" not in fs.candidate
    batch = to_model_batch(cols)
    assert "page_views" not in batch.hist
    assert batch.hist["organic_impressions"].dwell is None
    for policy in POLICIES:
        for seg in (0, 1):
            feats = policy_features(policy, seg, REMOVED, fs)
            with torch.no_grad():
                assert torch.isfinite(_model()(batch, feats)).all()


# ----------------------------------------------------------------- segments


def test_split_by_segment_partitions_rows_exactly():
    cols = tiny_samples()
    parts = split_by_segment(cols)
    assert sorted(parts) == [0, 1]  # the fixture has both segments
    seg = cols["segment"]
    for s, part in parts.items():
        assert (part["segment"] == s).all()
        assert set(part) == set(cols)
        for k, v in part.items():
            np.testing.assert_array_equal(v, cols[k][seg == s])
    assert sum(len(p["t_ms"]) for p in parts.values()) == len(seg)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=30))
def test_split_by_segment_keeps_every_row_once(segs):
    seg = np.array(segs, np.int8)
    cols = {"segment": seg, "row": np.arange(len(seg)), "x": np.ones((len(seg), 2))}
    parts = split_by_segment(cols)
    rows = np.concatenate([p["row"] for p in parts.values()] + [np.zeros(0, int)])
    assert sorted(rows.tolist()) == list(range(len(seg)))
    assert all(len(p["row"]) for p in parts.values())


def test_split_by_segment_rejects_unknown_segments():
    with pytest.raises(ValueError, match="segment"):
        split_by_segment({"segment": np.array([0, 2])})


# ------------------------------------------------------------------ policies


def test_every_policy_runs_the_model_on_each_segment():
    cols = tiny_samples()
    available = available_features(cols)
    model = _model()
    for policy in POLICIES:
        for seg, part in split_by_segment(cols).items():
            feats = policy_features(policy, seg, REMOVED, available)
            for src in SOURCE_ATTRIBUTES:
                assert set(feats.attrs(src)) <= set(available.attrs(src))
            with torch.no_grad():
                logits = model(to_model_batch(part), feats)
            assert logits.shape == (len(part["t_ms"]),)
            assert torch.isfinite(logits).all()


def test_policy_feature_sets():
    full = FeatureSet()
    base = policy_features("baseline", 0, REMOVED, full)
    assert base == policy_features("baseline", 1, REMOVED, full)
    assert base.ad_impressions == SOURCE_ATTRIBUTES["ad_impressions"]
    assert base.candidate == CANDIDATE_ATTRIBUTES
    for src in BOOSTABLE:
        assert base.attrs(src) == BASE_ATTRIBUTES[src]
    boosted = policy_features("boost-all", 0, REMOVED, full)
    assert boosted == policy_features("boost-all", 1, REMOVED, full) == full
    # remove-<segment> only touches that segment's ad-impression history
    for policy, target in (("remove-active", 1), ("remove-passive", 0)):
        hit = policy_features(policy, target, REMOVED, full)
        assert hit.ad_impressions == tuple(
            a for a in SOURCE_ATTRIBUTES["ad_impressions"] if a not in REMOVED
        )
        assert len(hit.ad_impressions) == 7
        assert hit.candidate == CANDIDATE_ATTRIBUTES
        assert policy_features(policy, 1 - target, REMOVED, full) == base
    active = policy_features("boost-selective", 1, REMOVED, full)
    passive = policy_features("boost-selective", 0, REMOVED, full)
    assert active == full
    assert passive.organic_impressions == full.organic_impressions
    assert passive.page_views == BASE_ATTRIBUTES["page_views"]
    assert passive.conversions == BASE_ATTRIBUTES["conversions"]
    # the selection reading: passive users see the boosted organic history only
    only = policy_features("boost-selective-only", 0, REMOVED, full)
    assert only.enabled_sources == ("organic_impressions",)
    assert only.organic_impressions == full.organic_impressions
    assert only.candidate == CANDIDATE_ATTRIBUTES
    assert policy_features("boost-selective-only", 1, REMOVED, full) == full


def test_policy_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="boost-selective"):
        policy_features("boost-some", 0, REMOVED, FeatureSet())
    with pytest.raises(ValueError, match="segment"):
        policy_features("baseline", 2, REMOVED, FeatureSet())
    with pytest.raises(ValueError, match="ad-impression"):
        policy_features("remove-active", 1, ("ad_impressions.surface",), FeatureSet())


def test_flops_of_the_policies():
    cfg = ModelConfig()
    available = available_features(tiny_samples())
    f = {p: flops_by_segment(cfg, p, REMOVED, available, 64) for p in POLICIES}
    base = f["baseline"]
    assert base[0] == base[1] > 0
    assert f["remove-active"][1] < base[1] and f["remove-active"][0] == base[0]
    assert f["remove-passive"][0] < base[0] and f["remove-passive"][1] == base[1]
    assert f["boost-all"][0] > base[0] and f["boost-all"][1] > base[1]
    assert base[0] < f["boost-selective"][0] < f["boost-all"][0]
    assert f["boost-selective"][1] == f["boost-all"][1]
    # selecting organic alone for passive users costs less than the baseline
    assert f["boost-selective-only"][0] < base[0]
    assert f["boost-selective-only"][1] == f["boost-all"][1]
    # a mapping of lengths and the model's own attributes (available=None) work
    seq = {s: 64 for s in SOURCE_ATTRIBUTES}
    assert flops_by_segment(cfg, "baseline", REMOVED, available, seq) == base
    with_kind = flops_by_segment(cfg, "boost-all", REMOVED, None, seq)
    assert with_kind[0] > f["boost-all"][0]  # conversions.kind has weights


# ------------------------------------------------------- permutation importance


def _toy_cols(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((n, 4), bool)
    mask[: n // 2, :2] = False  # half the rows padded on the left
    cols = {
        "ad_impressions.mask": mask,
        "ad_impressions.ts_ms": np.where(mask, T0, 0),
        "ad_impressions.campaign_id": np.where(mask, rng.integers(1, 1000, (n, 4)), 0),
        "ad_impressions.surface": np.where(mask, rng.integers(1, 9, (n, 4)), 0),
        "ad_impressions.dwell": np.where(mask, rng.random((n, 4)), 0).astype(
            np.float32
        ),
    }
    cols["target"] = cols["ad_impressions.campaign_id"][:, -1].copy()
    return cols


def _toy_score(cols) -> float:
    """Uses campaign_id (lower is better: the newest one matches the target)."""
    return float(np.mean(cols["ad_impressions.campaign_id"][:, -1] != cols["target"]))


def test_permutation_importance_of_used_and_ignored_attributes():
    cols = _toy_cols()
    imp = permutation_importance(
        _toy_score,
        cols,
        ["ad_impressions.campaign_id", "ad_impressions.surface", "dwell_ms"],
        rng_seed=1,
        n_repeats=2,
    )
    assert imp["ad_impressions.campaign_id"] > 0.5
    assert imp["ad_impressions.surface"] == 0.0
    assert imp["dwell_ms"] == 0.0
    # deterministic in the seed; the input columns are untouched
    again = permutation_importance(
        _toy_score, cols, ["ad_impressions.campaign_id"], rng_seed=1, n_repeats=2
    )
    assert again["ad_impressions.campaign_id"] == imp["ad_impressions.campaign_id"]
    np.testing.assert_array_equal(cols["target"], _toy_cols()["target"])


def test_permutation_moves_whole_sequences_and_keeps_each_rows_mask():
    cols = _toy_cols()
    seen = []

    def score(c) -> float:
        seen.append(c)
        return 0.0

    permutation_importance(score, cols, ["ad_impressions.campaign_id"])
    permuted = seen[1]
    mask = cols["ad_impressions.mask"]
    for k in ("ad_impressions.mask", "ad_impressions.ts_ms", "ad_impressions.surface"):
        assert permuted[k] is cols[k]
    new = permuted["ad_impressions.campaign_id"]
    assert (new[~mask] == 0).all()
    # each row's newest events are some other row's newest events, in order
    orig = {tuple(r[2:]) for r in cols["ad_impressions.campaign_id"].tolist()}
    assert {tuple(r[2:]) for r in new.tolist()} == orig
    assert not np.array_equal(new, cols["ad_impressions.campaign_id"])


def test_permutation_importance_unknown_column():
    with pytest.raises(KeyError, match="sem_id_9"):
        permutation_importance(_toy_score, _toy_cols(), ["ad_impressions.sem_id_9"])


def test_lowest_importance_picks_the_k_smallest_as_model_names():
    imp = {
        "ad_impressions.dwell": 0.03,
        "ad_impressions.ad_id": 0.2,
        "ad_impressions.campaign_id": -0.001,
        "ad_impressions.media_type": 0.0,
        "ad_impressions.surface": 0.0,
        "ad_impressions.position": 0.01,
        "ad_impressions.category_id": 0.05,
    }
    assert lowest_importance(imp) == REMOVED
    assert lowest_importance(imp, k=5)[-1] == DWELL
    assert lowest_importance({"sem_id_1": 1.0, "dwell_ms": 0.5}, k=1) == (DWELL,)
    with pytest.raises(ValueError):
        lowest_importance(imp, k=8)
    removed = lowest_importance(imp)
    assert policy_features("remove-active", 1, removed, FeatureSet()).ad_impressions
