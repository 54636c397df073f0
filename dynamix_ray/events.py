"""The event store: every user's events once, bucketed by user hash, validated
and sorted (``dynamix bucket``; docs/data-path.md, "Bucket once").

Every stage that needs whole users (segment, samples, histories, embed,
retrieval evaluation) reads one bucket of the store per task, and nothing else.
Its base part is itself a valid docs/contract.md §1 dataset, so any reader
can read it (delta parts, under ``_deltas/``, only
:meth:`EventStore.read_bucket` merges)::

    ROOT/_bucketing.json          num_buckets, hash "splitmix64", layout "compact-v1",
                                  rows and ts range per source, input fingerprint,
                                  rejects per reason
    ROOT/<source>/bucket=KKKKK/part-0.parquet
                                  the bucket's valid rows sorted by (user_id, ts),
                                  ``ts`` int64 epoch ms, attributes in their contract
                                  types (int8 enums, int16 position, int32 category)
    ROOT/rejects/*.parquet        every invalid input row, with its reason
    ROOT/_deltas/KKKKK/           a delta part: the same layout, holding only the
                                  files an incremental refresh added (listed in
                                  ``_bucketing.json``'s ``deltas``; see below)

Building it from unbucketed input is one shuffle through storage:

* **map** (one task per input piece of ~1M rows: whole Parquet row groups):
  read, validate (rejects written under a name derived from the piece, so a
  retried task overwrites its own file), sort the valid rows by (bucket, user,
  ts) and write ONE file per piece: the bucket slices as consecutive Arrow IPC
  streams, with a small offsets index beside it;
* **reduce** (one task per bucket): read its byte range of every piece (two
  ranged reads per piece), merge, write ``<source>/bucket=K/part-0.parquet``.

**Deltas** (``dynamix segment --incremental``; docs/data-path.md, "Incremental
refresh"): ``_bucketing.json`` records every input file it holds (``manifest``:
path and size). :func:`new_input_files` finds the files added since, and
:func:`append_delta` buckets only those, with the same shuffle, into
``_deltas/KKKKK/``; the part exists for readers once ``_bucketing.json``,
replaced in one step, lists it. :meth:`EventStore.read_bucket` merges a
bucket's parts into one (user, ts) order (base first among equal keys), so
every stage reads a store with deltas like one built at once. ``dynamix
bucket`` on the whole input writes one part again.

Files: O(pieces + buckets), not their product. Memory per task: one piece or
one bucket. Input that is already hash-bucketed (``generate --bucketed N``)
skips the map: each reduce task reads its bucket's files directly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray import __version__
from dynamix_ray.io import (
    BUCKETING_FILE,
    Dataset,
    absolute_url,
    atomic_output,
    discover,
    fingerprint,
    is_process_local,
    read_json,
    resolve,
    url_of,
    user_bucket,
    write_json,
    write_json_atomically,
    write_parquet,
)
from dynamix_ray.runtime import cluster_cpus, map_items
from dynamix_ray.schema import REJECT_REASONS, SOURCES, SchemaError, validate
from dynamix_ray.shuffle import read_slice, write_slices

__all__ = [
    "EVENTS_PER_BUCKET",
    "LAYOUT",
    "EventStore",
    "append_delta",
    "default_num_buckets",
    "delta_folder",
    "ensure_store",
    "file_manifest",
    "new_input_files",
    "open_store",
    "run_bucket",
    "store_schema",
]

log = logging.getLogger(__name__)

#: ``_bucketing.json`` ``layout`` of a store written by ``dynamix bucket``.
LAYOUT = "compact-v1"
#: Events (all sources) per bucket the default bucket count aims at: a kernel
#: task then holds ~1-4M events.
EVENTS_PER_BUCKET = 2_000_000
#: Rows per map task of the shuffle (whole Parquet row groups are kept together).
PIECE_ROWS = 1 << 20
#: Parquet codec of the store's files: written once, read by every stage and
#: every training worker (lz4 wrote a bucket 1.6x and read it 2x faster than
#: zstd here, for 20% more bytes).
STORE_COMPRESSION = "lz4"
_DAY_MS = 86_400_000


def store_schema(source: str, present: Iterable[str]) -> pa.Schema:
    """Columns of ``source`` in the store: ``user_id``, ``ts`` (int64 ms),
    ``dwell_ms`` (float64 for ad impressions, where the statistic reads it;
    float32 elsewhere, where only the model does), the attributes in their contract
    types, and ``country`` (int16) when the input has it."""
    src = SOURCES[source]
    fields = [pa.field("user_id", pa.int64()), pa.field("ts", pa.int64())]
    if src.has_dwell:
        dwell = pa.float64() if source == "ad_impressions" else pa.float32()
        fields.append(pa.field("dwell_ms", dwell))
    present = set(present)
    fields += [pa.field(a, t) for a, t in src.attributes.items() if a in present]
    if "country" in present:
        fields.append(pa.field("country", pa.int16()))
    return pa.schema(fields)


def default_num_buckets(total_events: int, cpus: int) -> int:
    """At least one bucket per CPU, about :data:`EVENTS_PER_BUCKET` events each."""
    return max(cpus, math.ceil(total_events / EVENTS_PER_BUCKET))


@dataclass(frozen=True)
class EventStore:
    """A ``dynamix bucket`` output root (see the module docstring)."""

    url: str
    num_buckets: int
    meta: dict[str, Any]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for s in SOURCES if s in self.meta["sources"])

    def rows(self, source: str) -> int:
        return int(self.meta["sources"].get(source, {}).get("rows", 0))

    def rejected(self, sources: Iterable[str]) -> dict[str, int]:
        """Rejected input rows per reason, summed over ``sources``."""
        out: dict[str, int] = {}
        for s in sources:
            for k, n in self.meta["rejected"].get(s, {}).items():
                out[k] = out.get(k, 0) + int(n)
        return out

    @property
    def fingerprint(self) -> str:
        """Identifies this store's content (its input and bucketing)."""
        m = self.meta
        return hashlib.sha1(
            f"{m['input_fingerprint']}/{m['num_buckets']}/{m['layout']}".encode()
        ).hexdigest()[:16]

    def columns(self, source: str) -> tuple[str, ...]:
        """The store's columns of ``source`` (input names: ``ts``, ``dwell_ms``,
        attributes, ``country``); empty when the store lacks the source."""
        if source not in self.meta["sources"]:
            return ()
        return tuple(self.meta["columns"][source])

    @property
    def ts_max_ms(self) -> int:
        return max(int(m["ts_max_ms"]) for m in self.meta["sources"].values())

    @property
    def ts_min_ms(self) -> int:
        return min(int(m["ts_min_ms"]) for m in self.meta["sources"].values())

    def bucket_items(self) -> list[dict[str, Any]]:
        """One ``runtime.map_items`` item per bucket. The store itself goes to
        the tasks once, as an argument: an item is only its bucket id."""
        return [{"bucket": b} for b in range(self.num_buckets)]

    @property
    def parts(self) -> tuple[int, ...]:
        """The store's parts: 0 (the base) and each delta, in the order added."""
        return (0, *(int(d["part"]) for d in self.meta.get("deltas", ())))

    @property
    def part_ids(self) -> tuple[str, ...]:
        """Each part's unique id (what a table records in ``store_parts``): a
        rebuilt store's parts never have an earlier store's ids."""
        base = self.meta.get("store_id") or f"legacy-{self.meta['input_fingerprint']}"
        return (str(base), *(str(d["id"]) for d in self.meta.get("deltas", ())))

    def parts_named(self, ids: Iterable[str]) -> list[int]:
        """The part numbers of ``ids``.

        Raises:
            ValueError: an id is not one of this store's: the store was
                rebuilt since (a table made from the old one cannot be
                refreshed from it).
        """
        number = dict(zip(self.part_ids, self.parts, strict=True))
        ids = list(ids)
        unknown = [i for i in ids if i not in number]
        if unknown:
            raise ValueError(
                f"{self.url}: the event store was rebuilt since the table was "
                f"made (it holds parts {list(self.part_ids)}, the table "
                f"{ids}); run `dynamix segment` without --incremental"
            )
        return [number[i] for i in ids]

    def part_files(self, ids: Iterable[str]) -> set[str]:
        """The input files the parts ``ids`` hold (paths as the manifest
        records them)."""
        deltas = {str(d["id"]): d for d in self.meta.get("deltas", ())}
        in_deltas = {
            f
            for d in deltas.values()
            for fs_ in d.get("manifest", {}).values()
            for f in fs_
        }
        out: set[str] = set()
        for i in ids:
            if i in deltas:
                out |= {
                    f for fs_ in deltas[i].get("manifest", {}).values() for f in fs_
                }
            else:  # the base: every file no delta brought
                out |= {
                    f for fs_ in self.meta.get("manifest", {}).values() for f in fs_
                } - in_deltas
        return out

    def _part_meta(self, part: int) -> dict[str, Any]:
        if part == 0:
            return self.meta
        return next(d for d in self.meta["deltas"] if int(d["part"]) == part)

    def bucket_path(self, source: str, bucket: int, part: int = 0) -> str:
        _, root = resolve(self.url)
        if part:
            root = f"{root}/{delta_folder(part)}"
        return f"{root}/{source}/bucket={bucket:05d}/part-0.parquet"

    def read_bucket(
        self,
        bucket: int,
        columns: dict[str, list[str] | None],
        parts: Iterable[int] | None = None,
        ordered: bool = True,
    ) -> dict[str, pa.Table]:
        """The bucket's rows of each requested source (``None``: all columns;
        columns the store lacks are left out); sources the store lacks, or
        without rows in this bucket, are absent. ``parts``: read only these
        (default: all), merged into one (user, ts) order, earlier parts first
        among equal keys; ``ordered=False``: concatenated part after part (for
        readers that do not need the order: the statistic)."""
        fs, _ = resolve(self.url)
        parts = self.parts if parts is None else tuple(parts)
        out: dict[str, pa.Table] = {}
        for src, cols in columns.items():
            if src not in self.meta["sources"]:
                continue
            have = self.columns(src)
            keep = None if cols is None else [c for c in cols if c in have]
            # parts merge in (user, ts) order: read the keys, drop them after
            read = keep
            if keep is not None and len(parts) > 1 and ordered:
                read = [*keep, *(k for k in ("user_id", "ts") if k not in keep)]
            tables = []
            for part in parts:
                path = self.bucket_path(src, bucket, part)
                if not fs.exists(path):
                    nonempty = self._part_meta(part).get("nonempty", {})
                    if bucket in nonempty.get(src, ()):
                        raise FileNotFoundError(
                            f"{path}: missing, but the store's {BUCKETING_FILE} "
                            f"says bucket {bucket} of '{src}' has rows"
                        )
                    continue
                with fs.open(path, "rb") as fh:
                    tables.append(pq.read_table(fh, columns=read))
            if not tables:
                continue
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            if len(tables) > 1 and ordered:
                table = _sort_rows(table)
            out[src] = table if keep is None else table.select(keep)
        return out


