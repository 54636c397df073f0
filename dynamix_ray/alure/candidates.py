"""u2u ad candidates (ALURE §3) and their offline evaluation.

For a user: the ads their graph neighbours converted on before ``as_of``, each
scored ``sum over neighbour events of similarity * 2^(-age / half_life)``;
then other ads of the same advertisers (the ``per_advertiser`` most converted
ones, at ``advertiser_weight`` times the best score of that advertiser);
deduplicated (an ad keeps its best score), ranked by score (ties: ad id), at
most ``cap`` per user (paper: 1500). Plain pandas joins over all users at once.

The evaluation (``retrieval``, ``evaluate``) compares them with the other
generators; the cluster scores here (adjusted Rand index, purity) say how well
the embeddings recover planted interest clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "CandidateConfig",
    "ad_catalog",
    "advertiser_top",
    "direct_scores",
    "expand_and_rank",
    "neighbour_conversions",
    "not_seen",
    "pair_keys",
    "rank_and_cap",
    "adjusted_rand_index",
    "purity",
    "u2u_candidates",
]


@dataclass(frozen=True)
class CandidateConfig:
    """Args:
    cap: candidates per user at most.
    half_life_s: recency half-life of a neighbour's conversion.
    per_advertiser: most-converted other ads added per advertiser.
    advertiser_weight: score of an added ad relative to its advertiser's best.
    """

    cap: int = 1500
    half_life_s: float = 3 * 86_400.0
    per_advertiser: int = 10
    advertiser_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.cap < 1 or self.per_advertiser < 0 or self.half_life_s <= 0:
            raise ValueError(f"invalid CandidateConfig {self}")


def neighbour_conversions(
    conversions: pd.DataFrame, as_of_ms: int, cfg: CandidateConfig
) -> pd.DataFrame:
    """Conversions before ``as_of_ms`` as ``neighbor_id``, ``ad_id``, ``decay``
    (``2^(-age / half_life)``)."""
    conv = conversions[conversions["ts_ms"] < as_of_ms]
    age_s = (as_of_ms - conv["ts_ms"].to_numpy()) / 1000.0
    return pd.DataFrame(
        {
            "neighbor_id": conv["user_id"].to_numpy(),
            "ad_id": conv["ad_id"].to_numpy(),
            "decay": np.exp2(-age_s / cfg.half_life_s),
        }
    )


def direct_scores(edges: pd.DataFrame, conv: pd.DataFrame) -> pd.DataFrame:
    """``user_id``, ``ad_id``, ``score``: the sum over the user's neighbours'
    conversions of ``similarity * decay`` (``conv`` of
    :func:`neighbour_conversions`)."""
    direct = edges[["user_id", "neighbor_id", "similarity"]].merge(
        conv, on="neighbor_id"
    )
    direct["score"] = direct["similarity"].astype(np.float64) * direct["decay"]
    return direct.groupby(["user_id", "ad_id"], as_index=False)["score"].sum()


def ad_catalog(ads: pd.DataFrame) -> pd.DataFrame:
    """``ad_id`` -> ``advertiser_id`` (one per ad: the smallest seen)."""
    return ads.groupby("ad_id", as_index=False)["advertiser_id"].min()


def advertiser_top(
    catalog: pd.DataFrame, popularity: pd.Series, cfg: CandidateConfig
) -> pd.DataFrame:
    """``ad_id``, ``advertiser_id`` of each advertiser's ``per_advertiser``
    most-converted ads (``popularity``: conversions per ``ad_id``; ties: ad
    id)."""
    c = catalog.assign(pop=catalog["ad_id"].map(popularity).fillna(0).to_numpy())
    c = c.sort_values(["advertiser_id", "pop", "ad_id"], ascending=[True, False, True])
    return c.groupby("advertiser_id").head(cfg.per_advertiser)[
        ["ad_id", "advertiser_id"]
    ]


def pair_keys(*frames: pd.DataFrame) -> list[np.ndarray]:
    """Each frame's (``user_id``, ``ad_id``) pairs as one int64 per row, of
    dense codes shared by all the frames (equal pairs, equal keys)."""
    sizes = np.cumsum([0, *(len(f) for f in frames)])
    users, _ = pd.factorize(np.concatenate([f["user_id"].to_numpy() for f in frames]))
    ads, uniq = pd.factorize(np.concatenate([f["ad_id"].to_numpy() for f in frames]))
    key = users.astype(np.int64) * max(1, len(uniq)) + ads
    return [key[a:b] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def not_seen(frame: pd.DataFrame, seen: pd.DataFrame | None) -> np.ndarray:
    """Mask of ``frame``'s rows whose (``user_id``, ``ad_id``) pair is not in
    ``seen`` (``None``: all rows)."""
    if seen is None or not len(seen) or not len(frame):
        return np.ones(len(frame), bool)
    mine, theirs = pair_keys(frame, seen)
    return ~np.isin(mine, theirs)


def rank_and_cap(
    scored: pd.DataFrame, cap: int, seen: pd.DataFrame | None = None
) -> pd.DataFrame:
    """``user_id``, ``ad_id``, ``score`` -> candidates: the ``seen`` pairs
    removed, one row per pair (its best score), ranked by score (ties: ad
    id), at most ``cap`` per user."""
    if seen is not None:
        scored = scored[not_seen(scored, seen)]
    out = scored.groupby(["user_id", "ad_id"], as_index=False)["score"].max()
    out = out.sort_values(
        ["user_id", "score", "ad_id"], ascending=[True, False, True], kind="stable"
    )
    out["rank"] = out.groupby("user_id").cumcount() + 1
    return out[out["rank"] <= cap].reset_index(drop=True)


def expand_and_rank(
    direct: pd.DataFrame,
    catalog: pd.DataFrame,
    top: pd.DataFrame,
    cfg: CandidateConfig,
    seen: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``direct`` scores plus each scored advertiser's top ads (at
    ``advertiser_weight`` times the advertiser's best direct score);
    ``seen`` pairs removed, deduplicated (best score), ranked (score, then
    ad id), capped."""
    parts = [direct]
    if cfg.per_advertiser > 0 and len(direct):
        best = direct.merge(catalog, on="ad_id")
        best = best.groupby(["user_id", "advertiser_id"], as_index=False)["score"].max()
        more = best.merge(top, on="advertiser_id")
        more["score"] = more["score"] * cfg.advertiser_weight
        parts.append(more[["user_id", "ad_id", "score"]])
    return rank_and_cap(pd.concat(parts, ignore_index=True), cfg.cap, seen)


