"""Incremental refresh (``dynamix segment --incremental``; docs/data-path.md,
"Incremental refresh"): folding new event files into a published table gives
what a full run on all the files gives, whatever the order they came in."""

from __future__ import annotations

import itertools
import json
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_segment_pipeline import assert_tables_equal

from dynamix_ray.config import SegmentConfig
from dynamix_ray.events import open_store, run_bucket
from dynamix_ray.io import resolve, version_folder
from dynamix_ray.segments.pipeline import (
    ACTIVE_COUNTS,
    BUCKET_COUNTS,
    read_segments,
    read_segments_meta,
    run_segment,
)
from dynamix_ray.segments.refresh import run_refresh, touched_groups
from dynamix_ray.segments.stats import STAT_COLUMNS, near_mask

T0 = 1_767_571_200_000  # 2026-01-05 00:00 UTC
#: Short windows beside the horizon and buffer: a conversion reaches back into
#: the window before its own, and the data spans several window boundaries.
CFG = SegmentConfig(
    window_s=600, buffer_s=60, horizon_s=300, epsilon=0.2, num_buckets=3
)
#: every additive count of the table (the traffic counts included)
_COUNTED = BUCKET_COUNTS + ACTIVE_COUNTS


def _write(root: str, name: str, imps: dict, convs: dict) -> None:
    fs, path = resolve(root)
    ts = pa.timestamp("ms", tz="UTC")
    for src, cols in (("ad_impressions", imps), ("conversions", convs)):
        if len(cols["user_id"]):
            table = pa.table(
                {
                    k: pa.array(v, ts) if k == "ts" else pa.array(v)
                    for k, v in cols.items()
                }
            )
            fs.makedirs(f"{path}/{src}", exist_ok=True)
            with fs.open(f"{path}/{src}/{name}.parquet", "wb") as fh:
                pq.write_table(table, fh)


def _batches(imps: dict, convs: dict, imp_batch, conv_batch, k: int):
    """Split the events into ``k`` batches by the given batch ids."""
    for i in range(k):
        yield (
            {c: np.asarray(v)[np.asarray(imp_batch) == i] for c, v in imps.items()},
            {c: np.asarray(v)[np.asarray(conv_batch) == i] for c, v in convs.items()},
        )


def _stats(out: str) -> pa.Table:
    fs, root = resolve(out)
    meta = read_segments_meta(out)
    folder = version_folder(fs, root, "stats", meta["table_version"])
    tables = []
    for p in sorted(x for x in fs.find(folder) if x.endswith(".parquet")):
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    t = pa.concat_tables(tables).select(list(STAT_COLUMNS))
    return t.sort_by([("user_id", "ascending"), ("window_start_ms", "ascending")])


def assert_same_as_full(events: str, out: str, full: str) -> None:
    """``out`` (refreshed) holds the table, statistics and counts of a full run
    at ``full`` on the same events with ``out``'s epsilon."""
    got = read_segments_meta(out)
    cfg = SegmentConfig(**{**CFG.__dict__, "epsilon": got["epsilon"]})
    want = run_segment(events, full, cfg, progress=False).meta
    assert_tables_equal(read_segments(out), read_segments(full))
    a, b = _stats(out), _stats(full)
    assert a.num_rows == b.num_rows
    for c in STAT_COLUMNS:
        np.testing.assert_allclose(
            a.column(c).to_numpy(), b.column(c).to_numpy(), rtol=0, atol=1e-9, err_msg=c
        )
    for k in (*_COUNTED, "conversions", "rejected_total"):
        assert got["counts"][k] == want["counts"][k], k
    assert got["input_fingerprint"] == want["input_fingerprint"]


