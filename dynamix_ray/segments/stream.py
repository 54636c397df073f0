"""Streaming segment updates: micro-batches of new event files folded into
in-memory statistics, segment changes published within seconds
(docs/data-path.md, "Streaming updates").

* :class:`StreamState` (plain): the events and partial statistics of a range
  of user buckets, held in memory. :meth:`StreamState.apply` folds one
  micro-batch into them with the refresh's own rule (``refresh.fold``) and
  returns the (user, window) rows it recomputed, as they now are. A batch id it
  has applied is skipped, so a batch sent twice counts once.
* :class:`SegmentUpdater`: a Ray actor around one state, for one range of
  buckets. Its checkpoint is the table version it started from and the list
  of batches it has applied (their ids and files), put after each one: the
  state is that version plus those batches, so a restarted updater
  (``max_restarts``) rebuilds it by replaying them, and the driver sends again the batch it had not
  acknowledged. The updater holds its buckets' events in memory: memory per
  updater is its share of the store's rows of the two sources, ~20 bytes
  an event.
* :func:`run_stream`: the driver. It watches a docs/contract.md §1 dataset
  root for event files that the table's store does not hold, sends each
  new file (a micro-batch) to every updater, and publishes the recomputed rows
  as ``OUT/segment_changes/<seq>.parquet``, one put per batch. The segment
  table itself stays the batch job's: ``dynamix segment --incremental``
  folds the same files into a new version.

Epsilon is the published table's. The state after the stream drains equals
that table refreshed with the same files (tests/test_stream.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.config import SegmentConfig
from dynamix_ray.events import EventStore, open_store, store_schema
from dynamix_ray.io import (
    parquet_files,
    put_atomically,
    read_json,
    resolve,
    url_of,
    user_bucket,
    version_folder,
    write_json_atomically,
)
from dynamix_ray.schema import SOURCES, validate
from dynamix_ray.segments.pipeline import (
    STAT_SOURCES,
    bucket_path,
    read_segments_meta,
    segment_table,
)
from dynamix_ray.segments.refresh import fold, stats_of, table_config
from dynamix_ray.segments.stats import Stats

__all__ = ["CHANGE_SCHEMA", "SegmentUpdater", "StreamState", "read_batch", "run_stream"]

log = logging.getLogger(__name__)

#: A published change: the (user, window) row as it now is.
CHANGE_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("window_end_ms", pa.int64()),
        ("segment", pa.int8()),
        ("corr", pa.float64()),
    ]
)


def read_batch(files: dict[str, list[str]]) -> dict[str, pa.Table]:
    """A micro-batch: the valid rows of the statistic's two sources in
    ``files`` (any fsspec URLs), in ``read_bucket``'s form (``ts`` in ms)."""
    out: dict[str, pa.Table] = {}
    for src, cols in STAT_SOURCES.items():
        parts = []
        for path in files.get(src, []):
            fs, p = resolve(path)
            with fs.open(p, "rb") as fh:
                raw = pq.read_table(fh)
            v = validate(raw, SOURCES[src], path, columns=[]).valid
            parts.append(
                v.rename_columns(
                    ["ts" if c == "ts_ms" else c for c in v.column_names]
                ).select(cols)
            )
        if parts:
            out[src] = pa.concat_tables(parts)
    return out


def _empty_events() -> dict[str, pa.Table]:
    """No event of the statistic's two sources, in the store's types."""
    return {src: store_schema(src, ()).empty_table() for src in STAT_SOURCES}


