"""Serving's plain cores: the segment store, the history store, the ranker, and
the request schema. No Serve here (tests/test_serve.py runs the app)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.features import policy_features, to_model_batch
from dynamix_ray.histories import (
    HistoryStore,
    cut_histories,
    read_histories,
    run_histories,
)
from dynamix_ray.model import DynamixCTR, ModelConfig
from dynamix_ray.model.checkpoint import save_checkpoint
from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
from dynamix_ray.samples import SampleConfig, events_of, segment_at
from dynamix_ray.schema import SOURCES
from dynamix_ray.serve.api import Candidate, error_body, field_name
from dynamix_ray.serve.app import SEPARATE_LOOP_ENV, AppConfig, router_options
from dynamix_ray.serve.ranker import Ranker
from dynamix_ray.serve.store import SegmentStore, compact_changes

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
    # reference: samples.segment_at (the training rule), unknown users passive
    want = segment_at(q_uid, q_ts, uid, end, seg)
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


def _store_of(rows_by_source: dict, as_of_ms: int, seq: int) -> HistoryStore:
    """A HistoryStore of raw rows (any order), cut like a snapshot."""
    events = {
        s: cut_histories(events_of(r), as_of_ms, seq) for s, r in rows_by_source.items()
    }
    return HistoryStore(events, as_of_ms, seq)


def test_history_store_gives_unknown_users_an_empty_history():
    rows = {
        "ad_impressions": {
            "user_id": np.array([7, 7, 3]),
            "ts_ms": np.array([10, 20, 30]),
            "ad_id": np.array([1, 2, 4]),
        }
    }
    store = _store_of(rows, as_of_ms=100, seq=2)
    got = store.rows(np.array([3, 99, 7]))
    np.testing.assert_array_equal(got["ad_impressions.ad_id"], [[0, 4], [0, 0], [1, 2]])
    assert not got["ad_impressions.mask"][1].any()
    np.testing.assert_array_equal(store.known(np.array([3, 4, 7])), [True, False, True])


@pytest.mark.parametrize("root", ["file", "memory"])
def test_history_snapshot_round_trips_and_equals_the_batch_builder(
    ray_session, tiny_events, tmp_path, root
):
    """The served histories of every user equal the training builder's for the
    same cut (histories.user_histories over all events)."""
    from dynamix_ray.alure.evaluate import read_events_frame
    from dynamix_ray.histories import user_histories
    from dynamix_ray.samples import HISTORY_SOURCES

    out = str(tmp_path / "h") if root == "file" else "memory://serve-test/h"
    as_of = int(read_events_frame(tiny_events, "ad_impressions")["ts_ms"].median())
    meta = run_histories(tiny_events, out, as_of, max_seq_len=5, progress=False)
    store = read_histories(out)
    assert len(store) == meta["users"] > 0
    assert store.max_seq_len == 5 and store.as_of_ms == as_of
    for ev in store.events.values():
        assert (ev.ts_ms < as_of).all() and (np.diff(ev.offsets) <= 5).all()
    frames = {
        s: read_events_frame(tiny_events, s).to_dict("series") for s in HISTORY_SOURCES
    }
    raw = {s: {k: np.asarray(v) for k, v in f.items()} for s, f in frames.items()}
    want = user_histories(raw, as_of, 5)
    got = store.rows(want["user_id"])  # at the snapshot's instant
    for k, v in got.items():
        w = v.shape[1]
        assert (want[k][:, : 5 - w] == 0).all()
        np.testing.assert_array_equal(want[k][:, 5 - w :], v, err_msg=k)


def _random_histories(n_users: int, seq: int, seed: int = 0) -> HistoryStore:
    from dynamix_ray.schema import SOURCES

    rng = np.random.default_rng(seed)
    as_of = 1_700_000_000_000
    rows = {}
    for src, s in SOURCES.items():
        n = int(rng.integers(0, 4 * seq * n_users + 1))
        r = {
            "user_id": rng.integers(0, n_users, n) * 10,
            "ts_ms": as_of - rng.integers(1, 10**8, n),
        }
        if s.has_dwell:
            r["dwell_ms"] = rng.uniform(0, 5e4, n)
        for a, t in s.attributes.items():
            if pa.types.is_integer(t):
                r[a] = rng.integers(0, 50, n)
        rows[src] = r
    return _store_of(rows, as_of, seq)


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
    # docs/contract.md §6: the last 8 events before t - 60 s, the same rule as training
    hist = store.rows(np.array(users), np.array(ts), None, 60_000, 8)
    cols = {k: v[idx] for k, v in hist.items()}
    cols["t_ms"] = np.array(ts)[idx]
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
    ev = store.events["ad_impressions"]
    lo, hi = ev.user_slices(np.array([0]))
    t_mid = int(np.median(ev.ts_ms[lo[0] : hi[0]])) + 60_000  # half are too late
    earlier = HistoryStore(
        {
            s: events_of(
                {
                    "user_id": np.repeat(e.user_id, np.diff(e.offsets))[keep],
                    "ts_ms": e.ts_ms[keep],
                    **{k: v[keep] for k, v in e.columns.items()},
                }
            )
            for s, e in store.events.items()
            for keep in [e.ts_ms < t_mid - 60_000]
        },
        store.as_of_ms,
        store.max_seq_len,
    )
    got = ranker.score([0], [t_mid], cand)[0]
    want = Ranker(ckpt, earlier, 0).score([0], [t_mid], cand)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _model_scores(model, ranker, cols, t, cand) -> np.ndarray:
    """The model's probabilities for history columns ``cols`` at ``t`` and the
    candidate rows ``cand``, under the ranker's feature set."""
    cols = {**cols, "t_ms": np.array([t])}
    for j, a in enumerate(CANDIDATE_ATTRIBUTES):
        cols[f"cand.{a}"] = cand[:, j]
    with torch.no_grad():
        return torch.sigmoid(model(to_model_batch(cols), ranker.features)).numpy()


