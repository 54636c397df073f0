"""Feature policies (docs/contract.md §4) and segment-conditional model batches.

Plain numpy / torch (no Ray). A batch of samples (the flat columns of
:func:`dynamix_ray.samples.build_samples`) is split by segment
(:func:`split_by_segment`); each part becomes the model's typed batch
(:func:`to_model_batch`, a ``model.batch.ModelBatch``) and runs with the ``FeatureSet`` its policy gives that
segment (:func:`policy_features`). Removed attributes and un-boosted sources
skip their look-ups, projection columns and encoder work: real compute saved
(:func:`flops_by_segment`), not zeros masked.

Feature sets (the paper's Tables 2 and 3), always intersected with what the
data holds (:func:`available_features`):

* BASE, for every policy: the ``ad_impressions`` history with all 11
  ad-impression attributes (``dwell_ms`` + 10 ids), every candidate attribute,
  and the three *boostable* EBF sources ``organic_impressions``, ``page_views``
  and ``conversions`` with their base subset only: ``(content_id,)``,
  ``(page_id,)`` and ``(ad_id,)``.
* BOOSTED source: every attribute of that source the data holds (e.g. organic
  impressions add ``dwell_ms``, ``media_type``, ``position``, ``author_id``).
  The ad-impression history already has everything in BASE; it is never boosted.

Policies:

* ``baseline``: BASE for everyone.
* ``remove-active`` / ``remove-passive``: BASE minus ``removed`` (the 4
  lowest-importance ad-impression attributes, :func:`lowest_importance` of
  :func:`permutation_importance` on a trained baseline) on the
  ``ad_impressions`` history, for that segment only; the other segment keeps
  BASE. The candidate keeps all its attributes.
* ``boost-all``: the three boostable sources BOOSTED for everyone.
* ``boost-selective``: active users (segment 1) get all three BOOSTED; passive
  users (segment 0) only ``organic_impressions`` BOOSTED, and keep BASE for
  the rest (one reading of the paper's "passive users: organic-impression
  EBF only").
* ``boost-selective-only``: the other reading, a feature *selection*: active
  users as in ``boost-selective``; passive users get the ``organic_impressions``
  history BOOSTED and no other history at all (no ad impressions, page views
  or conversions), only the candidate's attributes beside it. It is how
  selective boosting can cost less than the baseline (the paper's +4.2%
  inference QPS).

Why ad impressions are never boosted, though the paper's Table 3 boosts
them: here their history is the one feature Table 2's removal acts on, and
it holds all 11 attributes in BASE already. Boosting it would take a
narrower BASE for Table 3 alone, so that the two tables' baselines differed
(docs/experiments.md, "Boosting").

Segments: 0 passive, 1 active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from dynamix_ray.model import FeatureSet, ModelConfig, flops_per_sample
from dynamix_ray.model.batch import ModelBatch, SourceBatch
from dynamix_ray.model.config import (
    CANDIDATE_ATTRIBUTES,
    DWELL,
    EVENT_SOURCES,
    SOURCE_ATTRIBUTES,
)

__all__ = [
    "BASE_ATTRIBUTES",
    "BOOSTABLE",
    "POLICIES",
    "SEGMENTS",
    "available_features",
    "flops_by_segment",
    "lowest_importance",
    "permutation_importance",
    "policy_features",
    "split_by_segment",
    "to_model_batch",
]

#: The feature policies of docs/contract.md §4.
POLICIES = (
    "baseline",
    "remove-active",
    "remove-passive",
    "boost-all",
    "boost-selective",
    "boost-selective-only",
)
#: Segment codes: 0 passive, 1 active.
SEGMENTS = (0, 1)
#: The three EBF sources whose extra attributes boosting adds.
BOOSTABLE = ("organic_impressions", "page_views", "conversions")
#: Base (un-boosted) attributes of each boostable source.
BASE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "organic_impressions": ("content_id",),
    "page_views": ("page_id",),
    "conversions": ("ad_id",),
}
_REMOVE_TARGET = {"remove-active": 1, "remove-passive": 0}
_HISTORY = "ad_impressions"

Columns = Mapping[str, np.ndarray]


def _column(src: str, attr: str) -> str:
    """Sample column of a model attribute (dwell is ``<src>.dwell``)."""
    return f"{src}.dwell" if attr == DWELL else f"{src}.{attr}"


def available_features(cols: Columns) -> FeatureSet:
    """The model's attributes that the sample columns hold.

    A history source counts only with its ``<src>.mask`` and ``<src>.ts_ms``
    columns; then its attributes are those of ``SOURCE_ATTRIBUTES[src]`` with a
    column (``dwell_ms`` <- ``<src>.dwell``). Candidate attributes are those of
    ``CANDIDATE_ATTRIBUTES`` with a ``cand.<attr>`` column. Order follows the
    model's lists. E.g. the samples carry no ``conversions.kind``, so the result
    has ``conversions=("ad_id",)``.
    """
    spec: dict[str, tuple[str, ...]] = {}
    for src, attrs in SOURCE_ATTRIBUTES.items():
        if f"{src}.mask" in cols and f"{src}.ts_ms" in cols:
            spec[src] = tuple(a for a in attrs if _column(src, a) in cols)
        else:
            spec[src] = ()
    cand = tuple(a for a in CANDIDATE_ATTRIBUTES if f"cand.{a}" in cols)
    return FeatureSet.of({**spec, "candidate": cand})


def split_by_segment(cols: Columns) -> dict[int, dict[str, np.ndarray]]:
    """Rows of each segment present, in their original order.

    Args:
        cols: sample columns with ``segment`` (N,) (0 passive, 1 active); every
            column has N rows on axis 0.
    Returns:
        ``{segment: {name: rows of that segment}}`` for the segments with at
        least one row, so each part holds users of one segment only.
    Raises:
        ValueError: a segment value other than 0 or 1.
    """
    seg = np.asarray(cols["segment"])
    bad = np.setdiff1d(np.unique(seg), SEGMENTS)
    if len(bad):
        raise ValueError(f"segment values {bad.tolist()}; expected 0 or 1")
    out: dict[int, dict[str, np.ndarray]] = {}
    for s in SEGMENTS:
        idx = np.flatnonzero(seg == s)
        if len(idx):
            out[s] = {k: np.asarray(v)[idx] for k, v in cols.items()}
    return out


def to_model_batch(cols: Columns, device: Any = "cpu") -> ModelBatch:
    """Flat sample columns -> the model's typed batch of tensors on ``device``.

    Args:
        cols: ``t_ms`` (N,), optional ``label`` (N,), ``cand.<attr>`` (N,), and
            per history source ``<src>.<attr>`` (N, L), ``<src>.dwell`` (N, L)
            (ln(1 + dwell_ms)), ``<src>.ts_ms`` (N, L), ``<src>.mask`` (N, L);
            optional ``alure`` (N, E). Other columns (``user_id``,
            ``segment``) are ignored.
        device: torch device of the tensors.
    Returns:
        A :class:`~dynamix_ray.model.batch.ModelBatch` holding only the
        sources (those with a mask and ts_ms) and attributes present in
        ``cols``.
    """
    import torch

    def t(x: np.ndarray, dtype: Any) -> Any:
        # Ray Data hands out read-only arrays; torch wants writable memory
        x = np.require(x, requirements=["C", "W"])
        return torch.as_tensor(x).to(device=device, dtype=dtype)

    hist: dict[str, SourceBatch] = {}
    for src, attrs in SOURCE_ATTRIBUTES.items():
        if f"{src}.mask" not in cols or f"{src}.ts_ms" not in cols:
            continue
        hist[src] = SourceBatch(
            mask=t(cols[f"{src}.mask"], torch.bool),
            ts_ms=t(cols[f"{src}.ts_ms"], torch.int64),
            attrs={
                a: t(cols[f"{src}.{a}"], torch.int64)
                for a in attrs
                if a != DWELL and f"{src}.{a}" in cols
            },
            dwell=(
                t(cols[f"{src}.dwell"], torch.float32)
                if f"{src}.dwell" in cols
                else None
            ),
        )
    return ModelBatch(
        t_ms=t(cols["t_ms"], torch.int64),
        cand={
            a: t(cols[f"cand.{a}"], torch.int64)
            for a in CANDIDATE_ATTRIBUTES
            if f"cand.{a}" in cols
        },
        hist=hist,
        label=t(cols["label"], torch.float32) if "label" in cols else None,
        # an external user embedding (N, E), see alure.feature
        alure=t(cols["alure"], torch.float32) if "alure" in cols else None,
    )


def policy_features(
    policy: str, segment: int, removed: tuple[str, ...], available: FeatureSet
) -> FeatureSet:
    """The ``FeatureSet`` of ``policy`` for ``segment`` (see the module docstring).

    Args:
        policy: one of :data:`POLICIES`.
        segment: 0 (passive) or 1 (active).
        removed: ad-impression attributes (model names, ``dwell_ms`` for dwell)
            that ``remove-active`` / ``remove-passive`` drop; ignored otherwise.
        available: what the data holds (:func:`available_features`); the result
            never asks for more.
    Raises:
        ValueError: an unknown policy, segment, or removed attribute.
    """
    if policy not in POLICIES:
        raise ValueError(
            f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}"
        )
    if segment not in SEGMENTS:
        raise ValueError(f"segment must be 0 (passive) or 1 (active), got {segment!r}")
    unknown = sorted(set(removed) - set(SOURCE_ATTRIBUTES[_HISTORY]))
    if unknown:
        raise ValueError(
            f"removed: {unknown} are not ad-impression attributes; expected some "
            f"of {SOURCE_ATTRIBUTES[_HISTORY]} (model names, e.g. 'campaign_id')"
        )
    spec = {src: available.attrs(src) for src in EVENT_SOURCES}
    boosted: tuple[str, ...] = ()
    if policy == "boost-all":
        boosted = BOOSTABLE
    elif policy in ("boost-selective", "boost-selective-only"):
        boosted = BOOSTABLE if segment == 1 else ("organic_impressions",)
    for src in BOOSTABLE:
        if src not in boosted:
            spec[src] = tuple(a for a in spec[src] if a in BASE_ATTRIBUTES[src])
    if policy == "boost-selective-only" and segment == 0:
        spec = {src: spec[src] if src in boosted else () for src in EVENT_SOURCES}
    if _REMOVE_TARGET.get(policy) == segment:
        spec[_HISTORY] = tuple(a for a in spec[_HISTORY] if a not in removed)
    return FeatureSet.of({**spec, "candidate": available.attrs("candidate")})


def flops_by_segment(
    model_cfg: ModelConfig,
    policy: str,
    removed: tuple[str, ...],
    available: FeatureSet | None,
    seq_lens: Mapping[str, int] | int | None = None,
) -> dict[int, int]:
    """Model FLOPs per sample (``flops_per_sample``, whole CTR pass) per segment.

    Args:
        model_cfg: the model's shapes.
        policy, removed: as in :func:`policy_features`.
        available: what the data holds; ``None``: every attribute the model's
            ``ModelConfig.sources`` holds (and every candidate attribute).
        seq_lens: padded history length per source, or one length for all
            (default ``model_cfg.max_seq_len``).
    Returns:
        ``{0: passive FLOPs, 1: active FLOPs}``.
    """
    if available is None:
        available = FeatureSet.of(
            {
                **{s: tuple(a) for s, a in model_cfg.sources.items()},
                "candidate": tuple(model_cfg.candidate_attrs),
            }
        )
    if isinstance(seq_lens, int):
        seq_lens = {s: seq_lens for s in EVENT_SOURCES}
    return {
        seg: flops_per_sample(
            model_cfg, policy_features(policy, seg, removed, available), seq_lens
        )
        for seg in SEGMENTS
    }


def _history_column(name: str) -> str:
    """``campaign_id`` / ``dwell_ms`` -> the ad-impression history column."""
    return name if "." in name else _column(_HISTORY, name)


def permutation_importance(
    score_fn: Callable[[dict[str, np.ndarray]], float],
    cols: Columns,
    attrs: Iterable[str],
    rng_seed: int = 0,
    n_repeats: int = 1,
) -> dict[str, float]:
    """Increase of ``score_fn`` when one history attribute is permuted across rows.

    For each name, its (N, L) column is shuffled between samples (whole
    sequences move, row i gets row perm[i]'s sequence) while every row keeps
    its own mask and timestamps; positions the row's mask pads are re-zeroed.

    Args:
        score_fn: ``score_fn(cols) -> float``, lower is better (e.g. NE of a
            trained model on validation data).
        cols: sample columns (N rows).
        attrs: history columns such as ``"ad_impressions.campaign_id"`` and
            ``"ad_impressions.dwell"``; a bare model name (``"campaign_id"``,
            ``"dwell_ms"``) means the ``ad_impressions`` column.
        rng_seed: seed of the permutations.
        n_repeats: permutations per attribute; the increases are averaged.
    Returns:
        ``{name (as given): mean score(permuted) - score(cols)}``; about 0 for
        an attribute the score ignores.
    Raises:
        KeyError: a name without a column.
    """
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    rng = np.random.default_rng(rng_seed)
    base = float(score_fn(dict(cols)))
    out: dict[str, float] = {}
    for name in attrs:
        col_name = _history_column(name)
        if col_name not in cols:
            raise KeyError(f"no column {col_name!r} for {name!r}; have {sorted(cols)}")
        values = np.asarray(cols[col_name])
        src = col_name.split(".", 1)[0]
        mask = cols.get(f"{src}.mask")
        deltas = []
        for _ in range(n_repeats):
            shuffled = values[rng.permutation(len(values))]
            if mask is not None and shuffled.shape == np.shape(mask):
                shuffled = np.where(mask, shuffled, np.zeros_like(shuffled))
            permuted = dict(cols)
            permuted[col_name] = shuffled
            deltas.append(float(score_fn(permuted)) - base)
        out[name] = float(np.mean(deltas))
    return out


def _model_name(name: str) -> str:
    """``ad_impressions.dwell`` -> ``dwell_ms``; ``ad_impressions.x`` -> ``x``."""
    if "." not in name:
        return name
    attr = name.split(".", 1)[1]
    return DWELL if attr == "dwell" else attr


def lowest_importance(importances: Mapping[str, float], k: int = 4) -> tuple[str, ...]:
    """Model attribute names of the ``k`` least important columns, least first.

    Ties break by name, so the choice is deterministic. Names are converted
    (``"ad_impressions.dwell"`` -> ``"dwell_ms"``, ``"ad_impressions.surface"``
    -> ``"surface"``), ready for :func:`policy_features`'s ``removed``.

    Raises:
        ValueError: ``k`` is negative or more than the attributes given.
    """
    if not 0 <= k <= len(importances):
        raise ValueError(f"k={k}: need 0 <= k <= {len(importances)} attributes")
    ranked = sorted(importances, key=lambda n: (importances[n], n))[:k]
    return tuple(_model_name(n) for n in ranked)
