"""Candidate generators and their evaluation as the retrieval literature does
it (docs/retrieval.md): a temporal split, new items only, per-user recall and
NDCG at several K, hit rate and catalog coverage, recency scales and blend
weights chosen on a validation period before the split.

Plain pandas/numpy over one process: the offline evaluation's scale (the
served candidates are precomputed by ``candidates_job``). Frames:

* conversions: ``user_id``, ``ts_ms``, ``ad_id`` (``country`` optional);
* candidates: ``user_id``, ``ad_id``, ``score``, ``rank`` (1 = best), at most
  ``cap`` per user, never an ad the user converted on before the instant
  (``seen``).

Every generator takes ``seen`` and removes those pairs *before* it caps, so
that each user gets ``cap`` new ads where there are that many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import numpy as np
import pandas as pd

from dynamix_ray.alure.candidates import (
    CandidateConfig,
    not_seen,
    pair_keys,
    rank_and_cap,
    u2u_candidates,
)

__all__ = [
    "HALF_LIVES_S",
    "BlendSpec",
    "RetrievalConfig",
    "blend",
    "choose_blend_weights",
    "choose_half_life",
    "decay",
    "format_half_life",
    "metrics_table",
    "co_conversions",
    "item_cf",
    "item_cf_lists",
    "item_similarity",
    "last_ads",
    "merge_sums",
    "popular_lists",
    "popularity",
    "new_pairs",
    "popular",
    "random_ads",
    "retrieval_metrics",
    "seen_pairs",
]

_DAY_S = 86_400.0
#: recency scales tried on the validation period (inf: plain counts)
HALF_LIVES_S = tuple(d * _DAY_S for d in (0.5, 1, 2, 4, 8, 16)) + (float("inf"),)


@dataclass(frozen=True)
class RetrievalConfig:
    """Args:
    ks: the cut-offs of every metric.
    cap: candidates per user of every generator and of the blend.
    holdout_days: the held-out period after the split (``None``: to the
        end of the data).
    validation_days: the period before the split on which recency scales
        and blend weights are chosen (``None``: as long as the held-out one).
    half_lives_s: recency scales tried per generator.
    select_k: the K whose recall picks scales and weights.
    item_neighbours: most similar items kept per item (item-CF).
    item_history: last distinct ads per user that item-CF reads.
    rrf_c: the blend's reciprocal-rank constant (score ``w / (c + rank)``).
    weight_step: grid step of the blend weights (on the simplex).
    blend_depth: each generator's top ranks the weight search reads (the
        final blend reads all ``cap``).
    seed: random ads.
    """

    ks: tuple[int, ...] = (50, 200, 1500)
    cap: int = 1500
    holdout_days: float | None = None
    validation_days: float | None = None
    half_lives_s: tuple[float, ...] = HALF_LIVES_S
    select_k: int = 200
    item_neighbours: int = 200
    item_history: int = 100
    rrf_c: float = 60.0
    weight_step: float = 0.1
    blend_depth: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cap < max(self.ks, default=0) or min(self.ks, default=0) < 1:
            raise ValueError(f"need 1 <= K <= cap, got ks={self.ks} cap={self.cap}")
        if not 1 <= self.select_k <= self.cap:
            raise ValueError(
                f"need 1 <= select_k <= cap, got {self.select_k} and {self.cap}"
            )
        if not 0 < self.weight_step <= 1:
            raise ValueError(f"weight_step must be in (0, 1], got {self.weight_step}")
        for name in ("holdout_days", "validation_days"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")


@dataclass(frozen=True)
class BlendSpec:
    """What the blend is, as the evaluation chose it on its validation
    period (``u2u_eval.json``'s ``blend``): the generators' weights (``u2u``,
    ``most_popular`` or ``most_popular_country``, ``item_cf``), their
    recency half-lives (``None`` or inf: plain counts) and item-CF's and the
    fusion's settings. ``dynamix candidates --blend`` precomputes it."""

    weights: dict[str, float]
    half_life_s: dict[str, float | None]
    item_neighbours: int = 200
    item_history: int = 100
    rrf_c: float = 60.0

    def __post_init__(self) -> None:
        pops = [n for n in self.weights if n.startswith("most_popular")]
        if set(self.weights) - {"u2u", "item_cf", *pops} or len(pops) != 1:
            raise ValueError(
                "a blend weighs u2u, item_cf and one of most_popular / "
                f"most_popular_country, got {sorted(self.weights)}"
            )
        if any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()):
            raise ValueError(f"blend weights must be >= 0, not all 0: {self.weights}")
        missing = set(self.weights) - set(self.half_life_s)
        if missing:
            raise ValueError(f"no half-life for {sorted(missing)}")

    @property
    def popular(self) -> str:
        return next(n for n in self.weights if n.startswith("most_popular"))

    @property
    def popular_by(self) -> str | None:
        return "country" if self.popular == "most_popular_country" else None

    def half_life(self, name: str) -> float:
        h = self.half_life_s[name]
        return float("inf") if h is None else float(h)

    @classmethod
    def from_evaluation(cls, ev: dict[str, Any]) -> BlendSpec:
        """The spec recorded by ``evaluate_retrieval`` (its ``blend`` key)."""
        if "blend" not in ev:
            raise ValueError(
                "this evaluation records no blend: re-run `dynamix u2u --eval`"
            )
        return cls(**ev["blend"])


