"""The user-to-user graph (ALURE §3, ``dynamix u2u``).

Per country (or for everyone when the embeddings carry none):

1. spherical k-means (``faiss.Kmeans(spherical=True)``) with ``k1`` clusters,
2. an IVF index (``faiss.IndexIVFFlat``, inner product = cosine on the
   L2-normalised embeddings) whose coarse quantizer holds those centroids,
3. every user's ``k2`` nearest other users, searching the ``k1_probe``
   nearest clusters. Queries are independent: a Ray Data ``map_batches``
   over the embedding files shards them over tasks; each worker process loads
   every group's index once (memory-mapped from local disk) and keeps it for
   its next task, and the workers write the edges themselves.

Each group's index is built in a Ray task of its own (it reads the group's
embeddings, trains k-means, measures recall) and written to
``OUT/u2u_index/<version>/group=G.faiss``; the driver holds no embedding and no edge.

The paper uses k1 = 400, k1' = 50, k2 = 15 per country on billions of users:
probing 1/8 of the clusters, each query scans 1/8 of its country, so the
search costs O(n^2) and a country 10x larger takes 100x longer. The defaults
here keep a query's work bounded instead (docs/data-path.md, "The u2u
graph"): about :data:`USERS_PER_LIST` users per cluster (``k1 = n / USERS_PER_LIST``) and a
fixed :data:`DEFAULT_PROBE` clusters probed, so a query scans about 16k
users whatever the country's size. Above :data:`HNSW_ABOVE` clusters the
centroids sit in an HNSW graph, for k-means' assignment step and as the
coarse quantizer, so neither costs O(k1) a point. Neighbour recall against
exact brute-force search on a sample of queries is measured on every build
and recorded in ``u2u/_meta.json``.

Output ``OUT/u2u/<version>/*.parquet``, published by ``OUT/u2u/_CURRENT.json``
(``io.publish``): ``user_id``, ``neighbor_id`` (int64),
``similarity`` (float32 cosine), ``rank`` (int16, 1 = nearest); directed edges.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.io import (
    check_complete,
    is_process_local,
    publish,
    published_version,
    pyarrow_fs,
    read_parquet_folder,
    resolve,
    url_of,
    write_json,
    write_parquet,
)
from dynamix_ray.runtime import ensure_ray, map_items

__all__ = [
    "DEFAULT_PROBE",
    "HNSW_ABOVE",
    "USERS_PER_LIST",
    "U2UConfig",
    "build_u2u",
    "default_k1",
    "default_probe",
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
    k1_probe: clusters searched per query (``None``: :data:`DEFAULT_PROBE`,
        at most k1).
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


#: Users per IVF list that :func:`default_k1` aims at.
USERS_PER_LIST = 1024
#: Lists a query probes by default: with :data:`USERS_PER_LIST`, about 16k
#: users scanned per query at any country size.
DEFAULT_PROBE = 16
#: More clusters than this: k-means assigns points, and the index finds a
#: query's lists, through an HNSW graph of the centroids instead of a scan.
HNSW_ABOVE = 4096
#: HNSW neighbours per node, and its search breadth (at least 2x the probe).
HNSW_M, HNSW_EF = 32, 64


def default_k1(n: int) -> int:
    """About ``n / USERS_PER_LIST`` clusters (at least 39 points each, at least 1)."""
    return max(1, min(n // 39, math.ceil(n / USERS_PER_LIST)))


def default_probe(k1: int, probe: int | None = None) -> int:
    """Clusters a query probes: ``probe`` or :data:`DEFAULT_PROBE`, at most k1."""
    return min(k1, probe or DEFAULT_PROBE)


def _centroid_index(d: int, k1: int, probe: int, hnsw_above: int) -> Any:
    """Where centroids are looked up: a flat inner-product scan, or an HNSW
    graph (inner product) above ``hnsw_above`` clusters."""
    import faiss

    if k1 <= hnsw_above:
        return faiss.IndexFlatIP(d)
    index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(HNSW_EF, 2 * probe)
    return index


def ivf_index(
    x: np.ndarray,
    ids: np.ndarray,
    k1: int,
    niter: int = 20,
    seed: int = 0,
    probe: int | None = None,
    hnsw_above: int = HNSW_ABOVE,
) -> Any:
    """Spherical k-means centroids as the coarse quantizer of an inner-product
    ``IndexIVFFlat`` holding ``x`` (float32, L2-normalised) under ``ids``.
    k-means trains on at most 256 points a cluster (faiss's sample), so its
    cost per iteration is O(n log k1) with the HNSW assignment above
    ``hnsw_above`` clusters."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    probe = default_probe(k1, probe)
    km = faiss.Kmeans(d, k1, niter=niter, spherical=True, seed=seed, verbose=False)
    km.index = _centroid_index(d, k1, probe, hnsw_above)
    km.train(x)
    quantizer = _centroid_index(d, k1, probe, hnsw_above)
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


#: Indexes loaded by this worker process, by file: Ray reuses a worker process
#: for the next task, so each one loads (memory-maps) every index once.
_LOADED: dict[str, Any] = {}


def _search_task(
    batch: dict[str, np.ndarray],
    index_paths: dict[int, str],
    nprobes: dict[int, int],
    k2: int,
) -> dict[str, np.ndarray]:
    """Ray Data map: neighbours of a batch of users, with this process's
    loaded indexes (tasks, not an actor pool: no actor holds a CPU that the
    reading tasks need)."""
    import faiss

    faiss.omp_set_num_threads(1)
    for p in index_paths.values():
        if p not in _LOADED:
            _LOADED[p] = _load_index(p)
    indexes = {g: _LOADED[p] for g, p in index_paths.items()}
    return search_batch(batch, indexes, k2, nprobes)


def _load_index(url: str) -> Any:
    """A faiss index file: memory-mapped when local, else read whole."""
    import faiss

    fs, path = resolve(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    with fs.open(path, "rb") as fh:
        return faiss.deserialize_index(np.frombuffer(fh.read(), np.uint8))


def _group_of(country: np.ndarray | None, n: int, per_country: bool) -> np.ndarray:
    if per_country and country is not None:
        return np.nan_to_num(np.asarray(country, np.float64), nan=-1).astype(np.int64)
    return np.zeros(n, np.int64)


def search_batch(
    batch: dict[str, np.ndarray],
    indexes: dict[int, Any],
    k2: int,
    nprobes: dict[int, int],
    per_country: bool = True,
) -> dict[str, np.ndarray]:
    """Neighbours of a batch of users (any groups): the edges' columns."""
    uid = np.asarray(batch["user_id"], np.int64)
    x = np.asarray(list(batch["embedding"]), dtype=np.float32).reshape(len(uid), -1)
    group = _group_of(batch.get("country"), len(uid), per_country)
    out_u, out_n, out_s, out_r = [], [], [], []
    for g in np.unique(group):
        sel = group == g
        ids, sims = search(indexes[int(g)], x[sel], uid[sel], k2, nprobes[int(g)])
        rank = np.broadcast_to(np.arange(1, k2 + 1, dtype=np.int16), ids.shape)
        ok = ids >= 0
        out_u.append(np.broadcast_to(uid[sel][:, None], ids.shape)[ok])
        out_n.append(ids[ok])
        out_s.append(sims[ok])
        out_r.append(rank[ok])
    cat = lambda a, t: np.concatenate(a).astype(t) if a else np.zeros(0, t)  # noqa: E731
    return {
        "user_id": cat(out_u, np.int64),
        "neighbor_id": cat(out_n, np.int64),
        "similarity": cat(out_s, np.float32),
        "rank": cat(out_r, np.int16),
    }


def _embedding_files(url: str) -> list[str]:
    fs, root = resolve(url)
    files = sorted(p for p in fs.find(f"{root}/embeddings") if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"{url}: embeddings/ holds no Parquet files")
    return files


def _tables(source: str | pa.Table) -> list[pa.Table]:
    """The embedding tables of a ``dynamix embed`` OUT (one per file), or the
    table itself."""
    if isinstance(source, pa.Table):
        return [source]
    fs, _ = resolve(source)
    tables = []
    for p in _embedding_files(source):
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return tables


def _read_group(
    source: str | pa.Table, group: int | None, per_country: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, (n, E) float32) of one group (``None``: everyone)."""
    ids, xs = [], []
    for t in _tables(source):
        uid = t.column("user_id").to_numpy()
        country = (
            t.column("country").to_numpy(zero_copy_only=False)
            if "country" in t.column_names
            else None
        )
        g = _group_of(country, len(uid), per_country)
        sel = np.ones(len(uid), bool) if group is None else g == group
        emb = t.column("embedding").combine_chunks()
        dim = emb.type.list_size
        x = emb.values.to_numpy().reshape(-1, dim)
        ids.append(uid[sel])
        xs.append(x[sel].astype(np.float32))
    return np.concatenate(ids), np.concatenate(xs)


def _groups_task(item: dict[str, Any], per_country: bool) -> list[int]:
    """The groups (countries) present in one embeddings file."""
    fs, _ = resolve(item["file"])
    with fs.open(item["file"], "rb") as fh:
        names = pq.ParquetFile(fh).schema_arrow.names
        if not per_country or "country" not in names:
            return [0]
        col = pq.read_table(fh, columns=["country"]).column("country")
    c = col.to_numpy(zero_copy_only=False)
    return np.unique(_group_of(c, len(c), True)).tolist()


def _build_group(
    item: dict[str, Any], source: str | pa.Table, cfg: U2UConfig, index_root: str
) -> dict[str, Any]:
    """One group's index: k-means, IVF, measured recall; written to storage."""
    import faiss

    g = item["group"]
    uid, x = _read_group(source, g, cfg.per_country)
    n = len(uid)
    k1 = min(cfg.k1 or default_k1(n), n)
    probe = default_probe(k1, cfg.k1_probe)
    t0 = time.perf_counter()
    index = ivf_index(x, uid, k1, cfg.niter, cfg.seed, probe)
    index_s = time.perf_counter() - t0
    rng = np.random.default_rng([cfg.seed, g + (1 << 20)])
    sample = rng.choice(n, min(cfg.recall_sample, n), replace=False)
    approx, _ = search(index, x[sample], uid[sample], cfg.k2, probe)
    exact, _ = exact_neighbors(x, uid, x[sample], uid[sample], cfg.k2)
    fs, _ = resolve(index_root)
    path = f"{index_root}/group={g}.faiss"
    fs.makedirs(index_root, exist_ok=True)
    with fs.open(path, "wb") as fh:  # streamed: no second copy of the index
        writer = faiss.PyCallbackIOWriter(fh.write)  # type: ignore[attr-defined]
        faiss.write_index(index, writer)
        del writer  # flushes
    return {
        "group": g,
        "users": n,
        "k1": k1,
        "k1_probe": probe,
        "recall_at_k2": neighbor_recall(approx, exact),
        "recall_queries": len(sample),
        "index_s": round(index_s, 3),
        "path": path,
    }


def read_u2u(url: str) -> pa.Table:
    """The edges of the published version of a ``dynamix u2u`` output folder
    (checked against its pointer's counts)."""
    fs, root = resolve(url)
    folder = check_complete(fs, root, "u2u", published_version(url, "u2u"))
    missing = f"{url}: the published u2u graph has no edge file"
    return read_parquet_folder(fs, folder, missing).cast(U2U_SCHEMA)


def build_u2u(
    embeddings: str | pa.Table,
    out_url: str,
    cfg: U2UConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the graph of ``embeddings`` (a ``dynamix embed`` OUT, or a table
    of ``user_id``, ``embedding``, optional ``country``) into
    ``out_url/u2u/`` and ``out_url/u2u/_meta.json``, with each group's index
    in ``out_url/u2u_index/``.

    Returns:
        The ``_meta.json`` contents: parameters and measured recall per group,
        users, edges, timings.
    """
    import ray

    cfg = cfg or U2UConfig()
    t0 = time.perf_counter()
    fs, root = resolve(out_url)
    in_memory = isinstance(embeddings, pa.Table)
    local = (
        in_memory or is_process_local(fs) or is_process_local(resolve(embeddings)[0])
    )
    if not local:
        ensure_ray()
        ray.data.DataContext.get_current().enable_progress_bars = progress
    if isinstance(embeddings, pa.Table):
        uid_all = embeddings.column("user_id").to_numpy()
        c = (
            embeddings.column("country").to_numpy(zero_copy_only=False)
            if "country" in embeddings.column_names
            else None
        )
        groups = sorted(
            set(np.unique(_group_of(c, len(uid_all), cfg.per_country)).tolist())
        )
        dim = embeddings.column("embedding").type.list_size
    else:
        files = _embedding_files(embeddings)
        found: set[int] = set()
        for r in map_items(
            _groups_task,
            [{"file": f} for f in files],
            (cfg.per_country,),
            local=local,
            name="u2u: groups",
            progress=False,
        ):
            found.update(r)
        groups = sorted(found)
        with resolve(files[0])[0].open(files[0], "rb") as fh:
            dim = pq.ParquetFile(fh).schema_arrow.field("embedding").type.list_size
    with publish(fs, root, ["u2u", "u2u_index"]) as version:
        index_root = url_of(fs, version.path("u2u_index"))
        edges_root = version.path("u2u")
        t_build = time.perf_counter()
        built = list(
            map_items(
                _build_group,
                [{"group": g} for g in groups],
                (embeddings, cfg, index_root),
                local=local,
                name="u2u: index per group",
                progress=progress,
            )
        )
        build_s = time.perf_counter() - t_build
        nprobes = {b["group"]: b["k1_probe"] for b in built}
        # the index paths in their version folder (searched before the publish)
        paths = {b["group"]: b["path"] for b in built}
        t_query = time.perf_counter()
        if local:
            indexes = {g: _load_index(p) for g, p in paths.items()}
            for i, t in enumerate(_tables(embeddings)):
                for j in range(0, t.num_rows, 4096):
                    part = t.slice(j, 4096)
                    batch = {
                        c: part.column(c).to_numpy(zero_copy_only=False)
                        for c in part.column_names
                    }
                    edges = search_batch(
                        batch, indexes, cfg.k2, nprobes, cfg.per_country
                    )
                    write_parquet(
                        fs,
                        f"{edges_root}/part-{i:05d}-{j // 4096:05d}.parquet",
                        pa.table(edges, schema=U2U_SCHEMA),
                    )
        else:
            assert isinstance(embeddings, str)
            (
                ray.data.read_parquet(
                    files,
                    columns=["user_id", "embedding", "country"]
                    if cfg.per_country and any_country(files)
                    else ["user_id", "embedding"],
                    filesystem=pyarrow_fs(resolve(files[0])[0]),
                )
                .map_batches(
                    cast(Any, _search_task),
                    fn_args=(paths, nprobes, cfg.k2),
                    batch_size=4096,
                    batch_format="numpy",
                )
                .write_parquet(edges_root, filesystem=pyarrow_fs(fs))
            )
        query_s = time.perf_counter() - t_query
        users = edges_n = 0
        for p in fs.find(edges_root):
            if p.endswith(".parquet"):
                with fs.open(p, "rb") as fh:
                    edges_n += pq.ParquetFile(fh).metadata.num_rows
        users = sum(b["users"] for b in built)
        recalls = [b["recall_at_k2"] for b in built]
        weights = [b["recall_queries"] for b in built]
        meta = {
            "config": asdict(cfg),
            "users": users,
            "edges": edges_n,
            "dim": dim,
            "groups": {
                str(b["group"]): {
                    k: v for k, v in b.items() if k not in ("group", "path")
                }
                for b in built
            },
            "recall_at_k2": float(np.average(recalls, weights=weights))
            if built
            else 1.0,
            "build_s": round(build_s, 3),
            "query_s": round(query_s, 3),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        write_json(fs, f"{edges_root}/_meta.json", meta)
    return meta


def any_country(files: list[str]) -> bool:
    """Whether the embedding files carry a ``country`` column."""
    fs, _ = resolve(files[0])
    with fs.open(files[0], "rb") as fh:
        return "country" in pq.ParquetFile(fh).schema_arrow.names
