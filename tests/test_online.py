"""The Redis online store (dynamix_ray/online.py) against a real
redis-server on 127.0.0.1 (started here, stopped by its PID): served
histories equal the batch builder's for the same cut, streaming appends equal
one bulk load, an appended event is visible at once, and a ranker scores the
same from Redis as from the snapshot."""

from __future__ import annotations

import numpy as np
import pytest

from dynamix_ray.alure.evaluate import read_events_frame
from dynamix_ray.histories import read_histories, run_histories, user_histories
from dynamix_ray.localcluster import _free_ports
from dynamix_ray.online import (
    RedisHistories,
    consume_stream,
    default_columns,
    ingest,
    local_redis,
    publish_events,
    shard_of,
)
from dynamix_ray.samples import HISTORY_SOURCES

L = 6


@pytest.fixture(scope="module")
def redis_url():
    (port,) = _free_ports(1)
    with local_redis(port) as url:
        yield url


@pytest.fixture(scope="module")
def raw(tiny_events):
    frames = {s: read_events_frame(tiny_events, s) for s in HISTORY_SOURCES}
    return {s: {k: np.asarray(v) for k, v in f.items()} for s, f in frames.items()}


def _assert_rows_equal(got: dict, want: dict) -> None:
    for k, v in got.items():
        w = v.shape[1]
        assert (want[k][:, : L - w] == 0).all(), k
        np.testing.assert_array_equal(want[k][:, L - w :], v, err_msg=k)


@pytest.mark.parametrize("cut_at", ["end", "median"])
def test_served_histories_equal_the_batch_builder(
    ray_session, redis_url, tiny_events, raw, cut_at
):
    url = f"{redis_url}?ns=eq-{cut_at}"
    # margin: every event is kept, so any cut is exact
    m = ingest(tiny_events, url, L, margin=10**6, progress=False)
    assert sum(m["events"].values()) == sum(len(r["user_id"]) for r in raw.values())
    ts = raw["ad_impressions"]["ts_ms"]
    cut = int(ts.max()) + 1 if cut_at == "end" else int(np.median(ts))
    want = user_histories(raw, cut, L)
    hist = RedisHistories.connect(url)
    buffer_ms = 60_000
    q = want["user_id"]
    got = hist.rows(q, np.full(len(q), cut + buffer_ms), None, buffer_ms, L)
    _assert_rows_equal(got, want)


def test_streamed_appends_equal_one_bulk_load_and_lists_stay_trimmed(
    redis_url, tiny_events, raw
):
    bulk = f"{redis_url}?ns=bulk"
    ingest(tiny_events, bulk, L, margin=2, progress=False)
    stream = RedisHistories.create(f"{redis_url}?ns=stream", default_columns(), L, 2)
    for src, r in raw.items():  # in three chunks of time, as they would arrive
        edges = np.quantile(r["ts_ms"], [0, 1 / 3, 2 / 3, 1])
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            m = (r["ts_ms"] >= lo) & ((r["ts_ms"] < hi) | (hi == edges[-1]))
            stream.append(
                src,
                r["user_id"][m],
                r["ts_ms"][m],
                {c: r[c][m] for c in stream.columns[src]},
            )
    a = RedisHistories.connect(bulk)
    users = np.unique(raw["ad_impressions"]["user_id"])[:40]
    now = int(raw["ad_impressions"]["ts_ms"].max()) + 120_000
    ra, rb = (
        a.rows(users, np.full(len(users), now)),
        stream.rows(users, np.full(len(users), now)),
    )
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    key = a._key("ad_impressions", int(users[0]))
    assert a.client_of(int(users[0])).llen(key) <= L + 2


def test_an_event_store_is_ingested_in_ray_tasks_like_files(
    ray_session, redis_url, tiny_events, raw, tmp_path
):
    from dynamix_ray.events import run_bucket

    store = run_bucket(tiny_events, str(tmp_path / "store"), 3, progress=False)
    url = f"{redis_url}?ns=store"
    m = ingest(store.url, url, L, progress=False)
    assert sum(m["events"].values()) == sum(len(r["user_id"]) for r in raw.values())
    cut = int(raw["ad_impressions"]["ts_ms"].max()) + 1
    want = user_histories(raw, cut, L)
    q = want["user_id"]
    got = RedisHistories.connect(url).rows(q, np.full(len(q), cut + 60_000))
    _assert_rows_equal(got, want)