# ------------------------------------------------------------------ pairs


def seen_pairs(conversions: pd.DataFrame, as_of_ms: int) -> pd.DataFrame:
    """Distinct ``user_id``, ``ad_id`` converted on before ``as_of_ms``."""
    before = conversions[conversions["ts_ms"] < as_of_ms]
    return before[["user_id", "ad_id"]].drop_duplicates().reset_index(drop=True)


def new_pairs(
    conversions: pd.DataFrame, start_ms: int, end_ms: int | None
) -> pd.DataFrame:
    """Distinct ``user_id``, ``ad_id`` converted on in ``[start, end)`` that
    the user had not converted on before ``start``: what retrieval must find."""
    ts = conversions["ts_ms"]
    inside = conversions[(ts >= start_ms) & ((ts < end_ms) if end_ms else True)]
    pairs = inside[["user_id", "ad_id"]].drop_duplicates()
    seen = seen_pairs(conversions, start_ms)
    return pairs[not_seen(pairs, seen)].reset_index(drop=True)


def decay(ts_ms: np.ndarray, as_of_ms: int, half_life_s: float) -> np.ndarray:
    """``2^(-age / half_life)``; an infinite half-life weighs every event 1."""
    if not np.isfinite(half_life_s):
        return np.ones(len(ts_ms))
    return np.exp2(-(as_of_ms - np.asarray(ts_ms)) / 1000.0 / half_life_s)


# ------------------------------------------------------------------ generators


def popularity(
    conversions: pd.DataFrame, as_of_ms: int, half_life_s: float, by: str | None
) -> pd.DataFrame:
    """``[by,] ad_id, score``: conversions before ``as_of_ms`` per ad (and
    group), each weighed by its recency. Sums over disjoint sets of users add
    up (the candidates job merges buckets' with :func:`merge_sums`)."""
    before = conversions[conversions["ts_ms"] < as_of_ms]
    w = before.assign(score=decay(before["ts_ms"].to_numpy(), as_of_ms, half_life_s))
    keys = ["ad_id"] if by is None else [by, "ad_id"]
    if by is not None and by not in w:
        raise ValueError(f"conversions have no '{by}' column")
    return w.groupby(keys, as_index=False)["score"].sum()


def merge_sums(parts: Sequence[pd.DataFrame], value: str) -> pd.DataFrame:
    """Partial tables of sums (every column but ``value`` a key) added up."""
    both = pd.concat(parts, ignore_index=True)
    keys = [c for c in both.columns if c != value]
    return both.groupby(keys, as_index=False)[value].sum()


