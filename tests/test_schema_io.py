"""Validation, rejects, timestamps of any unit, fsspec discovery, atomic commit."""

from __future__ import annotations

import math
import uuid
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamix_ray.config import SegmentConfig, format_duration, parse_duration_s
from dynamix_ray.io import atomic_output, discover, resolve, user_bucket
from dynamix_ray.schema import (
    REJECT_REASONS,
    SOURCES,
    TS_MAX_MS,
    TS_MIN_MS,
    SchemaError,
    ts_to_ms,
    validate,
)

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


# --- integers and timestamps beyond int64: counted rejects, never a wrap ---------

I64_MAX, I64_MIN, U64_MAX = 2**63 - 1, -(2**63), 2**64 - 1
_PER_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


def _exact_ms(raw: int, unit: str) -> int:
    """The plain reference: epoch ms of ``raw`` ticks of ``unit`` ("int" = epoch
    ms), floor-rounded, in Python ints (no overflow possible)."""
    mul, div = _PER_MS.get(unit, (1, 1))
    return raw * mul // div


def _raw_bounds(unit: str) -> tuple[int, int]:
    """Raw ticks [lo, hi) whose ms lie in [TS_MIN_MS, TS_MAX_MS)."""
    mul, div = _PER_MS.get(unit, (1, 1))
    return -(-TS_MIN_MS * div // mul), -(-TS_MAX_MS * div // mul)


def _reference_reason(uid, raw, unit, dwell, has_dwell) -> str | None:
    if uid is None:
        return "null_user_id"
    if raw is None:
        return "null_ts"
    if uid > I64_MAX:
        return "user_id_out_of_range"
    if not TS_MIN_MS <= _exact_ms(raw, unit) < TS_MAX_MS:
        return "ts_out_of_range"
    if has_dwell and (dwell is None or not math.isfinite(dwell)):
        return "dwell_not_finite"
    if has_dwell and dwell < 0:
        return "dwell_negative"
    return None


def _ts_array(raw: list, unit: str, ts_type: pa.DataType, tz=None) -> pa.Array:
    if unit == "int":
        return pa.array(raw, ts_type)
    return pa.array(raw, pa.int64()).view(pa.timestamp(unit, tz=tz))


def test_new_reason_keeps_the_order_of_the_others():
    assert REJECT_REASONS == (
        "null_user_id",
        "null_ts",
        "user_id_out_of_range",
        "ts_out_of_range",
        "dwell_not_finite",
        "dwell_negative",
    )


@pytest.mark.parametrize("dtype", [pa.uint64(), pa.uint32(), pa.int64()])
def test_user_ids_beyond_int64_are_counted_rejects(dtype):
    top = np.iinfo(dtype.to_pandas_dtype()).max
    ids = [i for i in (0, 1, 2**31, I64_MAX, 2**63, U64_MAX) if i <= top] + [None]
    t = pa.table({"user_id": pa.array(ids, dtype), "ts": [T0] * len(ids)})
    v = validate(t, SOURCES["conversions"], "u.parquet")  # used to raise ArrowInvalid
    fits = [i for i in ids if i is not None and i <= I64_MAX]
    assert v.valid.column("user_id").type == pa.int64()
    assert v.valid.column("user_id").to_pylist() == fits
    n_big = sum(i is not None and i > I64_MAX for i in ids)
    assert v.reject_counts() == {
        "null_user_id": 1,
        **({"user_id_out_of_range": n_big} if n_big else {}),
    }
    # rejects keep what fits: the id is null (no int64 value), the ts is kept
    assert v.rejects.column("user_id").to_pylist() == [None] * (n_big + 1)
    assert v.rejects.column("ts_ms").to_pylist() == [T0] * (n_big + 1)
    assert set(v.rejects.column("file").to_pylist()) == {"u.parquet"}
    assert v.valid.num_rows + v.rejects.num_rows == t.num_rows


@pytest.mark.parametrize("dtype", [pa.uint64(), pa.uint32(), pa.int64()])
def test_integer_ts_beyond_int64_is_out_of_range_not_an_error(dtype):
    top = np.iinfo(dtype.to_pandas_dtype()).max
    candidates = (T0, TS_MIN_MS, TS_MAX_MS - 1, TS_MAX_MS, 2**32 - 1, I64_MAX, 2**63)
    ts = [x for x in (*candidates, U64_MAX) if x <= top]
    t = pa.table({"user_id": list(range(len(ts))), "ts": pa.array(ts, dtype)})
    v = validate(t, SOURCES["conversions"], "t.parquet")
    inside = [x for x in ts if TS_MIN_MS <= x < TS_MAX_MS]
    outside = [x for x in ts if not TS_MIN_MS <= x < TS_MAX_MS]
    assert v.valid.column("ts_ms").to_pylist() == inside
    assert v.reject_counts() == ({"ts_out_of_range": len(outside)} if outside else {})
    assert v.rejects.column("ts_ms").to_pylist() == [
        x if x <= I64_MAX else None for x in outside
    ]
    assert None not in v.rejects.column("user_id").to_pylist()


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC"])
def test_timestamp_scaling_never_wraps(unit, tz):
    lo, hi = _raw_bounds(unit)
    mul = _PER_MS[unit][0]
    raw = [lo - 1, lo, hi - 1, hi, I64_MAX, I64_MIN, I64_MAX // mul + 1, -1, 0]
    raw = [r for r in raw if r <= I64_MAX]  # a timestamp's ticks are int64
    if unit == "s":
        raw.append(2305843010813693952)  # * 1000 wraps to 2020-09-13 in int64
    t = pa.table(
        {"user_id": list(range(len(raw))), "ts": _ts_array(raw, unit, None, tz)}
    )
    v = validate(t, SOURCES["conversions"], "s.parquet")
    exact = [_exact_ms(r, unit) for r in raw]
    assert v.valid.column("ts_ms").to_pylist() == [
        _exact_ms(lo, unit),
        _exact_ms(hi - 1, unit),
    ]
    assert v.valid.column("ts_ms").to_pylist()[0] == TS_MIN_MS
    out = [m for m in exact if not TS_MIN_MS <= m < TS_MAX_MS]
    assert v.reject_counts() == {"ts_out_of_range": len(out)}
    assert v.rejects.column("ts_ms").to_pylist() == [
        m if I64_MIN <= m <= I64_MAX else None for m in out
    ]
    got = ts_to_ms(t.column("ts"))
    assert got.tolist() == [m if I64_MIN <= m <= I64_MAX else I64_MIN for m in exact]


def test_seconds_whose_ms_overflow_are_rejected():
    t = pa.table(
        {
            "user_id": [1],
            "ts": pa.array([2305843010813693952], pa.int64()).cast(pa.timestamp("s")),
        }
    )
    v = validate(t, SOURCES["conversions"], "big.parquet")
    assert v.valid.num_rows == 0
    assert v.rejects.to_pylist() == [
        {
            "source": "conversions",
            "reason": "ts_out_of_range",
            "user_id": 1,
            "ts_ms": None,
            "dwell_ms": None,
            "file": "big.parquet",
        }
    ]


def test_integer_dwell_beyond_float_precision_is_accepted():
    t = pa.table(
        {
            "user_id": [1, 2],
            "ts": [T0, T0],
            "dwell_ms": pa.array([2**53 + 1, U64_MAX], pa.uint64()),
        }
    )
    v = validate(t, SOURCES["ad_impressions"], "d.parquet")  # used to raise
    assert v.valid.column("dwell_ms").to_pylist() == [float(2**53 + 1), float(U64_MAX)]


def test_a_column_that_cannot_be_read_names_file_and_column(monkeypatch):
    import dynamix_ray.schema as schema

    def broken(col):
        raise pa.ArrowInvalid("boom")

    monkeypatch.setattr(schema, "_int64_values", broken)
    t = pa.table({"user_id": [1], "ts": [T0]})
    with pytest.raises(SchemaError, match=r"x\.parquet: column 'user_id'.*boom"):
        validate(t, SOURCES["conversions"], "x.parquet")


def _ints(lo: int, hi: int, unit: str):
    r_lo, r_hi = _raw_bounds(unit)
    edges = [lo, hi, 0, -1, 1, I64_MAX, 2**63, r_lo - 1, r_lo, r_hi - 1, r_hi]
    edges += [I64_MAX // 1000, I64_MAX // 1000 + 1, -(I64_MAX // 1000) - 1]
    edges += [2305843010813693952]
    return st.one_of(
        st.none(),
        st.integers(lo, hi),
        st.integers(max(lo, r_lo - 3), min(hi, r_hi + 3)),
        st.sampled_from([e for e in edges if lo <= e <= hi]),
    )


@st.composite
def _event_tables(draw):
    unit = draw(st.sampled_from(["int", "s", "ms", "us", "ns"]))
    ts_type = draw(st.sampled_from([pa.int64(), pa.uint64()]))
    if unit != "int":
        ts_type = pa.int64()  # a timestamp's ticks are int64
    user_type = draw(st.sampled_from([pa.int64(), pa.uint64()]))
    has_dwell = draw(st.booleans())
    n = draw(st.integers(0, 30))

    def bounds(t):
        return (0, U64_MAX) if t == pa.uint64() else (I64_MIN, I64_MAX)

    uids = draw(st.lists(_ints(*bounds(user_type), "int"), min_size=n, max_size=n))
    raw = draw(st.lists(_ints(*bounds(ts_type), unit), min_size=n, max_size=n))
    dwell = draw(
        st.lists(st.one_of(st.none(), st.floats()), min_size=n, max_size=n)
        if has_dwell
        else st.just([None] * n)
    )
    cols = {
        "user_id": pa.array(uids, user_type),
        "ts": _ts_array(raw, unit, ts_type, draw(st.sampled_from([None, "UTC"]))),
    }
    if has_dwell:
        cols["dwell_ms"] = pa.array(dwell, pa.float64())
    source = SOURCES["ad_impressions" if has_dwell else "conversions"]
    return pa.table(cols), source, unit, uids, raw, dwell


@given(_event_tables())
def test_validate_never_raises_and_counts_every_row(case):
    table, source, unit, uids, raw, dwell = case
    v = validate(table, source, "h.parquet")
    assert v.valid.num_rows + v.rejects.num_rows == table.num_rows
    expect = [
        _reference_reason(u, r, unit, d, source.has_dwell)
        for u, r, d in zip(uids, raw, dwell, strict=True)
    ]
    good = [i for i, e in enumerate(expect) if e is None]
    bad = [i for i, e in enumerate(expect) if e is not None]
    assert v.valid.column("user_id").to_pylist() == [uids[i] for i in good]
    assert v.valid.column("ts_ms").to_pylist() == [
        _exact_ms(raw[i], unit) for i in good
    ]
    assert v.rejects.column("reason").to_pylist() == [expect[i] for i in bad]
    assert v.reject_counts() == dict(Counter(expect[i] for i in bad))

    def fit(x):
        return x if x is not None and I64_MIN <= x <= I64_MAX else None

    assert v.rejects.column("user_id").to_pylist() == [fit(uids[i]) for i in bad]
    assert v.rejects.column("ts_ms").to_pylist() == [
        fit(None if raw[i] is None else _exact_ms(raw[i], unit)) for i in bad
    ]