def test_an_appended_event_is_visible_to_the_next_request(redis_url):
    hist = RedisHistories.create(f"{redis_url}?ns=fresh", default_columns(), L)
    cols = {c: np.array([7]) for c in hist.columns["conversions"]}
    t = 1_800_000_000_000
    hist.append("conversions", np.array([42]), np.array([t]), cols)
    # not yet: a request at t + 59 s cuts at t - 1 s
    early = hist.rows(np.array([42]), np.array([t + 59_000]))
    assert not early["conversions.mask"].any()
    late = hist.rows(np.array([42]), np.array([t + 60_001]))
    assert late["conversions.mask"].sum() == 1
    assert late["conversions.ad_id"][0, -1] == 7


def test_a_store_with_another_layout_is_refused(redis_url):
    RedisHistories.create(f"{redis_url}?ns=layout", default_columns(), 8)
    with pytest.raises(ValueError, match="another layout"):
        RedisHistories.create(f"{redis_url}?ns=layout", default_columns(), 16)
    with pytest.raises(FileNotFoundError, match="dynamix ingest"):
        RedisHistories.connect(f"{redis_url}?ns=nothing-here")


def test_a_ranker_scores_the_same_from_redis_as_from_the_snapshot(
    ray_session, redis_url, tiny_events, tmp_path
):
    from dynamix_ray.model import DynamixCTR, ModelConfig
    from dynamix_ray.model.checkpoint import save_checkpoint
    from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
    from dynamix_ray.serve.ranker import Ranker

    cfg = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=L)
    save_checkpoint(str(tmp_path / "ckpt"), DynamixCTR(cfg).eval(), cfg)
    run_histories(tiny_events, str(tmp_path / "h"), None, L, progress=False)
    snap = read_histories(str(tmp_path / "h"))
    url = f"{redis_url}?ns=ranker"
    ingest(tiny_events, url, L, progress=False)
    users = snap.user_id[:6]
    ts = [snap.as_of_ms + 60_000] * len(users)  # the snapshot's cut
    rng = np.random.default_rng(0)
    cands = [rng.integers(0, 50, (3, len(CANDIDATE_ATTRIBUTES))) for _ in users]
    a = Ranker(str(tmp_path / "ckpt"), snap, 1).score(users, ts, cands)
    b = Ranker(str(tmp_path / "ckpt"), RedisHistories.connect(url), 1).score(
        users, ts, cands
    )
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# ------------------------------------------------------------ shards, streams
@pytest.fixture(scope="module")
def second_redis():
    (port,) = _free_ports(1)
    with local_redis(port) as url:
        yield url


def _reference(url: str, raw: dict, users: np.ndarray) -> dict:
    now = int(raw["ad_impressions"]["ts_ms"].max()) + 120_000
    return RedisHistories.connect(url).rows(users, np.full(len(users), now))


def test_two_shards_serve_what_one_server_serves_and_split_the_users(
    ray_session, redis_url, second_redis, tiny_events, raw
):
    one = f"{redis_url}?ns=one"
    two = f"{redis_url},{second_redis}?ns=two"
    ingest(tiny_events, one, L, progress=False)
    ingest(tiny_events, two, L, progress=False)
    hist = RedisHistories.connect(two)
    assert hist.shards == 2
    users = np.unique(raw["ad_impressions"]["user_id"])
    got, want = _reference(two, raw, users), _reference(one, raw, users)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # every user's lists live on its own shard only, and both shards hold some
    on = [0, 0]
    for u in users[:60].tolist():
        key = hist._key("ad_impressions", u)
        mine = int(shard_of(np.array([u]), 2)[0])
        assert hist.clients[1 - mine].exists(key) == 0
        on[mine] += hist.clients[mine].exists(key)
    assert min(on) > 0, on


def test_shards_listed_in_another_order_or_number_are_refused(redis_url, second_redis):
    RedisHistories.create(f"{redis_url},{second_redis}?ns=order", default_columns(), L)
    with pytest.raises(ValueError, match="order and number"):
        RedisHistories.connect(f"{second_redis},{redis_url}?ns=order")
    with pytest.raises(ValueError, match="order and number"):
        RedisHistories.connect(f"{redis_url}?ns=order")
    with pytest.raises(ValueError, match="more than one"):
        RedisHistories.connect(f"{redis_url}?ns=a,{second_redis}?ns=b")


