"""Versioned tables (io.publish): a reader sees a whole version or the one
before, never a mix, whatever fails and whoever else publishes.

Fault injection on two filesystems: a local disk and an object-store-like
in-memory one (no rename, object by object). A step is any write, put, move
or delete; a publish is crashed at every one of its steps in turn.
"""

from __future__ import annotations

import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dynamix_ray.io import (
    POINTER,
    IncompleteTable,
    check_complete,
    collect_versions,
    current_version,
    publish,
    read_json,
    read_parquet_folder,
    write_json,
    write_parquet,
)
from dynamix_ray.serve.store import TableWatch


class Crash(Exception):
    """The injected failure."""


class _Faults:
    """Counts mutating steps; crashes at step ``crash_at``; sleeps
    ``delay_s`` before each (a slow store, for interleaving)."""

    steps = 0
    crash_at: int | None = None
    delay_s = 0.0
    lock = threading.Lock()

    def _step(self, what: str) -> None:
        with _Faults.lock:
            _Faults.steps += 1
            n = _Faults.steps
        if _Faults.delay_s:
            time.sleep(_Faults.delay_s)
        if _Faults.crash_at == n:
            raise Crash(f"injected at step {n}: {what}")

    def _open(self, path, mode="rb", *args, **kw):  # noqa: ANN001, ANN002, ANN003
        if any(c in mode for c in "wax"):
            self._step(f"write {path}")
        return super()._open(path, mode, *args, **kw)  # type: ignore[misc]

    def pipe_file(self, path, value, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        self._step(f"put {path}")
        return super().pipe_file(path, value, *args, **kw)  # type: ignore[misc]

    def mv(self, path1, path2, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        self._step(f"move {path1}")
        return super().mv(path1, path2, *args, **kw)  # type: ignore[misc]

    def rm(self, path, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        self._step(f"delete {path}")
        return super().rm(path, *args, **kw)  # type: ignore[misc]


class FaultyLocalFS(_Faults, LocalFileSystem):
    protocol = ("faultyfile",)
    process_local = True


class FaultyObjectFS(_Faults, MemoryFileSystem):
    """In memory like an object store: its own objects, no atomic rename
    (a move is a copy, object by object, then a delete)."""

    protocol = ("faultyobj",)
    process_local = True
    store: dict = {}
    pseudo_dirs = [""]

    def mv(self, path1, path2, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        for src in self.find(path1) or [path1]:
            self._step(f"copy {src}")
            self.copy(src, path2 + src[len(path1) :])
        self.rm(path1, recursive=True)


fsspec.register_implementation("faultyfile", FaultyLocalFS, clobber=True)
fsspec.register_implementation("faultyobj", FaultyObjectFS, clobber=True)


@pytest.fixture(params=["disk", "object-store"])
def where(request, tmp_path):
    _Faults.steps, _Faults.crash_at, _Faults.delay_s = 0, None, 0.0
    if request.param == "disk":
        fs, root = FaultyLocalFS(), str(tmp_path / "out")
    else:
        FaultyObjectFS.store.clear()
        FaultyObjectFS.pseudo_dirs[:] = [""]
        fs, root = FaultyObjectFS(), f"/t{time.time_ns()}"
    yield fs, root
    _Faults.steps, _Faults.crash_at, _Faults.delay_s = 0, None, 0.0


def _write(fs, root: str, tag: int, parts=("table", "side"), files: int = 3) -> str:
    """A version of each part: ``files`` Parquet files whose every row is
    ``tag``, and a ``_meta.json`` naming it."""
    with publish(fs, root, list(parts)) as v:
        for part in parts:
            for i in range(files):
                t = pa.table({"tag": np.full(10 + i, tag, np.int64)})
                write_parquet(fs, f"{v.path(part)}/bucket={i:05d}/part-0.parquet", t)
            write_json(fs, f"{v.path(part)}/_meta.json", {"tag": tag})
    return v.version


def _read(fs, root: str, part: str = "table") -> int | None:
    """The tag of the published version, after checking it is whole and
    every row and its meta agree; ``None`` while nothing is published."""
    ptr = current_version(fs, root, part)
    if ptr is None:
        return None
    folder = check_complete(fs, root, part, ptr)
    tags = set(read_parquet_folder(fs, folder, "none").column("tag").to_pylist())
    meta = read_json(fs, f"{folder}/_meta.json")
    assert len(tags) == 1 and tags == {meta["tag"]}, (tags, meta)
    return int(meta["tag"])


def test_publish_then_read(where):
    fs, root = where
    assert _read(fs, root) is None
    v1 = _write(fs, root, 1)
    assert _read(fs, root) == 1 and _read(fs, root, "side") == 1
    v2 = _write(fs, root, 2)
    assert v1 != v2 and _read(fs, root) == 2
    assert current_version(fs, root, "table")["rows"] == 10 + 11 + 12


def test_a_crash_at_any_step_leaves_the_old_version_or_the_new_one_whole(where):
    fs, root = where
    _write(fs, root, 1)
    _Faults.steps = 0
    _write(fs, root, 2)
    n_steps = _Faults.steps  # a clean publish, start to end
    assert n_steps > 8
    seen = set()
    for k in range(1, n_steps + 1):
        _Faults.steps, _Faults.crash_at = 0, k
        try:
            _write(fs, root, 100 + k)
        except Crash:
            pass
        finally:
            _Faults.crash_at = None
        got = _read(fs, root)
        # whole, and either the one before or this one (never a mix, never none)
        assert got is not None
        seen.add("new" if got == 100 + k else "old")
        if got != 100 + k:  # a crash before the pointer: the new folder is gone
            live = current_version(fs, root, "table")["version"]
            assert all(
                p.rsplit("/", 1)[-1] in (live, POINTER)
                or p.rsplit("/", 1)[-1] < live  # an older version, not this one
                for p in fs.ls(f"{root}/table", detail=False)
            )
    assert seen == {"old", "new"}  # crashes before and after the pointer's put


def test_a_partial_version_is_refused_not_read(where):
    fs, root = where
    _write(fs, root, 1)
    ptr = current_version(fs, root, "table")
    victim = next(
        p for p in fs.find(f"{root}/table/{ptr['version']}") if p.endswith(".parquet")
    )
    fs.rm(victim)  # what a reader of a half-copied folder would see
    with pytest.raises(IncompleteTable, match="pointer recorded"):
        _read(fs, root)


def test_two_publishers_at_once_and_a_reader_never_see_a_mix(where):
    fs, root = where
    _write(fs, root, 0)
    _Faults.delay_s = 0.002  # every step slow: the writers interleave
    errors: list[BaseException] = []
    reads: list[int | None] = []
    done = threading.Event()

    def writer(tag: int) -> None:
        try:
            _write(fs, root, tag)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        while not done.is_set():
            try:
                reads.append(_read(fs, root))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in (1, 2)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    r.join()
    _Faults.delay_s = 0.0
    assert not errors, errors
    assert set(reads) <= {0, 1, 2} and reads
    final = _read(fs, root)
    assert final in (1, 2)
    # both versions were written whole into folders of their own
    versions = [
        p.rsplit("/", 1)[-1]
        for p in fs.ls(f"{root}/table", detail=False)
        if not p.endswith(POINTER)
    ]
    assert len(versions) == 3 and len(set(versions)) == 3


def test_old_versions_are_collected_after_the_grace_period(where):
    """Grace counts from when a version was superseded, not from its id's
    time; a folder never published waits a day; the current one stays."""
    fs, root = where
    tags = [_write(fs, root, i) for i in range(4)]

    def folders() -> list[str]:
        return sorted(
            p.rsplit("/", 1)[-1]
            for p in fs.ls(f"{root}/table", detail=False)
            if not p.endswith(POINTER)
        )

    assert folders() == sorted(tags)  # all just superseded: none collected
    # a folder some publisher left unpublished, from long ago
    stale = f"v{int((time.time() - 2 * 86400) * 1000):013d}-deadbeef00"
    fs.makedirs(f"{root}/table/{stale}", exist_ok=True)
    write_json(fs, f"{root}/table/{stale}/_meta.json", {"tag": -1})
    assert collect_versions(fs, root, "table", grace_s=60, now_s=time.time() + 10) == [
        f"{root}/table/{stale}"
    ]
    assert folders() == sorted(tags)  # superseded 10 s ago < 60 s: kept
    removed = collect_versions(fs, root, "table", grace_s=60, now_s=time.time() + 61)
    assert len(removed) == 3 and folders() == [tags[-1]]
    assert _read(fs, root) == 3
    history = current_version(fs, root, "table")["history"]
    assert [h["version"] for h in history] == tags[:3]


# ------------------------------------------------------------ the serving side


class _Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def _watch(reads, clock, **kw) -> TableWatch:
    it = iter(reads)

    def read():
        got = next(it)
        if isinstance(got, Exception):
            raise got
        return got

    return TableWatch(
        read=read,
        version_of=lambda t: t[0],
        published_ms_of=lambda t: t[1],
        retry_s=10,
        clock=clock,
        **kw,
    )


def test_table_watch_keeps_the_good_table_and_backs_off_a_failed_version():
    clock = _Clock()
    w = _watch(
        [("a", 990_000), IncompleteTable("b half copied"), ("b", 1_000_000)],
        clock,
        max_failures=2,
    )
    assert w.health()[0] is False  # nothing loaded
    assert w.poll("a") and w.current[0] == "a"
    assert w.health() == (True, w.health()[1]) and w.health()[1]["age_s"] == 10.0
    assert not w.poll("b")  # fails: the old table stays
    assert w.current[0] == "a" and w.failures == 1
    assert not w.poll("b")  # backing off: not read again yet
    assert w.failures == 1
    w.note_failure(OSError("/secret/path unreachable"), None)
    healthy, body = w.health()
    assert not healthy and "2 reloads failed" in body["reason"]
    assert "/secret" not in str(body) and body["last_error_type"] == "OSError"
    clock.t += 10.5  # the backoff passed
    assert w.poll("b") and w.current[0] == "b" and w.health()[0]


def test_table_watch_is_unhealthy_when_the_table_is_too_old():
    clock = _Clock()
    w = _watch([("a", 900_000)], clock, max_age_s=60)
    w.poll("a")
    healthy, body = w.health()
    assert not healthy and "100 s old" in body["reason"] and body["version"] == "a"
