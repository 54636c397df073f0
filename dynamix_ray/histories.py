"""Users' event histories as of an instant: what the user tower and the
rankers read.

* :func:`user_histories`: plain numpy; one row per user with the last L events
  of each source strictly before ``as_of`` (the sample builder's columns).
* :func:`history_dataset`: the same over a whole dataset, one Ray Data task
  per user bucket (used by ``dynamix embed`` and ``dynamix histories``).
* :func:`run_histories` (``dynamix histories EVENTS OUT``): a snapshot of every
  user's histories in ``OUT/histories/*.parquet`` plus ``OUT/histories/_meta.json``
  (committed together): the serving feature store.
* :class:`HistoryStore`: that snapshot in memory as (N, L) numpy arrays, with a
  vectorised look-up by user id (unknown users get empty histories).

Snapshot columns: ``user_id`` int64 (sorted), ``country`` int16 when the events
have one, and per source ``<src>.<attr>`` int64, ``<src>.dwell`` float32,
``<src>.ts_ms`` int64 and ``<src>.mask`` bool, each a fixed_size_list[L].
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamix_ray.io import (
    atomic_output,
    read_parquet_folder,
    resolve,
    write_json,
    write_parquet,
)
from dynamix_ray.samples import (
    HISTORY_SOURCES,
    HISTORY_SOURCES_ALL,
    SampleConfig,
    build_samples,
    read_bucket_events,
)

__all__ = [
    "HistoryStore",
    "data_end_ms",
    "history_dataset",
    "read_histories",
    "run_histories",
    "user_histories",
]


def user_histories(
    events: dict[str, dict[str, np.ndarray]],
    as_of_ms: int,
    max_seq_len: int,
    since_ms: int | None = None,
) -> dict[str, np.ndarray]:
    """One row per user: the last ``max_seq_len`` events of each source strictly
    before ``as_of_ms`` (the sample builder's columns, without a candidate).

    Args:
        events: per source, valid rows of complete users (``user_id``,
            ``ts_ms``, attributes, optional ``country``).
        as_of_ms: the embedding instant.
        since_ms: keep only users with an event in ``[since_ms, as_of_ms)``
            (``None``: every user with an event before ``as_of_ms``).
    Returns:
        ``user_id``, ``t_ms`` (= as_of), ``segment`` (0), per source
        ``<src>.<attr>`` / ``.dwell`` / ``.ts_ms`` / ``.mask`` (N, L), and
        ``country`` when the ad impressions have one. Users sorted by id.
    """
    ids = []
    for ev in events.values():
        if not ev:
            continue
        ts = np.asarray(ev["ts_ms"], dtype=np.int64)
        uid = np.asarray(ev["user_id"], dtype=np.int64)
        lo = -(2**62) if since_ms is None else since_ms
        ids.append(uid[(ts >= lo) & (ts < as_of_ms)])
    users = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    if len(users) == 0:
        return {"user_id": users}
    cfg = SampleConfig(max_seq_len=max_seq_len)
    t = as_of_ms + cfg.buffer_s * 1000  # history strictly before t - buffer
    pseudo = {
        "user_id": users,
        "ts_ms": np.full(len(users), t, np.int64),
        "ad_id": np.zeros(len(users), np.int64),
    }
    no_rows = {k: np.zeros(0, np.int64) for k in ("user_id", "ts_ms", "ad_id")}
    no_segments: dict[str, np.ndarray] = {
        "user_id": np.zeros(0, np.int64),
        "window_end_ms": np.zeros(0, np.int64),
        "segment": np.zeros(0, np.int8),
    }
    history = {s: events[s] for s in HISTORY_SOURCES if events.get(s)}
    out = build_samples(pseudo, no_rows, history, no_segments, cfg)
    out["t_ms"] = np.full(len(users), as_of_ms, np.int64)
    for k in [k for k in out if k.startswith("cand.") or k == "label"]:
        del out[k]
    imp = events.get("ad_impressions") or {}
    if "country" in imp:  # from the impressions before as_of only
        seen = np.asarray(imp["ts_ms"]) < as_of_ms
        out["country"] = _mode_by_user(
            out["user_id"],
            np.asarray(imp["user_id"])[seen],
            np.asarray(imp["country"])[seen],
        )
    return out


def _mode_by_user(users: np.ndarray, uid: np.ndarray, value: np.ndarray) -> np.ndarray:
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


def _bucket_histories(
    batch: dict[str, np.ndarray],
    url: str,
    files: dict[str, list[str]],
    num_buckets: int,
    bucketed: bool,
    as_of_ms: int,
    since_ms: int | None,
    max_seq_len: int,
) -> dict[str, np.ndarray]:
    """Ray Data map: the histories of one user bucket's users."""
    fs, _ = resolve(url)
    out = []
    for bucket in batch["bucket"].tolist():
        ev = read_bucket_events(fs, files, bucket, num_buckets, bucketed)
        h = user_histories(ev, as_of_ms, max_seq_len, since_ms)
        if len(h["user_id"]):
            out.append(h)
    if not out:
        return {}
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _data_end_ms(ds: Any) -> int:
    """One ms after the last event of any source (from Parquet statistics when
    the files are int64 ms, else by reading the column)."""
    fs, _ = resolve(ds.url)
    last = None
    for paths in ds.files.values():
        for p in paths:
            with fs.open(p, "rb") as fh:
                col = pq.read_table(fh, columns=["ts"]).column("ts")
            if pa.types.is_timestamp(col.type):
                col = pc.cast(pc.cast(col, pa.timestamp("ms", "UTC")), pa.int64())
            m = pc.max(col).as_py()
            if m is not None and (last is None or m > last):
                last = int(m)
    if last is None:
        raise ValueError(f"{ds.url}: no events")
    return last + 1


def data_end_ms(events_url: str) -> int:
    """One ms after the last event of any source of ``events_url``."""
    from dynamix_ray.io import discover

    return _data_end_ms(
        discover(events_url, list(HISTORY_SOURCES_ALL), required=["ad_impressions"])
    )


def history_dataset(
    events_url: str,
    as_of: int,
    max_seq_len: int,
    since_ms: int | None = None,
) -> Any:
    """Ray Dataset of :func:`user_histories` rows as of ``as_of`` (epoch ms),
    one task per user bucket.

    Raises:
        FileNotFoundError: no ad impressions under ``events_url``.
    """
    import ray

    from dynamix_ray.io import discover
    from dynamix_ray.runtime import cluster_cpus, ensure_ray

    ensure_ray()
    ds = discover(events_url, list(HISTORY_SOURCES_ALL), required=["ad_impressions"])
    bucketed = ds.num_buckets is not None
    n = ds.num_buckets if bucketed else cluster_cpus()
    assert n is not None
    return ray.data.from_items(
        [{"bucket": b} for b in range(n)], override_num_blocks=n
    ).map_batches(
        cast(Any, _bucket_histories),
        fn_args=(ds.url, ds.files, n, bucketed, as_of, since_ms, max_seq_len),
        batch_size=1,
        batch_format="numpy",
    )


def _to_arrow(cols: dict[str, np.ndarray]) -> pa.Table:
    out: dict[str, pa.Array] = {}
    for k, v in cols.items():
        if k in ("t_ms", "segment"):
            continue  # the snapshot's as_of is in _meta.json; segments are live
        if v.ndim == 2:
            out[k] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(v).reshape(-1)), v.shape[1]
            )
        else:
            out[k] = pa.array(v)
    return pa.table(out)


