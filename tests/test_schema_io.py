"""Validation, rejects, timestamps of any unit, fsspec discovery, atomic commit."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamix_ray.config import SegmentConfig, format_duration, parse_duration_s
from dynamix_ray.io import atomic_output, discover, resolve, user_bucket
from dynamix_ray.schema import SOURCES, SchemaError, ts_to_ms, validate

T0 = 1_767_571_200_123  # ms


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris"])
def test_timestamps_of_any_unit_and_zone_become_epoch_ms(unit, tz):
    per_ms = {"ms": 1, "us": 1000, "ns": 1_000_000}
    if unit == "s":
        ints, expect = [T0 // 1000, None], [(T0 // 1000) * 1000]
    else:
        ints, expect = [T0 * per_ms[unit] + per_ms[unit] - 1, None], [T0]  # floor
    got = ts_to_ms(pa.array(ints, pa.int64()).cast(pa.timestamp(unit, tz=tz)))
    assert got[0] == expect[0]
    assert got[1] == np.iinfo(np.int64).min  # null marker, rejected as null_ts


def test_int_ms_and_timestamp_validate_identically():
    ts = pa.array([T0, T0 + 5], pa.int64())
    base = {"user_id": pa.array([1, 2], pa.int64()), "dwell_ms": pa.array([1.0, 2])}
    a = validate(pa.table({**base, "ts": ts}), SOURCES["ad_impressions"])
    b = validate(
        pa.table({**base, "ts": ts.cast(pa.timestamp("ms"))}), SOURCES["ad_impressions"]
    )
    assert a.valid.equals(b.valid)


def test_every_bad_row_is_rejected_with_its_reason():
    t = pa.table(
        {
            "user_id": pa.array([1, None, 3, 4, 5, 6, 7], pa.int64()),
            "ts": pa.array([T0, T0, None, 10, T0, T0, T0], pa.int64()),
            "dwell_ms": pa.array([1.0, 1.0, 1.0, 1.0, float("nan"), -3.0, None]),
            "ad_id": pa.array(range(7), pa.int64()),
        }
    )
    v = validate(t, SOURCES["ad_impressions"], "f.parquet")
    assert v.valid.column("user_id").to_pylist() == [1]
    assert v.rejects.column("reason").to_pylist() == [
        "null_user_id",
        "null_ts",
        "ts_out_of_range",
        "dwell_not_finite",
        "dwell_negative",
        "dwell_not_finite",
    ]
    assert set(v.rejects.column("file").to_pylist()) == {"f.parquet"}
    assert v.valid.num_rows + v.rejects.num_rows == t.num_rows


def test_ts_range_bounds():
    lo, hi = 946_684_800_000, 4_102_444_800_000
    t = pa.table(
        {"user_id": pa.array([1, 1, 1, 1]), "ts": pa.array([lo - 1, lo, hi - 1, hi])}
    )
    v = validate(t, SOURCES["conversions"])
    assert v.valid.column("ts_ms").to_pylist() == [lo, hi - 1]
    assert v.reject_counts() == {"ts_out_of_range": 2}


def test_integer_dwell_is_accepted():
    t = pa.table({"user_id": [1], "ts": [T0], "dwell_ms": pa.array([300], pa.int32())})
    v = validate(t, SOURCES["ad_impressions"])
    assert v.valid.column("dwell_ms").type == pa.float64()


def _memory_root() -> str:
    return f"memory://schema-{uuid.uuid4().hex[:8]}"


def test_missing_required_column_names_file_and_column():
    root = _memory_root()
    fs, path = resolve(root)
    good = pa.table({"user_id": [1], "ts": [T0], "dwell_ms": [1.0]})
    bad = pa.table({"user_id": [1], "ts": [T0]})
    for name, table in (
        ("ad_impressions/a.parquet", good),
        ("ad_impressions/b.parquet", bad.drop(["ts"])),
        ("conversions/c.parquet", bad),
    ):
        fs.makedirs(f"{path}/{name.rsplit('/', 1)[0]}", exist_ok=True)
        with fs.open(f"{path}/{name}", "wb") as fh:
            pq.write_table(table, fh)
    with pytest.raises(SchemaError, match=r"b\.parquet.*'ts'"):
        discover(root, ["ad_impressions", "conversions"])


def test_missing_required_source_is_an_error():
    with pytest.raises(FileNotFoundError, match="conversions"):
        discover(
            _memory_root(), ["ad_impressions", "conversions"], required=["conversions"]
        )


def test_wrong_ts_type_is_an_error():
    root = _memory_root()
    fs, path = resolve(root)
    fs.makedirs(f"{path}/conversions", exist_ok=True)
    with fs.open(f"{path}/conversions/x.parquet", "wb") as fh:
        pq.write_table(pa.table({"user_id": [1], "ts": ["yesterday"]}), fh)
    with pytest.raises(SchemaError, match=r"x\.parquet.*'ts'.*string"):
        discover(root, ["conversions"])


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_atomic_output_commits_or_leaves_nothing(where, tmp_path):
    root = _memory_root() if where == "memory" else str(tmp_path / "out")
    fs, path = resolve(root)
    with atomic_output(fs, path, ["segments"]) as tmp:
        fs.pipe(f"{tmp}/segments/v1", b"1")
    assert fs.cat(f"{path}/segments/v1") == b"1"
    with pytest.raises(RuntimeError), atomic_output(fs, path, ["segments"]) as tmp:
        fs.pipe(f"{tmp}/segments/v2", b"2")
        raise RuntimeError("boom")
    # the old table is untouched and nothing temporary is left
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(path)) == ["v1"]


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50), st.integers(1, 64))
def test_user_bucket_is_stable_and_in_range(ids, n):
    a = np.array(ids, dtype=np.int64)
    b = user_bucket(a, n)
    assert ((b >= 0) & (b < n)).all()
    np.testing.assert_array_equal(b, user_bucket(a.copy(), n))


def test_user_bucket_spreads_users():
    counts = np.bincount(user_bucket(np.arange(100_000) * 7 + 1_000_000, 16))
    assert counts.min() > 0.9 * counts.mean()


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("6h", 21600),
        ("30m", 1800),
        ("300s", 300),
        ("1d", 86400),
        ("250ms", 0.25),
        ("90", 90),
    ],
)
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


def test_bad_duration_and_config_errors_are_actionable():
    with pytest.raises(ValueError, match="6 hours"):
        parse_duration_s("6 hours")
    with pytest.raises(ValueError, match="min_events"):
        SegmentConfig(min_events=1)
    assert format_duration(21600) == "6h"


def test_memory_filesystem_is_reported_process_local():
    from dynamix_ray.io import is_process_local

    assert is_process_local(fsspec.filesystem("memory"))
    assert not is_process_local(fsspec.filesystem("file"))


def test_atomic_output_removes_temp_folders_of_dead_runs(tmp_path):
    import os
    import time

    old, fresh = tmp_path / ".tmp-dead", tmp_path / ".tmp-running"
    old.mkdir()
    fresh.mkdir()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))
    fs, path = resolve(str(tmp_path))
    with atomic_output(fs, path, ["segments"]):
        pass
    assert not old.exists() and fresh.exists()