def open_store(url: str) -> EventStore | None:
    """The store at ``url``, or ``None`` when ``url`` is not one (plain or
    generator-bucketed input)."""
    fs, root = resolve(url)
    path = f"{root}/{BUCKETING_FILE}"
    if not fs.exists(path):
        return None
    meta = read_json(fs, path)
    if meta.get("layout") != LAYOUT:
        return None
    # absolute: Ray Train workers and later runs work in other folders
    return EventStore(absolute_url(url), int(meta["num_buckets"]), meta)


def ensure_store(
    events_url: str,
    reuse: Iterable[str],
    default_out: str,
    num_buckets: int | None = None,
    progress: bool = True,
) -> EventStore:
    """``events_url`` itself when it is a store; else the first of ``reuse``
    that is a store built from the same input (same fingerprint); else a new
    store built at ``default_out``. So an unbucketed input is bucketed once and
    the next stage reuses it (e.g. ``train`` reuses ``segment``'s store)."""
    store = open_store(events_url)
    if store is not None:
        return store
    ds = discover(events_url, list(SOURCES), required=["ad_impressions"])
    fp = fingerprint(ds)
    for url in reuse:
        cand = open_store(url)
        if cand is None or cand.meta.get("input_fingerprint") != fp:
            continue
        if num_buckets is None or cand.num_buckets == num_buckets:
            log.info("reusing the event store at %s", url)
            return cand
    return run_bucket(events_url, default_out, num_buckets, progress=progress)