@st.composite
def _world(draw):
    """A few users' impressions and conversions over ~4 windows, each row in
    one of ``k`` batches (late rows in early windows, conversions before or
    after their impressions, some dwell times out of bounds)."""
    n_imp = draw(st.integers(1, 60))
    n_conv = draw(st.integers(1, 25))
    users = st.integers(0, 5)
    span = 4 * CFG.window_ms
    times = st.integers(0, span)
    imps = {
        "user_id": draw(st.lists(users, min_size=n_imp, max_size=n_imp)),
        "ts": [T0 + t for t in draw(st.lists(times, min_size=n_imp, max_size=n_imp))],
        "dwell_ms": draw(
            st.lists(
                st.sampled_from([100.0, 300.0, 800.0, 2_500.0, 9_000.0, 700_000.0]),
                min_size=n_imp,
                max_size=n_imp,
            )
        ),
    }
    convs = {
        "user_id": draw(st.lists(users, min_size=n_conv, max_size=n_conv)),
        "ts": [T0 + t for t in draw(st.lists(times, min_size=n_conv, max_size=n_conv))],
    }
    k = draw(st.integers(1, 4))
    batch = st.integers(0, k - 1)
    imp_batch = draw(st.lists(batch, min_size=n_imp, max_size=n_imp))
    imp_batch[0] = 0  # the first run needs an impression
    conv_batch = draw(st.lists(batch, min_size=n_conv, max_size=n_conv))
    conv_batch[0] = 0  # and a conversion (docs/contract.md §1)
    return imps, convs, imp_batch, conv_batch, k


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_world())
def test_refreshes_in_any_batches_equal_a_full_run(world):
    imps, convs, imp_batch, conv_batch, k = world
    base = f"memory://refresh-{uuid.uuid4().hex[:8]}"
    events, out = f"{base}/events", f"{base}/out"
    for i, (bi, bc) in enumerate(_batches(imps, convs, imp_batch, conv_batch, k)):
        _write(events, f"batch-{i}", bi, bc)
        result = run_refresh(events, out, CFG, progress=False)
        if i:
            assert "refresh" in result.meta
    assert_same_as_full(events, out, f"{base}/full")
    MemoryFileSystem().rm(base.removeprefix("memory://"), recursive=True)


def test_touched_groups_are_those_a_new_event_can_change():
    """Against the near rule itself: an old impression whose near/far label
    a new conversion flips lies in a touched group."""
    rng = np.random.default_rng(0)
    n = 400
    u = rng.integers(0, 4, n)
    t = T0 + rng.integers(0, 4 * CFG.window_ms, n)
    cu, ct = rng.integers(0, 4, 30), T0 + rng.integers(0, 4 * CFG.window_ms, 30)
    old, new = slice(0, 20), slice(20, 30)
    code = u.astype(np.int64)
    b, h = CFG.buffer_s * 1000, CFG.horizon_s * 1000
    before = near_mask(code, t, cu[old], ct[old], b, h)
    after = near_mask(code, t, cu, ct, b, h)
    flipped = before != after
    keys = touched_groups(
        np.zeros(0, np.int64), np.zeros(0, np.int64), cu[new], ct[new], CFG, 0
    )
    start = (t // CFG.window_ms) * CFG.window_ms
    hit = {(int(a), int(s)) for a, s in zip(u[flipped], start[flipped], strict=True)}
    assert flipped.any() and hit <= set(keys.tolist())
    # a new impression touches its own window only
    none = np.zeros(0, np.int64)
    one = touched_groups(u[:5], t[:5], none, none, CFG, 0)
    want = {(int(a), int(s)) for a, s in zip(u[:5], start[:5], strict=True)}
    assert set(one.tolist()) == want


def _split_world(root: str) -> tuple[dict, dict]:
    rng = np.random.default_rng(3)
    n, m = 3_000, 300
    imps = {
        "user_id": rng.integers(0, 80, n),
        "ts": T0 + np.sort(rng.integers(0, 12 * CFG.window_ms, n)),
        "dwell_ms": np.exp(rng.normal(7.0, 1.0, n)),
    }
    convs = {
        "user_id": rng.integers(0, 80, m),
        "ts": T0 + rng.integers(0, 12 * CFG.window_ms, m),
    }
    return imps, convs


def test_nothing_new_keeps_the_published_version(tmp_path):
    base = f"memory://refresh-{uuid.uuid4().hex[:8]}"
    imps, convs = _split_world(base)
    _write(f"{base}/events", "a", imps, convs)
    run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)  # a full run
    before = read_segments_meta(f"{base}/out")["table_version"]
    again = run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)
    assert again.meta["refresh"]["up_to_date"]
    assert "up to date" in again.summary()
    assert read_segments_meta(f"{base}/out")["table_version"] == before


def test_a_calibrated_table_keeps_its_epsilon_and_says_so():
    base = f"memory://refresh-{uuid.uuid4().hex[:8]}"
    imps, convs = _split_world(base)
    early = imps["ts"] < T0 + 9 * CFG.window_ms
    cfg = SegmentConfig(**{**CFG.__dict__, "epsilon": None})
    pick = lambda d, m: {c: v[m] for c, v in d.items()}  # noqa: E731
    _write(f"{base}/events", "early", pick(imps, early), convs)
    first = run_segment(f"{base}/events", f"{base}/out", cfg, progress=False)
    _write(f"{base}/events", "late", pick(imps, ~early), pick(convs, convs["ts"] < 0))
    refreshed = run_refresh(f"{base}/events", f"{base}/out", cfg, progress=False)
    assert refreshed.meta["epsilon"] == first.meta["epsilon"]
    assert refreshed.meta["epsilon_source"].startswith("kept from version")
    r = refreshed.meta["refresh"]
    assert r["new_files"] == 1 and r["parts_folded"] == [1]
    # only the late windows were recomputed, in the buckets their users hash to
    assert 0 < r["touched_groups"] < refreshed.meta["counts"]["rows"]
    assert "store part(s) 1 folded" in refreshed.summary()
    assert_same_as_full(f"{base}/events", f"{base}/out", f"{base}/full")


