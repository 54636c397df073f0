"""Asynchronous user embeddings (ALURE §2.3, ``dynamix embed``).

Only the user tower of a trained CTR model runs (``DynamixCTR.user_tower``):
no candidate, one forward per user, on a schedule rather than per request.

::

    buckets of the event store ─(task per bucket: users with events in the
        window, their last L events per source strictly before as_of:
        histories.user_histories, the loader's rule)─► user rows
      ─(actor pool: one checkpoint load per actor, GPU when asked)─► (user, E)
      ─ workers write OUT/embeddings/bucket=K/*.parquet
      ─ per bucket: the previous run's rows of users not re-embedded are kept
        (a worker rewrites them beside the new ones)

Incremental: a re-run with a later ``as_of`` and the same model embeds only
users with events in ``[previous as_of, as_of)``; every other user keeps the
row (and ``as_of``) of the previous run. A new model version re-embeds
everyone. The driver holds no row.

Output columns: ``user_id`` int64, ``embedding`` fixed_size_list<float32>[E]
(L2-normalised), ``as_of`` timestamp[ms, UTC], ``model_version`` string, and
``country`` int16 (-1 where the events carry none; the user's most frequent
value otherwise).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.events import EventStore, ensure_store
from dynamix_ray.features import available_features, to_model_batch
from dynamix_ray.gather import SourceEvents
from dynamix_ray.histories import user_histories, users_between
from dynamix_ray.io import (
    absolute_url,
    atomic_output,
    is_process_local,
    pyarrow_fs,
    read_json,
    read_parquet_folder,
    resolve,
    url_of,
    write_json,
    write_parquet,
)
from dynamix_ray.model.checkpoint import (
    load_checkpoint,
    model_version,
    resolve_checkpoint,
)
from dynamix_ray.runtime import ensure_ray, map_items
from dynamix_ray.samples import HISTORY_SOURCES

__all__ = [
    "EMBEDDING_SCHEMA",
    "EmbedConfig",
    "embeddings_table",
    "model_version",
    "read_embeddings",
    "read_embeddings_meta",
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


class UserTower:
    """Ray Data actor: loads the checkpoint once, embeds batches of histories."""

    def __init__(self, checkpoint: str, use_gpu: bool) -> None:
        import torch

        self.model, _, _ = load_checkpoint(checkpoint)
        self.device = torch.device(
            "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        )
        self.model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        fs = available_features(batch)
        with torch.no_grad():
            emb = self.model.user_tower(
                to_model_batch(batch, self.device), fs, normalize=True
            )
        return {
            "user_id": batch["user_id"],
            "embedding": emb.float().cpu().numpy(),
            "country": batch["country"],
            "bucket": batch["bucket"],
        }


EMBEDDING_SCHEMA_BASE = [
    ("user_id", pa.int64()),
    ("as_of", pa.timestamp("ms", "UTC")),
    ("model_version", pa.string()),
    ("country", pa.int16()),
]


def EMBEDDING_SCHEMA(dim: int) -> pa.Schema:  # noqa: N802 - a schema per width
    """The embeddings table's schema for width ``dim``."""
    return pa.schema(
        [EMBEDDING_SCHEMA_BASE[0], ("embedding", pa.list_(pa.float32(), dim))]
        + EMBEDDING_SCHEMA_BASE[1:]
    )


def read_embeddings(url: str) -> pa.Table:
    """The embeddings table of a ``dynamix embed`` output folder."""
    fs, root = resolve(url)
    path = f"{root}/embeddings"
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no embeddings/ (run `dynamix embed`)")
    t = read_parquet_folder(fs, path, f"{url}: embeddings/ holds no Parquet files")
    return t.sort_by("user_id")


def read_embeddings_meta(url: str) -> dict[str, Any]:
    """``_meta.json`` of a ``dynamix embed`` output folder."""
    fs, root = resolve(url)
    if not fs.exists(f"{root}/_meta.json"):
        raise FileNotFoundError(f"{url}: no _meta.json (run `dynamix embed`)")
    return dict(read_json(fs, f"{root}/_meta.json"))