@dataclass
class StreamState:
    """The events and statistics of ``buckets`` in memory (module docstring).

    Attributes:
        buckets: the user-hash buckets this state holds.
        num_buckets: the store's bucket count (the hash's modulus).
        cfg, origin_ms, epsilon: the published table's settings.
    """

    buckets: list[int]
    num_buckets: int
    cfg: SegmentConfig
    origin_ms: int
    epsilon: float
    events: dict[int, dict[str, pa.Table]] = field(default_factory=dict)
    stats: dict[int, Stats] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)

    table_version: str = ""

    @classmethod
    def from_table(
        cls,
        out_url: str,
        buckets: Iterable[int],
        store: EventStore | None = None,
        version: str | None = None,
    ) -> StreamState:
        """The state of the published table at ``out_url`` (or of its
        ``version``) for ``buckets``: their events from the table's store
        parts, their statistics from its ``stats``."""
        meta = read_segments_meta(out_url, version)
        store = store or open_store(meta["store"])
        if store is None:
            raise FileNotFoundError(f"{meta['store']}: the table's event store is gone")
        fs, root = resolve(out_url)
        folder = version_folder(fs, root, "stats", meta["table_version"])
        cfg = table_config(meta)
        state = cls(
            sorted(buckets),
            store.num_buckets,
            cfg,
            int(meta["params"]["window_origin_ms"]),
            float(meta["epsilon"]),
            table_version=str(meta["table_version"]),
        )
        parts = store.parts_named(meta.get("store_parts") or store.part_ids[:1])
        for b in state.buckets:
            got = store.read_bucket(b, dict(STAT_SOURCES), parts=parts, ordered=False)
            state.events[b] = {**_empty_events(), **got}
            path = bucket_path(folder, b)
            table = None
            if fs.exists(path):
                with fs.open(path, "rb") as fh:
                    table = pq.read_table(fh)
            state.stats[b] = stats_of(table)
        return state

    def apply(self, batch_id: str, batch: dict[str, pa.Table]) -> pa.Table | None:
        """Fold one micro-batch; the recomputed rows (:data:`CHANGE_SCHEMA`, as they now are), or
        ``None`` when ``batch_id`` was applied already."""
        if batch_id in self.applied:
            return None
        changes = []
        # each row's bucket, hashed once per batch
        bucket = {
            src: user_bucket(t.column("user_id").to_numpy(), self.num_buckets)
            for src, t in batch.items()
        }
        for b in self.buckets:
            new = {}
            for src, t in batch.items():
                sel = bucket[src] == b
                if sel.any():
                    new[src] = t.filter(pa.array(sel))
            if not new:
                continue
            ev = {
                src: pa.concat_tables(
                    [self.events[b][src], *([new[src]] if src in new else [])]
                )
                for src in self.events[b]
            }
            f = fold(ev, new, self.stats[b], self.cfg, self.origin_ms)
            self.events[b], self.stats[b] = ev, f.stats
            seg = segment_table(f.fresh, self.cfg, self.epsilon)
            changes.append(
                pa.table(
                    {
                        "user_id": seg.column("user_id"),
                        "window_end_ms": seg.column("window_end").cast(pa.int64()),
                        "segment": seg.column("segment"),
                        "corr": seg.column("corr"),
                    },
                    schema=CHANGE_SCHEMA,
                )
            )
        self.applied.append(batch_id)
        return pa.concat_tables(changes) if changes else CHANGE_SCHEMA.empty_table()

    def segments(self) -> pa.Table:
        """The docs/contract.md §3 rows of every bucket held."""
        return pa.concat_tables(
            [segment_table(self.stats[b], self.cfg, self.epsilon) for b in self.buckets]
        )


class SegmentUpdater:
    """The Ray actor body of one range of buckets (module docstring)."""

    def __init__(self, out_url: str, buckets: list[int], checkpoint: str):
        self.checkpoint = checkpoint
        fs, path = resolve(checkpoint)
        self.log: list[list[Any]] = []
        # the last batch's changes: when this updater died after its
        # checkpoint and before its answer, the driver's resend gets them
        self.last: tuple[str, pa.Table | None] = ("", None)
        if fs.exists(path):  # a restart: the same table version, then replay
            saved = read_json(fs, path)
            self.state = StreamState.from_table(
                out_url, buckets, version=saved["table_version"]
            )
            for batch_id, files in saved["batches"]:
                self.last = (batch_id, self.state.apply(batch_id, read_batch(files)))
                self.log.append([batch_id, files])
        else:
            self.state = StreamState.from_table(out_url, buckets)

    def process(self, batch_id: str, files: dict[str, list[str]]) -> dict[str, Any]:
        """Apply one batch and put the checkpoint; the recomputed rows
        (``None``: applied before, unless it was the last batch, whose rows
        are kept for a resend) and the seconds it took."""
        t0 = time.perf_counter()
        batch = read_batch(files)
        changes = self.state.apply(batch_id, batch)
        if changes is None and self.last[0] == batch_id:
            changes = self.last[1]
        elif changes is not None:
            self.last = (batch_id, changes)
            self.log.append([batch_id, files])
            fs, path = resolve(self.checkpoint)
            write_json_atomically(
                fs,
                path,
                {"table_version": self.state.table_version, "batches": self.log},
            )
        return {
            "changes": changes,
            "events": sum(t.num_rows for t in batch.values()),
            "busy_s": time.perf_counter() - t0,
        }

    def segments(self) -> pa.Table:
        return self.state.segments()

    def pid(self) -> int:
        return os.getpid()


def start_updaters(out_url: str, n: int, num_cpus: float = 0.5) -> list[Any]:
    """``n`` updater actors, each holding a range of the table's buckets,
    checkpointing under ``OUT/stream/``."""
    import ray

    meta = read_segments_meta(out_url)
    nb = int(meta["num_buckets"])
    n = max(1, min(n, nb))
    actor = ray.remote(max_restarts=3, max_task_retries=0, num_cpus=num_cpus)(
        SegmentUpdater
    )
    fs, root = resolve(out_url)
    return [
        actor.remote(
            out_url,
            list(range(nb))[i::n],
            url_of(fs, f"{root}/stream/updater-{i:03d}.json"),
        )
        for i in range(n)
    ]


