"""The event store (``dynamix bucket``): every layout and filesystem gives the
same store; rejects are counted per piece and never overwrite each other; the
shuffle writes O(pieces + buckets) files; a failure mid-commit leaves the old
store whole."""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from dynamix_ray.config import GenerateConfig
from dynamix_ray.events import LAYOUT, open_store, run_bucket
from dynamix_ray.io import user_bucket
from dynamix_ray.synth import generate

SMALL = GenerateConfig(users=120, days=2, seed=5, chunk_users=40)  # 3 files a source


def _tables(store):
    """Every (source, bucket) table of a store, read through its filesystem."""
    out = {}
    for b in range(store.num_buckets):
        for s, t in store.read_bucket(b, dict.fromkeys(store.sources)).items():
            out[(s, b)] = t
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev") / "plain"
    generate(str(root), SMALL, progress=None)
    return str(root)


@pytest.fixture(scope="module")
def shuffled(ray_session, plain, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("store") / "s")
    # small pieces: several map tasks per source
    return run_bucket(plain, out, 3, progress=False, piece_rows=2000)


def test_store_holds_every_valid_row_sorted_by_user_and_time(shuffled, plain):
    with open(f"{plain}/_truth/truth.json") as fh:
        truth = json.load(fh)
    for (_, b), t in _tables(shuffled).items():
        uid, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
        assert (user_bucket(uid, 3) == b).all()
        key_ok = (uid[1:] > uid[:-1]) | ((uid[1:] == uid[:-1]) & (ts[1:] >= ts[:-1]))
        assert key_ok.all()
        assert t.schema.field("ts").type == pa.int64()
    m = shuffled.meta
    assert m["layout"] == LAYOUT and open_store(shuffled.url) is not None
    for src, rows in truth["rows"].items():
        planted = sum(v for k, v in truth["planted"].items() if k.startswith(f"{src}/"))
        assert m["sources"][src]["rows"] + sum(m["rejected"][src].values()) == rows
        assert sum(m["rejected"][src].values()) == planted
    # the shuffle: data + index per piece, then one file per bucket and source
    assert m["pieces"] > 4 and m["shuffle_files"] == 2 * m["pieces"]
    assert len(_tables(shuffled)) == 3 * len(shuffled.sources)
    rejects = pa.dataset.dataset(f"{shuffled.url}/rejects", format="parquet").to_table()
    assert rejects.num_rows == m["rejected_total"]


@pytest.mark.parametrize("layout", ["bucketed", "memory", "store-as-input"])
def test_every_layout_gives_the_same_store(
    ray_session, shuffled, plain, tmp_path, layout
):
    if layout == "bucketed":
        events = str(tmp_path / "bk")
        generate(events, GenerateConfig(**{**SMALL.__dict__, "bucketed": 3}), None)
        other = run_bucket(events, str(tmp_path / "out"), progress=False)
        assert other.meta["mode"] == "bucketed input"
    elif layout == "memory":
        other = run_bucket(
            plain, f"memory://st-{uuid.uuid4().hex[:8]}", 3, progress=False
        )
    else:  # the store is a docs/contract.md §1 dataset itself: re-bucketing it changes nothing
        other = run_bucket(shuffled.url, str(tmp_path / "again"), 3, progress=False)
        assert other.meta["rejected_total"] == 0
    mine, theirs = _tables(shuffled), _tables(other)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].equals(theirs[k]), k


def test_rejects_of_two_pieces_of_one_file_never_overwrite_each_other(
    ray_session, tmp_path
):
    """Two row groups of one file with the same leading bad rows: each piece
    writes its own rejects (named by the piece), all are counted."""
    root = tmp_path / "in"
    (root / "ad_impressions").mkdir(parents=True)
    (root / "conversions").mkdir()
    good = {"user_id": [1, 2], "ts": [1_767_571_200_000] * 2, "dwell_ms": [500.0] * 2}
    bad = {
        "user_id": [None, None],
        "ts": [1_767_571_200_000] * 2,
        "dwell_ms": [1.0] * 2,
    }
    rows = {k: bad[k] + good[k] for k in good}
    t = pa.table(
        rows,
        schema=pa.schema(
            [("user_id", pa.int64()), ("ts", pa.int64()), ("dwell_ms", pa.float64())]
        ),
    )
    with pq.ParquetWriter(str(root / "ad_impressions" / "a.parquet"), t.schema) as w:
        w.write_table(t)  # row group 0
        w.write_table(t)  # row group 1: the same rows again
    pq.write_table(
        pa.table({"user_id": [1], "ts": [1_767_571_200_000]}),
        str(root / "conversions" / "c.parquet"),
    )
    store = run_bucket(str(root), str(tmp_path / "s"), 2, progress=False, piece_rows=1)
    assert store.meta["rejected"]["ad_impressions"] == {"null_user_id": 4}
    rejects = pa.dataset.dataset(
        str(tmp_path / "s" / "rejects"), format="parquet"
    ).to_table()
    assert rejects.num_rows == 4
    assert set(rejects.column("file").to_pylist()) == {
        f"{root}/ad_impressions/a.parquet#row_groups=0-0",
        f"{root}/ad_impressions/a.parquet#row_groups=1-1",
    }