def run_histories(
    events_url: str,
    out_url: str,
    as_of_ms: int | None = None,
    max_seq_len: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every user's histories as of ``as_of_ms`` (default: the end of the
    data) to ``OUT/histories/`` atomically; returns ``OUT/histories/_meta.json``."""
    import ray

    t0 = time.perf_counter()
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    from dynamix_ray.runtime import ensure_ray

    ensure_ray()
    as_of = as_of_ms if as_of_ms is not None else data_end_ms(events_url)
    rows = history_dataset(events_url, as_of, max_seq_len)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    parts = [
        _to_arrow(b)
        for b in rows.iter_batches(batch_size=None, batch_format="numpy")
        if len(b.get("user_id", ()))
    ]
    if not parts:
        raise ValueError(f"{events_url}: no user has an event before {as_of}")
    table = pa.concat_tables(parts).sort_by("user_id")
    fs, root = resolve(out_url)
    meta = {
        "as_of_ms": as_of,
        "max_seq_len": max_seq_len,
        "users": table.num_rows,
        "events": events_url,
    }
    with atomic_output(fs, root, ["histories"]) as tmp:  # data and meta together
        write_parquet(fs, f"{tmp}/histories/part-0.parquet", table)
        meta["wall_s"] = round(time.perf_counter() - t0, 3)
        write_json(fs, f"{tmp}/histories/_meta.json", meta)
    return meta


@dataclass(frozen=True)
class HistoryStore:
    """Histories of every user of a snapshot, as (N + 1, L) arrays.

    Row N is the empty history (all masks False) that unknown users get.
    """

    user_id: np.ndarray  # (N,) sorted
    columns: dict[str, np.ndarray]  # name -> (N + 1, L) or (N + 1,)
    as_of_ms: int
    max_seq_len: int

    @classmethod
    def from_columns(
        cls, cols: dict[str, np.ndarray], as_of_ms: int, max_seq_len: int
    ) -> HistoryStore:
        uid = np.asarray(cols["user_id"], np.int64)
        order = np.argsort(uid, kind="stable")
        if len(uid) and (np.diff(uid[order]) == 0).any():
            raise ValueError("a history snapshot holds a user twice")
        columns = {}
        for k, v in cols.items():
            if k in ("user_id", "t_ms", "segment"):
                continue
            v = np.asarray(v)[order]
            empty = np.zeros((1, *v.shape[1:]), v.dtype)
            if k == "country":
                empty[:] = -1
            columns[k] = np.concatenate([v, empty])
        return cls(uid[order], columns, as_of_ms, max_seq_len)

    def __len__(self) -> int:
        return len(self.user_id)

    def _index(self, user_ids: np.ndarray) -> np.ndarray:
        """Each user's row; ``len(self)`` (the empty row) for unknown users."""
        q = np.asarray(user_ids, np.int64)
        n = len(self.user_id)
        if n == 0:
            return np.zeros(len(q), np.int64)
        pos = np.minimum(np.searchsorted(self.user_id, q), n - 1)
        return np.where(self.user_id[pos] == q, pos, n)

    def rows(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each user's history row (the empty one for unknown users)."""
        idx = self._index(user_ids)
        return {k: v[idx] for k, v in self.columns.items()}

    def known(self, user_ids: np.ndarray) -> np.ndarray:
        return self._index(user_ids) < len(self.user_id)

    def last(self, seq: int) -> HistoryStore:
        """The newest ``seq`` events per source (views, no copy)."""
        if seq >= self.max_seq_len:
            return self
        cols = {k: v[:, -seq:] if v.ndim == 2 else v for k, v in self.columns.items()}
        return HistoryStore(self.user_id, cols, self.as_of_ms, seq)


def read_histories(url: str) -> HistoryStore:
    """The :class:`HistoryStore` of a ``dynamix histories`` output root."""
    from dynamix_ray.io import read_json

    fs, root = resolve(url)
    if not fs.exists(f"{root}/histories/_meta.json"):
        raise FileNotFoundError(
            f"{url}: no histories/_meta.json (run `dynamix histories`)"
        )
    meta = read_json(fs, f"{root}/histories/_meta.json")
    table = read_parquet_folder(
        fs, f"{root}/histories", f"{url}: histories/ holds no Parquet files"
    )
    cols: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
            flat = col.flatten().to_numpy(zero_copy_only=False)
            cols[name] = flat.reshape(-1, width)
        else:
            cols[name] = col.to_numpy(zero_copy_only=False)
    return HistoryStore.from_columns(
        cols, int(meta["as_of_ms"]), int(meta["max_seq_len"])
    )