def _bucket_events(store: EventStore, bucket: int) -> dict[str, SourceEvents]:
    tables = store.read_bucket(bucket, dict.fromkeys(HISTORY_SOURCES))
    out = {}
    for src, t in tables.items():
        keep = [
            c for c in t.column_names if c in HISTORY_SOURCES[src] or c == "country"
        ]
        out[src] = SourceEvents.from_table(t, keep)
    return out


def _user_rows(
    batch: dict[str, np.ndarray],
    store: EventStore,
    as_of_ms: int,
    since_ms: int | None,
    seq: int | dict[str, int],
    buffer_s: int,
) -> dict[str, np.ndarray]:
    """Ray Data map: the history rows of one bucket's users to embed."""
    out = []
    for b in batch["bucket"].tolist():
        h = user_histories(_bucket_events(store, b), as_of_ms, seq, since_ms, buffer_s)
        if len(h["user_id"]):
            h.setdefault("country", np.full(len(h["user_id"]), -1, np.int16))
            h["bucket"] = np.full(len(h["user_id"]), b, np.int32)
            out.append(h)
    if not out:
        return {}
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _kept_task(
    item: dict[str, Any],
    store: EventStore,
    prev_root: str,
    tmp: str,
    as_of_ms: int,
    since_ms: int,
) -> dict[str, int]:
    """One bucket: the previous run's rows of users without new events, kept."""
    b = item["bucket"]
    fs, _ = resolve(tmp)
    prev_fs, _ = resolve(prev_root)
    folder = f"{prev_root}/embeddings/bucket={b}"
    found = prev_fs.find(folder) if prev_fs.exists(folder) else []
    files = sorted(p for p in found if p.endswith(".parquet"))
    if not files:
        return {"kept": 0}
    tables = []
    for p in files:
        with prev_fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    old = pa.concat_tables(tables, promote_options="permissive")
    if "country" not in old.column_names:  # a run before the events had one
        old = old.append_column(
            "country", pa.array(np.full(old.num_rows, -1), pa.int16())
        )
    fresh = [
        users_between(ev, since_ms, as_of_ms)
        for ev in _bucket_events(store, b).values()
    ]
    fresh_ids = np.unique(np.concatenate(fresh)) if fresh else np.zeros(0, np.int64)
    keep = ~np.isin(old.column("user_id").to_numpy(), fresh_ids)
    kept = old.filter(pa.array(keep)).select(
        ["user_id", "embedding", "as_of", "model_version", "country"]
    )
    if kept.num_rows:
        write_parquet(fs, f"{tmp}/embeddings/bucket={b}/kept-0.parquet", kept)
    return {"kept": kept.num_rows}


def embeddings_table(
    cols: dict[str, np.ndarray], as_of_ms: int, version: str, dim: int
) -> pa.Table:
    """``user_id`` and ``embedding`` (N, E) (optional ``country``) in the
    embeddings schema, stamped with ``as_of`` and ``model_version``."""
    n = len(cols["user_id"])
    emb = np.asarray(cols["embedding"], np.float32).reshape(n, dim)
    country = cols.get("country")
    return pa.table(
        {
            "user_id": pa.array(cols["user_id"], pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.reshape(-1), pa.float32()), dim
            ),
            "as_of": pa.array(np.full(n, as_of_ms, np.int64)).cast(
                pa.timestamp("ms", "UTC")
            ),
            "model_version": pa.array([version] * n, pa.string()),
            "country": pa.array(
                np.full(n, -1) if country is None else country, pa.int16()
            ),
        },
        schema=EMBEDDING_SCHEMA(dim),
    )


def _to_arrow(
    batch: dict[str, np.ndarray], as_of_ms: int, version: str, dim: int
) -> pa.Table:
    """Ray Data map: the tower's output in the embeddings schema (+ bucket)."""
    t = embeddings_table(batch, as_of_ms, version, dim)
    return t.append_column("bucket", pa.array(batch["bucket"], pa.int32()))