def test_unsigned_ids_beyond_int64_are_counted_rejects(ray_session, tmp_path):
    root = tmp_path / "in"
    for src in ("ad_impressions", "conversions"):
        (root / src).mkdir(parents=True)
    uid = pa.array([1, 2**63 + 5, 3], pa.uint64())
    ts = pa.array([1_767_571_200_000] * 3, pa.uint64())
    pq.write_table(
        pa.table({"user_id": uid, "ts": ts, "dwell_ms": [500.0] * 3}),
        str(root / "ad_impressions" / "a.parquet"),
    )
    pq.write_table(
        pa.table({"user_id": uid, "ts": ts}), str(root / "conversions" / "c.parquet")
    )
    store = run_bucket(str(root), str(tmp_path / "s"), 2, progress=False)
    assert store.meta["rejected"]["ad_impressions"] == {"user_id_out_of_range": 1}
    assert store.meta["sources"]["ad_impressions"]["rows"] == 2


class FailingMoveFS(LocalFileSystem):
    """A local filesystem whose ``mv`` fails after ``moves_left`` moves
    (the driver's commit; the store's data is written before it)."""

    protocol = ("failmv",)
    process_local = True  # tasks run in this process (see io.is_process_local)
    moves_left = 10**9

    def mv(self, path1, path2, **kw):  # noqa: ANN001, ANN003
        if FailingMoveFS.moves_left <= 0:
            raise OSError("injected: the move failed")
        FailingMoveFS.moves_left -= 1
        return super().mv(path1, path2, **kw)


fsspec.register_implementation("failmv", FailingMoveFS, clobber=True)


@pytest.mark.parametrize("moves", [0, 1, 2, 3, 5])
def test_a_commit_failing_mid_move_leaves_the_old_store_whole(plain, tmp_path, moves):
    out = f"failmv://{tmp_path}/store"
    FailingMoveFS.moves_left = 10**9
    old = run_bucket(plain, out, 2, progress=False)
    before = _tables(old)
    other = tmp_path / "other"
    generate(str(other), GenerateConfig(**{**SMALL.__dict__, "seed": 99}), None)
    FailingMoveFS.moves_left = moves
    try:
        with pytest.raises(OSError, match="injected"):
            run_bucket(str(other), out, 2, progress=False)
    finally:
        FailingMoveFS.moves_left = 10**9
    store = open_store(out)
    # either no store at all (the marker is removed first) or the old one whole:
    # never a marker beside a mix of old and new buckets
    if store is not None:
        assert store.meta["input_fingerprint"] == old.meta["input_fingerprint"]
        assert _tables(store).keys() == before.keys()
        for k, t in _tables(store).items():
            assert t.equals(before[k])
    # and a clean re-run commits
    again = run_bucket(str(other), out, 2, progress=False)
    assert open_store(out).meta["input_fingerprint"] == again.meta["input_fingerprint"]


def test_a_lost_bucket_file_is_an_error_not_an_empty_bucket(
    ray_session, plain, tmp_path
):
    """The store lists its non-empty buckets: a reader never mistakes a
    missing file (a wrong path, a lost object) for a bucket without rows."""
    store = run_bucket(plain, str(tmp_path / "s"), 2, progress=False)
    path = store.bucket_path("ad_impressions", 1)
    import os

    os.remove(path)
    with pytest.raises(FileNotFoundError, match="bucket 1 of 'ad_impressions'"):
        store.read_bucket(1, {"ad_impressions": ["user_id"]})
    assert open_store(str(tmp_path / "s")).url == str(tmp_path / "s")  # absolute


def test_missing_ad_impressions_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ad_impressions"):
        run_bucket(str(tmp_path / "nothing"), str(tmp_path / "s"), progress=False)


def test_bucket_cli(ray_session, plain, tmp_path, capsys):
    from dynamix_ray.cli import main

    assert (
        main(
            [
                "bucket",
                plain,
                str(tmp_path / "s"),
                "--num-buckets",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 buckets" in out and "rejected" in out
    assert np.isfinite(open_store(str(tmp_path / "s")).meta["wall_s"])
