"""Serving's plain cores: the segment store, the history store, the ranker, and
the request schema. No Serve here (tests/test_serve.py runs the app)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.features import policy_features, to_model_batch
from dynamix_ray.histories import HistoryStore, read_histories, run_histories
from dynamix_ray.model import DynamixCTR, ModelConfig
from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
from dynamix_ray.samples import segment_at
from dynamix_ray.schema import SOURCES
from dynamix_ray.serve.api import Candidate, error_body, field_name
from dynamix_ray.serve.app import SEPARATE_LOOP_ENV, AppConfig, router_options
from dynamix_ray.serve.ranker import Ranker
from dynamix_ray.serve.store import SegmentStore, compact_changes
from dynamix_ray.train import save_checkpoint

TINY_MODEL = ModelConfig(
    emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=8
)

rows = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 40), st.integers(0, 1)),
    max_size=60,
    unique_by=lambda r: (r[0], r[1]),
)


@settings(max_examples=200, deadline=None)
@given(rows=rows, queries=st.lists(st.tuples(st.integers(-1, 8), st.integers(-5, 45))))
def test_segment_store_answers_like_the_full_table(rows, queries):
    """Compaction keeps only segment changes; answers equal the plain look-up
    over every window (samples.segment_at), unknown users passive."""
    uid = np.array([r[0] for r in rows], np.int64)
    end = np.array([r[1] for r in rows], np.int64) * 1000
    seg = np.array([r[2] for r in rows], np.int8)
    store = SegmentStore.from_rows(uid, end, seg)
    assert len(store.user_id) <= len(uid)
    q_uid = np.array([q[0] for q in queries], np.int64)
    q_ts = np.array([q[1] for q in queries], np.int64) * 1000
    # reference: segment_at with user codes (users absent from the table: -1)
    code = np.where(np.isin(q_uid, uid), q_uid, -1)
    want = segment_at(code, q_ts, uid, end, seg) if len(q_uid) else np.zeros(0, np.int8)
    want = np.where(code >= 0, want, 0)
    np.testing.assert_array_equal(store.lookup(q_uid, q_ts), want)


def test_compaction_drops_repeats_and_leading_passive_windows():
    u, e, s = compact_changes(
        np.array([1, 1, 1, 1, 2, 2]),
        np.array([10, 20, 30, 40, 10, 20]),
        np.array([0, 1, 1, 0, 1, 1]),
    )
    assert list(zip(u, e, s, strict=True)) == [(1, 20, 1), (1, 40, 0), (2, 10, 1)]
    with pytest.raises(ValueError, match="expected 0 or 1"):
        SegmentStore.from_rows(np.array([1]), np.array([1]), np.array([2]))


def test_history_store_gives_unknown_users_an_empty_history():
    cols = {
        "user_id": np.array([7, 3]),
        "ad_impressions.ad_id": np.array([[1, 2], [3, 4]]),
        "ad_impressions.mask": np.array([[True, True], [False, True]]),
        "country": np.array([5, 6], np.int16),
    }
    store = HistoryStore.from_columns(cols, as_of_ms=100, max_seq_len=2)
    got = store.rows(np.array([3, 99, 7]))
    np.testing.assert_array_equal(got["ad_impressions.ad_id"], [[3, 4], [0, 0], [1, 2]])
    assert not got["ad_impressions.mask"][1].any()
    np.testing.assert_array_equal(got["country"], [6, -1, 5])
    np.testing.assert_array_equal(store.known(np.array([3, 4, 7])), [True, False, True])


@pytest.mark.parametrize("root", ["file", "memory"])
def test_history_snapshot_round_trips(ray_session, tiny_events, tmp_path, root):
    from dynamix_ray.alure.evaluate import read_events_frame

    out = str(tmp_path / "h") if root == "file" else "memory://serve-test/h"
    as_of = int(read_events_frame(tiny_events, "ad_impressions")["ts_ms"].median())
    meta = run_histories(tiny_events, out, as_of, max_seq_len=5, progress=False)
    store = read_histories(out)
    assert len(store) == meta["users"] > 0
    assert store.max_seq_len == 5 and store.as_of_ms == as_of
    ts, mask = (
        store.columns["ad_impressions.ts_ms"],
        store.columns["ad_impressions.mask"],
    )
    assert ts.shape == (len(store) + 1, 5)
    assert (ts[mask] < as_of).all()  # nothing at or after as_of
    assert mask.any(axis=1)[:-1].mean() > 0.5


def _random_histories(n_users: int, seq: int, seed: int = 0) -> HistoryStore:
    from dynamix_ray.model.config import SOURCE_ATTRIBUTES

    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {"user_id": np.arange(n_users) * 10}
    for src, attrs in SOURCE_ATTRIBUTES.items():
        lens = rng.integers(0, seq + 1, n_users)
        mask = np.arange(seq)[None] >= seq - lens[:, None]
        cols[f"{src}.mask"] = mask
        cols[f"{src}.ts_ms"] = np.where(
            mask, 1_700_000_000_000 - rng.integers(1, 10**8, (n_users, seq)), 0
        )
        for a in attrs:
            name = f"{src}.dwell" if a == "dwell_ms" else f"{src}.{a}"
            cols[name] = np.where(mask, rng.integers(0, 50, (n_users, seq)), 0)
        if f"{src}.dwell" in cols:
            cols[f"{src}.dwell"] = cols[f"{src}.dwell"].astype(np.float32)
    return HistoryStore.from_columns(cols, 1_700_000_000_000, seq)


@pytest.mark.parametrize(
    ("policy", "segment"),
    [("baseline", 1), ("remove-active", 1), ("boost-selective", 0)],
)
def test_ranker_scores_equal_the_model_on_repeated_rows(tmp_path, policy, segment):
    """The ranker's shared-history pass equals the training-time forward over
    sample rows, with its policy's features for its segment."""
    torch.manual_seed(0)
    model = DynamixCTR(TINY_MODEL).eval()
    removed = ("campaign_id", "media_type", "surface", "position")
    ckpt = save_checkpoint(str(tmp_path / "c"), model, TINY_MODEL, policy, removed)
    store = _random_histories(5, seq=12)  # longer than the model's 8: trimmed
    ranker = Ranker(ckpt, store, segment)
    assert ranker.policy == policy and ranker.removed == removed
    rng = np.random.default_rng(1)
    users, ts = [10, 999, 30], [1_700_000_000_000 + i for i in range(3)]  # 999: unknown
    cands = [rng.integers(0, 100, (n, len(CANDIDATE_ATTRIBUTES))) for n in (3, 1, 4)]
    got = ranker.score(users, ts, cands)
    assert [len(g) for g in got] == [3, 1, 4]

    idx = np.repeat(np.arange(3), [3, 1, 4])
    cols = {
        k: v[:, -8:] if v.ndim == 2 else v
        for k, v in store.rows(np.array(users)).items()
    }
    cols = {k: v[idx] for k, v in cols.items()}
    cols["t_ms"] = np.array(ts)[idx]
    for k in [k for k in cols if k.endswith(".mask")]:  # SPEC §6: before t - 60 s
        cols[k] = cols[k] & (cols[k[:-4] + "ts_ms"] < cols["t_ms"][:, None] - 60_000)
    flat = np.concatenate(cands)
    for j, a in enumerate(CANDIDATE_ATTRIBUTES):
        cols[f"cand.{a}"] = flat[:, j]
    fs = policy_features(policy, segment, removed, ranker.features)
    with torch.no_grad():
        want = torch.sigmoid(model(to_model_batch(cols), fs)).numpy()
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-5, atol=1e-6)