def _embed_local(
    store: EventStore, tmp: str, args: tuple, ckpt: str, cfg: EmbedConfig, meta: tuple
) -> None:
    """The same stages in this process (a ``memory://`` output or input)."""
    fs, _ = resolve(tmp)
    tower = UserTower(ckpt, cfg.use_gpu)
    for b in range(store.num_buckets):
        rows = _user_rows({"bucket": np.array([b])}, *args)
        n = len(rows.get("user_id", ()))
        for i in range(0, n, cfg.batch_size):
            part = tower({k: v[i : i + cfg.batch_size] for k, v in rows.items()})
            t = _to_arrow(part, *meta).drop_columns(["bucket"])
            write_parquet(fs, f"{tmp}/embeddings/bucket={b}/part-{i:09d}.parquet", t)


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

    cfg = cfg or EmbedConfig()
    t0 = time.perf_counter()
    ckpt = absolute_url(resolve_checkpoint(checkpoint))  # loaded by the actors
    _, mcfg, ck = load_checkpoint(ckpt)
    version = model_version(ckpt)
    # the checkpoint's per-source lengths, unless one is given for all
    seq: int | dict[str, int] = cfg.max_seq_len or ck["samples"].lengths()
    buffer_s = ck["samples"].buffer_s
    out = out_url.rstrip("/")
    store = ensure_store(
        events_url, [f"{out}/events"], f"{out}/events", progress=progress
    )
    as_of = cfg.as_of_ms if cfg.as_of_ms is not None else store.ts_max_ms + 1
    fs, root = resolve(out_url)
    local = is_process_local(fs) or is_process_local(resolve(store.url)[0])
    if not local:
        ensure_ray()
        ray.data.DataContext.get_current().enable_progress_bars = progress
    prev_meta = None
    if cfg.incremental and fs.exists(f"{root}/_meta.json"):
        prev_meta = read_json(fs, f"{root}/_meta.json")
    since = None
    if prev_meta is not None and prev_meta.get("model_version") == version:
        if as_of < int(prev_meta["as_of_ms"]):
            raise ValueError(
                f"as_of {as_of} is before the previous run's {prev_meta['as_of_ms']} "
                f"in {out_url}; pass --full to re-embed from scratch"
            )
        since = int(prev_meta["as_of_ms"])
    args = (store, as_of, since, seq, buffer_s)
    row_meta = (as_of, version, mcfg.user_dim)
    kept = 0
    # the meta is placed after the table it describes (atomic_output's files)
    with atomic_output(fs, root, ["embeddings"], files=["_meta.json"]) as tmp_path:
        tmp = url_of(fs, tmp_path)
        if local:
            _embed_local(store, tmp, args, ckpt, cfg, row_meta)
        else:
            (
                ray.data.from_items(
                    [{"bucket": b} for b in range(store.num_buckets)],
                    override_num_blocks=store.num_buckets,
                )
                .map_batches(
                    cast(Any, _user_rows),
                    fn_args=args,
                    batch_size=1,
                    batch_format="numpy",
                )
                .map_batches(
                    UserTower,
                    fn_constructor_args=(ckpt, cfg.use_gpu),
                    batch_size=cfg.batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                    num_gpus=1 if cfg.use_gpu else 0,
                )
                .map_batches(
                    cast(Any, _to_arrow), fn_args=row_meta, batch_format="numpy"
                )
                .write_parquet(
                    f"{tmp_path}/embeddings",
                    partition_cols=["bucket"],
                    filesystem=pyarrow_fs(fs),
                )
            )
        if since is not None:  # workers keep the previous rows of the others
            items = store.bucket_items()
            for r in map_items(
                _kept_task,
                items,
                (store, url_of(fs, root), tmp, as_of, since),
                local=local,
                name="embed: keep previous rows",
                progress=progress,
            ):
                kept += r["kept"]
        total = 0
        for p in fs.find(f"{tmp_path}/embeddings"):
            if p.endswith(".parquet"):
                with fs.open(p, "rb") as fh:
                    total += pq.ParquetFile(fh).metadata.num_rows
        meta = {
            "as_of_ms": as_of,
            "model_version": version,
            "checkpoint": ckpt,
            "max_seq_len": seq,
            "embedded_this_run": total - kept,
            "kept_from_previous": kept,
            "users": total,
            "dim": mcfg.user_dim,
            "num_buckets": store.num_buckets,
            "store": store.url,
            "incremental_since_ms": since,
            "config": asdict(cfg),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        write_json(fs, f"{tmp_path}/_meta.json", meta)
    return meta