def test_a_changed_file_or_other_settings_are_refused():
    base = f"memory://refresh-{uuid.uuid4().hex[:8]}"
    imps, convs = _split_world(base)
    _write(f"{base}/events", "a", imps, convs)
    run_segment(f"{base}/events", f"{base}/out", CFG, progress=False)
    other = SegmentConfig(**{**CFG.__dict__, "horizon_s": 600})
    with pytest.raises(ValueError, match="horizon_s"):
        run_refresh(f"{base}/events", f"{base}/out", other, progress=False)
    with pytest.raises(ValueError, match="epsilon"):
        run_refresh(
            f"{base}/events",
            f"{base}/out",
            SegmentConfig(**{**CFG.__dict__, "epsilon": 0.5}),
            progress=False,
        )
    # a refresh keeps the table's epsilon: it cannot recalibrate to traffic
    no_eps = {**CFG.__dict__, "epsilon": None, "active_traffic": 0.5}
    with pytest.raises(ValueError, match="active_traffic"):
        run_refresh(
            f"{base}/events", f"{base}/out", SegmentConfig(**no_eps), progress=False
        )
    # a table from before the traffic counts: a clear error, not a KeyError
    fs, root = resolve(f"{base}/out")
    meta_path = f"{version_folder(fs, root, 'segments')}/_meta.json"
    meta = json.loads(fs.cat_file(meta_path))
    new_keys = ("eligible_impressions", "active_impressions")
    old = {k: v for k, v in meta["counts"].items() if k not in new_keys}
    fs.pipe_file(meta_path, json.dumps({**meta, "counts": old}).encode())
    with pytest.raises(ValueError, match="predates the counts"):
        run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)
    fs.pipe_file(meta_path, json.dumps(meta).encode())
    pick = {c: v[:100] for c, v in imps.items()}
    _write(f"{base}/events", "a", pick, {c: v[:10] for c, v in convs.items()})
    with pytest.raises(ValueError, match="append-only"):
        run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)
    store = open_store(f"{base}/out/events")
    with pytest.raises(ValueError, match="is an event store"):
        run_refresh(store.url, f"{base}/out", CFG, progress=False)
    # a store rebuilt since the table was made: its parts are not the table's
    _write(f"{base}/events", "a", imps, convs)  # the file as it was
    run_bucket(f"{base}/events", f"{base}/out/events", 3, progress=False)
    _write(f"{base}/events", "b", pick, {c: v[:10] for c, v in convs.items()})
    with pytest.raises(ValueError, match="rebuilt"):
        run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)


class CrashingFS(MemoryFileSystem):
    """In memory; the ``crash_at``-th write (a file opened for writing or a
    put) raises, as a node dying mid-refresh would."""

    protocol = ("crashmem",)
    process_local = True
    writes = 0
    crash_at: int | None = None

    def _step(self) -> None:
        CrashingFS.writes += 1
        if CrashingFS.crash_at is not None and CrashingFS.writes >= CrashingFS.crash_at:
            raise OSError("injected: the refresh died here")

    def _open(self, path, mode="rb", *args, **kw):  # noqa: ANN001, ANN002, ANN003
        if "w" in mode or "a" in mode:
            self._step()
        return super()._open(path, mode, *args, **kw)

    def pipe_file(self, path, value, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        self._step()
        return super().pipe_file(path, value, *args, **kw)


fsspec.register_implementation("crashmem", CrashingFS, clobber=True)


def test_a_refresh_that_dies_anywhere_is_finished_by_the_next():
    """The store's delta is committed before the table: a crash at any write
    leaves a whole table published (the old one, or the new one when only the
    clean-up after its pointer failed), and the next refresh folds in what the
    dead one added, once (no event lost or counted twice)."""
    imps, convs = _split_world("")
    late = imps["ts"] >= T0 + 8 * CFG.window_ms
    late_c = convs["ts"] >= T0 + 7 * CFG.window_ms
    pick = lambda d, m: {c: v[m] for c, v in d.items()}  # noqa: E731
    # count the writes of one whole refresh, then crash at each of them
    for crash in itertools.count(1):
        base = f"crashmem://crash-{uuid.uuid4().hex[:8]}"
        CrashingFS.crash_at, CrashingFS.writes = None, 0
        _write(f"{base}/events", "early", pick(imps, ~late), pick(convs, ~late_c))
        run_segment(f"{base}/events", f"{base}/out", CFG, progress=False)
        before = read_segments_meta(f"{base}/out")["table_version"]
        _write(f"{base}/events", "late", pick(imps, late), pick(convs, late_c))
        CrashingFS.writes, CrashingFS.crash_at = 0, crash
        try:
            run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)
        except OSError as e:
            assert "injected" in str(e)
            CrashingFS.crash_at = None
            now = read_segments_meta(f"{base}/out")
            # the old table, or the whole new one (the pointer went up first)
            assert now["table_version"] == before or len(now["store_parts"]) == 2
            read_segments(f"{base}/out")  # complete, as its pointer says
            run_refresh(f"{base}/events", f"{base}/out", CFG, progress=False)
            assert_same_as_full(f"{base}/events", f"{base}/out", f"{base}/full")
            continue
        finally:
            CrashingFS.crash_at = None
        assert crash > 5  # the loop crashed at every write before this one
        break