# ------------------------------------------------------------------- map side


def _wanted(source: str, names: Iterable[str]) -> list[str]:
    """The columns of ``source`` the store keeps, of those a file has."""
    src = SOURCES[source]
    have = set(names)
    return [c for c in (*src.required, *src.attributes, "country") if c in have]


def _conform(
    table: pa.Table, source: str, present: Iterable[str], file: str
) -> pa.Table:
    """Valid rows (``ts_ms``) in the store's columns and types; a missing
    attribute (some files lack it) reads as 0."""
    schema = store_schema(source, present)
    cols = []
    for f in schema:
        name = "ts_ms" if f.name == "ts" else f.name
        if name not in table.column_names:
            fill = -1 if f.name == "country" else 0
            cols.append(pa.array(np.full(table.num_rows, fill), f.type))
            continue
        col = table.column(name)
        try:
            col = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SchemaError(
                f"{file}: column '{f.name}' of '{source}' does not fit {f.type}: {e}"
            ) from e
        if col.null_count:
            col = col.fill_null(pa.scalar(0, f.type) if f.name != "country" else -1)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def _reject_counts(rejects: pa.Table) -> dict[str, int]:
    if rejects.num_rows == 0:
        return {}
    names, counts = np.unique(
        rejects.column("reason").to_numpy(zero_copy_only=False), return_counts=True
    )
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _sort_rows(table: pa.Table) -> pa.Table:
    """Rows sorted by (user, ts); stable, so equal keys keep their order."""
    order = np.lexsort(
        [table.column("ts").to_numpy(), table.column("user_id").to_numpy()]
    )
    return table.take(pa.array(order))


