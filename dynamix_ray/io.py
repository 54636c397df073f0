"""fsspec I/O: dataset discovery, Parquet read/write, user-id hash buckets and the
atomic commit of outputs.

Any fsspec URL works (``/path``, ``file://``, ``s3://``, ``gs://``, ``memory://``).
``memory://`` lives in one process only: Ray workers cannot see it, so pipelines
read and write it from the driver (:func:`is_process_local`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

__all__ = [
    "BUCKETING_FILE",
    "POINTER",
    "Dataset",
    "absolute_url",
    "atomic_output",
    "IncompleteTable",
    "check_complete",
    "copy_published",
    "collect_versions",
    "current_version",
    "publish",
    "published_version",
    "version_folder",
    "discover",
    "fingerprint",
    "group_by_bucket",
    "is_process_local",
    "pyarrow_fs",
    "read_bucketing",
    "read_json",
    "resolve",
    "splitmix64",
    "url_of",
    "user_bucket",
    "write_bucketing",
    "parquet_files",
    "put_atomically",
    "write_json",
    "write_json_atomically",
    "write_parquet",
]

BUCKETING_FILE = "_bucketing.json"
_HASH = "splitmix64"


def resolve(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url`` -> (filesystem, path without protocol)."""
    fs, path = url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` on ``fs`` as a URL another call of :func:`resolve` (a Ray task,
    a helper) maps back to the same filesystem: local paths stay plain."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    return str(fs.unstrip_protocol(path))


def absolute_url(url: str) -> str:
    """A local path made absolute (replicas and later runs work in other
    folders); URLs with a protocol stay as they are."""
    return url if "://" in url else os.path.abspath(url)


def relative_to(base: str, url: str) -> str:
    """``url`` as an output's JSON records it: relative to the local folder
    ``base`` when both are local paths, so that moving the tree that holds
    both keeps it valid (docs/contract.md §3); URLs with a protocol as given.
    :func:`located` is the inverse."""
    if "://" in url or "://" in base:
        return url
    return os.path.relpath(os.path.abspath(url), os.path.abspath(base))


def located(base: str, path: str) -> str:
    """Where a path that :func:`relative_to` recorded in ``base`` is now."""
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for filesystems that other processes (Ray workers) cannot see:
    ``memory://``, and any filesystem class that sets ``process_local = True``
    (the tests' fault-injecting ones)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "memory" in protocols or bool(getattr(fs, "process_local", False))


def pyarrow_fs(fs: fsspec.AbstractFileSystem) -> pa.fs.FileSystem:
    """A pyarrow filesystem over ``fs`` (for Ray Data readers and writers)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


#: splitmix64's increment and its two multipliers (uint64).
SPLITMIX64 = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of int64 ids, as uint64 (wrapping arithmetic).

    The one hash of the project: user buckets here, and the model's hashed
    embeddings (``model.embeddings.hash_ids`` is its torch form, with the same
    :data:`SPLITMIX64` constants, tested equal).
    """
    golden, mul1, mul2 = (np.uint64(c) for c in SPLITMIX64)
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).view(np.uint64) + golden
        z = (z ^ (z >> np.uint64(30))) * mul1
        z = (z ^ (z >> np.uint64(27))) * mul2
        return z ^ (z >> np.uint64(31))


def user_bucket(user_id: np.ndarray, num_buckets: int) -> np.ndarray:
    """Hash bucket of each user id: :func:`splitmix64`, then modulo.

    The generator (``--bucketed N``) and the event store both use this
    function, so pre-bucketed files need no shuffle.
    """
    return (splitmix64(user_id) % np.uint64(num_buckets)).astype(np.int64)


@dataclass(frozen=True)
class Dataset:
    """An EBF dataset root: its files per source, their row counts and bucketing."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    files: dict[str, list[str]]
    rows: dict[str, int]
    num_buckets: int | None

    def bucket_files(self, source: str) -> dict[int, list[str]]:
        """Files of ``source`` per bucket (bucketed datasets only)."""
        return group_by_bucket(self.files.get(source, []))


def group_by_bucket(paths: Iterable[str]) -> dict[int, list[str]]:
    """Paths with a ``bucket=K`` folder, grouped by K."""
    out: dict[int, list[str]] = {}
    for f in paths:
        part = next(p for p in f.split("/") if p.startswith("bucket="))
        out.setdefault(int(part.split("=", 1)[1]), []).append(f)
    return out


def parquet_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The data files below ``folder``, sorted (names starting with ``_`` or
    ``.`` are not data)."""
    if not fs.exists(folder):
        return []
    found = fs.find(folder)
    keep = []
    for f in found:
        rel = f[len(folder) :].lstrip("/")
        if any(p.startswith(("_", ".")) for p in rel.split("/")):
            continue
        if f.endswith(".parquet") or "." not in posixpath.basename(f):
            keep.append(f)
    return sorted(keep)


def discover(url: str, sources: Iterable[str], required: Iterable[str] = ()) -> Dataset:
    """Find the Parquet files of each source under ``url`` and check their columns.

    Raises:
        FileNotFoundError: a required source has no Parquet file.
        SchemaError: a file lacks a required column (the message names both).
    """
    from dynamix_ray.schema import SOURCES, check_columns

    url = absolute_url(url)  # tasks run elsewhere; the fingerprint names files
    fs, root = resolve(url)
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for name in sources:
        paths = parquet_files(fs, f"{root}/{name}")
        if not paths:
            if name in required:
                raise FileNotFoundError(
                    f"{url}: no Parquet files under '{name}/' (source '{name}' is "
                    "required)"
                )
            continue
        total = 0
        for p in paths:
            with fs.open(p, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                check_columns(meta.schema.to_arrow_schema(), SOURCES[name], p)
                total += meta.num_rows
        files[name], rows[name] = paths, total
    buckets = read_bucketing(fs, root)
    if buckets is not None:
        for name, paths in files.items():
            if any("bucket=" not in p for p in paths):
                raise ValueError(
                    f"{url}: {BUCKETING_FILE} says the data is bucketed but "
                    f"'{name}/' has files outside bucket=K/ folders"
                )
    return Dataset(url, fs, root, files, rows, buckets)


def write_bucketing(fs: fsspec.AbstractFileSystem, root: str, num_buckets: int) -> None:
    write_json(
        fs, f"{root}/{BUCKETING_FILE}", {"num_buckets": num_buckets, "hash": _HASH}
    )


def read_bucketing(fs: fsspec.AbstractFileSystem, root: str) -> int | None:
    path = f"{root}/{BUCKETING_FILE}"
    if not fs.exists(path):
        return None
    meta = read_json(fs, path)
    if meta.get("hash") != _HASH:
        raise ValueError(f"{path}: unknown bucket hash {meta.get('hash')!r}")
    return int(meta["num_buckets"])


def fingerprint(ds: Dataset) -> str:
    """sha256 over the input files' paths and sizes (changes when inputs change)."""
    h = hashlib.sha256()
    for name in sorted(ds.files):
        for p in ds.files[name]:
            h.update(f"{p}\0{ds.fs.size(p)}\n".encode())
    return h.hexdigest()[:16]


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    with fs.open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)


def write_json_atomically(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """:func:`write_json` in one step: a reader sees the old file or the new
    one, never a part (a rename on local disks, one put on object stores)."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    put_atomically(fs, path, data)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "r") as fh:
        return json.load(fh)


def read_parquet_folder(
    fs: fsspec.AbstractFileSystem, folder: str, missing: str
) -> pa.Table:
    """Every ``*.parquet`` below ``folder`` (sorted by path), concatenated.

    Raises:
        FileNotFoundError: ``missing`` when the folder holds no Parquet file.
    """
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(missing)
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def write_parquet(
    fs: fsspec.AbstractFileSystem,
    path: str,
    table: pa.Table,
    compression: str = "zstd",
    use_dictionary: bool = True,
) -> None:
    """``table`` to ``path`` on ``fs`` (folders made as needed)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(
            table, fh, compression=compression, use_dictionary=use_dictionary
        )


class atomic_output:  # noqa: N801 - used as a context manager, reads like a function
    """Write under a hidden temporary folder, then move each named part into place.

    ``with atomic_output(fs, out, ["segments", "rejects"]) as tmp:`` writes go to
    ``tmp/segments`` etc.; on success every part replaces ``out/<part>`` (the old
    one is removed only after the new one is in place); on failure the temporary
    folder is deleted and ``out/<part>`` is untouched, so a failed run never
    leaves a table that looks complete. ``files`` (written by the caller as
    ``tmp/<file>``) are marker files at ``out``'s top: the old ones are removed
    before any part moves and the new ones placed after all parts, so a reader
    that checks the marker (an event store's ``_bucketing.json``) never sees it
    beside a mix of old and new parts.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        out: str,
        parts: list[str],
        files: Iterable[str] = (),
    ):
        self.fs, self.out, self.parts = fs, out.rstrip("/"), parts
        self.files = tuple(files)
        self.tmp = f"{self.out}/.tmp-{uuid.uuid4().hex[:12]}"

    #: Temporary folders of runs that died (driver killed) older than this go.
    stale_after_s = 24 * 3600

    def _remove_stale(self) -> None:
        if not self.fs.exists(self.out):
            return
        now = time.time()
        for path in self.fs.ls(self.out, detail=False):
            if not posixpath.basename(path).startswith(".tmp-"):
                continue
            try:
                age = now - self.fs.modified(path).timestamp()
            except (NotImplementedError, FileNotFoundError, OSError):
                continue
            if age > self.stale_after_s:
                self.fs.rm(path, recursive=True)

    def __enter__(self) -> str:
        self._remove_stale()
        self.fs.makedirs(self.tmp, exist_ok=True)
        for part in self.parts:
            self.fs.makedirs(f"{self.tmp}/{part}", exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.fs.rm(self.tmp, recursive=True)
            return
        for name in self.files:
            if self.fs.exists(f"{self.out}/{name}"):
                self.fs.rm(f"{self.out}/{name}")
        for part in self.parts:
            final = f"{self.out}/{part}"
            old = f"{self.out}/.old-{part}-{uuid.uuid4().hex[:8]}"
            if self.fs.exists(final):
                self.fs.mv(final, old, recursive=True)
            self.fs.mv(f"{self.tmp}/{part}", final, recursive=True)
            if self.fs.exists(old):
                self.fs.rm(old, recursive=True)
        for name in self.files:
            self.fs.mv(f"{self.tmp}/{name}", f"{self.out}/{name}")
        self.fs.rm(self.tmp, recursive=True)


#: The pointer object of a versioned table (``OUT/<part>/_CURRENT.json``).
POINTER = "_CURRENT.json"
#: Superseded versions younger than this stay (readers that resolved the
#: pointer before the publish finish reading them).
GC_GRACE_S = 3600.0
#: A version folder never published (its writer still at work, or dead) is
#: removed this long after its id's time.
UNPUBLISHED_AFTER_S = 24 * 3600.0
#: Superseded versions a pointer remembers (for collection).
HISTORY = 32


class IncompleteTable(RuntimeError):
    """A version's files do not match what its pointer recorded."""


def _version_id(now_s: float | None = None) -> str:
    """``v<epoch ms, 13 digits>-<random>``: unique, and sorts by time."""
    ms = int(1000 * (time.time() if now_s is None else now_s))
    return f"v{ms:013d}-{uuid.uuid4().hex[:10]}"


def _version_ms(name: str) -> int | None:
    head = name[1:].split("-", 1)[0]
    return int(head) if name.startswith("v") and head.isdigit() else None


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _parquet_rows(fs: fsspec.AbstractFileSystem, files: Iterable[str]) -> int:
    total = 0
    for p in files:
        with fs.open(p, "rb") as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def _describe(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, int]:
    """Files, bytes and Parquet rows under ``folder`` (what a pointer records)."""
    found = fs.find(folder, detail=True) if fs.exists(folder) else {}
    files = sorted(p for p, info in found.items() if info.get("type") != "directory")
    return {
        "files": len(files),
        "bytes": int(sum(int(found[p].get("size") or 0) for p in files)),
        "rows": _parquet_rows(fs, [p for p in files if p.endswith(".parquet")]),
    }


def current_version(
    fs: fsspec.AbstractFileSystem, root: str, part: str
) -> dict[str, Any] | None:
    """The pointer of ``root/part`` (``version``, ``published_ms``, ``files``,
    ``bytes``, ``rows``), or ``None`` while nothing is published."""
    try:
        with fs.open(f"{root}/{part}/{POINTER}", "rb") as fh:
            return dict(json.loads(fh.read()))
    except FileNotFoundError:
        return None


#: The command that publishes each versioned table (named in errors).
MADE_BY = {
    "segments": "dynamix segment",
    "stats": "dynamix segment",
    "histories": "dynamix histories",
    "u2u": "dynamix u2u",
    "u2u_index": "dynamix u2u",
    "candidates": "dynamix candidates",
}


def published_version(url: str, part: str) -> dict[str, Any]:
    """The pointer of ``url``'s published ``part`` (:func:`current_version`).

    Raises:
        FileNotFoundError: nothing is published there (the message names the
            command that publishes it).
    """
    fs, root = resolve(url)
    return _published(fs, root, part, url)


def _published(
    fs: fsspec.AbstractFileSystem, root: str, part: str, url: str
) -> dict[str, Any]:
    ptr = current_version(fs, root, part)
    if ptr is None:
        raise FileNotFoundError(
            f"{url}: no published {part} table (no {part}/{POINTER}; run "
            f"`{MADE_BY.get(part, 'dynamix')}`)"
        )
    return ptr


def version_folder(
    fs: fsspec.AbstractFileSystem, root: str, part: str, version: str | None = None
) -> str:
    """The folder of ``part``'s published version (or of ``version``).

    Raises:
        FileNotFoundError: nothing is published under ``root/part``.
    """
    if version is None:
        version = str(_published(fs, root, part, url_of(fs, root))["version"])
    return f"{root}/{part}/{version}"


def check_complete(
    fs: fsspec.AbstractFileSystem, root: str, part: str, pointer: dict[str, Any]
) -> str:
    """The folder of ``pointer``'s version, after checking that its files,
    bytes and Parquet rows are the ones the publisher recorded.

    Raises:
        IncompleteTable: they are not (a partial copy, a collected version).
    """
    folder = f"{root}/{part}/{pointer.get('version')}"
    got = _describe(fs, folder)
    want = {k: pointer.get(k) for k in got}
    if got != want:
        raise IncompleteTable(
            f"{url_of(fs, folder)}: holds {got}, its pointer recorded {want}"
        )
    return folder


def put_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One object at ``path``, all or nothing: a rename on local disks, a single
    put on object stores (where a put is atomic)."""
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, path)  # os.rename: atomic within one filesystem
        except BaseException:
            fs.rm(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def collect_versions(
    fs: fsspec.AbstractFileSystem,
    root: str,
    part: str,
    grace_s: float = GC_GRACE_S,
    now_s: float | None = None,
) -> list[str]:
    """Remove the versions of ``root/part`` no reader can still need:

    * a version that was published is kept until ``grace_s`` after it was
      *superseded* (the pointer's ``history`` records when), so a reader or
      a job that resolved it just before a publish finishes reading it;
    * a folder that was never published (a publisher still writing, or one
      that died) is kept until :data:`UNPUBLISHED_AFTER_S` after its id's time;
    * the current version always stays.

    Returns the removed folders."""
    ptr = current_version(fs, root, part)
    if ptr is None:
        return []
    now_ms = 1000 * (time.time() if now_s is None else now_s)
    superseded = {h["version"]: h["superseded_ms"] for h in ptr.get("history", [])}
    removed = []
    for path in fs.ls(f"{root}/{part}", detail=False):
        name = posixpath.basename(path)
        made_ms = _version_ms(name)
        if made_ms is None or name == ptr["version"]:
            continue
        if name in superseded:
            old = now_ms - superseded[name] >= 1000 * grace_s
        else:
            old = now_ms - made_ms >= 1000 * UNPUBLISHED_AFTER_S
        if old:
            fs.rm(f"{root}/{part}/{name}", recursive=True)
            removed.append(f"{root}/{part}/{name}")
    return removed


class publish:  # noqa: N801 - used as a context manager, reads like a function
    """Write a new version of each of ``parts`` and publish it by a pointer.

    ``with publish(fs, out, ["segments", "stats"]) as v:`` writes go to
    ``v.path("segments")`` = ``out/segments/<version>/``. On success each part's
    ``out/<part>/_CURRENT.json`` is put last, in one atomic step, naming the
    version and its file and row counts; superseded versions are collected
    after :data:`GC_GRACE_S`. On failure the new folders are removed and the
    pointers are untouched. Nothing is moved, so a reader never sees a partial
    version, whatever the filesystem, and version ids are unique, so two
    publishers never write into one folder: the pointer names exactly one
    complete version (the last put). See docs/serving.md, "Versioned tables".
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        out: str,
        parts: list[str],
        grace_s: float = GC_GRACE_S,
    ):
        self.fs, self.out, self.parts = fs, out.rstrip("/"), parts
        self.grace_s = grace_s
        self.version = _version_id()

    def path(self, part: str) -> str:
        return f"{self.out}/{part}/{self.version}"

    def _discard(self, parts: list[str]) -> None:
        for part in parts:
            if self.fs.exists(self.path(part)):
                self.fs.rm(self.path(part), recursive=True)

    def __enter__(self) -> publish:
        for part in self.parts:
            self.fs.makedirs(self.path(part), exist_ok=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._discard(self.parts)
            return
        for i, part in enumerate(self.parts):
            try:
                now = int(time.time() * 1000)
                old = current_version(self.fs, self.out, part)
                history = [] if old is None else list(old.get("history", []))
                if old is not None:
                    history.append({"version": old["version"], "superseded_ms": now})
                pointer = {
                    "version": self.version,
                    "published_ms": now,
                    "history": history[-HISTORY:],
                    **_describe(self.fs, self.path(part)),
                }
                data = json.dumps(pointer, sort_keys=True).encode()
                put_atomically(self.fs, f"{self.out}/{part}/{POINTER}", data)
            except BaseException:
                self._discard(self.parts[i:])  # the parts not published
                raise
        for part in self.parts:
            collect_versions(self.fs, self.out, part, self.grace_s)


def copy_published(src_url: str, dst_url: str, part: str) -> str:
    """Publish a copy of ``src_url``'s published ``part`` as a new version of
    ``dst_url/part`` (e.g. a segment table built elsewhere, into the root a
    router polls). Returns the new version id."""
    src_fs, src_root = resolve(src_url)
    dst_fs, dst_root = resolve(dst_url)
    src = _published(src_fs, src_root, part, src_url)
    folder = check_complete(src_fs, src_root, part, src)  # never copy a partial one
    with publish(dst_fs, dst_root, [part]) as v:
        for path in src_fs.find(folder):
            with src_fs.open(path, "rb") as fh:
                data = fh.read()
            dst = f"{v.path(part)}{path[len(folder) :]}"
            dst_fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            dst_fs.pipe_file(dst, data)
        got = _describe(dst_fs, v.path(part))
        if got != {k: src[k] for k in got}:
            raise IncompleteTable(f"{dst_url}: the copy of {folder} holds {got}")
    return v.version
