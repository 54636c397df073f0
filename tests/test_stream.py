"""Streaming updates (segments/stream.py): micro-batches folded in memory give
the table a full run gives; a killed updater replays its checkpoint and
counts every batch once."""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from test_refresh import CFG, T0, _batches, _split_world, _world, _write
from test_segment_pipeline import assert_tables_equal

from dynamix_ray.io import resolve
from dynamix_ray.segments.pipeline import read_segments, run_segment
from dynamix_ray.segments.stream import (
    StreamState,
    read_batch,
    run_stream,
    start_updaters,
)


def _files(root: str, name: str) -> dict[str, list[str]]:
    fs, path = resolve(root)
    out = {}
    for src in ("ad_impressions", "conversions"):
        p = f"{path}/{src}/{name}.parquet"
        if fs.exists(p):
            out[src] = [f"memory://{p.lstrip('/')}" if root.startswith("memory") else p]
    return out


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_world())
def test_batches_folded_in_memory_equal_a_full_run(world):
    imps, convs, imp_batch, conv_batch, k = world
    base = f"memory://stream-{uuid.uuid4().hex[:8]}"
    events = f"{base}/events"
    batches = list(_batches(imps, convs, imp_batch, conv_batch, k))
    _write(events, "batch-0", *batches[0])
    run_segment(events, f"{base}/out", CFG, progress=False)
    state = StreamState.from_table(f"{base}/out", range(CFG.num_buckets))
    for i, (bi, bc) in enumerate(batches[1:], start=1):
        _write(events, f"batch-{i}", bi, bc)
        files = _files(events, f"batch-{i}")
        changes = state.apply(f"b{i}", read_batch(files))
        assert changes is not None
        assert state.apply(f"b{i}", read_batch(files)) is None  # once only
    run_segment(events, f"{base}/full", CFG, progress=False)
    assert_tables_equal(state.segments(), read_segments(f"{base}/full"))


def test_a_killed_updater_replays_and_the_stream_equals_a_full_run(
    ray_session, tmp_path
):
    import ray

    imps, convs = _split_world("")
    pick = lambda d, m: {c: v[m] for c, v in d.items()}  # noqa: E731
    cut1, cut2 = T0 + 8 * CFG.window_ms, T0 + 10 * CFG.window_ms
    early, mid = imps["ts"] < cut1, (imps["ts"] >= cut1) & (imps["ts"] < cut2)
    late = imps["ts"] >= cut2
    cmid = (convs["ts"] >= cut1) & (convs["ts"] < cut2)
    events, out = str(tmp_path / "events"), str(tmp_path / "out")
    _write(events, "a", pick(imps, early), pick(convs, convs["ts"] < cut1))
    run_segment(events, out, CFG, progress=False)
    updaters = start_updaters(out, 2)
    _write(events, "b", pick(imps, mid), pick(convs, cmid))
    first = run_stream(events, out, updaters, max_batches=1)
    assert first.batches == 1 and first.changes > 0
    pid = ray.get(updaters[0].pid.remote())
    os.kill(pid, signal.SIGKILL)  # it restarts and replays batch "b"
    time.sleep(1.0)
    _write(events, "c", pick(imps, late), pick(convs, convs["ts"] >= cut2))
    second = run_stream(events, out, updaters, max_batches=1)
    assert second.batches == 1 and second.lag_ms[0] >= 0
    assert ray.get(updaters[0].pid.remote()) != pid
    got = pa.concat_tables(ray.get([u.segments.remote() for u in updaters]))
    run_segment(events, str(tmp_path / "full"), CFG, progress=False)
    assert_tables_equal(got, read_segments(str(tmp_path / "full")))
    changes = sorted((tmp_path / "out" / "segment_changes").iterdir())
    assert [p.name for p in changes] == ["000000000.parquet", "000000001.parquet"]
    # the last published change of each row is the row as the full run has it
    log = pa.concat_tables([pq.read_table(p) for p in changes]).to_pandas()
    last = log.drop_duplicates(["user_id", "window_end_ms"], keep="last")
    table = read_segments(str(tmp_path / "full"))
    full = table.to_pandas()
    full["window_end_ms"] = table.column("window_end").cast(pa.int64()).to_numpy()
    both = last.merge(full, on=["user_id", "window_end_ms"], suffixes=("", "_full"))
    assert len(both) == len(last) > 0
    assert (both["segment"] == both["segment_full"]).all()
    np.testing.assert_allclose(both["corr"], both["corr_full"], atol=1e-9)
    # nothing new: the driver's state says both files were sent
    again = run_stream(events, out, updaters, idle_stop_s=0.3)
    assert again.batches == 0
    for u in updaters:
        ray.kill(u)
    assert np.isfinite(first.summary()["lag_p50_ms"])


def _table_on_memory():
    """A published table on memory:// from the early files, and the late
    files' names (written, not yet folded)."""
    imps, convs = _split_world("")
    pick = lambda d, m: {c: v[m] for c, v in d.items()}  # noqa: E731
    cut = T0 + 9 * CFG.window_ms
    base = f"memory://stream-{uuid.uuid4().hex[:8]}"
    events, out = f"{base}/events", f"{base}/out"
    _write(events, "a", pick(imps, imps["ts"] < cut), pick(convs, convs["ts"] < cut))
    run_segment(events, out, CFG, progress=False)
    _write(events, "b", pick(imps, imps["ts"] >= cut), pick(convs, convs["ts"] >= cut))
    return base, events, out


def test_the_driver_sends_only_files_the_tables_parts_do_not_hold():
    """Manifest paths carry no protocol: on memory:// (an object store's
    case) the files the table holds are not sent again. A delta a dead
    refresh left outside the table's parts is sent as new files."""
    from dynamix_ray.events import append_delta, new_input_files, open_store
    from dynamix_ray.io import discover, fingerprint
    from dynamix_ray.schema import SOURCES
    from dynamix_ray.segments.pipeline import read_segments_meta
    from dynamix_ray.segments.stream import _new_files

    base, events, out = _table_on_memory()
    meta = read_segments_meta(out)
    store = open_store(meta["store"])
    held = store.part_files(meta["store_parts"])
    new = _new_files(events, held)
    assert {p.rsplit("/", 1)[-1] for f in new.values() for p in f} == {"b.parquet"}
    # a refresh that died after its delta: the store holds b, the table not
    ds = discover(events, list(SOURCES))
    store = append_delta(store, events, new_input_files(store, ds), fingerprint(ds))
    assert store.meta["input_fingerprint"] == fingerprint(ds)
    assert _new_files(events, store.part_files(meta["store_parts"])) == new
    assert _new_files(events, store.part_files(store.part_ids)) == {}


def test_an_updater_dead_after_its_checkpoint_answers_the_resend():
    """The updater body without Ray: one that checkpointed a batch and died
    before answering replays it, and the driver's resend gets its rows."""
    from dynamix_ray.segments.stream import SegmentUpdater

    base, events, out = _table_on_memory()
    ckpt = f"{base}/out/stream/updater-000.json"
    files = _files(events, "b")
    first = SegmentUpdater(out, [0, 1, 2], ckpt).process("b", files)
    assert first["changes"].num_rows > 0
    again = SegmentUpdater(out, [0, 1, 2], ckpt)  # the restart: replays "b"
    resent = again.process("b", files)
    assert resent["changes"].equals(first["changes"])
    assert again.state.applied == ["b"]  # once