def test_ranker_cuts_histories_with_the_checkpoints_sample_settings(tmp_path):
    """Serving reads the sequence length and the buffer from the checkpoint,
    not from defaults: a model trained with L = 4 and a 10-minute buffer sees
    the last 4 events before t - 10 min."""
    torch.manual_seed(0)
    cfg = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=4)
    model = DynamixCTR(cfg).eval()
    samples = SampleConfig(max_seq_len=4, buffer_s=600)
    ckpt = save_checkpoint(str(tmp_path / "c"), model, cfg, samples=samples)
    store = _random_histories(3, seq=8, seed=5)
    ranker = Ranker(ckpt, store, 1)
    assert ranker.samples == samples
    t = store.as_of_ms - 3_600_000
    cand = [np.arange(len(CANDIDATE_ATTRIBUTES))[None] % 7]
    got = ranker.score([10], [t], cand)[0]
    cols = store.rows(np.array([10]), np.array([t]), None, 600_000, 4)
    for k, v in cols.items():
        if k.endswith(".ts_ms"):
            assert (v[cols[k[:-5] + "mask"]] < t - 600_000).all()
            assert cols[k[:-5] + "mask"].sum() <= 4
    want = _model_scores(model, ranker, cols, t, cand[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ranker_cuts_each_source_at_the_checkpoints_own_length(tmp_path):
    """Per-source lengths (``SampleConfig.seq_lens``) travel in the checkpoint:
    the ranker gathers 2 page views and 4 events of every other source, and
    scores what the model gives on exactly those rows."""
    torch.manual_seed(0)
    cfg = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=4)
    model = DynamixCTR(cfg).eval()
    samples = SampleConfig(max_seq_len=4, seq_lens={"page_views": 2})
    ckpt = save_checkpoint(str(tmp_path / "c"), model, cfg, samples=samples)
    store = _random_histories(3, seq=8, seed=5)
    ranker = Ranker(ckpt, store, 1)
    assert ranker.samples.seq_len("page_views") == 2
    t = store.as_of_ms + 60_000
    cand = [np.arange(len(CANDIDATE_ATTRIBUTES))[None] % 7]
    got = ranker.score([10], [t], cand)[0]
    cols = store.rows(np.array([10]), np.array([t]), None, 60_000, samples.lengths())
    assert cols["page_views.mask"].sum() == 2
    assert cols["ad_impressions.mask"].sum() == 4
    want = _model_scores(model, ranker, cols, t, cand[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    longer = store.rows(np.array([10]), np.array([t]), None, 60_000, 4)
    cols.update({k: v for k, v in longer.items() if k.startswith("page_views.")})
    other = _model_scores(model, ranker, cols, t, cand[0])
    assert not np.allclose(got, other)  # the length is not a no-op


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


def test_one_failing_request_does_not_fail_its_batch_mates():
    """A forward pass that raises is re-run request by request: the bad one
    gets its own error, its batch mates their scores."""
    from dynamix_ray.serve.ranker import score_isolated

    passes: list[list[int]] = []

    def score(user_ids, ts_ms, candidates):
        passes.append(list(user_ids))
        if 13 in user_ids:
            raise ValueError("bad request 13")
        return [np.full(len(c), 0.5) for c in candidates]

    cands = [np.ones((n, len(CANDIDATE_ATTRIBUTES)), np.int64) for n in (2, 1, 3)]
    got = score_isolated(score, [1, 13, 2], [0, 0, 0], cands)
    assert isinstance(got[1], ValueError) and "13" in str(got[1])
    assert got[0].tolist() == [0.5, 0.5] and got[2].tolist() == [0.5] * 3
    assert passes == [[1, 13, 2], [1], [13], [2]]  # one pass, then one each
    # a batch that works is one pass; a lone bad request is its own error
    passes.clear()
    assert len(score_isolated(score, [1, 2], [0, 0], cands[:2])) == 2
    assert passes == [[1, 2]]
    assert isinstance(score_isolated(score, [13], [0], cands[:1])[0], ValueError)


def test_shared_histories_answer_like_the_snapshot_and_map_one_copy(
    ray_session, tiny_events, tmp_path
):
    """The node-shared, memory-mapped copy gives the same rows as the
    in-memory snapshot; a second opener maps the first one's files."""
    from dynamix_ray.histories import open_shared_histories, read_histories

    out = str(tmp_path / "h")
    run_histories(tiny_events, out, None, 8, progress=False)
    cache = str(tmp_path / "cache")
    a = open_shared_histories(out, cache)
    b = open_shared_histories(out, cache)
    plain = read_histories(out)
    assert a.version == plain.version and len(os.listdir(cache)) == 1
    ev = next(iter(a.events.values()))
    assert isinstance(ev.ts_ms, np.memmap) and not ev.ts_ms.flags.writeable
    users = np.r_[plain.user_id[:50], 10**15]
    ts = np.full(len(users), plain.as_of_ms - 3_600_000)
    want = plain.rows(users, ts, None, 60_000, 8)
    for got in (a.rows(users, ts, None, 60_000, 8), b.rows(users, ts, None, 60_000, 8)):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # a new published version replaces the node's copy (the old maps stay valid)
    run_histories(tiny_events, out, None, 8, progress=False)
    c = open_shared_histories(out, cache)
    (home,) = os.listdir(cache)
    assert sorted(os.listdir(os.path.join(cache, home))) == [".lock", c.version]
    assert c.version != a.version and len(a.rows(users[:3])) > 0
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
