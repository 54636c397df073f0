"""The user-to-user graph (ALURE §3, ``dynamix u2u``).

Per country (or for everyone when the embeddings carry none):

1. spherical k-means (``faiss.Kmeans(spherical=True)``) with ``k1`` clusters,
2. an IVF index (``faiss.IndexIVFFlat``, inner product = cosine on the
   L2-normalised embeddings) whose coarse quantizer holds those centroids,
3. every user's ``k2`` nearest other users, searching the ``k1_probe``
   nearest clusters. Queries are independent: a Ray Data ``map_batches``
   shards them over the cluster, each task deserialising the index once.

The paper uses k1 = 400, k1' = 50, k2 = 15 per country on billions of users;
the defaults here scale k1 with the users of a country (about 4 sqrt(n), at
least 39 users per cluster, at most 400) and probe 1/8 of the clusters (at
least 8), which is the paper's ratio. Neighbour recall against exact
brute-force search on a sample of queries is measured on every build and
recorded in ``u2u/_meta.json``.

Output ``OUT/u2u/*.parquet``: ``user_id``, ``neighbor_id`` (int64),
``similarity`` (float32 cosine), ``rank`` (int16, 1 = nearest); directed edges.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from dynamix_ray.io import (
    atomic_output,
    read_parquet_folder,
    resolve,
    write_json,
    write_parquet,
)

__all__ = [
    "U2UConfig",
    "build_u2u",
    "default_k1",
    "exact_neighbors",
    "ivf_index",
    "neighbor_recall",
    "read_u2u",
    "search",
]

U2U_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("neighbor_id", pa.int64()),
        ("similarity", pa.float32()),
        ("rank", pa.int16()),
    ]
)


@dataclass(frozen=True)
class U2UConfig:
    """Args:
    k1: k-means clusters per country (``None``: :func:`default_k1`).
    k1_probe: clusters searched per query (``None``: max(8, k1 / 8), at most k1).
    k2: neighbours per user.
    niter: k-means iterations.
    recall_sample: queries per country checked against exact search.
    per_country: build one graph per ``country`` when the column exists.
    seed: k-means and sampling seed.
    """

    k1: int | None = None
    k1_probe: int | None = None
    k2: int = 15
    niter: int = 20
    recall_sample: int = 1000
    per_country: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("k1", "k1_probe"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.k2 < 1:
            raise ValueError(f"k2 must be >= 1, got {self.k2}")


def default_k1(n: int) -> int:
    """About 4 sqrt(n) clusters, at least 39 points each, between 1 and 400."""
    return max(1, min(400, round(4 * math.sqrt(n)), n // 39))


def ivf_index(
    x: np.ndarray, ids: np.ndarray, k1: int, niter: int = 20, seed: int = 0
) -> Any:
    """Spherical k-means centroids as the coarse quantizer of an inner-product
    ``IndexIVFFlat`` holding ``x`` (float32, L2-normalised) under ``ids``."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    km = faiss.Kmeans(d, k1, niter=niter, spherical=True, seed=seed, verbose=False)
    km.train(x)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(cast(np.ndarray, km.centroids))
    index = faiss.IndexIVFFlat(quantizer, d, k1, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def search(
    index: Any, q: np.ndarray, q_ids: np.ndarray, k2: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k2`` nearest *other* users of each query: ``(ids, sims)`` (n, k2);
    ``-1`` / ``nan`` where fewer exist."""
    index.nprobe = nprobe
    sims, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), k2 + 1)
    return _drop_self(ids, sims, q_ids, k2)


def _drop_self(
    ids: np.ndarray, sims: np.ndarray, q_ids: np.ndarray, k2: int
) -> tuple[np.ndarray, np.ndarray]:
    keep = (ids != q_ids[:, None]) & (ids >= 0)
    # stable: move kept entries to the front, in their (similarity) order
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k2]
    out_ids = np.take_along_axis(ids, order, 1)
    out_sims = np.take_along_axis(sims, order, 1).astype(np.float32)
    ok = np.take_along_axis(keep, order, 1)
    return np.where(ok, out_ids, -1), np.where(ok, out_sims, np.nan)


def exact_neighbors(
    x: np.ndarray, ids: np.ndarray, q: np.ndarray, q_ids: np.ndarray, k2: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product neighbours (faiss ``IndexFlatIP``), self excluded."""
    import faiss

    flat = faiss.IndexIDMap(faiss.IndexFlatIP(x.shape[1]))
    flat.add_with_ids(
        np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64)
    )
    sims, got = flat.search(np.ascontiguousarray(q, np.float32), k2 + 1)
    return _drop_self(got, sims, q_ids, k2)


def neighbor_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (ids; -1 ignored)."""
    hits, total = 0, 0
    for a, e in zip(approx, exact, strict=True):
        e = e[e >= 0]
        hits += len(np.intersect1d(a[a >= 0], e))
        total += len(e)
    return hits / total if total else 1.0


def _search_batch(
    batch: dict[str, np.ndarray],
    indexes: dict[int, Any],
    k2: int,
    nprobes: dict[int, int],
) -> dict[str, np.ndarray]:
    """Ray Data map: neighbours of a batch of users (any countries)."""
    import faiss

    faiss.omp_set_num_threads(1)
    uid = batch["user_id"]
    x = np.asarray(list(batch["embedding"]), dtype=np.float32)
    group = batch["group"]
    out_u, out_n, out_s, out_r = [], [], [], []
    for g in np.unique(group):
        sel = group == g
        index = faiss.deserialize_index(indexes[int(g)])
        ids, sims = search(index, x[sel], uid[sel], k2, nprobes[int(g)])
        rank = np.broadcast_to(np.arange(1, k2 + 1, dtype=np.int16), ids.shape)
        ok = ids >= 0
        out_u.append(np.broadcast_to(uid[sel][:, None], ids.shape)[ok])
        out_n.append(ids[ok])
        out_s.append(sims[ok])
        out_r.append(rank[ok])
    return {
        "user_id": np.concatenate(out_u).astype(np.int64),
        "neighbor_id": np.concatenate(out_n).astype(np.int64),
        "similarity": np.concatenate(out_s).astype(np.float32),
        "rank": np.concatenate(out_r).astype(np.int16),
    }


def read_u2u(url: str) -> pa.Table:
    """The edges of a ``dynamix u2u`` output folder."""
    fs, root = resolve(url)
    missing = f"{url}: no u2u/*.parquet (run `dynamix u2u`)"
    if not fs.exists(f"{root}/u2u"):
        raise FileNotFoundError(missing)
    return read_parquet_folder(fs, f"{root}/u2u", missing).cast(U2U_SCHEMA)


def build_u2u(
    embeddings: pa.Table,
    out_url: str,
    cfg: U2UConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the graph of ``embeddings`` (``user_id``, ``embedding``, optional
    ``country``) into ``out_url/u2u/`` and ``out_url/u2u/_meta.json``.

    Returns:
        The ``_meta.json`` contents: parameters and measured recall per group,
        users, edges, timings.
    """
    import faiss
    import ray

    from dynamix_ray.runtime import cluster_cpus, ensure_ray

    cfg = cfg or U2UConfig()
    t0 = time.perf_counter()
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    uid = embeddings.column("user_id").to_numpy()
    emb = embeddings.column("embedding")
    dim = emb.type.list_size
    x = emb.combine_chunks().values.to_numpy().reshape(-1, dim).astype(np.float32)
    if cfg.per_country and "country" in embeddings.column_names:
        group = embeddings.column("country").to_numpy().astype(np.int64)
    else:
        group = np.zeros(len(uid), np.int64)
    rng = np.random.default_rng(cfg.seed)
    indexes, nprobes, groups_meta = {}, {}, {}
    recalls, weights = [], []
    t_build = time.perf_counter()
    for g in np.unique(group):
        sel = np.flatnonzero(group == g)
        n = len(sel)
        k1 = min(cfg.k1 or default_k1(n), n)
        probe = min(k1, cfg.k1_probe or max(8, k1 // 8))
        index = ivf_index(x[sel], uid[sel], k1, cfg.niter, cfg.seed)
        sample = rng.choice(sel, min(cfg.recall_sample, n), replace=False)
        approx, _ = search(index, x[sample], uid[sample], cfg.k2, probe)
        exact, _ = exact_neighbors(x[sel], uid[sel], x[sample], uid[sample], cfg.k2)
        recall = neighbor_recall(approx, exact)
        recalls.append(recall)
        weights.append(len(sample))
        indexes[int(g)] = faiss.serialize_index(index)
        nprobes[int(g)] = probe
        groups_meta[str(int(g))] = {
            "users": n,
            "k1": k1,
            "k1_probe": probe,
            "recall_at_k2": recall,
            "recall_queries": len(sample),
        }
    build_s = time.perf_counter() - t_build

    t_query = time.perf_counter()
    n_blocks = max(1, min(4 * cluster_cpus(), len(uid) // 2000 or 1))
    table = pa.table(
        {
            "user_id": pa.array(uid, pa.int64()),
            "embedding": emb,
            "group": pa.array(group, pa.int64()),
        }
    )
    ds = ray.data.from_arrow(table).repartition(n_blocks)
    edges_ds = ds.map_batches(
        cast(Any, _search_batch),
        fn_args=(indexes, cfg.k2, nprobes),
        batch_size=4096,
        batch_format="numpy",
    )
    fs, root = resolve(out_url)
    edges = 0
    with atomic_output(fs, root, ["u2u"]) as tmp:
        for i, b in enumerate(
            edges_ds.iter_batches(batch_size=None, batch_format="pyarrow")
        ):
            t = cast(pa.Table, b).cast(U2U_SCHEMA)
            edges += t.num_rows
            write_parquet(fs, f"{tmp}/u2u/part-{i:05d}.parquet", t)
        query_s = time.perf_counter() - t_query
        meta = {
            "config": asdict(cfg),
            "users": len(uid),
            "edges": edges,
            "dim": dim,
            "groups": groups_meta,
            "recall_at_k2": float(np.average(recalls, weights=weights)),
            "build_s": round(build_s, 3),
            "query_s": round(query_s, 3),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        write_json(fs, f"{tmp}/u2u/_meta.json", meta)
    return meta
