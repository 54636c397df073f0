"""Asynchronous user embeddings (ALURE §2.3, ``dynamix embed``).

Only the user tower of a trained CTR model runs (``DynamixCTR.user_tower``):
no candidate, one forward per user, on a schedule rather than per request.

::

    buckets of users ─(task per bucket: read, validate, last L events per
        source strictly before as_of)─► histories
      ─(actor pool: one checkpoint load per actor, GPU when asked)─► (user, E)
      ─ driver: merge with the previous run's rows ─► OUT/embeddings/*.parquet

Incremental: a re-run with a later ``as_of`` and the same model embeds only
users with events in ``[previous as_of, as_of)`` (and users new since then);
every other user keeps the row (and ``as_of``) of the previous run. A new model
version re-embeds everyone.

Output columns: ``user_id`` int64, ``embedding`` fixed_size_list<float32>[E]
(L2-normalised), ``as_of`` timestamp[ms, UTC], ``model_version`` string, and
``country`` int16 when the events carry one (the user's most frequent value).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamix_ray.io import atomic_output, resolve, write_json, write_parquet
from dynamix_ray.samples import (
    HISTORY_SOURCES,
    HISTORY_SOURCES_ALL,
    SampleConfig,
    build_samples,
    read_bucket_events,
)

__all__ = [
    "EmbedConfig",
    "model_version",
    "read_embeddings",
    "run_embed",
    "user_histories",
]


@dataclass(frozen=True)
class EmbedConfig:
    """Args:
    as_of_ms: embed histories strictly before this instant (epoch ms);
        ``None``: the end of the data (one ms after its last event).
    max_seq_len: events per source (default: the checkpoint's).
    batch_size: users per forward pass.
    actors: user-tower actors (each loads the checkpoint once).
    use_gpu: one GPU per actor.
    incremental: keep the previous run's rows of users without new events.
    """

    as_of_ms: int | None = None
    max_seq_len: int | None = None
    batch_size: int = 512
    actors: int = 1
    use_gpu: bool = False
    incremental: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError(f"need batch_size >= 1 and actors >= 1, got {self}")


def model_version(checkpoint_dir: str) -> str:
    """A short content hash of the checkpoint's weights file."""
    h = hashlib.sha1()
    with open(os.path.join(checkpoint_dir, "state.pt"), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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
    ids, before = [], []
    for ev in events.values():
        if not ev:
            continue
        ts = np.asarray(ev["ts_ms"], dtype=np.int64)
        uid = np.asarray(ev["user_id"], dtype=np.int64)
        lo = -(2**62) if since_ms is None else since_ms
        ids.append(uid[(ts >= lo) & (ts < as_of_ms)])
        before.append(uid[ts < as_of_ms])
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
    if "country" in imp:
        out["country"] = _mode_by_user(
            out["user_id"], np.asarray(imp["user_id"]), np.asarray(imp["country"])
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


class UserTower:
    """Ray Data actor: loads the checkpoint once, embeds batches of histories."""

    def __init__(self, checkpoint: str, use_gpu: bool) -> None:
        import torch

        from dynamix_ray.train import load_checkpoint

        self.model, _, _ = load_checkpoint(checkpoint)
        self.device = torch.device(
            "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        )
        self.model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from dynamix_ray.features import available_features, to_model_batch

        fs = available_features(batch)
        with torch.no_grad():
            emb = self.model.user_tower(
                to_model_batch(batch, self.device), fs, normalize=True
            )
        out = {"user_id": batch["user_id"], "embedding": emb.float().cpu().numpy()}
        if "country" in batch:
            out["country"] = batch["country"]
        return out


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


def read_embeddings(url: str) -> pa.Table:
    """The embeddings table of a ``dynamix embed`` output folder."""
    fs, root = resolve(url)
    path = f"{root}/embeddings"
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no embeddings/ (run `dynamix embed`)")
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        raise FileNotFoundError(f"{url}: embeddings/ holds no Parquet files")
    return pa.concat_tables(tables)


def _previous(fs: Any, root: str) -> tuple[dict[str, Any] | None, pa.Table | None]:
    from dynamix_ray.io import read_json

    meta_path = f"{root}/_meta.json"
    if not fs.exists(meta_path):
        return None, None
    return read_json(fs, meta_path), read_embeddings(root)


def run_embed(
    events_url: str,
    checkpoint: str,
    out_url: str,
    cfg: EmbedConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed users as of ``cfg.as_of_ms`` into ``out_url`` (see module doc).

    Returns:
        The run's ``_meta.json``: as_of, model_version, users embedded this run,
        users kept from the previous run, total rows, wall seconds.
    Raises:
        FileNotFoundError: no checkpoint / no ad impressions.
        ValueError: ``as_of`` earlier than the previous run's for this model.
    """
    import ray

    from dynamix_ray.io import discover
    from dynamix_ray.runtime import cluster_cpus, ensure_ray
    from dynamix_ray.train import load_checkpoint, resolve_checkpoint

    cfg = cfg or EmbedConfig()
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    _, mcfg, _ = load_checkpoint(ckpt)
    version = model_version(ckpt)
    seq = cfg.max_seq_len or mcfg.max_seq_len
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    ds = discover(events_url, list(HISTORY_SOURCES_ALL), required=["ad_impressions"])
    as_of = cfg.as_of_ms if cfg.as_of_ms is not None else _data_end_ms(ds)
    fs, root = resolve(out_url)
    prev_meta, prev = _previous(fs, root) if cfg.incremental else (None, None)
    since = None
    if prev_meta is not None and prev_meta.get("model_version") == version:
        if as_of < int(prev_meta["as_of_ms"]):
            raise ValueError(
                f"as_of {as_of} is before the previous run's {prev_meta['as_of_ms']} "
                f"in {out_url}; pass --full to re-embed from scratch"
            )
        since = int(prev_meta["as_of_ms"])
    else:
        prev = None  # first run, or a new model: everyone

    bucketed = ds.num_buckets is not None
    n = ds.num_buckets if bucketed else cluster_cpus()
    assert n is not None
    histories = ray.data.from_items(
        [{"bucket": b} for b in range(n)], override_num_blocks=n
    ).map_batches(
        cast(Any, _bucket_histories),
        fn_args=(ds.url, ds.files, n, bucketed, as_of, since, seq),
        batch_size=1,
        batch_format="numpy",
    )
    embedded = histories.map_batches(
        UserTower,
        fn_constructor_args=(ckpt, cfg.use_gpu),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        concurrency=cfg.actors,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for b in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    new = {k: np.concatenate(v) for k, v in parts.items()}
    n_new = len(new.get("user_id", []))
    table = _to_table(new, as_of, version, mcfg.user_dim)
    kept = 0
    if prev is not None:
        stale = pa.array(np.isin(prev.column("user_id").to_numpy(), new["user_id"]))
        old = prev.filter(pc.invert(stale)).select(table.column_names)
        kept = old.num_rows
        table = pa.concat_tables([old, table.cast(old.schema)])
    table = table.sort_by("user_id")
    meta = {
        "as_of_ms": as_of,
        "model_version": version,
        "checkpoint": ckpt,
        "max_seq_len": seq,
        "embedded_this_run": n_new,
        "kept_from_previous": kept,
        "users": table.num_rows,
        "dim": mcfg.user_dim,
        "incremental_since_ms": since,
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    with atomic_output(fs, root, ["embeddings"]) as tmp:
        write_parquet(fs, f"{tmp}/embeddings/part-0.parquet", table)
    write_json(fs, f"{root}/_meta.json", meta)
    return meta


def _to_table(
    cols: dict[str, np.ndarray], as_of_ms: int, version: str, dim: int
) -> pa.Table:
    n = len(cols.get("user_id", []))
    emb = np.asarray(cols.get("embedding", np.zeros((0, dim))), np.float32)
    arrays = {
        "user_id": pa.array(cols.get("user_id", np.zeros(0, np.int64)), pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float32()), dim
        ),
        "as_of": pa.array(np.full(n, as_of_ms, np.int64)).cast(
            pa.timestamp("ms", "UTC")
        ),
        "model_version": pa.array([version] * n, pa.string()),
    }
    if "country" in cols:
        arrays["country"] = pa.array(cols["country"], pa.int16())
    return pa.table(arrays)
