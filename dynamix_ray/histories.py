"""Users' event histories as of an instant: what the user tower and the
rankers read (docs/data-path.md, "Histories").

Everything here takes histories out of compact events (``gather.SourceEvents``)
with the one rule of ``gather.history_window``:

* :func:`user_histories`: plain numpy; one row per user with the last L events
  of each source strictly before ``as_of`` (the training batch's columns);
* :func:`cut_histories`: the same in compact form (each user's last L events,
  CSR), what a snapshot stores;
* :func:`run_histories` (``dynamix histories EVENTS OUT``): every user's
  compact histories as of ``as_of``, one Ray Data task per bucket of the event
  store, each writing ``OUT/histories/<version>/<source>/bucket=K/part-0.parquet``
  itself (the driver holds nothing per user), plus the version's
  ``_meta.json``, published by ``OUT/histories/_CURRENT.json`` (``io.publish``);
* :class:`HistoryStore`: a snapshot loaded for serving, one
  ``SourceEvents`` per source; :meth:`HistoryStore.rows` gathers requests'
  histories exactly as the training loader does;
* :func:`open_node_cached`: a published table built once per node into
  memory-mappable files that every replica maps (:func:`open_shared_histories`
  here, ``candidates_job.open_shared_candidates`` for the Retriever).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.events import EventStore, ensure_store
from dynamix_ray.gather import (
    SourceEvents,
    gather,
    history_window,
)
from dynamix_ray.io import (
    check_complete,
    is_process_local,
    publish,
    published_version,
    read_json,
    resolve,
    url_of,
    write_json,
    write_parquet,
)
from dynamix_ray.runtime import map_items
from dynamix_ray.samples import (
    HISTORY_SOURCES,
    SampleConfig,
    attach_histories,
    events_of,
    seq_len_of,
)

__all__ = [
    "NODE_CACHE_ENV",
    "HistoryStore",
    "cut_histories",
    "mode_by_user",
    "node_cache_dir",
    "open_node_cached",
    "open_shared_histories",
    "read_histories",
    "run_histories",
    "user_histories",
    "users_between",
]


def cut_histories(ev: SourceEvents, as_of_ms: int, max_len: int) -> SourceEvents:
    """Each user's last ``max_len`` events strictly before ``as_of_ms``, as
    compact events (users without one are left out)."""
    start, count = history_window(
        ev, ev.user_id, np.full(len(ev.user_id), as_of_ms, np.int64), max_len
    )
    keep = count > 0
    start, count = start[keep], count[keep]
    idx = np.repeat(start - np.cumsum(count) + count, count) + np.arange(count.sum())
    return SourceEvents(
        ev.user_id[keep],
        np.append(0, np.cumsum(count)).astype(np.int64),
        ev.ts_ms[idx],
        {k: v[idx] for k, v in ev.columns.items()},
    )


def mode_by_user(users: np.ndarray, uid: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Most frequent ``value`` of each user (smallest on ties; -1 if none)."""
    out = np.full(len(users), -1, np.int16)
    if len(uid) == 0 or len(users) == 0:
        return out
    order = np.lexsort((value, uid))
    uid, value = uid[order], value[order]
    pair_start = np.flatnonzero(
        np.r_[True, (uid[1:] != uid[:-1]) | (value[1:] != value[:-1])]
    )
    counts = np.diff(np.r_[pair_start, len(uid)])
    pu, pv = uid[pair_start], value[pair_start]
    best = np.lexsort((pv, -counts, pu))  # per user: highest count, then value
    pu, pv = pu[best], pv[best]
    first = np.r_[True, pu[1:] != pu[:-1]]
    pos = np.searchsorted(users, pu[first])
    ok = (pos < len(users)) & (users[np.minimum(pos, len(users) - 1)] == pu[first])
    out[pos[ok]] = pv[first][ok]
    return out


def _as_events(rows: Mapping[str, np.ndarray] | SourceEvents) -> SourceEvents:
    return rows if isinstance(rows, SourceEvents) else events_of(rows)