def _ts_range(table: pa.Table) -> tuple[int | None, int | None]:
    if table.num_rows == 0:
        return None, None
    ts = table.column("ts").to_numpy()
    return int(ts.min()), int(ts.max())


def _map_piece(item: dict[str, Any], in_url: str, tmp: str, num_buckets: int) -> dict:
    """Shuffle map: one input piece -> one sorted file of bucket slices."""
    fs, _ = resolve(in_url)
    out_fs, _ = resolve(tmp)
    source, path, groups = item["source"], item["path"], item["row_groups"]
    with fs.open(path, "rb") as fh:
        table = pq.ParquetFile(fh).read_row_groups(groups, columns=item["columns"])
    name = f"{path}#row_groups={groups[0]}-{groups[-1]}"
    v = validate(table, SOURCES[source], name, columns=item["columns"])
    if v.rejects.num_rows:
        write_parquet(
            out_fs, f"{tmp}/rejects/{source}-{item['piece']:06d}.parquet", v.rejects
        )
    valid = _conform(v.valid, source, item["present"], name)
    bucket = user_bucket(valid.column("user_id").to_numpy(), num_buckets)
    # grouped by bucket only (a stable radix sort): the reduce sorts by
    # (user, ts), merging every piece's slice
    data = f"{tmp}/_shuffle/{source}/piece-{item['piece']:06d}"
    write_slices(out_fs, data, valid, bucket, num_buckets)
    lo, hi = _ts_range(valid)
    return {
        "source": source,
        "rows": valid.num_rows,
        "rejects": _reject_counts(v.rejects),
        "ts_min_ms": lo,
        "ts_max_ms": hi,
    }


# ----------------------------------------------------------------- reduce side