def test_refresh_on_ray_and_disk_equals_a_full_run(ray_session, tmp_path):
    """The same on local disk with the tasks on Ray, through the CLI."""
    from dynamix_ray.cli import main as dynamix

    imps, convs = _split_world("")
    late = imps["ts"] >= T0 + 10 * CFG.window_ms
    pick = lambda d, m: {c: v[m] for c, v in d.items()}  # noqa: E731
    events, out = str(tmp_path / "events"), str(tmp_path / "out")
    _write(events, "early", pick(imps, ~late), convs)
    args = [
        "segment",
        events,
        out,
        "--window",
        "10m",
        "--buffer-s",
        "60s",
        "--horizon-s",
        "300s",
        "--epsilon",
        "0.2",
        "--num-buckets",
        "3",
        "--no-progress",
    ]
    assert dynamix(args) == 0
    _write(events, "late", pick(imps, late), pick(convs, convs["ts"] < 0))
    assert dynamix([*args, "--incremental"]) == 0
    meta = read_segments_meta(out)
    assert meta["refresh"]["parts_folded"] == [1]
    assert open_store(f"{out}/events").parts == (0, 1)
    assert_same_as_full(events, out, str(tmp_path / "full"))
    # one user's late events: the other buckets' files are copied on disk
    one = imps["user_id"] == imps["user_id"][0]
    _write(events, "one", pick(imps, one), pick(convs, convs["ts"] < 0))
    assert dynamix([*args, "--incremental"]) == 0
    r = read_segments_meta(out)["refresh"]
    assert r["touched_buckets"] == 1 and r["parts_folded"] == [2]
    assert_same_as_full(events, out, str(tmp_path / "full2"))


def test_a_store_with_a_delta_reads_like_one_built_at_once():
    """Every stage reads buckets through ``read_bucket``: with a delta part it
    answers what a store bucketed from all the files at once answers, in
    (user, ts) order, for any column subset."""
    from dynamix_ray.events import append_delta, new_input_files, run_bucket
    from dynamix_ray.io import discover, fingerprint
    from dynamix_ray.schema import SOURCES

    base = f"memory://delta-{uuid.uuid4().hex[:8]}"
    imps, convs = _split_world("")
    imps["ad_id"] = np.arange(len(imps["ts"])) % 7
    late = imps["ts"] >= T0 + 6 * CFG.window_ms
    pick = lambda d, m: {c: v[m] for c, v in d.items()}  # noqa: E731
    _write(f"{base}/events", "a", pick(imps, ~late), convs)
    store = run_bucket(f"{base}/events", f"{base}/store", 3, progress=False)
    _write(f"{base}/events", "b", pick(imps, late), pick(convs, convs["ts"] < 0))
    ds = discover(f"{base}/events", list(SOURCES))
    new = new_input_files(store, ds)
    assert [p.rsplit("/", 1)[-1] for p in new["ad_impressions"]] == ["b.parquet"]
    store = append_delta(store, f"{base}/events", new, fingerprint(ds), progress=False)
    whole = run_bucket(f"{base}/events", f"{base}/whole", 3, progress=False)
    assert store.rows("ad_impressions") == whole.rows("ad_impressions")
    assert store.meta["input_fingerprint"] == whole.meta["input_fingerprint"]
    assert new_input_files(store, ds) == {}
    for b in range(3):
        for cols in (None, ["ad_id"]):
            got = store.read_bucket(b, {"ad_impressions": cols})["ad_impressions"]
            want = whole.read_bucket(b, {"ad_impressions": cols})["ad_impressions"]
            assert got.column_names == want.column_names
            if cols is None:
                u = got.column("user_id").to_numpy()
                t = got.column("ts").to_numpy()
                assert (np.diff(u) >= 0).all()
                assert ((np.diff(u) > 0) | (np.diff(t) >= 0)).all()
            key = [(c, "ascending") for c in got.column_names]
            assert got.sort_by(key).equals(want.sort_by(key))