def test_remove_policy_without_removed_attributes_is_an_error(tmp_path):
    model = DynamixCTR(TINY_MODEL)
    ckpt = save_checkpoint(str(tmp_path / "c"), model, TINY_MODEL, "remove-active")
    with pytest.raises(ValueError, match="removed"):
        Ranker(ckpt, _random_histories(2, 4), 1)


def test_candidate_schema_is_the_ad_impression_attributes():
    assert tuple(Candidate.model_fields) == tuple(SOURCES["ad_impressions"].attributes)
    assert tuple(Candidate.model_fields) == CANDIDATE_ATTRIBUTES


@pytest.mark.parametrize(
    ("loc", "name"),
    [
        (("body", "candidates", 3, "ad_id"), "candidates[3].ad_id"),
        (("body", "user_id"), "user_id"),
        (("body", 17), "body"),
        (("body",), "body"),
    ],
)
def test_error_messages_name_the_field(loc, name):
    assert field_name(loc) == name
    body = error_body([{"loc": loc, "msg": "bad", "type": "x"}])
    assert body["error"] == f"{name}: bad"


def test_a_request_before_the_snapshot_sees_no_later_events(tmp_path):
    """A request's history is cut at its own ts - buffer, as in training, even
    when the snapshot was taken later."""
    torch.manual_seed(0)
    model = DynamixCTR(TINY_MODEL).eval()
    ckpt = save_checkpoint(str(tmp_path / "c"), model, TINY_MODEL)
    store = _random_histories(3, seq=8, seed=3)
    ranker = Ranker(ckpt, store, 0)
    cand = [np.arange(len(CANDIDATE_ATTRIBUTES))[None]]
    ts = store.columns["ad_impressions.ts_ms"][0]
    mask = store.columns["ad_impressions.mask"][0]
    t_mid = int(np.median(ts[mask])) + 60_000  # half the events are too late
    cut = {k: v.copy() for k, v in store.columns.items()}
    for k in [k for k in cut if k.endswith(".mask")]:
        cut[k][0] &= cut[k[:-4] + "ts_ms"][0] < t_mid - 60_000
    earlier = HistoryStore.from_columns(
        {"user_id": store.user_id, **{k: v[:-1] for k, v in cut.items()}},
        store.as_of_ms,
        store.max_seq_len,
    )
    got = ranker.score([0], [t_mid], cand)[0]
    want = Ranker(ckpt, earlier, 0).score([0], [t_mid], cand)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _cfg(**over) -> AppConfig:
    spec = {"checkpoint": "c"}
    return AppConfig.model_validate(
        {"segments": "s", "histories": "h", "active": spec, "passive": spec, **over}
    )


def test_router_options_put_the_handles_on_the_replica_loop_keeping_the_runtime_env():
    env = {"env_vars": {"A": "1"}, "pip": ["x"]}
    router = {"ray_actor_options": {"num_cpus": 0.3, "runtime_env": env}}
    got = router_options(_cfg(router=router))
    assert got["ray_actor_options"] == {
        "num_cpus": 0.3,
        "runtime_env": {"env_vars": {"A": "1", SEPARATE_LOOP_ENV: "0"}, "pip": ["x"]},
    }
    assert env == {"env_vars": {"A": "1"}, "pip": ["x"]}  # the config's is untouched
    off = router_options(_cfg(router=router, handles_on_replica_loop=False))
    assert off["ray_actor_options"] == router["ray_actor_options"]
    # an explicit setting of the variable wins
    mine = {
        "ray_actor_options": {"runtime_env": {"env_vars": {SEPARATE_LOOP_ENV: "1"}}}
    }
    got = router_options(_cfg(router=mine))["ray_actor_options"]
    assert got["runtime_env"]["env_vars"] == {SEPARATE_LOOP_ENV: "1"}