def _write_bucket(
    fs: Any, tmp: str, source: str, bucket: int, parts: list[pa.Table]
) -> dict:
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return {"rows": 0, "users": 0, "ts_min_ms": None, "ts_max_ms": None, "days": {}}
    table = _sort_rows(pa.concat_tables(parts, promote_options="permissive"))
    write_parquet(
        fs,
        f"{tmp}/{source}/bucket={bucket:05d}/part-0.parquet",
        table,
        compression=STORE_COMPRESSION,
    )
    uid = table.column("user_id").to_numpy()
    lo, hi = _ts_range(table)
    day, n = np.unique(table.column("ts").to_numpy() // _DAY_MS, return_counts=True)
    return {
        "rows": table.num_rows,
        "users": int(np.count_nonzero(np.diff(uid)) + 1),
        "ts_min_ms": lo,
        "ts_max_ms": hi,
        "days": dict(zip(day.tolist(), n.tolist(), strict=True)),
    }


def _reduce_shuffled(item: dict[str, Any], tmp: str) -> dict:
    """Shuffle reduce: bucket ``item['bucket']``'s slice of every piece."""
    fs, _ = resolve(tmp)
    b = item["bucket"]
    out: dict[str, Any] = {"bucket": b, "sources": {}}
    for source, pieces in item["pieces"].items():
        parts = [
            t
            for p in pieces
            if (t := read_slice(fs, f"{tmp}/_shuffle/{source}/piece-{p:06d}", b))
            is not None
        ]
        out["sources"][source] = _write_bucket(fs, tmp, source, b, parts)
    return out


def _reduce_bucketed(item: dict[str, Any], in_url: str, tmp: str) -> dict:
    """Bucketed input (``generate --bucketed``): validate and sort one bucket's
    files; the rows' hash bucket is checked, not trusted."""
    fs, _ = resolve(in_url)
    out_fs, _ = resolve(tmp)
    b, nb = item["bucket"], item["num_buckets"]
    out: dict[str, Any] = {"bucket": b, "sources": {}, "rejects": {}, "misplaced": 0}
    for source, files in item["files"].items():
        parts = []
        for path in files:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                cols = _wanted(source, pf.schema_arrow.names)
                table = pf.read(columns=cols)
            v = validate(table, SOURCES[source], path, columns=cols)
            if v.rejects.num_rows:
                digest = hashlib.sha1(path.encode()).hexdigest()[:12]
                write_parquet(
                    out_fs,
                    f"{tmp}/rejects/{source}-b{b:05d}-{digest}.parquet",
                    v.rejects,
                )
            counts = out["rejects"].setdefault(source, {})
            for k, n in _reject_counts(v.rejects).items():
                counts[k] = counts.get(k, 0) + n
            valid = _conform(v.valid, source, item["present"][source], path)
            wrong = user_bucket(valid.column("user_id").to_numpy(), nb) != b
            if wrong.any():
                raise ValueError(
                    f"{path}: {int(wrong.sum())} rows of users outside bucket {b} "
                    f"(the {BUCKETING_FILE} hash is splitmix64 mod {nb}); re-bucket "
                    "the input with `dynamix bucket`"
                )
            parts.append(valid)
        out["sources"][source] = _write_bucket(out_fs, tmp, source, b, parts)
    return out


# ------------------------------------------------------------------- the stage


def _scan(ds: Dataset, rows: int) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Input pieces of about ``rows`` rows (whole row groups of one file, numbered,
    with the file's columns), and per source the columns any of its files has."""
    pieces: list[dict[str, Any]] = []
    present: dict[str, dict[str, None]] = {}
    for source in ds.files:
        present[source] = {}
        for path in ds.files[source]:
            with ds.fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                meta, cols = pf.metadata, _wanted(source, pf.schema_arrow.names)
            present[source].update(dict.fromkeys(cols))
            group: list[int] = []
            n = 0
            for i in range(meta.num_row_groups):
                group.append(i)
                n += meta.row_group(i).num_rows
                if n >= rows or i == meta.num_row_groups - 1:
                    pieces.append(
                        {"source": source, "path": path, "row_groups": group}
                        | {"columns": cols}
                    )
                    group, n = [], 0
    for i, item in enumerate(pieces):
        item["piece"] = i
    return pieces, {s: list(c) for s, c in present.items()}


def file_manifest(ds: Dataset) -> dict[str, dict[str, int]]:
    """Every file of ``ds`` and its size, per source."""
    return {s: {p: int(ds.fs.size(p)) for p in paths} for s, paths in ds.files.items()}


def _subset_manifest(
    manifest: dict[str, dict[str, int]], files: dict[str, list[str]]
) -> dict[str, dict[str, int]]:
    return {
        s: {p: manifest[s][p] for p in paths} for s, paths in files.items() if paths
    }


def _subset(ds: Dataset, files: dict[str, list[str]]) -> Dataset:
    """``ds`` restricted to ``files`` (their rows recounted)."""
    keep = {s: sorted(p) for s, p in files.items() if p}
    rows = {}
    for s, paths in keep.items():
        rows[s] = 0
        for p in paths:
            with ds.fs.open(p, "rb") as fh:
                rows[s] += pq.ParquetFile(fh).metadata.num_rows
    return Dataset(ds.url, ds.fs, ds.root, keep, rows, ds.num_buckets)


def _keep_columns(
    present: dict[str, list[str]], columns: dict[str, list[str]], url: str
) -> dict[str, list[str]]:
    """The store's columns for a delta's files.

    Raises:
        ValueError: a file brings a source or a column the store lacks (only a
            whole rebuild can add one).
    """
    for src, cols in present.items():
        extra = sorted(set(cols) - set(columns.get(src, ())))
        if src not in columns or extra:
            what = f"column(s) {', '.join(extra)} of" if src in columns else "source"
            raise ValueError(
                f"{url}: new files bring {what} '{src}', which the event store "
                "lacks; rebuild it (`dynamix segment` without --incremental)"
            )
    return {src: list(columns[src]) for src in present}


def _merge_range(acc: dict[str, Any], lo: int | None, hi: int | None) -> None:
    if lo is not None:
        acc["ts_min_ms"] = lo if acc["ts_min_ms"] is None else min(acc["ts_min_ms"], lo)
    if hi is not None:
        acc["ts_max_ms"] = hi if acc["ts_max_ms"] is None else max(acc["ts_max_ms"], hi)


def run_bucket(
    events_url: str,
    out_url: str,
    num_buckets: int | None = None,
    *,
    progress: bool = True,
    piece_rows: int = PIECE_ROWS,
    files: dict[str, list[str]] | None = None,
    columns: dict[str, list[str]] | None = None,
) -> EventStore:
    """Build the event store of ``events_url`` at ``out_url`` (see the module
    docstring); the store and its rejects are committed atomically.

    Args:
        events_url: a docs/contract.md §1 dataset root (plain or ``generate --bucketed``).
        out_url: the store's root (any fsspec URL).
        num_buckets: user-hash buckets (``None``: :func:`default_num_buckets`;
            bucketed input keeps its own count).
        piece_rows: rows per map task (whole row groups are kept together).
        files: bucket only these of the input's files, per source (a delta:
            :func:`append_delta`); default all.
        columns: the columns to keep per source (a delta keeps its store's:
            a file without one reads it as 0); default those the files have.

    Raises:
        FileNotFoundError: no ad impressions under ``events_url``.
        SchemaError: a file lacks a required column (file and column named).
    """
    t0 = time.perf_counter()
    ds = discover(events_url, list(SOURCES), required=["ad_impressions"])
    manifest = file_manifest(ds)
    if files is not None:
        ds = _subset(ds, files)
    out_fs, out_root = resolve(out_url)
    local = is_process_local(ds.fs) or is_process_local(out_fs)
    pieces, present = _scan(ds, piece_rows)
    if columns is not None:
        present = _keep_columns(present, columns, events_url)
    total = sum(ds.rows.values())
    if ds.num_buckets is not None:
        nb, mode = ds.num_buckets, "bucketed input"
        if num_buckets is not None and num_buckets != nb:
            log.warning(
                "%s is bucketed into %d buckets; keeping that (not %d)",
                events_url,
                nb,
                num_buckets,
            )
    else:
        mode = "shuffled by user hash"
        nb = num_buckets or default_num_buckets(total, 1 if local else cluster_cpus())
    if nb < 1:
        raise ValueError(f"num_buckets must be >= 1, got {nb}")

    sources: dict[str, dict[str, Any]] = {
        s: {"rows": 0, "users": 0, "ts_min_ms": None, "ts_max_ms": None, "days": {}}
        for s in ds.files
    }
    rejects: dict[str, dict[str, int]] = {s: {} for s in ds.files}
    nonempty: dict[str, list[int]] = {}

    def add_rejects(source: str, counts: dict[str, int]) -> None:
        for k, n in counts.items():
            rejects[source][k] = rejects[source].get(k, 0) + n

    parts = [*ds.files, "rejects"]
    phases: dict[str, float] = {"scan": time.perf_counter() - t0}
    reduce_stats: dict[str, float] = {}
    with atomic_output(out_fs, out_root, parts, files=[BUCKETING_FILE]) as tmp_path:
        tmp = url_of(out_fs, tmp_path)  # what the tasks resolve
        t_phase = time.perf_counter()
        if ds.num_buckets is None:
            for p in pieces:
                p["present"] = present[p["source"]]
            by_source: dict[str, list[int]] = {}
            map_stats: dict[str, float] = {}
            for r, p in zip(
                map_items(
                    _map_piece,
                    pieces,
                    (ds.url, tmp, nb),
                    local=local,
                    name="bucket: map",
                    progress=progress,
                    stats=map_stats,
                ),
                pieces,
                strict=True,
            ):
                by_source.setdefault(p["source"], []).append(p["piece"])
                add_rejects(p["source"], r["rejects"])
            phases["map"] = time.perf_counter() - t_phase
            phases["map_tasks"] = map_stats["task_s"]
            t_phase = time.perf_counter()
            items = [{"bucket": b, "pieces": by_source} for b in range(nb)]
            results = map_items(
                _reduce_shuffled,
                items,
                (tmp,),
                local=local,
                name="bucket: reduce",
                progress=progress,
                stats=reduce_stats,
            )
        else:
            items = [
                {
                    "bucket": b,
                    "num_buckets": nb,
                    "files": {s: ds.bucket_files(s).get(b, []) for s in ds.files},
                    "present": present,
                }
                for b in range(nb)
            ]
            results = map_items(
                _reduce_bucketed,
                items,
                (ds.url, tmp),
                local=local,
                name="bucket: per bucket",
                progress=progress,
                stats=reduce_stats,
            )
        for r in results:
            for source, counts in r.get("rejects", {}).items():
                add_rejects(source, counts)
            for s, m in r["sources"].items():
                if m["rows"]:
                    nonempty.setdefault(s, []).append(r["bucket"])
                acc = sources[s]
                acc["rows"] += m["rows"]
                acc["users"] += m["users"]
                _merge_range(acc, m["ts_min_ms"], m["ts_max_ms"])
                for d, n in m["days"].items():  # rows per UTC day
                    acc["days"][str(d)] = acc["days"].get(str(d), 0) + n
        phases["reduce"] = time.perf_counter() - t_phase
        phases["reduce_tasks"] = reduce_stats.get("task_s", 0.0)
        shuffle_files = 0
        if out_fs.exists(f"{tmp_path}/_shuffle"):
            shuffle_files = len(out_fs.find(f"{tmp_path}/_shuffle"))
            out_fs.rm(f"{tmp_path}/_shuffle", recursive=True)
        sources = {s: m for s, m in sources.items() if m["rows"]}
        if "ad_impressions" not in sources and files is None:
            raise ValueError(f"{events_url}: no valid ad impression")
        meta = {
            "num_buckets": nb,
            "hash": "splitmix64",
            "layout": LAYOUT,
            "sorted_by": ["user_id", "ts"],
            "mode": mode,
            "pieces": len(pieces) if ds.num_buckets is None else 0,
            "shuffle_files": shuffle_files,
            "input": ds.url,
            "input_fingerprint": fingerprint(ds),
            "input_rows": dict(ds.rows),
            # every input file this store holds: what a refresh finds new
            "manifest": manifest
            if files is None
            else _subset_manifest(manifest, files),
            "store_id": uuid.uuid4().hex[:16],
            "sources": sources,
            "columns": {s: c for s, c in present.items() if s in sources},
            "nonempty": {s: sorted(b) for s, b in nonempty.items()},
            "phase_s": phases,
            "rejected": {
                s: {r: c[r] for r in REJECT_REASONS if r in c}
                for s, c in rejects.items()
            },
            "rejected_total": int(sum(n for c in rejects.values() for n in c.values())),
            "version": __version__,
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        # placed last by atomic_output: a reader sees a store only once every
        # bucket is committed
        write_json(out_fs, f"{tmp_path}/{BUCKETING_FILE}", meta)
    if files is None and out_fs.exists(f"{out_root}/_deltas"):
        out_fs.rm(f"{out_root}/_deltas", recursive=True)  # an earlier store's
    return EventStore(absolute_url(out_url), nb, meta)


# -------------------------------------------------------------------- deltas


def delta_folder(part: int) -> str:
    """Where delta part ``part`` lives, relative to the store's root."""
    return f"_deltas/{part:05d}"


def new_input_files(store: EventStore, ds: Dataset) -> dict[str, list[str]]:
    """The files of ``ds`` the store does not hold yet, per source.

    Raises:
        ValueError: the store has no file manifest (an older store), or a file
            it holds has changed size or is gone: event files are append-only,
            and only a whole rebuild can take an edit back.
    """
    held = store.meta.get("manifest")
    if held is None:
        raise ValueError(
            f"{store.url}: this event store records no input files (built by "
            "an older version); rebuild it (`dynamix segment` without "
            "--incremental)"
        )
    now = file_manifest(ds)
    changed = [
        f"{p} ({size:,} -> {now.get(s, {}).get(p, 'gone')} bytes)"
        for s, files in held.items()
        for p, size in files.items()
        if now.get(s, {}).get(p) != size
    ]
    if changed:
        raise ValueError(
            f"{ds.url}: {len(changed)} file(s) the event store already holds "
            f"changed or went away: {', '.join(changed[:3])}"
            f"{' ...' if len(changed) > 3 else ''}; event files are append-only "
            "(add new files); to take an edit back, rebuild (`dynamix segment` "
            "without --incremental)"
        )
    return {
        s: [p for p in files if p not in held.get(s, {})]
        for s, files in now.items()
        if any(p not in held.get(s, {}) for p in files)
    }


def _merged_meta(meta: dict[str, Any], delta: dict[str, Any], part: int) -> dict:
    """The store's ``_bucketing.json`` with delta ``part`` added (rows, time
    range, days, rejects and the manifest; ``users`` counts the base only)."""
    out = {**meta, "sources": {s: dict(m) for s, m in meta["sources"].items()}}
    for s, m in delta["sources"].items():
        acc = out["sources"][s]
        acc["rows"] += m["rows"]
        _merge_range(acc, m["ts_min_ms"], m["ts_max_ms"])
        days = dict(acc["days"])
        for d, n in m["days"].items():
            days[str(d)] = days.get(str(d), 0) + n
        acc["days"] = days
    rejected = {s: dict(c) for s, c in meta["rejected"].items()}
    for s, c in delta["rejected"].items():
        for r, n in c.items():
            rejected.setdefault(s, {})[r] = rejected.get(s, {}).get(r, 0) + n
    manifest = {s: dict(f) for s, f in meta["manifest"].items()}
    for s, f in delta["manifest"].items():
        manifest.setdefault(s, {}).update(f)
    entry = {
        "part": part,
        "id": delta["store_id"],
        "folder": delta_folder(part),
        "manifest": delta["manifest"],
        "rows": {s: m["rows"] for s, m in delta["sources"].items()},
        "nonempty": delta["nonempty"],
        "files": sum(len(f) for f in delta["manifest"].values()),
        "rejected_total": delta["rejected_total"],
        "wall_s": delta["wall_s"],
    }
    out.update(
        rejected=rejected,
        rejected_total=meta["rejected_total"] + delta["rejected_total"],
        manifest=manifest,
        deltas=[*meta.get("deltas", ()), entry],
    )
    return out


def append_delta(
    store: EventStore,
    events_url: str,
    files: dict[str, list[str]],
    input_fingerprint: str,
    *,
    progress: bool = True,
    piece_rows: int = PIECE_ROWS,
) -> EventStore:
    """Bucket ``files`` (new files of ``events_url``: :func:`new_input_files`)
    into a new delta part of ``store`` and list it in ``_bucketing.json``,
    whose ``input_fingerprint`` becomes ``input_fingerprint`` (that of the
    listing ``files`` came from: a file that lands meanwhile is not in it).

    The part is written (committed whole by :func:`run_bucket`) before
    ``_bucketing.json`` is replaced in one step, so a reader, or a refresh that
    died half-way, sees the store with or without the whole part, never a
    piece of it; a retry writes the same part again.

    Raises:
        ValueError: the files bring a source or column the store lacks.
    """
    fs, root = resolve(store.url)
    part = max(store.parts) + 1
    folder = f"{root}/{delta_folder(part)}"
    if fs.exists(folder):  # a dead attempt's, or an earlier store's
        fs.rm(folder, recursive=True)
    delta = run_bucket(
        events_url,
        url_of(fs, f"{root}/{delta_folder(part)}"),
        store.num_buckets,
        progress=progress,
        piece_rows=piece_rows,
        files=files,
        columns=store.meta["columns"],
    )
    if delta.num_buckets != store.num_buckets:
        raise ValueError(
            f"{events_url}: the new files are bucketed into {delta.num_buckets} "
            f"buckets, the store into {store.num_buckets}"
        )
    meta = _merged_meta(store.meta, delta.meta, part)
    meta["input_fingerprint"] = input_fingerprint
    write_json_atomically(fs, f"{root}/{BUCKETING_FILE}", meta)
    return EventStore(store.url, store.num_buckets, meta)
