"""Offline evaluation of retrieval (``dynamix u2u --eval``, docs/retrieval.md).

Embeddings and the graph are built as of ``as_of``; the conversions from
``as_of`` on (``holdout_days`` of them, or to the end) are held out, and only
the ads a user had not converted on before count. u2u, most-popular (global
and per country), item-based CF, random ads and their blend are scored by
per-user recall, NDCG, hit rate and coverage at each K
(``alure.retrieval``). When the data has planted truth
(``_truth/users.parquet``), a k-means on the embeddings with as many clusters
as were planted is compared with the planted interest clusters (adjusted Rand
index, purity).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dynamix_ray.alure.candidates import (
    CandidateConfig,
    adjusted_rand_index,
    purity,
)
from dynamix_ray.alure.retrieval import (
    BlendSpec,
    RetrievalConfig,
    blend,
    catalog_of,
    choose_blend_weights,
    choose_half_life,
    format_half_life,
    item_cf,
    metrics_table,
    new_pairs,
    popular,
    random_ads,
    retrieval_metrics,
    seen_pairs,
    u2u,
)
from dynamix_ray.events import open_store
from dynamix_ray.io import discover, resolve
from dynamix_ray.schema import SOURCES, validate

__all__ = ["GENERATORS", "evaluate_retrieval", "read_events_frame", "retrieval_summary"]

_DAY_MS = 86_400_000
#: what the evaluation scores (most_popular_country when users have a country)
GENERATORS = (
    "u2u",
    "most_popular",
    "most_popular_country",
    "item_cf",
    "blend",
    "random",
)


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


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _span_days(ms: float) -> float:
    return round(ms / _DAY_MS, 3)


def evaluate_retrieval(
    events_url: str,
    embeddings: pa.Table,
    edges: pa.Table,
    as_of_ms: int,
    cfg: RetrievalConfig | None = None,
    candidates: CandidateConfig | None = None,
    validation_edges: pa.Table | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every generator against the conversions held out from ``as_of_ms`` on
    (docs/retrieval.md), and the embeddings' planted-cluster recovery.

    The recency scale of each generator and the blend's weights are chosen on
    the validation period just before ``as_of_ms`` (as of its start, with the
    graph ``validation_edges``, or the evaluated graph when ``None``: then
    the embeddings saw the validation period, which favours u2u there).

    Returns:
        ``{"generators": {name: {K: {"recall", "ndcg", "hit_rate",
        "coverage"}}}, "recall": {K: {name: recall}}, "half_life_s",
        "blend_weights", "holdout", "validation", "users_evaluated",
        "new_pairs", ...}`` plus ``cluster_ari``/``cluster_purity`` when the
        data has planted truth.
    """
    cfg = cfg or RetrievalConfig()
    say = progress or (lambda _: None)
    conv = read_events_frame(
        events_url, "conversions", ["user_id", "ts_ms", "ad_id", "country"]
    )
    ads = read_events_frame(events_url, "ad_impressions", ["ad_id", "advertiser_id"])
    ads = ads.drop_duplicates("ad_id")
    catalog = catalog_of(ads)
    cols = (
        ["user_id", "country"] if "country" in embeddings.column_names else ["user_id"]
    )
    users = embeddings.select(cols).to_pandas().drop_duplicates("user_id")
    graph = edges.to_pandas()
    val_graph = graph if validation_edges is None else validation_edges.to_pandas()

    end_ms = as_of_ms + int(cfg.holdout_days * _DAY_MS) if cfg.holdout_days else None
    last_ms = int(conv["ts_ms"].max()) + 1 if len(conv) else as_of_ms
    held_ms = (end_ms or last_ms) - as_of_ms
    val_ms = int(cfg.validation_days * _DAY_MS) if cfg.validation_days else held_ms
    val_at = as_of_ms - val_ms
    truth = new_pairs(conv, as_of_ms, end_ms)
    truth = truth[truth["user_id"].isin(users["user_id"])]
    val_truth = new_pairs(conv, val_at, as_of_ms)
    val_truth = val_truth[val_truth["user_id"].isin(users["user_id"])]
    for what, pairs, start in (
        ("held out", truth, as_of_ms),
        ("in the validation period", val_truth, val_at),
    ):
        if not len(pairs):
            raise ValueError(
                f"nothing is {what}: no user of the embeddings converted on a new "
                f"ad from {start} ms on for {_span_days(held_ms if start == as_of_ms else val_ms):g} "
                "days; embed with an earlier --as-of (or pass --holdout-days / "
                "--validation-days)"
            )
    test_users = users[users["user_id"].isin(truth["user_id"])]
    val_users = users[users["user_id"].isin(val_truth["user_id"])]
    seen = {at: seen_pairs(conv, at) for at in (val_at, as_of_ms)}

    def make(name: str) -> Callable[[pd.DataFrame, int, float], pd.DataFrame]:
        def run(who: pd.DataFrame, at: int, h: float) -> pd.DataFrame:
            if name == "u2u":
                g = graph if at == as_of_ms else val_graph
                return u2u(g, conv, ads, who, at, cfg.cap, h, seen[at], candidates)
            if name == "item_cf":
                return item_cf(
                    conv,
                    who,
                    at,
                    cfg.cap,
                    h,
                    seen[at],
                    cfg.item_neighbours,
                    cfg.item_history,
                )
            by = "country" if name == "most_popular_country" else None
            return popular(conv, who, at, cfg.cap, h, seen[at], by)

        return run

    names = ["u2u", "most_popular", "item_cf"]
    if "country" in users and "country" in conv:
        names.insert(2, "most_popular_country")
    half_life: dict[str, float] = {}
    sweeps: dict[str, dict[str, float]] = {}
    val_lists: dict[str, pd.DataFrame] = {}
    test_lists: dict[str, pd.DataFrame] = {}
    for name in names:
        run = make(name)
        h, sweeps[name] = choose_half_life(
            functools.partial(run, val_users),
            val_truth,
            val_at,
            cfg.half_lives_s,
            cfg.select_k,
        )
        half_life[name] = h
        val_lists[name] = run(val_users, val_at, h)
        test_lists[name] = run(test_users, as_of_ms, h)
        say(f"retrieval: {name} half-life {format_half_life(h)}")
    pop_name = max(
        (n for n in names if n.startswith("most_popular")),
        key=lambda n: (sweeps[n][format_half_life(half_life[n])], n == "most_popular"),
    )
    parts = ["u2u", pop_name, "item_cf"]
    weights, val_recall = choose_blend_weights(
        {n: val_lists[n] for n in parts},
        val_truth,
        cfg.select_k,
        cfg.weight_step,
        cfg.blend_depth,
        cfg.rrf_c,
    )
    test_lists["blend"] = blend(
        {n: test_lists[n] for n in parts}, weights, cfg.cap, cfg.rrf_c
    )
    test_lists["random"] = random_ads(
        catalog, test_users, cfg.cap, seen[as_of_ms], cfg.seed
    )
    metrics = {
        name: retrieval_metrics(lst, truth, cfg.ks, len(catalog))
        for name, lst in test_lists.items()
    }
    # headroom of any merge: the union of the blended generators' top K
    # (up to 3K ads), against the blend's K
    union = {}
    for k in cfg.ks:
        tops = pd.concat(
            [test_lists[n][test_lists[n]["rank"] <= k] for n in parts]
        ).drop_duplicates(["user_id", "ad_id"])
        union[str(k)] = retrieval_metrics(
            tops.assign(rank=1), truth, (k,), len(catalog)
        )[str(k)]["recall"]
    held = conv[
        (conv["ts_ms"] >= as_of_ms) & ((conv["ts_ms"] < end_ms) if end_ms else True)
    ]
    out: dict[str, Any] = {
        "as_of_ms": as_of_ms,
        "holdout": {
            "start_ms": as_of_ms,
            "end_ms": end_ms or last_ms,
            "days": _span_days(held_ms),
        },
        "validation": {
            "start_ms": val_at,
            "end_ms": as_of_ms,
            "days": _span_days(val_ms),
            "graph": "own" if validation_edges is not None else "the evaluated one",
        },
        "held_out_conversions": int(held["user_id"].isin(users["user_id"]).sum()),
        "new_pairs": int(len(truth)),
        "users": int(len(users)),
        "users_evaluated": int(len(test_users)),
        "users_with_candidates": int(test_lists["u2u"]["user_id"].nunique()),
        "catalog_ads": int(len(catalog)),
        # JSON: None for an infinite half-life (plain counts)
        "half_life_s": {n: _finite(h) for n, h in half_life.items()},
        "half_life_sweep": sweeps,
        "blend_weights": weights,
        "blend": asdict(
            BlendSpec(
                weights=weights,
                half_life_s={n: _finite(half_life[n]) for n in parts},
                item_neighbours=cfg.item_neighbours,
                item_history=cfg.item_history,
                rrf_c=cfg.rrf_c,
            )
        ),
        "blend_validation_recall": val_recall,
        "union_recall": union,
        "generators": metrics,
        "recall": {
            str(k): {n: m[str(k)]["recall"] for n, m in metrics.items()} for k in cfg.ks
        },
        "config": {
            **asdict(cfg),
            "half_lives_s": [_finite(h) for h in cfg.half_lives_s],
        },
    }
    fs, root = resolve(events_url)
    truth_path = f"{root}/_truth/users.parquet"
    if fs.exists(truth_path):
        import pyarrow.parquet as pq

        with fs.open(truth_path, "rb") as fh:
            planted_users = pq.read_table(fh, columns=["user_id", "cluster"])
        planted_users = planted_users.to_pandas()
        planted = (
            pd.Series(
                planted_users["cluster"].to_numpy(), index=planted_users["user_id"]
            )
            .reindex(embeddings.column("user_id").to_numpy())
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
        import faiss

        km = faiss.Kmeans(dim, k, niter=25, spherical=True, seed=cfg.seed, nredo=3)
        km.train(x)
        _, pred = km.index.search(x, 1)
        out["cluster_ari"] = adjusted_rand_index(pred[:, 0], planted[known])
        out["cluster_purity"] = purity(pred[:, 0], planted[known])
        out["planted_clusters"] = k
    return out


def retrieval_summary(ev: dict[str, Any]) -> str:
    """What ``evaluate_retrieval`` found, as indented text lines: the split,
    the choices made on the validation period, the table of generators."""
    h, v = ev["holdout"], ev["validation"]
    lines = [
        f"held out {h['days']:g} days: {ev['new_pairs']:,} new (user, ad) pairs "
        f"of {ev['users_evaluated']:,} users ({ev['held_out_conversions']:,} "
        f"conversions); chosen on the {v['days']:g} days before (graph: "
        f"{v['graph']})",
        "recency half-life: "
        + ", ".join(
            f"{n} {format_half_life(float('inf') if x is None else x)}"
            for n, x in ev["half_life_s"].items()
        ),
        "blend weights: "
        + ", ".join(f"{n} {w:.2f}" for n, w in ev["blend_weights"].items()),
        *metrics_table(ev["generators"]),
        "union of the blended generators' top K (up to 3K ads): recall "
        + ", ".join(f"@{k} {r:.3f}" for k, r in ev["union_recall"].items()),
    ]
    if "cluster_ari" in ev:
        lines.append(
            f"planted clusters ({ev['planted_clusters']}): ARI "
            f"{ev['cluster_ari']:.3f}, purity {ev['cluster_purity']:.3f}"
        )
    return "\n".join("  " + line for line in lines)