def user_histories(
    events: Mapping[str, Mapping[str, np.ndarray] | SourceEvents],
    as_of_ms: int,
    max_seq_len: int | Mapping[str, int],
    since_ms: int | None = None,
    buffer_s: int = SampleConfig.buffer_s,
) -> dict[str, np.ndarray]:
    """One row per user: the last ``max_seq_len`` events of each source strictly
    before ``as_of_ms`` (the loader's columns, without a candidate); one
    length for all sources or one per source (``SampleConfig.lengths()``).

    Args:
        events: per source, compact events or raw rows (``user_id``,
            ``ts_ms``, attributes, optional ``country``) of complete users.
        as_of_ms: the embedding instant.
        since_ms: keep only users with an event in ``[since_ms, as_of_ms)``
            (``None``: every user with an event before ``as_of_ms``).
    Returns:
        ``user_id``, ``t_ms`` (= as_of), ``segment`` (0), per source
        ``<src>.<attr>`` / ``.dwell`` / ``.ts_ms`` / ``.mask`` (N, L), and
        ``country`` when the ad impressions have one. Users sorted by id.
    """
    evs: dict[str, SourceEvents] = {}
    for s, e in events.items():
        ev = _as_events(e)
        if len(ev):
            evs[s] = ev
    ids = [
        ev.user_id[ev.ts_ms[ev.offsets[:-1]] < as_of_ms]  # first event before
        if since_ms is None
        else users_between(ev, since_ms, as_of_ms)
        for ev in evs.values()
    ]
    users = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    n = len(users)
    cols: dict[str, np.ndarray] = {
        "user_id": users,
        "t_ms": np.full(n, as_of_ms, np.int64),
        "segment": np.zeros(n, np.int8),
    }
    if n == 0:
        return {"user_id": users}
    # the rule's bound is t - buffer: a pseudo request at as_of + buffer
    if isinstance(max_seq_len, Mapping):
        longest = max(max_seq_len.values())
        cfg = SampleConfig(
            max_seq_len=longest, buffer_s=buffer_s, seq_lens=tuple(max_seq_len.items())
        )
    else:
        cfg = SampleConfig(max_seq_len=int(max_seq_len), buffer_s=buffer_s)
    pseudo = {"user_id": users, "t_ms": np.full(n, as_of_ms + cfg.buffer_ms, np.int64)}
    hist = {s: ev for s, ev in evs.items() if s in HISTORY_SOURCES}
    out = attach_histories(pseudo, hist, cfg)
    cols.update({k: v for k, v in out.items() if "." in k})
    imp = evs.get("ad_impressions")
    if imp is not None and "country" in imp.columns:  # impressions before as_of
        seen = imp.ts_ms < as_of_ms
        owner = np.repeat(imp.user_id, np.diff(imp.offsets))
        cols["country"] = mode_by_user(users, owner[seen], imp.columns["country"][seen])
    return cols


def users_between(ev: SourceEvents, lo_ms: int, hi_ms: int) -> np.ndarray:
    """Users of ``ev`` with an event in ``[lo_ms, hi_ms)``."""
    inside = (ev.ts_ms >= lo_ms) & (ev.ts_ms < hi_ms)
    owner = np.repeat(ev.user_id, np.diff(ev.offsets))
    return np.unique(owner[inside])


# ----------------------------------------------------------------- snapshot


def _snapshot_task(
    item: dict[str, Any], store: EventStore, tmp: str, as_of_ms: int, max_seq_len: int
) -> dict[str, Any]:
    """One bucket: each user's last L events per source before ``as_of``."""
    b = item["bucket"]
    fs, _ = resolve(tmp)
    tables = store.read_bucket(b, dict.fromkeys(HISTORY_SOURCES))
    users: set[int] = set()
    events = {}
    for src, table in tables.items():
        cols = [a for a in HISTORY_SOURCES[src] if a in table.column_names]
        cut = cut_histories(SourceEvents.from_table(table, cols), as_of_ms, max_seq_len)
        events[src] = len(cut)
        users.update(cut.user_id.tolist())
        if len(cut):
            owner = np.repeat(cut.user_id, np.diff(cut.offsets))
            t = pa.table(
                {
                    "user_id": pa.array(owner, pa.int64()),
                    "ts": pa.array(cut.ts_ms, pa.int64()),
                    **{k: pa.array(v) for k, v in cut.columns.items()},
                }
            )
            write_parquet(fs, f"{tmp}/{src}/bucket={b:05d}/part-0.parquet", t)
    return {"users": len(users), "events": events}