def _publish_all(client, key: str, raw: dict) -> int:
    n = 0
    for src, r in raw.items():  # in time order, as events arrive
        o = np.argsort(r["ts_ms"], kind="stable")
        cols = {c: r[c][o] for c in default_columns()[src]}
        n += len(publish_events(client, key, src, r["user_id"][o], r["ts_ms"][o], cols))
    return n


def test_a_stream_consumer_applies_every_entry_once_and_keeps_bad_ones(
    ray_session, redis_url, second_redis, tiny_events, raw
):
    import redis

    client = redis.Redis.from_url(redis_url)
    n = _publish_all(client, "ev-ok", raw)
    client.xadd("ev-ok", {"source": "nope", "user_id": 1, "ts": 1})
    client.xadd("ev-ok", {"source": "conversions", "user_id": "x", "ts": 1, "ad_id": 1})
    client.xadd("ev-ok", {"source": "conversions", "user_id": 3})
    client.xadd(
        "ev-ok", {"source": "conversions", "user_id": 2**63, "ts": 1, "ad_id": 1}
    )
    target = f"{redis_url},{second_redis}?ns=streamed"
    m = consume_stream(f"{redis_url}?stream=ev-ok", target, L, batch=97)
    assert sum(m["events"].values()) == n
    assert m["dead_letters"] == 4 and client.xlen("ev-ok:dead") == 4
    reasons = {e[1][b"reason"].decode() for e in client.xrange("ev-ok:dead")}
    assert any("unknown source" in r for r in reasons)
    assert any("missing" in r for r in reasons)
    assert any("not a number" in r for r in reasons)
    assert client.xpending("ev-ok", "dynamix-ingest")["pending"] == 0
    ingest(tiny_events, f"{redis_url}?ns=streamed-ref", L, progress=False)
    users = np.unique(raw["ad_impressions"]["user_id"])
    got = _reference(target, raw, users)
    want = _reference(f"{redis_url}?ns=streamed-ref", raw, users)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # nothing new: a second run applies nothing
    again = consume_stream(f"{redis_url}?stream=ev-ok", target, L)
    assert sum(again["events"].values()) == 0


@pytest.mark.parametrize("die_after", [1, 2])
def test_a_consumer_killed_mid_batch_applies_nothing_twice_on_restart(
    redis_url, second_redis, raw, monkeypatch, die_after
):
    """The process dies after ``die_after`` shard transactions of a batch
    committed (1: between the shards; 2: after both, before the XACK)."""
    import redis
    from redis.client import Pipeline

    client = redis.Redis.from_url(redis_url)
    key = f"ev-crash-{die_after}"
    n = _publish_all(client, key, raw)
    target = f"{redis_url},{second_redis}?ns=crash-{die_after}"
    real = Pipeline.execute
    commits = {"n": 0}

    class Died(Exception):
        pass

    def execute(self, *a, **k):
        out = real(self, *a, **k)
        if self.transaction:
            commits["n"] += 1
            if commits["n"] == 3 + die_after:  # in the second batch
                raise Died
        return out

    monkeypatch.setattr(Pipeline, "execute", execute)
    stream = f"{redis_url}?stream={key}"
    with pytest.raises(Died):  # margin: nothing trimmed, so a twice-applied event shows
        consume_stream(stream, target, L, margin=10**6, batch=200)
    monkeypatch.setattr(Pipeline, "execute", real)
    assert client.xpending(key, "dynamix-ingest")["pending"] == 200  # batch 2
    m = consume_stream(stream, target, L, margin=10**6, batch=200)
    assert client.xpending(key, "dynamix-ingest")["pending"] == 0
    applied = sum(m["events"].values())
    assert (applied < n - 200) if die_after == 1 else (applied == n - 400)
    hist = RedisHistories.connect(target)
    stored = sum(
        hist.client_of(u).llen(hist._key(src, u))
        for src, r in raw.items()
        for u in np.unique(r["user_id"]).tolist()
    )
    assert stored == n


def test_dynamix_ingest_reads_a_stream_into_shards(
    ray_session, redis_url, second_redis, raw, capsys
):
    import redis

    from dynamix_ray.cli import main

    client = redis.Redis.from_url(redis_url)
    n = _publish_all(client, "ev-cli", raw)
    target = f"{redis_url},{second_redis}?ns=cli"
    assert (
        main(["ingest", f"{redis_url}?stream=ev-cli", target, "--max-seq-len", str(L)])
        == 0
    )
    out = capsys.readouterr().out
    assert f"{n:,} events" in out and "0 entries not events" in out
    assert RedisHistories.connect(target).shards == 2
