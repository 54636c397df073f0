"""Offline evaluation of u2u retrieval on generated data (``dynamix u2u --eval``).

Embeddings and the graph are built as of ``as_of`` (the start of the last day);
the conversions from ``as_of`` on are held out. Recall@K of those conversions:
u2u candidates vs the most-converted ads before ``as_of`` vs random ads. When
the data has planted truth (``_truth/users.parquet``), a k-means on the
embeddings with as many clusters as were planted is compared with the planted
interest clusters (adjusted Rand index, purity).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dynamix_ray.alure.candidates import (
    CandidateConfig,
    adjusted_rand_index,
    most_popular,
    purity,
    recall_at_k,
    u2u_candidates,
)
from dynamix_ray.events import open_store
from dynamix_ray.io import discover, resolve
from dynamix_ray.schema import SOURCES, validate

__all__ = ["evaluate_retrieval", "read_events_frame"]


def read_events_frame(
    events_url: str, source: str, columns: list[str] | None = None
) -> pd.DataFrame:
    """Valid rows of one source (``ts`` as ``ts_ms``) as a pandas frame
    (``columns``: those of them it has; ``None``: all), in one process.

    For evaluations and catalogs on small data: an event store is read bucket
    by bucket; any other input is validated whole (``schema.validate``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store(events_url)
    if store is not None:
        parts = [
            t
            for b in range(store.num_buckets)
            for t in store.read_bucket(b, {source: None}).values()
        ]
        table = pa.concat_tables(parts, promote_options="permissive") if parts else None
        if table is not None:
            table = table.rename_columns(
                ["ts_ms" if c == "ts" else c for c in table.column_names]
            )
    else:
        ds = discover(events_url, [source], required=[source])
        tables = []
        for p in ds.files[source]:
            with ds.fs.open(p, "rb") as fh:
                t = pq.read_table(fh)
            keep = [*SOURCES[source].attributes, "country"]
            tables.append(validate(t, SOURCES[source], p, keep).valid)
        table = (
            pa.concat_tables(tables, promote_options="permissive") if tables else None
        )
    if table is None:
        raise FileNotFoundError(f"{events_url}: no rows of '{source}'")
    frame = table.to_pandas()
    return frame if columns is None else frame[[c for c in columns if c in frame]]


def evaluate_retrieval(
    events_url: str,
    embeddings: pa.Table,
    edges: pa.Table,
    as_of_ms: int,
    ks: tuple[int, ...] = (50, 200, 1500),
    cfg: CandidateConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@K of held-out conversions and planted-cluster recovery.

    Returns:
        ``{"recall": {K: {"u2u", "most_popular", "random"}}, "held_out",
        "users_with_candidates", "cluster_ari", "cluster_purity"}``.
    """
    import faiss

    conv = read_events_frame(events_url, "conversions", ["user_id", "ts_ms", "ad_id"])
    ads = read_events_frame(events_url, "ad_impressions", ["ad_id", "advertiser_id"])
    ads = ads.drop_duplicates("ad_id")
    users = embeddings.column("user_id").to_numpy()
    held = conv[(conv["ts_ms"] >= as_of_ms) & conv["user_id"].isin(users)]
    cands = u2u_candidates(edges.to_pandas(), conv, ads, as_of_ms, cfg)
    rng = np.random.default_rng(seed)
    catalog = ads["ad_id"].to_numpy()
    recall: dict[str, dict[str, float]] = {}
    for k in ks:
        pop = most_popular(conv, as_of_ms, k)
        pop_c = pd.DataFrame(
            {
                "user_id": np.repeat(users, len(pop)),
                "ad_id": np.tile(pop, len(users)),
                "rank": np.tile(np.arange(1, len(pop) + 1), len(users)),
            }
        )
        rand = np.stack(
            [rng.choice(catalog, min(k, len(catalog)), replace=False) for _ in users]
        )
        rand_c = pd.DataFrame(
            {
                "user_id": np.repeat(users, rand.shape[1]),
                "ad_id": rand.reshape(-1),
                "rank": np.tile(np.arange(1, rand.shape[1] + 1), len(users)),
            }
        )
        recall[str(k)] = {
            "u2u": recall_at_k(cands, held, k),
            "most_popular": recall_at_k(pop_c, held, k),
            "random": recall_at_k(rand_c, held, k),
        }
    out: dict[str, Any] = {
        "as_of_ms": as_of_ms,
        "held_out_conversions": int(len(held)),
        "users": int(len(users)),
        "users_with_candidates": int(cands["user_id"].nunique()),
        "mean_candidates": float(cands.groupby("user_id").size().mean())
        if len(cands)
        else 0.0,
        "recall": recall,
    }
    fs, root = resolve(events_url)
    truth_path = f"{root}/_truth/users.parquet"
    if fs.exists(truth_path):
        import pyarrow.parquet as pq

        with fs.open(truth_path, "rb") as fh:
            truth = pq.read_table(fh, columns=["user_id", "cluster"]).to_pandas()
        planted = (
            pd.Series(truth["cluster"].to_numpy(), index=truth["user_id"])
            .reindex(users)
            .to_numpy()
        )
        known = ~np.isnan(planted.astype(np.float64))
        dim = embeddings.column("embedding").type.list_size
        x = (
            embeddings.column("embedding")
            .combine_chunks()
            .values.to_numpy()
            .reshape(-1, dim)
            .astype(np.float32)[known]
        )
        k = len(np.unique(planted[known]))
        km = faiss.Kmeans(dim, k, niter=25, spherical=True, seed=seed, nredo=3)
        km.train(x)
        _, pred = km.index.search(x, 1)
        out["cluster_ari"] = adjusted_rand_index(pred[:, 0], planted[known])
        out["cluster_purity"] = purity(pred[:, 0], planted[known])
        out["planted_clusters"] = k
    return out
