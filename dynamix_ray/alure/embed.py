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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamix_ray.histories import data_end_ms, history_dataset, user_histories
from dynamix_ray.io import (
    atomic_output,
    read_parquet_folder,
    resolve,
    write_json,
    write_parquet,
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


def read_embeddings(url: str) -> pa.Table:
    """The embeddings table of a ``dynamix embed`` output folder."""
    fs, root = resolve(url)
    path = f"{root}/embeddings"
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no embeddings/ (run `dynamix embed`)")
    return read_parquet_folder(fs, path, f"{url}: embeddings/ holds no Parquet files")


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

    from dynamix_ray.runtime import ensure_ray
    from dynamix_ray.train import load_checkpoint, resolve_checkpoint

    cfg = cfg or EmbedConfig()
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    _, mcfg, _ = load_checkpoint(ckpt)
    version = model_version(ckpt)
    seq = cfg.max_seq_len or mcfg.max_seq_len
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    as_of = cfg.as_of_ms if cfg.as_of_ms is not None else data_end_ms(events_url)
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

    histories = history_dataset(events_url, as_of, seq, since)
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