def send(
    updaters: list[Any], batch_id: str, files: dict[str, list[str]], tries: int = 4
) -> list[dict[str, Any]]:
    """One batch to every updater; an updater that died is sent it again once
    it has restarted (its replay makes the retry count once)."""
    import ray
    from ray.exceptions import RayActorError

    out: list[dict[str, Any] | None] = [None] * len(updaters)
    for attempt in range(tries):
        refs = {
            i: u.process.remote(batch_id, files)
            for i, u in enumerate(updaters)
            if out[i] is None
        }
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref)
            except RayActorError:
                if attempt == tries - 1:
                    raise
                time.sleep(0.5)
        if all(o is not None for o in out):
            break
    return [o for o in out if o is not None]


def _new_files(events_url: str, known: set[str]) -> dict[str, list[str]]:
    """The files under ``events_url`` not in ``known`` (paths as the store's
    manifest records them, without a protocol), as URLs, per source."""
    fs, root = resolve(events_url)
    out = {}
    for src in STAT_SOURCES:
        new = [
            url_of(fs, p) for p in parquet_files(fs, f"{root}/{src}") if p not in known
        ]
        if new:
            out[src] = new
    return out


def _batch_id(files: dict[str, list[str]]) -> str:
    text = "\n".join(f for src in sorted(files) for f in sorted(files[src]))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def publish_changes(out_url: str, seq: int, changes: pa.Table) -> str:
    """``OUT/segment_changes/<seq>.parquet``, in one put."""
    fs, root = resolve(out_url)
    path = f"{root}/segment_changes/{seq:09d}.parquet"
    buf = pa.BufferOutputStream()
    pq.write_table(changes, buf)
    fs.makedirs(f"{root}/segment_changes", exist_ok=True)
    put_atomically(fs, path, buf.getvalue().to_pybytes())
    return url_of(fs, path)


@dataclass
class StreamRun:
    """What :func:`run_stream` did."""

    batches: int = 0
    events: int = 0
    changes: int = 0
    busy_s: float = 0.0  # summed over updaters: core-seconds of work
    wall_s: float = 0.0
    lag_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lag = np.array(self.lag_ms) if self.lag_ms else np.zeros(1)
        return {
            "batches": self.batches,
            "events": self.events,
            "changes": self.changes,
            # per core: every updater reads the whole batch, folds its buckets
            "events_per_busy_s": self.events / self.busy_s if self.busy_s else 0.0,
            "lag_p50_ms": float(np.percentile(lag, 50)),
            "lag_p99_ms": float(np.percentile(lag, 99)),
            "wall_s": self.wall_s,
        }


def run_stream(
    events_url: str,
    out_url: str,
    updaters: list[Any],
    *,
    poll_s: float = 0.1,
    max_batches: int | None = None,
    idle_stop_s: float | None = None,
) -> StreamRun:
    """Watch ``events_url`` for event files the table's store does not hold;
    send each poll's new files to the updaters as one batch; publish its
    changes. Stops after ``max_batches`` batches, or ``idle_stop_s`` without
    a new file."""
    meta = read_segments_meta(out_url)
    store = open_store(meta["store"])
    if store is None:
        raise FileNotFoundError(f"{meta['store']}: the table's event store is gone")
    # the files the table's own parts hold (a dead refresh's delta is not:
    # the stream folds its files as new ones)
    known = store.part_files(meta.get("store_parts") or store.part_ids[:1])
    fs, root = resolve(out_url)
    driver = f"{root}/stream/driver.json"
    state: dict[str, Any] = (
        read_json(fs, driver) if fs.exists(driver) else {"seq": 0, "files": []}
    )
    known |= set(state["files"])
    run = StreamRun()
    t0 = idle = time.perf_counter()
    while max_batches is None or run.batches < max_batches:
        files = _new_files(events_url, known)
        if not files:
            if idle_stop_s is not None and time.perf_counter() - idle > idle_stop_s:
                break
            time.sleep(poll_s)
            continue
        seen_ms = _arrival_ms(files)
        answers = send(updaters, _batch_id(files), files)
        parts = [a["changes"] for a in answers if a["changes"] is not None]
        if parts:
            changes = pa.concat_tables(parts)
            publish_changes(out_url, int(state["seq"]), changes)
            run.changes += changes.num_rows
            state["seq"] = int(state["seq"]) + 1
        now_ms = time.time() * 1000
        run.lag_ms.append(now_ms - seen_ms)
        new = [resolve(f)[1] for fs_ in files.values() for f in fs_]
        known |= set(new)
        state["files"] = [*state["files"], *new]
        write_json_atomically(fs, driver, state)
        run.batches += 1
        run.events += max(a["events"] for a in answers)
        run.busy_s += sum(a["busy_s"] for a in answers)
        idle = time.perf_counter()
    run.wall_s = time.perf_counter() - t0
    return run


def _arrival_ms(files: dict[str, list[str]]) -> float:
    """When the batch's newest file appeared (its modification time)."""
    latest = 0.0
    for paths in files.values():
        for p in paths:
            fs, path = resolve(p)
            info = fs.info(path)
            m = info.get("mtime") or info.get("created") or time.time()
            m = m.timestamp() if hasattr(m, "timestamp") else float(m)
            latest = max(latest, m)
    return latest * 1000