def u2u_candidates(
    edges: pd.DataFrame,
    conversions: pd.DataFrame,
    ads: pd.DataFrame,
    as_of_ms: int,
    cfg: CandidateConfig | None = None,
    users: np.ndarray | None = None,
    seen: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Candidates of every user of ``edges`` (or of ``users``), in one
    process: the reference of the distributed job (``candidates_job``).
    ``seen`` (``user_id``, ``ad_id``): pairs left out before the cap.

    Args:
        edges: ``user_id``, ``neighbor_id``, ``similarity``.
        conversions: ``user_id``, ``ts_ms``, ``ad_id`` (only rows before
            ``as_of_ms`` are used).
        ads: ``ad_id``, ``advertiser_id`` (the catalog).
        as_of_ms: the retrieval instant.
    Returns:
        ``user_id``, ``ad_id``, ``score`` (float64), ``rank`` (1 = best),
        sorted by (user_id, rank).
    """
    cfg = cfg or CandidateConfig()
    if users is not None:
        edges = edges[edges["user_id"].isin(users)]
    direct = direct_scores(edges, neighbour_conversions(conversions, as_of_ms, cfg))
    catalog = ad_catalog(ads)
    pop = conversions[conversions["ts_ms"] < as_of_ms].groupby("ad_id").size()
    top = advertiser_top(catalog, pop, cfg)
    return expand_and_rank(direct, catalog, top, cfg, seen)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie), plain numpy."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(table, (ai, bi), 1)

    def comb2(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    index = comb2(table)
    rows, cols = comb2(table.sum(1)), comb2(table.sum(0))
    n = comb2(np.array([len(a)]))
    expected = rows * cols / n if n else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Share of users whose predicted cluster's majority truth label is theirs."""
    _, pi = np.unique(pred, return_inverse=True)
    _, ti = np.unique(truth, return_inverse=True)
    table = np.zeros((pi.max() + 1, ti.max() + 1), np.int64)
    np.add.at(table, (pi, ti), 1)
    return float(table.max(1).sum() / len(pred))