def _depth(cap: int, seen: pd.DataFrame, users: pd.DataFrame) -> int:
    """How much of a shared list to give each of ``users`` so that ``cap``
    remain after their seen pairs go: ``cap`` + the most any of them saw."""
    mine = seen[seen["user_id"].isin(users["user_id"])]
    return cap + int(mine.groupby("user_id").size().max()) if len(mine) else cap


def popular_lists(
    pop: pd.DataFrame,
    users: pd.DataFrame,
    cap: int,
    seen: pd.DataFrame,
    by: str | None = None,
) -> pd.DataFrame:
    """Candidates from :func:`popularity`'s table: the same list (best score
    first, ties: ad id) for every user of a group, minus the user's seen."""
    keys = ["ad_id"] if by is None else [by, "ad_id"]
    pop = pop.sort_values(
        [*keys[:-1], "score", "ad_id"],
        ascending=[True] * (len(keys) - 1) + [False, True],
    )
    depth = _depth(cap, seen, users)
    if by is None:
        pop = pop.head(depth)
        table = users[["user_id"]].merge(pop, how="cross")
    else:
        pop = pop.groupby(by).head(depth)
        table = users[["user_id", by]].merge(pop, on=by, sort=False)
        table = table.sort_values("user_id", kind="stable")
    # each user's rows are in list order already: drop seen, count, cut
    table = table[not_seen(table, seen)]
    rank = table.groupby("user_id", sort=False).cumcount().to_numpy() + 1
    out = table[["user_id", "ad_id", "score"]].assign(rank=rank)[rank <= cap]
    return out.reset_index(drop=True)


def popular(
    conversions: pd.DataFrame,
    users: pd.DataFrame,
    as_of_ms: int,
    cap: int,
    half_life_s: float,
    seen: pd.DataFrame,
    by: str | None = None,
) -> pd.DataFrame:
    """The most-converted ads before ``as_of_ms`` (each conversion weighed by
    its recency), the same list for every user of a group: everyone
    (``by=None``) or each value of ``users[by]`` (e.g. ``country``).

    Args:
        users: ``user_id`` (and ``by``): whom to give candidates.
    """
    pop = popularity(conversions, as_of_ms, half_life_s, by)
    return popular_lists(pop, users, cap, seen, by)


def last_ads(conversions: pd.DataFrame, as_of_ms: int, history: int) -> pd.DataFrame:
    """``user_id, ad_id, ts_ms``: each user's last ``history`` distinct ads
    converted on before ``as_of_ms`` (ts: the last such conversion)."""
    before = conversions[conversions["ts_ms"] < as_of_ms]
    last = before.groupby(["user_id", "ad_id"], as_index=False)["ts_ms"].max()
    last = last.sort_values(["user_id", "ts_ms"], ascending=[True, False])
    return last[last.groupby("user_id").cumcount() < history]


