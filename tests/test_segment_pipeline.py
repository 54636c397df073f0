"""``run_segment`` end to end on real Ray Data: every input layout and filesystem
gives the same table; rejects and counts match what was planted; failures
leave no complete-looking output."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest

from dynamix_ray.config import GenerateConfig, SegmentConfig
from dynamix_ray.io import resolve, version_folder
from dynamix_ray.segments.pipeline import (
    SEGMENT_SCHEMA,
    read_segments,
    read_segments_meta,
    run_segment,
)
from dynamix_ray.synth import generate, read_truth_users, segment_recovery

SMALL = GenerateConfig(users=300, days=3, seed=7)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("user_id", "ascending"), ("window_start", "ascending")])


def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    a, b = _sorted(a), _sorted(b)
    assert a.num_rows == b.num_rows
    for name in SEGMENT_SCHEMA.names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            xa = x.to_numpy(zero_copy_only=False)
            ya = y.to_numpy(zero_copy_only=False)
            np.testing.assert_allclose(xa, ya, rtol=0, atol=1e-9, err_msg=name)
        else:
            assert x.equals(y), name


@pytest.fixture(scope="module")
def plain_run(ray_session, tiny_events, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seg") / "plain")
    result = run_segment(tiny_events, out, SegmentConfig(num_buckets=4), progress=False)
    return result, read_segments(out)


def test_output_follows_the_contract(plain_run):
    result, table = plain_run
    assert table.schema.equals(SEGMENT_SCHEMA)
    width = pa.compute.subtract(
        table.column("window_end").cast(pa.int64()),
        table.column("window_start").cast(pa.int64()),
    )
    assert set(width.to_pylist()) == {6 * 3600 * 1000}
    assert (
        table.column("window_start").cast(pa.int64()).to_numpy() % (6 * 3600_000) == 0
    ).all()
    n = pa.compute.add(table.column("n_near"), table.column("n_far")).to_numpy()
    assert (n > 0).all()  # a row per window with kept impressions, no others
    meta = result.meta
    assert {"params", "epsilon", "counts", "input_fingerprint", "version"} <= set(meta)
    eligible = table.column("corr").is_valid().to_numpy(zero_copy_only=False)
    assert meta["counts"]["eligible"] == int(eligible.sum())
    seg = table.column("segment").to_numpy()
    assert meta["counts"]["active_rows"] == int(seg.sum())
    assert abs(meta["counts"]["active_share_eligible"] - 0.6667) < 0.01
    # segment = |corr| > epsilon, null corr passive
    corr = table.column("corr").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(
        seg.astype(bool), eligible & (np.abs(np.nan_to_num(corr)) > meta["epsilon"])
    )


def test_rejects_match_what_was_planted(plain_run, tiny_events):
    result, _ = plain_run
    fs, root = resolve(tiny_events)
    planted = json.loads(fs.cat(f"{root}/_truth/truth.json"))["planted"]
    expect: dict[str, int] = {}
    for key, count in planted.items():
        source, _, reason = key.partition("/")
        if source in ("ad_impressions", "conversions") and count:
            expect[reason] = expect.get(reason, 0) + count
    assert result.meta["counts"]["rejected"] == expect
    # the rejects are written once, by the event store this run bucketed
    rejects = pa.dataset.dataset(
        f"{result.out}/events/rejects", format="parquet"
    ).to_table()
    mine = rejects.filter(
        pa.compute.is_in(
            rejects.column("source"), pa.array(["ad_impressions", "conversions"])
        )
    )
    assert mine.num_rows == sum(expect.values())
    assert set(mine.column("reason").to_pylist()) == set(expect)
    # nothing dropped silently: valid + filtered + rejected = rows read
    truth_rows = json.loads(fs.cat(f"{root}/_truth/truth.json"))["rows"]
    c = result.meta["counts"]
    imp_rejected = sum(v for k, v in planted.items() if k.startswith("ad_impressions/"))
    assert c["impressions"] + imp_rejected == truth_rows["ad_impressions"]


@pytest.mark.parametrize("layout", ["bucketed", "timestamp", "memory"])
def test_every_layout_gives_the_same_table(layout, plain_run, tmp_path):
    _, expected = plain_run
    if layout == "memory":
        events = f"memory://events-{uuid.uuid4().hex[:8]}"
        out = f"memory://seg-{uuid.uuid4().hex[:8]}"
        cfg = SMALL
    else:
        events, out = str(tmp_path / "events"), str(tmp_path / "out")
        cfg = GenerateConfig(
            **{
                **SMALL.__dict__,
                **(
                    {"bucketed": 4}
                    if layout == "bucketed"
                    else {"ts_type": "timestamp"}
                ),
            }
        )
    generate(events, cfg, progress=None)
    result = run_segment(events, out, progress=False)
    if layout == "bucketed":
        assert result.meta["mode"] == "bucketed input"
    assert_tables_equal(read_segments(out), expected)


def test_calibrated_epsilon_equals_the_one_of_every_eligible_row(plain_run):
    """Epsilon comes from small questions to the buckets (segments/select.py),
    never from an array of every |corr|: it must still be exactly the one
    calibrate_epsilon gives on all of them."""
    from dynamix_ray.segments.epsilon import calibrate_epsilon

    result, table = plain_run
    corr = table.column("corr").to_numpy(zero_copy_only=False)
    want = calibrate_epsilon(np.abs(corr[~np.isnan(corr)]), 0.6667)
    assert result.meta["epsilon"] == want
    assert result.meta["epsilon_calibration"]["rounds"] >= 1
    # counts are sums of per-bucket counts: users never span buckets
    assert result.meta["counts"]["users"] == len(np.unique(table.column("user_id")))
    assert result.meta["counts"]["rows"] == table.num_rows


def _all_stats(out: str):
    import pyarrow.parquet as pq

    fs, root = resolve(out)
    folder = version_folder(fs, root, "stats")
    return pa.concat_tables(
        pq.read_table(f, filesystem=fs)
        for f in sorted(fs.glob(f"{folder}/*/*.parquet"))
    )


def test_active_traffic_calibrates_on_impressions_and_records_both_shares(
    ray_session, tiny_events, plain_run, tmp_path
):
    """--active-traffic: the share of ad impressions in active rows, counted
    over every valid impression (ineligible rows are passive), is the target;
    epsilon is exactly the plain reference's, and _meta.json holds the shares
    of eligible rows and of traffic for this run and for the row-calibrated
    one alike."""
    from dynamix_ray.segments.epsilon import calibrate_epsilon_traffic

    out = str(tmp_path / "traffic")
    result = run_segment(
        tiny_events,
        out,
        SegmentConfig(num_buckets=4, active_traffic=0.3),
        progress=False,
    )
    st = _all_stats(out)
    n_near, n_far = (st.column(c).to_numpy() for c in ("n_near", "n_far"))
    imps = n_near + n_far + st.column("n_filtered").to_numpy()
    ok = (n_near >= 2) & (n_far >= 2)
    a = np.abs(st.column("mean_near").to_numpy() - st.column("mean_far").to_numpy())
    want = calibrate_epsilon_traffic(a[ok], imps[ok], int(imps.sum()), 0.3)
    meta, c = result.meta, result.meta["counts"]
    # a target the eligible rows can meet: the search had to find a threshold
    assert 0 < meta["epsilon_calibration"]["eligible_target"] < 1
    assert 0 < c["active_impressions"] < c["eligible_impressions"]
    assert meta["epsilon"] == want
    assert meta["epsilon_source"] == "calibrated to active_traffic=0.3"
    assert c["impressions"] == imps.sum()
    assert c["eligible_impressions"] == imps[ok].sum()
    active = ok & (a > want)
    assert c["active_impressions"] == imps[active].sum()
    assert c["active_share_traffic"] == pytest.approx(imps[active].sum() / imps.sum())
    table = read_segments(out)
    assert c["active_rows"] == int(table.column("segment").to_numpy().sum())
    # the default run records its traffic share too
    plain = plain_run[0].meta["counts"]
    assert 0 < plain["active_share_traffic"] <= plain["eligible_share_traffic"] <= 1


def test_segments_and_statistics_are_written_per_bucket(plain_run):
    import pyarrow.parquet as pq

    from dynamix_ray.io import user_bucket
    from dynamix_ray.segments.pipeline import read_segment_bucket

    result, table = plain_run
    nb = result.meta["num_buckets"]
    assert nb >= 2
    total = 0
    version = read_segments_meta(result.out)["table_version"]
    fs, root = resolve(result.out)
    stats_folder = version_folder(fs, root, "stats")
    for b in range(nb):
        part = read_segment_bucket(result.out, b, version)
        total += part.num_rows
        assert (user_bucket(part.column("user_id").to_numpy(), nb) == b).all()
        stats = pq.read_table(f"{stats_folder}/bucket={b:05d}/part-0.parquet")
        assert {"n_near", "m2_far", "n_filtered"} <= set(stats.column_names)
    assert total == table.num_rows


def test_fixed_epsilon_and_parameters_are_recorded(ray_session, tiny_events, tmp_path):
    cfg = SegmentConfig(epsilon=0.5, window_s=3 * 3600, horizon_s=600, min_events=3)
    result = run_segment(tiny_events, str(tmp_path), cfg, progress=False)
    meta = read_segments_meta(str(tmp_path))
    assert meta["epsilon"] == 0.5 and meta["epsilon_source"] == "given"
    assert meta["params"]["window"] == "3h" and meta["params"]["min_events"] == 3
    table = read_segments(str(tmp_path))
    corr = table.column("corr").to_numpy(zero_copy_only=False)
    seg = table.column("segment").to_numpy().astype(bool)
    np.testing.assert_array_equal(seg, np.abs(np.nan_to_num(corr)) > 0.5)
    n_near = table.column("n_near").to_numpy()
    assert np.isnan(corr[n_near < 3]).all()
    assert result.meta["counts"]["rows"] == table.num_rows


def test_failed_run_leaves_previous_output_untouched(
    ray_session, tiny_events, tmp_path
):
    import shutil

    out = tmp_path / "out"
    run_segment(tiny_events, str(out), progress=False)
    before = read_segments(str(out))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_events, broken)
    (broken / "conversions" / "zz-corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as it fails
        run_segment(str(broken), str(out), progress=False)
    assert_tables_equal(read_segments(str(out)), before)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_failed_first_run_leaves_no_table(ray_session, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="ad_impressions"):
        run_segment(str(tmp_path / "nothing-here"), str(out), progress=False)
    assert not (out / "segments" / "_CURRENT.json").exists()


def test_planted_segments_are_recovered(ray_session, tmp_path):
    """On default-shaped data (2/3 active users, 1/6 switchers) the calibrated
    segmentation finds the planted active (user, window) rows."""
    events = str(tmp_path / "events")
    generate(events, GenerateConfig(users=1500, days=5, seed=3), progress=None)
    run_segment(events, str(tmp_path / "out"), progress=False)
    rec = segment_recovery(
        read_truth_users(events), read_segments(str(tmp_path / "out"))
    )
    print(f"recovery: {rec}")
    assert rec["eligible_rows"] > 3000
    assert rec["precision"] >= 0.75
    assert rec["recall"] >= 0.85
