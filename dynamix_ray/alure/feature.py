"""ALURE's embedding as a CTR feature (ALURE §2.4 and §5.1; issue 7 part 4).

The embedding is asynchronous: a daily job (``dynamix embed --daily``) embeds
every user as of each UTC midnight with a trained model's user tower. A sample
at time ``t`` gets the embedding of the last midnight at or before
``t - buffer_s``: built only from events before that midnight, so nothing the
sample's own history may not see (docs/contract.md §6: events before ``t - buffer_s``)
leaks in, and up to a day stale, as a daily job's output is in production.
Users without an embedding that day get zeros.

::

    events + checkpoint ─ run_embed per midnight ─► OUT/day=YYYY-MM-DD/embeddings/
    samples ─ loader.SegmentBatcher (attach_daily) ─► "alure" (N, E) ─► head input
                                        of a model with ModelConfig.ext_dim = E
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynamix_ray.io import read_json, resolve, write_json

__all__ = [
    "DailyEmbeddings",
    "attach_daily",
    "read_daily",
    "read_daily_meta",
    "run_daily_embed",
]

DAY_MS = 86_400_000


def _day_name(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("day=%Y-%m-%d")


def run_daily_embed(
    events_url: str,
    checkpoint: str,
    out_url: str,
    cfg: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every user as of each UTC midnight after the data's first day and
    up to its end, into ``OUT/day=YYYY-MM-DD/``; ``OUT/_daily.json`` lists them."""
    from dataclasses import replace

    from dynamix_ray.alure.embed import EmbedConfig, run_embed
    from dynamix_ray.events import ensure_store

    t0 = time.perf_counter()
    cfg = cfg or EmbedConfig()
    out = out_url.rstrip("/")
    # one event store for every day's run (the input itself when it is one)
    store = ensure_store(
        events_url, [f"{out}/events"], f"{out}/events", progress=progress
    )
    events_url = store.url
    first = int(store.meta["sources"]["ad_impressions"]["ts_min_ms"])
    end = store.ts_max_ms + 1
    days = list(range((first // DAY_MS + 1) * DAY_MS, end + 1, DAY_MS))
    if not days:
        raise ValueError(f"{events_url}: the data spans no midnight")
    fs, root = resolve(out_url)
    for d in days:
        run_embed(
            events_url,
            checkpoint,
            f"{out_url.rstrip('/')}/{_day_name(d)}",
            replace(cfg, as_of_ms=d, incremental=False),
            progress=progress,
        )
    meta = {
        "days_ms": days,
        "folders": [_day_name(d) for d in days],
        "checkpoint": checkpoint,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    write_json(fs, f"{root}/_daily.json", meta)
    return meta


@dataclass(frozen=True)
class DailyEmbeddings:
    """``emb[d, u]``: user ``user_id[u]`` as of midnight ``days_ms[d]``."""

    user_id: np.ndarray  # (U,) sorted
    days_ms: np.ndarray  # (D,) sorted
    emb: np.ndarray  # (D, U, E) float32, zeros where a user had no embedding

    @property
    def dim(self) -> int:
        return int(self.emb.shape[2])


def attach_daily(
    users: np.ndarray,
    days_ms: np.ndarray,
    emb: np.ndarray,
    user_id: np.ndarray,
    t_ms: np.ndarray,
) -> np.ndarray:
    """(N, E): the embedding as of the last midnight <= ``t_ms`` (pass the
    history's bound ``t - buffer``, as ``loader.SegmentBatcher`` does), zeros
    where none."""
    q = np.asarray(user_id, np.int64)
    day = np.searchsorted(days_ms, np.asarray(t_ms, np.int64), "right") - 1
    pos = np.searchsorted(users, q)
    hit = (pos < len(users)) & (day >= 0)
    hit[hit] = users[pos[hit]] == q[hit]
    out = np.zeros((len(q), emb.shape[2]), np.float32)
    out[hit] = emb[day[hit], pos[hit]]
    return out


def read_daily_meta(url: str) -> dict[str, Any]:
    """``_daily.json`` of a ``dynamix embed --daily`` OUT, with ``dim``."""
    from dynamix_ray.alure.embed import read_embeddings_meta

    fs, root = resolve(url)
    if not fs.exists(f"{root}/_daily.json"):
        raise FileNotFoundError(f"{url}: no _daily.json (run `dynamix embed --daily`)")
    meta = dict(read_json(fs, f"{root}/_daily.json"))
    first = read_embeddings_meta(f"{url.rstrip('/')}/{meta['folders'][0]}")
    meta["dim"] = int(first["dim"])
    return meta


def read_daily(url: str) -> DailyEmbeddings:
    """The :class:`DailyEmbeddings` of a ``dynamix embed --daily`` OUT."""
    from dynamix_ray.alure.embed import read_embeddings

    fs, root = resolve(url)
    if not fs.exists(f"{root}/_daily.json"):
        raise FileNotFoundError(f"{url}: no _daily.json (run `dynamix embed --daily`)")
    meta = read_json(fs, f"{root}/_daily.json")
    tables = [read_embeddings(f"{url.rstrip('/')}/{f}") for f in meta["folders"]]
    users = np.unique(np.concatenate([t.column("user_id").to_numpy() for t in tables]))
    dim = tables[0].column("embedding").type.list_size
    emb = np.zeros((len(tables), len(users), dim), np.float32)
    for d, t in enumerate(tables):
        x = t.column("embedding").combine_chunks().values.to_numpy().reshape(-1, dim)
        emb[d, np.searchsorted(users, t.column("user_id").to_numpy())] = x
    return DailyEmbeddings(users, np.asarray(meta["days_ms"], np.int64), emb)