def co_conversions(last: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(ad_id, ad_id_j, co)`` of users converting on both, and ``(ad_id,
    n)`` of users converting on each, from :func:`last_ads`: counts over
    disjoint sets of users add up (:func:`merge_sums`)."""
    pairs = last[["user_id", "ad_id"]].merge(
        last[["user_id", "ad_id"]], on="user_id", suffixes=("", "_j")
    )
    pairs = pairs[pairs["ad_id"] != pairs["ad_id_j"]]
    co = pairs.groupby(["ad_id", "ad_id_j"]).size().reset_index(name="co")
    n_item = last.groupby("ad_id").size().reset_index(name="n")
    return co, n_item


def item_similarity(
    co: pd.DataFrame, n_item: pd.DataFrame, neighbours: int
) -> pd.DataFrame:
    """``ad_id, ad_id_j, sim``: ``co / sqrt(n_i n_j)``, the ``neighbours``
    most similar j per i (ties: ad id)."""
    n = n_item.set_index("ad_id")["n"]
    co = co.assign(
        sim=co["co"]
        / np.sqrt(
            n.reindex(co["ad_id"]).to_numpy() * n.reindex(co["ad_id_j"]).to_numpy()
        )
    )
    co = co.sort_values(["ad_id", "sim", "ad_id_j"], ascending=[True, False, True])
    return co[co.groupby("ad_id").cumcount() < neighbours][["ad_id", "ad_id_j", "sim"]]


def item_cf_lists(
    last: pd.DataFrame,
    sim: pd.DataFrame,
    users: pd.DataFrame,
    as_of_ms: int,
    cap: int,
    half_life_s: float,
    seen: pd.DataFrame,
) -> pd.DataFrame:
    """Candidates of ``users``: a user's score of j is ``sum over their ads
    i (in ``last``) of decay(i) * sim(i, j)``."""
    mine = last[last["user_id"].isin(users["user_id"])]
    mine = mine.assign(w=decay(mine["ts_ms"].to_numpy(), as_of_ms, half_life_s))
    scored = mine[["user_id", "ad_id", "w"]].merge(sim)
    scored = scored.assign(score=scored["w"] * scored["sim"])
    scored = scored.groupby(["user_id", "ad_id_j"], as_index=False)["score"].sum()
    scored = scored.rename(columns={"ad_id_j": "ad_id"})
    return rank_and_cap(scored, cap, seen)


def item_cf(
    conversions: pd.DataFrame,
    users: pd.DataFrame,
    as_of_ms: int,
    cap: int,
    half_life_s: float,
    seen: pd.DataFrame,
    neighbours: int = 200,
    history: int = 100,
) -> pd.DataFrame:
    """Item-based collaborative filtering on co-conversions before
    ``as_of_ms``: ``sim(i, j) = co(i, j) / sqrt(n_i n_j)`` over users' distinct
    ads (each user's last ``history``), the ``neighbours`` most similar j per
    i; a user's score of j is ``sum over their ads i of decay(i) * sim(i, j)``.
    """
    last = last_ads(conversions, as_of_ms, history)
    sim = item_similarity(*co_conversions(last), neighbours)
    return item_cf_lists(last, sim, users, as_of_ms, cap, half_life_s, seen)


def random_ads(
    catalog: np.ndarray,
    users: pd.DataFrame,
    cap: int,
    seen: pd.DataFrame,
    seed: int = 0,
) -> pd.DataFrame:
    """Random ads of ``catalog`` per user (score: falling in draw order)."""
    rng = np.random.default_rng(seed)
    k = min(len(catalog), cap)
    depth = min(len(catalog), _depth(k, seen, users))
    uid = users["user_id"].to_numpy()
    picks = (
        np.stack([rng.choice(catalog, depth, replace=False) for _ in uid])
        if len(uid)
        else np.empty((0, depth), np.int64)
    )
    table = pd.DataFrame(
        {
            "user_id": np.repeat(uid, depth),
            "ad_id": picks.reshape(-1),
            "score": np.tile(np.arange(depth, 0, -1, dtype=np.float64), len(uid)),
        }
    )
    return rank_and_cap(table, k, seen)


def u2u(
    edges: pd.DataFrame,
    conversions: pd.DataFrame,
    ads: pd.DataFrame,
    users: pd.DataFrame,
    as_of_ms: int,
    cap: int,
    half_life_s: float,
    seen: pd.DataFrame,
    cfg: CandidateConfig | None = None,
) -> pd.DataFrame:
    """ALURE's u2u candidates (``candidates.u2u_candidates``: similarity x
    recency of neighbours' conversions, plus their advertisers' top ads) at
    this recency scale, seen pairs removed before the cap."""
    cfg = replace(cfg or CandidateConfig(), cap=cap, half_life_s=half_life_s)
    return u2u_candidates(
        edges,
        conversions,
        ads,
        as_of_ms,
        cfg,
        users=users["user_id"].to_numpy(),
        seen=seen,
    )


# ------------------------------------------------------------------ metrics


def retrieval_metrics(
    candidates: pd.DataFrame,
    truth: pd.DataFrame,
    ks: Sequence[int],
    catalog_size: int,
) -> dict[str, dict[str, float]]:
    """Per-user averages over the users of ``truth`` (distinct new pairs):

    * ``recall``: hits in the top K / the user's new ads;
    * ``ndcg``: ``sum over hits 1/log2(rank + 1)`` over the best possible
      (``min(|truth|, K)`` hits at ranks 1..);
    * ``hit_rate``: share of users with at least one hit;
    * ``coverage``: distinct ads in those users' top-K lists / ``catalog_size``.

    A user without candidates scores 0.
    """
    truth = truth[["user_id", "ad_id"]].drop_duplicates()
    n_true = truth.groupby("user_id").size()
    users = n_true.index
    if not len(users):
        return {
            str(k): dict.fromkeys(
                ("recall", "ndcg", "hit_rate", "coverage"), float("nan")
            )
            for k in ks
        }
    mine = candidates[candidates["user_id"].isin(users)]
    cand_key, true_key = pair_keys(mine, truth)
    hits = mine[np.isin(cand_key, true_key)]
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        h = hits[hits["rank"] <= k]
        n_hit = h.groupby("user_id").size().reindex(users, fill_value=0)
        dcg = (1.0 / np.log2(h["rank"].to_numpy() + 1.0)) if len(h) else np.zeros(0)
        dcg_u = pd.Series(dcg, index=h["user_id"].to_numpy()).groupby(level=0).sum()
        dcg_u = dcg_u.reindex(users, fill_value=0.0)
        ideal_cum = np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))
        idcg = ideal_cum[np.minimum(n_true.to_numpy(), k) - 1]
        top = mine[mine["rank"] <= k]
        out[str(k)] = {
            "recall": float((n_hit / n_true).mean()),
            "ndcg": float((dcg_u.to_numpy() / idcg).mean()),
            "hit_rate": float((n_hit > 0).mean()),
            "coverage": float(top["ad_id"].nunique() / max(1, catalog_size)),
        }
    return out


def _recall(candidates: pd.DataFrame, truth: pd.DataFrame, k: int) -> float:
    return retrieval_metrics(candidates, truth, (k,), 1)[str(k)]["recall"]


# ------------------------------------------------------------------ choices

#: a generator at an instant and a recency scale -> candidates
Generator = Callable[[int, float], pd.DataFrame]


def choose_half_life(
    generate: Generator,
    truth: pd.DataFrame,
    at_ms: int,
    half_lives_s: Sequence[float],
    k: int,
) -> tuple[float, dict[str, float]]:
    """The recency scale whose candidates as of ``at_ms`` have the best
    recall@k of ``truth`` (the validation period's new pairs); ties: the
    longer scale. Returns it and every scale's recall."""
    scores = {}
    for h in half_lives_s:
        scores[h] = _recall(generate(at_ms, h), truth, k)
    best = max(scores, key=lambda h: (scores[h], h))
    return best, {format_half_life(h): v for h, v in scores.items()}


def _simplex(n: int, step: float) -> list[tuple[float, ...]]:
    m = round(1 / step)
    return [
        tuple(c / m for c in combo)
        for combo in product(range(m + 1), repeat=n)
        if sum(combo) == m
    ]


def blend(
    lists: dict[str, pd.DataFrame],
    weights: dict[str, float],
    cap: int,
    rrf_c: float = 60.0,
) -> pd.DataFrame:
    """Weighted reciprocal-rank fusion: a pair scores ``sum over generators of
    w_g / (c + rank_g)``; deduplicated, ranked (ties: ad id), capped."""
    parts = [
        lst.assign(score=weights[name] / (rrf_c + lst["rank"].to_numpy()))[
            ["user_id", "ad_id", "score"]
        ]
        for name, lst in lists.items()
        if weights.get(name, 0) > 0
    ]
    if not parts:
        raise ValueError(f"no generator has a positive weight: {weights}")
    both = pd.concat(parts, ignore_index=True)
    both = both.groupby(["user_id", "ad_id"], as_index=False)["score"].sum()
    return rank_and_cap(both, cap)


def choose_blend_weights(
    lists: dict[str, pd.DataFrame],
    truth: pd.DataFrame,
    k: int,
    step: float = 0.1,
    depth: int = 600,
    rrf_c: float = 60.0,
) -> tuple[dict[str, float], float]:
    """The weights on the simplex grid (``step``) whose blend of ``lists``
    (each generator's top ``depth``) has the best recall@k of ``truth``.

    The pairs' reciprocal ranks are laid out once (pairs x generators); each
    weight vector is then a matrix-vector product and one sort.
    Ties: the first grid point (the grid runs from the last generator's
    corner to the first's).
    """
    names = list(lists)
    users = pd.Index(truth["user_id"].unique())
    if not len(users):
        raise ValueError("choose_blend_weights needs held-out pairs (truth is empty)")
    parts = []
    for g, name in enumerate(names):
        lst = lists[name]
        lst = lst[(lst["rank"] <= depth) & lst["user_id"].isin(users)]
        parts.append(
            pd.DataFrame(
                {
                    "user_id": lst["user_id"].to_numpy(),
                    "ad_id": lst["ad_id"].to_numpy(),
                    "g": g,
                    "rr": 1.0 / (rrf_c + lst["rank"].to_numpy()),
                }
            )
        )
    long = pd.concat(parts, ignore_index=True)
    wide = long.pivot_table(
        index=["user_id", "ad_id"],
        columns="g",
        values="rr",
        aggfunc="sum",
        fill_value=0.0,
    )  # sorted by (user, ad): ties below keep ad order
    wide = wide.reindex(columns=range(len(names)), fill_value=0.0)
    uid = wide.index.get_level_values(0).to_numpy()
    aid = wide.index.get_level_values(1).to_numpy()
    rr = wide.to_numpy()
    truth = truth[["user_id", "ad_id"]].drop_duplicates()
    is_true = ~not_seen(pd.DataFrame({"user_id": uid, "ad_id": aid}), truth)
    n_true = truth.groupby("user_id").size()
    uidx = users.get_indexer(uid)
    inv_true = 1.0 / n_true.reindex(users).to_numpy()
    # one float key per pair: the user, then the score falling (scores are
    # at most 1 / (c + 1), so 1 - s (c + 1) lies in [0, 1))
    scale = rrf_c + 1.0
    best_w, best_r = None, -1.0
    for w in _simplex(len(names), step):
        s = rr @ np.asarray(w)
        order = np.argsort(uidx + 0.5 * (1.0 - s * scale), kind="stable")
        u_sorted = uidx[order]
        first = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1]
        starts = np.repeat(first, np.diff(np.r_[first, len(order)]))
        rank = np.arange(len(order)) - starts + 1
        hit = order[is_true[order] & (rank <= k) & (s[order] > 0)]
        r = float(inv_true[uidx[hit]].sum() / len(users))
        if r > best_r:
            best_w, best_r = w, r
    assert best_w is not None
    return dict(zip(names, best_w, strict=True)), best_r


def catalog_of(ads: pd.DataFrame) -> np.ndarray:
    """Distinct ad ids of an ad frame."""
    return np.unique(ads["ad_id"].to_numpy())


def format_half_life(half_life_s: float) -> str:
    """``'2d'``, ``'12h'``, or ``'none'`` for plain counts."""
    if not np.isfinite(half_life_s):
        return "none"
    days = half_life_s / _DAY_S
    return f"{days:g}d" if days >= 1 else f"{half_life_s / 3600:g}h"


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The evaluation as text rows: one per generator, recall / NDCG / hit
    rate / coverage at each K (for the CLI, the README and the report)."""
    ks = list(next(iter(metrics.values())))
    head = (
        f"{'generator':<22}"
        + "".join(f"{'R@' + k:>8}{'N@' + k:>8}" for k in ks)
        + f"{'hit@' + ks[-1]:>10}{'cov@' + ks[-1]:>10}"
    )
    rows = [head]
    for name, by_k in metrics.items():
        cells = "".join(f"{by_k[k]['recall']:>8.3f}{by_k[k]['ndcg']:>8.3f}" for k in ks)
        rows.append(
            f"{name:<22}{cells}{by_k[ks[-1]]['hit_rate']:>10.3f}"
            f"{by_k[ks[-1]]['coverage']:>10.3f}"
        )
    return rows
