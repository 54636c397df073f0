"""The Retriever's candidates table memory-mapped from one copy per node
(``candidates_job.open_shared_candidates``, on ``histories.open_node_cached``)
looks up exactly what the in-memory table does; the node cache is built once,
replaced by a new version, and never used half built."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.alure import candidates_job
from dynamix_ray.alure.candidates_job import (
    CANDIDATES_SCHEMA,
    open_shared_candidates,
    read_candidates,
)
from dynamix_ray.histories import NODE_CACHE_ENV
from dynamix_ray.io import (
    publish,
    published_version,
    resolve,
    write_json,
    write_parquet,
)

UNKNOWN = [10**15, -5, 0]  # never in a table (ids are 3 u + 1)


def _publish_candidates(
    out: str, seed: int, counts: list[int] | None = None
) -> np.ndarray:
    """A published candidates version of users with ``counts`` ads each (0:
    no rows; default: 40 users with 0..7), rows shuffled over 3 bucket files;
    returns every user's id."""
    rng = np.random.default_rng(seed)
    if counts is None:
        counts = [0, 1, 7, *rng.integers(0, 8, 37).tolist()]
    ids = np.arange(len(counts), dtype=np.int64) * 3 + 1
    uid = np.repeat(ids, counts)
    rank = np.concatenate([np.arange(1, c + 1) for c in [0, *counts]])
    rank = rank.astype(np.int32)
    score = np.round(1.0 / rank + rng.random(len(rank)) / 100, 2)  # ties too
    table = pa.table(
        {
            "user_id": uid,
            "ad_id": rng.integers(0, 50, len(uid)),
            "score": score,
            "rank": rank,
        },
        schema=CANDIDATES_SCHEMA,
    ).take(pa.array(rng.permutation(len(uid))))
    fs, root = resolve(out)
    with publish(fs, root, ["candidates"]) as v:
        for b, part in enumerate(np.array_split(np.arange(len(uid)), 3)):
            write_parquet(
                fs,
                f"{v.path('candidates')}/bucket={b:05d}/part-0.parquet",
                table.take(pa.array(part)),
            )
        meta = {"as_of_ms": 1_000 + seed, "rows": len(uid)}
        write_json(fs, f"{v.path('candidates')}/_meta.json", meta)
    return ids


def _assert_same_lookups(got, want, users) -> None:
    assert (got.version, got.published_ms) == (want.version, want.published_ms)
    assert (got.as_of_ms, got.meta, len(got)) == (want.as_of_ms, want.meta, len(want))
    for u in [*users.tolist(), *UNKNOWN]:
        for k in (1, 3, 10**9):  # capped and not
            (ga, gs), (wa, ws) = got.lookup(u, k), want.lookup(u, k)
            assert ga.dtype == wa.dtype and gs.dtype == ws.dtype
            assert ga.tolist() == wa.tolist() and gs.tolist() == ws.tolist(), (u, k)


def test_shared_candidates_look_up_like_the_table_and_map_one_copy(tmp_path):
    out, cache = str(tmp_path / "c"), str(tmp_path / "cache")
    users = _publish_candidates(out, 0)
    a = open_shared_candidates(out, cache)
    (home,) = os.listdir(cache)
    manifest = os.path.join(cache, home, a.version, "manifest.json")
    built = os.stat(manifest).st_mtime_ns
    b = open_shared_candidates(out, cache)  # a second replica maps a's files
    assert os.stat(manifest).st_mtime_ns == built
    assert sorted(os.listdir(os.path.join(cache, home))) == [".lock", a.version]
    assert isinstance(a.ad_id.base, np.memmap) and not a.ad_id.flags.writeable
    plain = read_candidates(out)
    assert len(a.lookup(int(users[0]), 10**9)[0]) == 0  # a user with no rows
    _assert_same_lookups(a, plain, users)
    _assert_same_lookups(b, plain, users)

    # a new version gets a new copy; the old one goes (its maps stay valid)
    users2 = _publish_candidates(out, 1)
    c = open_shared_candidates(out, cache)
    assert c.version != a.version
    assert sorted(os.listdir(os.path.join(cache, home))) == [".lock", c.version]
    _assert_same_lookups(c, read_candidates(out), users2)
    _assert_same_lookups(a, plain, users)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=12), st.integers(0, 2**16))
def test_shared_lookups_equal_the_table_on_random_tables(counts, seed):
    """Any table (none, one, many users; ties; empty users), built in this
    process through memory://."""
    out = f"memory://shared-cands-random/{seed}-{len(counts)}-{sum(counts)}"
    users = _publish_candidates(out, seed, counts)
    cache = tempfile.mkdtemp(prefix="shared-cands-")
    try:
        _assert_same_lookups(
            open_shared_candidates(out, cache), read_candidates(out), users
        )
    finally:
        shutil.rmtree(cache)


def test_a_half_built_node_copy_is_never_used(tmp_path):
    """A builder that died left its version's folder without a manifest and
    a ``.tmp-`` folder: the next opener builds afresh and removes both."""
    out, cache = str(tmp_path / "c"), str(tmp_path / "cache")
    users = _publish_candidates(out, 0)
    open_shared_candidates(out, cache)
    (home,) = os.listdir(cache)
    users = _publish_candidates(out, 2)
    version = str(published_version(out, "candidates")["version"])
    for name in (version, f"{version}.tmp-1-dead00"):
        os.makedirs(os.path.join(cache, home, name))
        np.save(os.path.join(cache, home, name, "ad_id.npy"), np.zeros(3, np.int64))
    got = open_shared_candidates(out, cache)
    assert sorted(os.listdir(os.path.join(cache, home))) == [".lock", version]
    _assert_same_lookups(got, read_candidates(out), users)


@pytest.mark.parametrize("fault", ["raises", "no manifest"])
def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch, fault):
    """memory:// is built in this process, where the build can be broken."""
    out, cache = f"memory://shared-cands-{fault.replace(' ', '-')}/c", tmp_path
    users = _publish_candidates(out, 0)
    write = candidates_job._write_csr

    def broken(table, folder):
        os.makedirs(folder)
        np.save(os.path.join(folder, "user_id.npy"), table.user_id)
        if fault == "raises":
            raise OSError("disk full")

    monkeypatch.setattr(candidates_job, "_write_csr", broken)
    with pytest.raises(OSError if fault == "raises" else RuntimeError):
        open_shared_candidates(out, str(cache))
    (home,) = os.listdir(cache)
    assert os.listdir(cache / home) == [".lock"]
    monkeypatch.setattr(candidates_job, "_write_csr", write)
    _assert_same_lookups(
        open_shared_candidates(out, str(cache)), read_candidates(out), users
    )


def test_retriever_answers_the_same_shared_or_in_memory(tmp_path, monkeypatch):
    from dynamix_ray.serve.app import Retriever

    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "cache"))
    out = str(tmp_path / "c")
    users = _publish_candidates(out, 0)
    spec = {"table": out, "cap": 3, "reload_interval_s": 3600.0}
    shared = Retriever({**spec, "shared_table": True})
    private = Retriever({**spec, "shared_table": False})
    assert isinstance(shared.watch.current.ad_id.base, np.memmap)
    assert not isinstance(private.watch.current.ad_id.base, np.memmap)
    assert os.listdir(tmp_path / "cache")
    for u in [*users.tolist(), *UNKNOWN]:
        for k in (1, 10):  # 10: capped at 3
            got = shared.candidates(u, k)
            assert got == private.candidates(u, k) and len(got["ads"]) <= 3
    for r in (shared, private):
        r._stop.set()