def run_histories(
    events_url: str,
    out_url: str,
    as_of_ms: int | None = None,
    max_seq_len: int = SampleConfig.max_seq_len,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every user's compact histories as of ``as_of_ms`` (default: one ms
    after the data's last event, from the store's meta) to a new version of
    ``OUT/histories/``, published atomically; returns its ``_meta.json``.

    Args:
        events_url: an event store or a docs/contract.md §1 dataset (bucketed once into
            ``OUT/events`` when it is not a store).
    """
    t0 = time.perf_counter()
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    out = out_url.rstrip("/")
    store = ensure_store(
        events_url, [f"{out}/events"], f"{out}/events", progress=progress
    )
    as_of = as_of_ms if as_of_ms is not None else store.ts_max_ms + 1
    fs, root = resolve(out_url)
    local = is_process_local(fs) or is_process_local(resolve(store.url)[0])
    items = store.bucket_items()
    users, events = 0, dict[str, int]()
    with publish(fs, root, ["histories"]) as version:  # data and meta
        tmp = url_of(fs, version.path("histories"))
        for r in map_items(
            _snapshot_task,
            items,
            (store, tmp, as_of, max_seq_len),
            local=local,
            name="histories",
            progress=progress,
        ):
            users += r["users"]
            for s, n in r["events"].items():
                events[s] = events.get(s, 0) + n
        if users == 0:
            raise ValueError(f"{events_url}: no user has an event before {as_of}")
        meta = {
            "as_of_ms": as_of,
            "max_seq_len": max_seq_len,
            "users": users,
            "events": events,
            "num_buckets": store.num_buckets,
            "store": store.url,
            "input": events_url,
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        write_json(fs, f"{version.path('histories')}/_meta.json", meta)
    return meta


@dataclass(frozen=True)
class HistoryStore:
    """A histories snapshot in memory: per source, every user's compact
    events (at most ``max_seq_len`` each, all before ``as_of_ms``).

    :meth:`rows` cuts a request's histories at its own ``ts - buffer`` with the
    training loader's rule and gather, so serving sees what training saw.
    """

    events: dict[str, SourceEvents]
    as_of_ms: int
    max_seq_len: int
    version: str = ""  # the published version it was read from

    @property
    def user_id(self) -> np.ndarray:
        """(N,) every user with at least one event, sorted."""
        ids = [e.user_id for e in self.events.values()]
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.user_id)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.events.values())

    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Per source, the attribute columns held (``dwell_ms`` included)."""
        return {s: tuple(e.columns) for s, e in self.events.items()}

    def rows(
        self,
        user_ids: np.ndarray,
        ts_ms: np.ndarray | None = None,
        features: Any = None,
        buffer_ms: int = SampleConfig().buffer_ms,
        max_seq_len: int | Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Each user's histories, in the loader's columns (W = the longest of
        the batch).

        Args:
            user_ids: (B,) users (unknown ones get empty histories).
            ts_ms: (B,) request instants: only events before ``ts - buffer``
                (default: the snapshot's ``as_of + buffer``, every event).
            features: a ``FeatureSet``: gather only its sources and attributes
                (default: everything held).
            max_seq_len: L, one for every source or one per source
                (``SampleConfig.lengths()``); default and cap: the snapshot's.
        """
        q = np.asarray(user_ids, np.int64)
        t = (
            np.full(len(q), self.as_of_ms + buffer_ms, np.int64)
            if ts_ms is None
            else np.broadcast_to(np.asarray(ts_ms, np.int64), q.shape)
        )
        out: dict[str, np.ndarray] = {}
        for src, ev in self.events.items():
            attrs = list(ev.columns) if features is None else list(features.attrs(src))
            if features is not None and not attrs:
                continue
            want = seq_len_of(max_seq_len or self.max_seq_len, src, self.max_seq_len)
            seq = min(want, self.max_seq_len)
            start, count = history_window(ev, q, t - buffer_ms, seq)
            g = gather(ev, start, count, [a for a in attrs if a in ev.columns])
            out.update({f"{src}.{k}": v for k, v in g.items()})
        return out

    def known(self, user_ids: np.ndarray) -> np.ndarray:
        q = np.asarray(user_ids, np.int64)
        out = np.zeros(len(q), bool)
        for ev in self.events.values():
            lo, hi = ev.user_slices(q)
            out |= hi > lo
        return out


def read_histories(url: str, pointer: dict[str, Any] | None = None) -> HistoryStore:
    """The :class:`HistoryStore` of the published version of a ``dynamix
    histories`` output root (checked against its pointer's counts).

    Raises:
        FileNotFoundError: nothing is published there.
        io.IncompleteTable: the version's files are not the ones published.
    """
    fs, root = resolve(url)
    ptr = pointer or published_version(url, "histories")
    folder = check_complete(fs, root, "histories", ptr)
    meta = read_json(fs, f"{folder}/_meta.json")
    events: dict[str, SourceEvents] = {}
    for src in HISTORY_SOURCES:
        if not fs.exists(f"{folder}/{src}"):
            continue
        files = sorted(p for p in fs.find(f"{folder}/{src}") if p.endswith(".parquet"))
        tables = []
        for p in files:
            with fs.open(p, "rb") as fh:
                tables.append(pq.read_table(fh))
        if not tables:
            continue
        t = pa.concat_tables(tables)
        # buckets hold disjoint users: one stable sort by user merges them
        order = np.argsort(t.column("user_id").to_numpy(), kind="stable")
        events[src] = SourceEvents.from_table(t.take(pa.array(order)))
    return HistoryStore(
        events, int(meta["as_of_ms"]), int(meta["max_seq_len"]), str(ptr["version"])
    )


#: Where a node keeps memory-mappable copies of published tables
#: (``DYNAMIX_NODE_CACHE`` overrides it): docs/serving.md, "One copy per node".
NODE_CACHE_ENV = "DYNAMIX_NODE_CACHE"

#: What a node-cache build writes last into its folder: a version folder
#: without it is never opened.
NODE_CACHE_MANIFEST = "manifest.json"

T = TypeVar("T")


def node_cache_dir() -> str:
    import tempfile

    return os.environ.get(NODE_CACHE_ENV) or os.path.join(
        tempfile.gettempdir(), "dynamix-node-cache"
    )


def _cache_key(fs: Any, root: str, part: str) -> str:
    """The node-cache folder of one published part of one root (its
    versions inside): ``<part>-<hash of the root's URL>``, so that the
    histories and the candidates of one OUT have a folder each."""
    import hashlib

    return f"{part}-{hashlib.sha1(url_of(fs, root).encode()).hexdigest()[:20]}"


def _private_dir(path: str) -> str:
    """``path`` made (mode 0700) or checked: a real folder this user owns,
    so another local user cannot plant the arrays replicas map."""
    import stat

    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(
            f"{path}: not a folder of this user (set ${NODE_CACHE_ENV} elsewhere)"
        )
    return path


def _build_then_exit(
    build: Callable[[str, dict[str, Any], str], None],
    url: str,
    ptr: dict[str, Any],
    tmp: str,
) -> None:
    """The spawned builder: ``build``, then leave at once (``os._exit``), so
    that no library's thread teardown at interpreter exit can abort the
    process and fail a good build (a fresh-clone run once saw the child end
    with "terminate called without an active exception", exit -6, most
    likely there). A failed build still exits 1, with its traceback."""
    import traceback

    try:
        build(url, ptr, tmp)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _build_aside(
    build: Callable[[str, dict[str, Any], str], None],
    url: str,
    part: str,
    ptr: dict[str, Any],
    tmp: str,
    here: bool,
) -> None:
    """``build(url, ptr, tmp)``: in a spawned process, so that the table read
    whole to convert it does not stay in this replica's heap after it is
    freed (``here``: memory://, seen by this process only, so built here).

    Raises:
        RuntimeError: the build failed or wrote no manifest.
    """
    import multiprocessing

    if here:
        build(url, ptr, tmp)
    else:
        proc = multiprocessing.get_context("spawn").Process(
            target=_build_then_exit, args=(build, url, ptr, tmp), daemon=True
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(
                f"{url}: converting {part} version {ptr['version']} for the node "
                f"cache failed (exit code {proc.exitcode})"
            )
    if not os.path.exists(os.path.join(tmp, NODE_CACHE_MANIFEST)):
        raise RuntimeError(
            f"{url}: converting {part} version {ptr['version']} for the node "
            f"cache wrote no {NODE_CACHE_MANIFEST} into {tmp}"
        )


def open_node_cached(
    url: str,
    part: str,
    build: Callable[[str, dict[str, Any], str], None],
    load: Callable[[str], T],
    cache_dir: str | None = None,
) -> T:
    """The published version of ``url``'s ``part``, opened from one copy per
    node: the first replica on a node builds it into a folder of files under
    :func:`node_cache_dir` (under a lock, so one replica builds while the
    others wait; built aside in a spawned process, then renamed into place,
    so a crash leaves no half copy; older versions removed after); every
    replica then opens that folder, typically memory-mapping its ``.npy``
    arrays read-only, so the pages are shared and a replica's own memory
    does not grow with the table or the replica count.

    Args:
        url: the output root whose ``part`` is published (``io.publish``).
        part: the published part (``"histories"``, ``"candidates"``).
        build: ``build(url, pointer, folder)`` writes the pointer's version
            into ``folder``, :data:`NODE_CACHE_MANIFEST` last; a module-level
            function (it runs in a spawned process).
        load: ``load(folder)`` opens a built folder.
        cache_dir: the node cache (default: :func:`node_cache_dir`).

    Raises:
        FileNotFoundError: nothing is published there.
        RuntimeError: building the node's copy failed (nothing is left).
    """
    import fcntl
    import shutil
    import uuid

    fs, root = resolve(url)
    ptr = published_version(url, part)
    version = str(ptr["version"])
    home = _private_dir(
        os.path.join(
            _private_dir(cache_dir or node_cache_dir()), _cache_key(fs, root, part)
        )
    )
    folder = os.path.join(home, version)
    # one builder per node: the others wait for it, then open its files
    with open(os.path.join(home, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(folder, NODE_CACHE_MANIFEST)):
            tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            try:
                _build_aside(build, url, part, ptr, tmp, is_process_local(fs))
                shutil.rmtree(folder, ignore_errors=True)  # one with no manifest
                os.rename(tmp, folder)  # whole, or not there
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            # older versions (and leftovers of dead builders) go: maps that
            # replicas still hold on them stay valid until unmapped
            for name in os.listdir(home):
                if name not in (version, ".lock"):
                    shutil.rmtree(os.path.join(home, name), ignore_errors=True)
    return load(folder)


def _write_arrays(store: HistoryStore, folder: str) -> None:
    import json

    os.makedirs(folder, exist_ok=True)
    manifest: dict[str, Any] = {
        "as_of_ms": store.as_of_ms,
        "max_seq_len": store.max_seq_len,
        "version": store.version,
        "sources": {},
    }
    for src, ev in store.events.items():
        arrays = {"user_id": ev.user_id, "offsets": ev.offsets, "ts_ms": ev.ts_ms}
        arrays.update({f"col.{k}": v for k, v in ev.columns.items()})
        for name, a in arrays.items():
            np.save(os.path.join(folder, f"{src}.{name}.npy"), np.ascontiguousarray(a))
        manifest["sources"][src] = list(ev.columns)
    with open(os.path.join(folder, NODE_CACHE_MANIFEST), "w") as fh:
        json.dump(manifest, fh)


def _map_arrays(folder: str) -> HistoryStore:
    import json

    with open(os.path.join(folder, NODE_CACHE_MANIFEST)) as fh:
        manifest = json.load(fh)

    def load(src: str, name: str) -> np.ndarray:
        return np.load(os.path.join(folder, f"{src}.{name}.npy"), mmap_mode="r")

    events = {
        src: SourceEvents(
            load(src, "user_id"),
            load(src, "offsets"),
            load(src, "ts_ms"),
            {c: load(src, f"col.{c}") for c in cols},
        )
        for src, cols in manifest["sources"].items()
    }
    return HistoryStore(
        events,
        int(manifest["as_of_ms"]),
        int(manifest["max_seq_len"]),
        manifest["version"],
    )


def _build_arrays(url: str, pointer: dict[str, Any], folder: str) -> None:
    _write_arrays(read_histories(url, pointer), folder)


def open_shared_histories(url: str, cache_dir: str | None = None) -> HistoryStore:
    """The published histories of ``url``, memory-mapped from one copy per
    node (:func:`open_node_cached`: ``.npy`` arrays built once by one
    replica, mapped read-only by every replica; benchmarks/serve_memory.py).
    Same answers as :func:`read_histories`.
    """
    return open_node_cached(url, "histories", _build_arrays, _map_arrays, cache_dir)
