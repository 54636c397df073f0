"""``dynamix candidates``: every user's capped u2u candidates, precomputed
as of an instant into a versioned table, so that ``/candidates`` is one
look-up (docs/serving.md, "Candidates in O(1)").

The rule is :func:`candidates.u2u_candidates` (the one-process reference,
tested equal); here it runs as three passes of tasks over the event store's
user buckets, with two shuffles through storage (``shuffle.py``), so no task
holds more than a bucket and the driver holds only the ad catalog (per ad,
not per user):

1. **catalog** (a task per bucket): ``ad_id -> advertiser_id`` and
   conversions per ad before ``as_of``, merged in the driver into each
   advertiser's top ads;
2. **edges by neighbour** (a task per u2u edge file): the edges, grouped by
   the *neighbour's* bucket;
3. **direct scores** (a task per bucket B): the edges whose neighbour is in B,
   joined with B's conversions: partial ``(user, ad, score)`` sums, grouped by
   the *user's* bucket;
4. **rank** (a task per bucket): a bucket's users' partial sums added up,
   their advertisers' top ads added, ranked and capped, written to
   ``OUT/candidates/<version>/bucket=K/part-0.parquet``.

With a blend (``--blend``, docs/retrieval.md), pass 1 also returns each
bucket's popularity and co-conversion counts (per ad and per ad pair, summed
in the driver into the popular list and the item similarity), and pass 4
blends each bucket user's u2u, popular and item-CF lists
(:func:`blend_bucket`, the same pieces the evaluation scores).

Files: O(edge files + buckets). The table is published by its pointer
(``io.publish``) with ``_meta.json`` (``as_of_ms``, the config, the u2u
version it came from).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_ray.alure.candidates import (
    CandidateConfig,
    ad_catalog,
    advertiser_top,
    direct_scores,
    expand_and_rank,
    neighbour_conversions,
)
from dynamix_ray.alure.retrieval import (
    BlendSpec,
    blend,
    co_conversions,
    item_cf_lists,
    item_similarity,
    last_ads,
    merge_sums,
    popular_lists,
    popularity,
    seen_pairs,
)
from dynamix_ray.events import EventStore, ensure_store
from dynamix_ray.histories import NODE_CACHE_MANIFEST, mode_by_user, open_node_cached
from dynamix_ray.io import (
    check_complete,
    is_process_local,
    publish,
    published_version,
    read_json,
    resolve,
    url_of,
    user_bucket,
    write_json,
    write_parquet,
)
from dynamix_ray.runtime import map_items
from dynamix_ray.shuffle import read_slice, write_slices

__all__ = [
    "CANDIDATES_SCHEMA",
    "CandidateTable",
    "blend_bucket",
    "bucket_users",
    "open_candidates",
    "open_shared_candidates",
    "read_candidates",
    "run_candidates",
]

CANDIDATES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("ad_id", pa.int64()),
        ("score", pa.float64()),
        ("rank", pa.int32()),
    ]
)
_DIRECT = pa.schema(
    [("user_id", pa.int64()), ("ad_id", pa.int64()), ("score", pa.float64())]
)


def _conversions(
    store: EventStore, bucket: int, as_of_ms: int, country: bool = False
) -> pd.DataFrame:
    cols = ["user_id", "ts", "ad_id", *(["country"] if country else [])]
    got = store.read_bucket(bucket, {"conversions": cols})
    if "conversions" not in got:
        empty: dict[str, list] = {
            c: [] for c in ["user_id", "ts_ms", "ad_id", *cols[3:]]
        }
        return pd.DataFrame(empty, dtype=np.int64)
    df = got["conversions"].to_pandas().rename(columns={"ts": "ts_ms"})
    return df[df["ts_ms"] < as_of_ms]


def bucket_users(store: EventStore, bucket: int, as_of_ms: int) -> pd.DataFrame:
    """``user_id, country``: the bucket's users with an ad impression or a
    conversion before ``as_of_ms``, each with their most frequent country
    there (-1 without one): whom the blend gives candidates."""
    cols = ["user_id", "ts", "country"]
    got = store.read_bucket(bucket, {"ad_impressions": cols, "conversions": cols})
    frames = [t.to_pandas() for t in got.values()]
    if not frames:
        return pd.DataFrame({"user_id": [], "country": []}, dtype=np.int64)
    both = pd.concat(frames, ignore_index=True)
    both = both[both["ts"] < as_of_ms]
    uid = both["user_id"].to_numpy()
    users = np.unique(uid)
    country = (
        mode_by_user(users, uid, both["country"].to_numpy())
        if "country" in both
        else np.full(len(users), -1, np.int16)
    )
    return pd.DataFrame({"user_id": users, "country": country})


def blend_bucket(
    direct: pd.DataFrame,
    conv: pd.DataFrame,
    users: pd.DataFrame,
    as_of_ms: int,
    catalog: pd.DataFrame,
    top: pd.DataFrame,
    cfg: CandidateConfig,
    spec: BlendSpec,
    pop: pd.DataFrame,
    sim: pd.DataFrame,
) -> pd.DataFrame:
    """The blend of a set of users (``retrieval.blend`` of u2u, popular and
    item-CF lists, each without the users' seen ads) from the users' direct
    u2u scores and conversions and the merged popularity and similarity."""
    seen = seen_pairs(conv, as_of_ms)
    lists = {
        "u2u": expand_and_rank(direct, catalog, top, cfg, seen),
        spec.popular: popular_lists(pop, users, cfg.cap, seen, spec.popular_by),
        "item_cf": item_cf_lists(
            last_ads(conv, as_of_ms, spec.item_history),
            sim,
            users,
            as_of_ms,
            cfg.cap,
            spec.half_life("item_cf"),
            seen,
        ),
    }
    return blend(lists, spec.weights, cfg.cap, spec.rrf_c)


def _slices(work: str, kind: str, pieces: int, bucket: int) -> list[pa.Table]:
    """Bucket ``bucket``'s rows of every ``kind`` piece of the scratch shuffle."""
    fs, root = resolve(work)
    return [
        t
        for p in range(pieces)
        if (t := read_slice(fs, f"{root}/{kind}/piece-{p:06d}", bucket)) is not None
    ]


def _catalog_task(
    item: dict[str, Any], store: EventStore, as_of_ms: int, spec: BlendSpec | None
) -> dict:
    """Pass 1: one bucket's ``ad -> advertiser`` pairs and conversions per ad;
    for a blend also its partial popularity and co-conversion counts (per
    ad, summed over buckets in the driver)."""
    b = item["bucket"]
    imps = store.read_bucket(b, {"ad_impressions": ["ad_id", "advertiser_id"]})
    ads = (
        ad_catalog(imps["ad_impressions"].to_pandas())
        if "ad_impressions" in imps
        else pd.DataFrame({"ad_id": [], "advertiser_id": []}, dtype=np.int64)
    )
    by = spec.popular_by if spec else None
    conv = _conversions(store, b, as_of_ms, country=by is not None)
    out: dict[str, Any] = {"ads": ads, "pop": conv.groupby("ad_id").size()}
    if spec is not None:
        out["popularity"] = popularity(conv, as_of_ms, spec.half_life(spec.popular), by)
        out["co"], out["n_item"] = co_conversions(
            last_ads(conv, as_of_ms, spec.item_history)
        )
    return out


def _edges_task(item: dict[str, Any], work: str, num_buckets: int) -> dict:
    """Pass 2: one edge file, grouped by the neighbour's bucket."""
    fs, _ = resolve(item["file"])
    with fs.open(item["file"], "rb") as fh:
        t = pq.read_table(fh, columns=["user_id", "neighbor_id", "similarity"])
    wfs, wroot = resolve(work)
    dest = user_bucket(t.column("neighbor_id").to_numpy(), num_buckets)
    write_slices(wfs, f"{wroot}/edges/piece-{item['piece']:06d}", t, dest, num_buckets)
    return {"edges": t.num_rows}


def _direct_task(
    item: dict[str, Any],
    store: EventStore,
    work: str,
    n_pieces: int,
    as_of_ms: int,
    cfg: CandidateConfig,
) -> dict:
    """Pass 3: edges into bucket B's users x B's conversions -> partial sums,
    grouped by the user's bucket."""
    b, nb = item["bucket"], store.num_buckets
    wfs, wroot = resolve(work)
    parts = _slices(work, "edges", n_pieces, b)
    if parts:
        edges = pa.concat_tables(parts).to_pandas()
        conv = neighbour_conversions(_conversions(store, b, as_of_ms), as_of_ms, cfg)
        direct = direct_scores(edges, conv)
    else:
        direct = _DIRECT.empty_table().to_pandas()
    table = pa.Table.from_pandas(direct, schema=_DIRECT, preserve_index=False)
    dest = user_bucket(table.column("user_id").to_numpy(), nb)
    write_slices(wfs, f"{wroot}/direct/piece-{b:06d}", table, dest, nb)
    return {"rows": table.num_rows}


def _rank_task(
    item: dict[str, Any],
    work: str,
    num_buckets: int,
    catalog: pd.DataFrame,
    top: pd.DataFrame,
    cfg: CandidateConfig,
    out: str,
    blend_args: tuple | None,
) -> dict:
    """Pass 4: bucket B's users' partial sums -> ranked, capped candidates
    (for a blend, ``blend_args`` = (store, as_of, spec, popularity,
    similarity): the blend of the bucket's users)."""
    b = item["bucket"]
    parts = _slices(work, "direct", num_buckets, b)
    if parts:
        partial = pa.concat_tables(parts).to_pandas()
        direct = partial.groupby(["user_id", "ad_id"], as_index=False)["score"].sum()
    else:
        direct = _DIRECT.empty_table().to_pandas()
    if blend_args is None:
        ranked = expand_and_rank(direct, catalog, top, cfg)
    else:
        store, as_of, spec, pop, sim = blend_args
        conv = _conversions(store, b, as_of, country=spec.popular_by is not None)
        users = bucket_users(store, b, as_of)
        ranked = blend_bucket(
            direct, conv, users, as_of, catalog, top, cfg, spec, pop, sim
        )
    if not len(ranked):
        return {"users": 0, "rows": 0}
    table = pa.Table.from_pandas(
        ranked[["user_id", "ad_id", "score", "rank"]],
        schema=CANDIDATES_SCHEMA,
        preserve_index=False,
    )
    ofs, oroot = resolve(out)
    write_parquet(ofs, f"{oroot}/bucket={b:05d}/part-0.parquet", table)
    return {"users": int(ranked["user_id"].nunique()), "rows": table.num_rows}


def run_candidates(
    u2u_url: str,
    events_url: str,
    out_url: str,
    cfg: CandidateConfig | None = None,
    as_of_ms: int | None = None,
    progress: bool = True,
    blend_spec: BlendSpec | None = None,
) -> dict[str, Any]:
    """Every user's u2u candidates as of ``as_of_ms`` (default: one ms after
    the data's last event) into a new published version of
    ``OUT/candidates/``; returns its ``_meta.json``.

    Args:
        u2u_url: a ``dynamix u2u`` OUT (its published graph is read).
        events_url: the events the graph's users come from (an event store,
            or input bucketed once into ``OUT/events``).
        blend_spec: precompute this blend of u2u, most-popular and item-CF
            (docs/retrieval.md) instead of u2u alone: every user of the
            events gets candidates, none they converted on before.
    """
    cfg = cfg or CandidateConfig()
    spec = blend_spec
    if spec is not None:
        cfg = replace(cfg, half_life_s=spec.half_life("u2u"))
    t0 = time.perf_counter()
    out = out_url.rstrip("/")
    store = ensure_store(
        events_url, [f"{out}/events"], f"{out}/events", progress=progress
    )
    as_of = as_of_ms if as_of_ms is not None else store.ts_max_ms + 1
    ufs, uroot = resolve(u2u_url)
    graph = published_version(u2u_url, "u2u")
    folder = check_complete(ufs, uroot, "u2u", graph)
    edge_files = sorted(p for p in ufs.find(folder) if p.endswith(".parquet"))
    fs, root = resolve(out_url)
    local = (
        is_process_local(fs)
        or is_process_local(ufs)
        or is_process_local(resolve(store.url)[0])
    )
    items = store.bucket_items()
    phases: dict[str, float] = {}
    with publish(fs, root, ["candidates"]) as version:
        work_path = f"{root}/.work-{version.version}"  # scratch, not published
        work = url_of(fs, work_path)
        try:
            t = time.perf_counter()
            got = list(
                map_items(
                    _catalog_task,
                    items,
                    (store, as_of, spec),
                    local=local,
                    name="candidates: catalog",
                    progress=progress,
                )
            )
            catalog = ad_catalog(pd.concat([r["ads"] for r in got], ignore_index=True))
            pops = [r["pop"] for r in got]
            pop = pd.concat(pops).groupby(level=0).sum() if pops else pd.Series()
            top = advertiser_top(catalog, pop, cfg)
            blend_args = None
            if spec is not None:
                sim = item_similarity(
                    merge_sums([r["co"] for r in got], "co"),
                    merge_sums([r["n_item"] for r in got], "n"),
                    spec.item_neighbours,
                )
                popular = merge_sums([r["popularity"] for r in got], "score")
                blend_args = (store, as_of, spec, popular, sim)
            phases["catalog"] = time.perf_counter() - t

            t = time.perf_counter()
            pieces = [
                {"piece": i, "file": url_of(ufs, f)} for i, f in enumerate(edge_files)
            ]
            edges = sum(
                r["edges"]
                for r in map_items(
                    _edges_task,
                    pieces,
                    (work, store.num_buckets),
                    local=local,
                    name="candidates: edges by neighbour",
                    progress=progress,
                )
            )
            phases["edges"] = time.perf_counter() - t

            t = time.perf_counter()
            for _ in map_items(
                _direct_task,
                items,
                (store, work, len(pieces), as_of, cfg),
                local=local,
                name="candidates: direct scores",
                progress=progress,
            ):
                pass
            phases["direct"] = time.perf_counter() - t

            t = time.perf_counter()
            users = rows = 0
            dest = url_of(fs, version.path("candidates"))
            for r in map_items(
                _rank_task,
                items,
                (work, store.num_buckets, catalog, top, cfg, dest, blend_args),
                local=local,
                name="candidates: rank",
                progress=progress,
            ):
                users += r["users"]
                rows += r["rows"]
            phases["rank"] = time.perf_counter() - t
        finally:
            if fs.exists(work_path):
                fs.rm(work_path, recursive=True)
        meta = {
            "as_of_ms": as_of,
            "config": asdict(cfg),
            "blend": asdict(spec) if spec is not None else None,
            "u2u": {"url": u2u_url, "version": graph["version"]},
            "store": store.url,
            "store_fingerprint": store.fingerprint,
            "num_buckets": store.num_buckets,
            "edges": edges,
            "ads": len(catalog),
            "users": users,
            "rows": rows,
            "phase_s": {k: round(v, 3) for k, v in phases.items()},
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        write_json(fs, f"{version.path('candidates')}/_meta.json", meta)
    return meta


@dataclass(frozen=True, eq=False)
class CandidateTable:
    """A published candidates table for look-ups: users sorted, each user's
    ads best first (CSR: ``offsets`` into ``ad_id`` and ``score``). A look-up
    is a binary search and a slice: its cost does not grow with
    conversions, and barely (log n) with users.

    The arrays are in this process (:func:`read_candidates`) or memory-mapped
    read-only from one copy per node (:func:`open_shared_candidates`); the
    look-ups are the same.
    """

    user_id: np.ndarray  # (U,) int64, users with candidates, sorted
    offsets: np.ndarray  # (U + 1,) int64: user i's rows are [offsets[i], offsets[i+1])
    ad_id: np.ndarray  # (N,) int64, each user's best first
    score: np.ndarray  # (N,) float64
    as_of_ms: int
    meta: dict[str, Any]  # the version's _meta.json
    version: str = ""  # the published version it was read from
    published_ms: int = 0

    @classmethod
    def from_table(
        cls,
        table: pa.Table,
        meta: dict[str, Any],
        version: str = "",
        published_ms: int = 0,
    ) -> CandidateTable:
        """The CSR of ``CANDIDATES_SCHEMA`` rows (any order)."""
        uid = table.column("user_id").to_numpy()
        rank = table.column("rank").to_numpy()
        order = np.lexsort((rank, uid))
        uid = uid[order]
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]][: len(uid)])
        return cls(
            user_id=uid[starts],
            offsets=np.r_[starts, len(uid)].astype(np.int64),
            ad_id=table.column("ad_id").to_numpy()[order],
            score=table.column("score").to_numpy()[order],
            as_of_ms=int(meta["as_of_ms"]),
            meta=meta,
            version=version,
            published_ms=published_ms,
        )

    def __len__(self) -> int:
        return len(self.user_id)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, a).nbytes for a in _CSR_ARRAYS)

    def lookup(self, user_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's best ``k`` ads and their scores (empty when none)."""
        i = int(np.searchsorted(self.user_id, user_id))
        if i == len(self.user_id) or self.user_id[i] != user_id:
            return self.ad_id[:0], self.score[:0]
        lo = int(self.offsets[i])
        hi = min(int(self.offsets[i + 1]), lo + k)
        return self.ad_id[lo:hi], self.score[lo:hi]


_CSR_ARRAYS = ("user_id", "offsets", "ad_id", "score")


def read_candidates(url: str, pointer: dict[str, Any] | None = None) -> CandidateTable:
    """The published version of a ``dynamix candidates`` OUT (or the one of
    ``pointer``), read into this process.

    Raises:
        FileNotFoundError: nothing is published there.
        io.IncompleteTable: the version's files are not the ones published.
    """
    fs, root = resolve(url)
    ptr = pointer or published_version(url, "candidates")
    folder = check_complete(fs, root, "candidates", ptr)
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh).cast(CANDIDATES_SCHEMA))
    table = pa.concat_tables(tables) if tables else CANDIDATES_SCHEMA.empty_table()
    return CandidateTable.from_table(
        table,
        read_json(fs, f"{folder}/_meta.json"),
        str(ptr["version"]),
        int(ptr.get("published_ms", 0)),
    )


def _write_csr(table: CandidateTable, folder: str) -> None:
    """The table's arrays as ``.npy`` files in ``folder``, the manifest last."""
    os.makedirs(folder, exist_ok=True)
    for name in _CSR_ARRAYS:
        a = np.ascontiguousarray(getattr(table, name))
        np.save(os.path.join(folder, f"{name}.npy"), a)
    manifest = {
        "as_of_ms": table.as_of_ms,
        "meta": table.meta,
        "version": table.version,
        "published_ms": table.published_ms,
    }
    with open(os.path.join(folder, NODE_CACHE_MANIFEST), "w") as fh:
        json.dump(manifest, fh)


def _map_csr(folder: str) -> CandidateTable:
    """The table of a :func:`_write_csr` folder, its arrays memory-mapped
    read-only (plain ndarray views of the maps: no memmap subclass on the
    look-up path)."""
    with open(os.path.join(folder, NODE_CACHE_MANIFEST)) as fh:
        manifest = json.load(fh)
    arrays = {
        name: np.asarray(np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r"))
        for name in _CSR_ARRAYS
    }
    return CandidateTable(
        **arrays,
        as_of_ms=int(manifest["as_of_ms"]),
        meta=manifest["meta"],
        version=str(manifest["version"]),
        published_ms=int(manifest["published_ms"]),
    )


def _build_csr(url: str, pointer: dict[str, Any], folder: str) -> None:
    _write_csr(read_candidates(url, pointer), folder)


def open_shared_candidates(url: str, cache_dir: str | None = None) -> CandidateTable:
    """The published candidates of ``url``, memory-mapped from one copy per
    node (``histories.open_node_cached``: built once by one replica, mapped
    read-only by every replica, so a replica's own memory does not grow with
    the table; benchmarks/candidates_memory.py). Same look-ups as
    :func:`read_candidates`.

    Raises:
        FileNotFoundError: nothing is published there.
        RuntimeError: building the node's copy failed.
    """
    return open_node_cached(url, "candidates", _build_csr, _map_csr, cache_dir)


def open_candidates(url: str, shared: bool = True) -> CandidateTable:
    """What the Retriever serves: the published table memory-mapped from one
    copy per node (``shared``), or read into this process (for comparison)."""
    return open_shared_candidates(url) if shared else read_candidates(url)
