"""The paper's experiments: Table 2 (feature removal) and Table 3 (boosting).

``run_experiment`` trains every arm of an experiment with several seeds on the
same samples (built once, :func:`train.prepare_train_data`), evaluated on the
same later day, and measures per arm and seed:

* NE overall and per segment, and the NE gain vs the same seed's baseline;
* training examples/s: Ray Train's steady-state figure (data loading
  included), and the model's own step (``train.train_step``) on fixed batches
  with the arms interleaved batch by batch (:func:`train_step_throughput`);
* inference QPS through the Serve rankers' own code (``serve.ranker.Ranker``)
  in a replica-level harness: one request of ``candidates`` ads per call, 2/3
  of requests for active users, one torch thread (a 1-CPU replica), arms
  interleaved request by request (:func:`inference_qps`);
* the speed-ups FLOPs predict for the same traffic.

Epsilon is reported two ways: the segment table's (calibrated to an active
share, docs/contract.md §2) and the paper's "maximise NE separation between the two
segments", swept with the first seed's baseline on the evaluation rows
(:mod:`segments.epsilon`). Everything lands in ``OUT/results.json`` (per arm:
mean, std and per-seed values of each figure) and ``OUT/report/`` (:mod:`report`).

The plain parts (:func:`mean_std`, :func:`summarize_arms`, the harnesses)
take arrays and callables; ``run_experiment`` is the Ray shell around them.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from dynamix_ray.features import (
    FeatureSet,
    flops_by_segment,
    lowest_importance,
    policy_features,
)
from dynamix_ray.histories import read_histories, run_histories
from dynamix_ray.io import absolute_url, relative_to
from dynamix_ray.loader import SegmentBatcher
from dynamix_ray.model import DynamixCTR, ModelConfig, flops_per_sample
from dynamix_ray.report import format_or_dash, write_report
from dynamix_ray.runtime import ensure_ray
from dynamix_ray.samples import SampleConfig, segment_at, segment_rows
from dynamix_ray.segments.epsilon import (
    log_loss,
    ne_by_threshold,
    separation_epsilon,
    sweep_thresholds,
)
from dynamix_ray.segments.pipeline import read_segments, read_segments_meta
from dynamix_ray.serve.loadgen import Traffic
from dynamix_ray.synth import NO_SIGNAL_ATTRIBUTES, read_truth_users, segment_recovery
from dynamix_ray.train import (
    TrainConfig,
    load_checkpoint,
    model_config_dict,
    prepare_train_data,
    run_train,
    score_by_segment,
    train_step,
)

__all__ = [
    "ARMS",
    "arm_scorers",
    "PAPER",
    "ExperimentConfig",
    "inference_qps",
    "mean_std",
    "paired_gain",
    "predicted_gain",
    "request_flops",
    "request_flops_by_arm",
    "run_experiment",
    "sample_batches",
    "summarize_arms",
    "train_step_throughput",
]

ARMS: dict[str, tuple[str, ...]] = {
    "removal": ("baseline", "remove-passive", "remove-active"),
    "boosting": ("baseline", "boost-all", "boost-selective", "boost-selective-only"),
    "all": (
        "baseline",
        "remove-passive",
        "remove-active",
        "boost-all",
        "boost-selective",
        "boost-selective-only",
    ),
}
# Tables 2 and 3 of the paper (percent, vs baseline; boost-selective's
# inference figure is vs boost-all).
PAPER: dict[str, dict[str, float]] = {
    "remove-active": {"train_qps_pct": 1.1, "inference_qps_pct": 1.8},
    "boost-selective": {"inference_qps_vs_boost_all_pct": 14.3},
    # the selection reading of Table 3's boost-selective, vs baseline
    "boost-selective-only": {"inference_qps_pct": 4.2},
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Args:
    kind: ``removal`` (Table 2), ``boosting`` (Table 3) or ``all`` (both, one
        shared baseline per seed).
    seeds: one training run per arm and seed.
    epochs / batch_size / lr: training, as ``dynamix train``.
    samples: the sample settings of every run (their owner; each run's
        checkpoint records them). Histories of 32 events by default.
    model: the model's shapes (``presets.model_preset``); its
        ``max_seq_len`` follows ``samples``.
    num_workers / cpus_per_worker / use_gpu: Ray Train's scaling.
    removed: attributes the ``remove-*`` arms drop; ``None``: the 4 lowest
        permutation importances of the first seed's baseline (the paper).
    candidates: ads per inference request.
    qps_requests / qps_rounds: inference harness: requests per round (each
        scored by every arm), rounds.
    step_batches / step_rounds: training-step harness: fixed batches per
        round, rounds.
    skip_arms: arms of ``kind`` not to run (never the baseline), e.g. the
        demo's ``("boost-selective-only",)``, to stay in its time budget.
    sweep_points: epsilons in the NE-separation sweep.
    min_side_share: a sweep point needs this share of rows on each side.
    """

    kind: str = "removal"
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 1
    batch_size: int = 512
    lr: float = 2e-3
    samples: SampleConfig = field(default_factory=lambda: SampleConfig(max_seq_len=32))
    model: ModelConfig = field(default_factory=ModelConfig)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    removed: tuple[str, ...] | None = None
    candidates: int = 100
    qps_requests: int = 60
    qps_rounds: int = 5
    step_batches: int = 20
    step_rounds: int = 3
    sweep_points: int = 37
    min_side_share: float = 0.05
    skip_arms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ARMS:
            raise ValueError(
                f"experiment kind {self.kind!r}: expected one of {sorted(ARMS)}"
            )
        others = ARMS[self.kind][1:]  # the baseline comes first
        bad = sorted(set(self.skip_arms) - set(others))
        if bad:
            raise ValueError(
                f"skip_arms {bad}: can skip only arms of {self.kind!r} other than "
                f"the baseline: {', '.join(others)}"
            )
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds}: each seed once")
        for name in ("qps_requests", "qps_rounds", "step_batches", "step_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms this experiment runs: ``ARMS[kind]`` less ``skip_arms``."""
        return tuple(a for a in ARMS[self.kind] if a not in self.skip_arms)


# ----------------------------------------------------------------- plain core


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` of the non-missing values (sample std,
    ``None`` with fewer than 2 values; ``mean`` ``None`` with none)."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return {
        "mean": statistics.fmean(v) if v else None,
        "std": statistics.stdev(v) if len(v) > 1 else None,
        "values": [None if x is None else float(x) for x in values],
    }


def paired_gain(runs: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of (arm / baseline) - 1: rounds interleave the arms,
    so each round's ratio cancels the machine's drift between rounds."""
    return statistics.median(p / b for p, b in zip(runs, base, strict=True)) - 1


def predicted_gain(flops: dict[int, int], base: dict[int, int], share: float) -> float:
    """Speed-up FLOPs predict: base work / arm work - 1, at an active share."""

    def work(f: dict[int, int]) -> float:
        return share * f[1] + (1 - share) * f[0]

    return work(base) / work(flops) - 1


def request_flops(
    cfg: ModelConfig,
    fs: FeatureSet,
    n_candidates: int,
    seq_lens: dict[str, int] | None = None,
) -> int:
    """One ranking request: the history encoded once (with its target-attention
    K/V), then each candidate's part (its attention over the history and the
    head), as ``serve.ranker.Ranker`` computes it (``seq_lens``: each
    source's history length, ``SampleConfig.lengths()``; default the model's
    ``max_seq_len`` for all)."""
    user = flops_per_sample(cfg, fs, seq_lens, part="request_user")
    return user + n_candidates * (flops_per_sample(cfg, fs, seq_lens) - user)


def summarize_arms(
    arms: Sequence[str], runs: dict[str, dict[int, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Per arm, mean/std/values over seeds of each figure, paired per seed
    with that seed's baseline.

    Args:
        arms: arm names, ``baseline`` among them.
        runs: ``{arm: {seed: figures}}``; figures hold ``ne``, ``ne_active``,
            ``ne_passive``, ``auc``, ``train_examples_per_s`` and optionally
            ``inference_qps_change`` (a fraction vs baseline).

    Returns:
        ``{arm: {figure: mean_std(...)}}`` with ``ne_gain`` (baseline NE minus
        arm NE), ``ne_gain_pct`` (of baseline NE), ``train_qps_change_pct`` and
        ``inference_qps_change_pct`` added.
    """
    base = runs["baseline"]
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        seeds = sorted(runs[arm])
        rows = [runs[arm][s] for s in seeds]

        def col(key: str, rows: list[dict[str, Any]] = rows) -> list[Any]:
            return [r.get(key) for r in rows]

        gains, gains_pct, train_pct, inf_pct = [], [], [], []
        for s, r in zip(seeds, rows, strict=True):
            b = base.get(s, {})
            ok = r.get("ne") is not None and b.get("ne") is not None
            gains.append(b["ne"] - r["ne"] if ok else None)
            gains_pct.append(100 * (b["ne"] - r["ne"]) / b["ne"] if ok else None)
            te, tb = r.get("train_examples_per_s"), b.get("train_examples_per_s")
            train_pct.append(100 * (te / tb - 1) if te and tb else None)
            q = r.get("inference_qps_change")
            inf_pct.append(None if q is None else 100 * q)
        out[arm] = {
            "seeds": seeds,
            **{
                k: mean_std(col(k))
                for k in (
                    "ne",
                    "ne_active",
                    "ne_passive",
                    "auc",
                    "train_examples_per_s",
                )
            },
            "ne_gain": mean_std(gains),
            "ne_gain_pct": mean_std(gains_pct),
            "train_qps_change_pct": mean_std(train_pct),
            "inference_qps_change_pct": mean_std(inf_pct),
        }
    return out


def train_step_throughput(
    batches: Sequence[dict[str, np.ndarray]],
    policies: Sequence[str],
    removed: tuple[str, ...],
    mcfg: ModelConfig,
    rounds: int,
    threads: int = 1,
    on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Examples/s of ``train.train_step`` (forward, backward, Adam) per policy
    and round.

    Every policy has its own model and optimizer from the same initial
    weights; within a round the policies take turns batch by batch (order
    rotated per batch), so drifts of the machine hit all of them alike. Only
    ``train_step`` is timed.
    """
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        init = DynamixCTR(mcfg).state_dict()
        n = sum(len(b["label"]) for b in batches)
        out: dict[str, list[float]] = {p: [] for p in policies}
        for r in range(rounds):
            state = {}
            for policy in policies:
                model = DynamixCTR(mcfg)
                model.load_state_dict(init)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                for b in batches[:3]:  # warm-up: allocator, first-call paths
                    train_step(model, opt, b, policy, removed)
                state[policy] = (model, opt)
            spent = dict.fromkeys(policies, 0.0)
            for i, b in enumerate(batches):
                k = (i + r) % len(policies)
                for policy in list(policies[k:]) + list(policies[:k]):
                    model, opt = state[policy]
                    t0 = time.perf_counter()
                    train_step(model, opt, b, policy, removed)
                    spent[policy] += time.perf_counter() - t0
            for policy in policies:
                out[policy].append(n / spent[policy])
            if on_round is not None:
                on_round(r, out)
    finally:
        torch.set_num_threads(old_threads)
    return out


Request = tuple[int, int, int, np.ndarray]  # segment, user_id, ts_ms, (C, A) ads


def inference_qps(
    score: dict[str, Callable[[Request], Any]],
    requests: Sequence[Request],
    rounds: int,
    threads: int = 1,
) -> dict[str, list[float]]:
    """Requests/s of each arm's scorer per round.

    Within a round every request is scored by every arm in turn (order
    rotated per request), so the machine's drift hits all arms alike; only
    the scoring call is timed. One warm-up pass per arm first.

    Args:
        score: ``{arm: fn(request)}``, e.g. the arm's active or passive
            ``Ranker.score`` by the request's segment.
        requests: the same requests for every arm.
    """
    import torch

    arms = list(score)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for arm in arms:
            for req in requests[: min(5, len(requests))]:
                score[arm](req)
        out: dict[str, list[float]] = {a: [] for a in arms}
        for r in range(rounds):
            spent = dict.fromkeys(arms, 0.0)
            for i, req in enumerate(requests):
                k = (i + r) % len(arms)
                for arm in arms[k:] + arms[:k]:
                    t0 = time.perf_counter()
                    score[arm](req)
                    spent[arm] += time.perf_counter() - t0
            for arm in arms:
                out[arm].append(len(requests) / spent[arm])
    finally:
        torch.set_num_threads(old_threads)
    return out


# ----------------------------------------------------------------- Ray shell


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _eval_rows(
    checkpoint: str, data: Any, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """``user_id``, ``t_ms``, ``label``, ``segment`` and the checkpoint's
    ``logit`` for every evaluation row (each segment with its policy, as
    ``train.score_by_segment`` scores the loader's parts)."""

    model, _, meta = load_checkpoint(checkpoint)
    policy, removed = meta["policy"] or "baseline", tuple(meta["removed"] or ())
    batcher = SegmentBatcher(
        data.loader_spec(
            TrainConfig(policy=policy, removed=removed, samples=data.samples)
        )
    )
    keep = ("user_id", "t_ms", "label", "segment")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*keep, "logit")}
    for rows in data.dataset("eval").iter_batches(
        batch_size=batch_size, batch_format="numpy"
    ):
        by_seg = batcher(rows)
        for seg, logits, _ in score_by_segment(model, by_seg, policy, removed):
            parts["logit"].append(logits)
            for k in keep:
                parts[k].append(np.asarray(by_seg[seg][k]))
    if not parts["logit"]:
        raise ValueError(
            "no evaluation rows: the last day of the events holds no ad impressions"
        )
    return {k: np.concatenate(v) for k, v in parts.items()}


def _finite(x: Any) -> float | None:
    return float(x) if np.isfinite(x) else None


def epsilon_study(
    rows: dict[str, np.ndarray],
    segments_url: str,
    points: int = 37,
    min_side_share: float = 0.05,
    table: Any = None,
) -> dict[str, Any]:
    """The NE-separation sweep beside the segment table's calibrated epsilon.

    Each evaluation row gets ``|corr|`` of its user's last window ended at or
    before it (as its segment), and the sweep measures the baseline's NE on
    each side of every epsilon. ``table``: the segment table, when the caller
    has read it already (several seeds' sweeps read it once).
    """
    import pandas as pd

    table = read_segments(segments_url) if table is None else table
    corr = table.column("corr").to_numpy(zero_copy_only=False).astype(np.float64)
    seg_rows = segment_rows(table)
    uniques = pd.Index(pd.unique(rows["user_id"]))
    row_corr = segment_at(
        uniques.get_indexer(rows["user_id"]).astype(np.int64),
        rows["t_ms"],
        uniques.get_indexer(seg_rows["user_id"]).astype(np.int64),
        seg_rows["window_end_ms"],
        corr,
        fill=np.nan,
    )
    abs_row = np.abs(row_corr)
    eligible = np.abs(corr[~np.isnan(corr)])
    grid = sweep_thresholds(eligible, points)
    meta = read_segments_meta(segments_url)
    calibrated = float(meta["epsilon"])
    sweep = ne_by_threshold(
        abs_row,
        log_loss(rows["logit"], rows["label"]),
        rows["label"],
        np.append(grid, calibrated),
        min_side_share,
    )
    at_cal = {k: _finite(v[-1]) for k, v in sweep.items()}
    sweep = {k: v[:-1] for k, v in sweep.items()}
    best = separation_epsilon(sweep)

    def shares(eps: float | None) -> dict[str, Any]:
        if eps is None:
            return {"epsilon": None}
        i = int(np.argmin(np.abs(sweep["epsilon"] - eps)))
        return {
            "epsilon": eps,
            "active_share_windows": float((eligible > eps).mean())
            if len(eligible)
            else None,
            "active_share_traffic": _finite(sweep["active_share"][i]),
            "ne_active": _finite(sweep["ne_active"][i]),
            "ne_passive": _finite(sweep["ne_passive"][i]),
            "separation": _finite(sweep["separation"][i]),
        }

    cal = {
        "epsilon": calibrated,
        "source": meta.get("epsilon_source"),
        "active_share_windows": float((eligible > calibrated).mean())
        if len(eligible)
        else None,
        "active_share_traffic": at_cal["active_share"],
        "ne_active": at_cal["ne_active"],
        "ne_passive": at_cal["ne_passive"],
        "separation": at_cal["separation"],
    }
    return {
        "calibrated": cal,
        "separation": shares(best),
        "sweep": {k: [_finite(x) for x in v] for k, v in sweep.items()},
        "eval_rows": int(len(abs_row)),
        "eval_rows_without_window": int(np.isnan(abs_row).sum()),
    }


def _requests(
    events_url: str,
    segments_url: str,
    histories: Any,
    n: int,
    candidates: int,
    active_share: float = 2 / 3,
    seed: int = 0,
) -> list[Request]:
    """``n`` ranking requests at the histories' instant, ``active_share`` of
    them for users the segment table calls active, ``candidates`` distinct
    ads of the catalog each (``serve.loadgen.Traffic.request``)."""

    traffic = Traffic(
        events_url, histories, segments_url, candidates, seed, bodies_per_segment=0
    )
    return [traffic.request(active_share) for _ in range(n)]


def _scorer(rankers: dict[int, Any]) -> Callable[[Request], Any]:
    """Score a request with the ranker of its segment."""

    def score(req: Request) -> Any:
        return rankers[req[0]].score([req[1]], [req[2]], [req[3]])

    return score


def arm_scorers(
    checkpoints: dict[str, str], histories: Any
) -> dict[str, Callable[[Request], Any]]:
    """Per arm, :func:`inference_qps`'s scorer: the arm's checkpoint in the
    Serve rankers' code (``serve.ranker.Ranker``), one per segment."""
    from dynamix_ray.serve.ranker import Ranker

    return {
        arm: _scorer({s: Ranker(ckpt, histories, s) for s in (0, 1)})
        for arm, ckpt in checkpoints.items()
    }


def request_flops_by_arm(
    cfg: ModelConfig,
    arms: Sequence[str],
    removed: tuple[str, ...],
    available: FeatureSet,
    n_candidates: int,
    seq_lens: dict[str, int] | None = None,
) -> dict[str, dict[int, int]]:
    """:func:`request_flops` of each arm's passive (0) and active (1) requests."""
    return {
        a: {
            s: request_flops(
                cfg, policy_features(a, s, removed, available), n_candidates, seq_lens
            )
            for s in (0, 1)
        }
        for a in arms
    }


def sample_batches(
    data: Any, batch_size: int, n_batches: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``n_batches`` batches of training rows drawn at random, in a fixed
    order, each with every history attribute the data holds (flat columns, so
    that every arm's feature set is a subset), ``(B, L)`` wide; only about the
    rows needed reach the driver.

    Args:
        data: a :class:`train.TrainData`.
    """

    want = batch_size * n_batches
    total = data.table.rows("train")
    ds = data.dataset("train")
    frac = min(1.0, 1.5 * want / max(total, 1))
    if frac < 1.0:
        ds = ds.random_sample(frac, seed=seed)
    parts: dict[str, list[np.ndarray]] = {}
    for b in ds.iter_batches(batch_size=8192, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    got = len(cols["label"])
    order = np.random.default_rng(seed).permutation(got)[: min(got, want)]
    # boost-all's feature set is everything the data holds
    batcher = SegmentBatcher(
        data.loader_spec(TrainConfig(policy="boost-all", samples=data.samples))
    )
    idx = [
        order[i : i + batch_size]
        for i in range(0, len(order) - batch_size + 1, batch_size)
    ] or [order]
    # a fixed width L per source: batches of one shape, that callers may
    # concatenate
    width = data.samples.lengths()
    return [
        batcher.part({k: v[i] for k, v in cols.items()}, data.available, width)
        for i in idx
    ]


def _train_arms(
    cfg: ExperimentConfig,
    data: Any,
    base_tcfg: Any,
    inputs: dict[str, Any],
    urls: tuple[str, str, str],
    progress: bool,
) -> tuple[dict[str, dict[int, dict[str, Any]]], tuple[str, ...], Any]:
    """Phase 1: every (arm, seed) run on the same samples, the first seed's
    baseline first (its permutation importance picks what ``remove-*``
    drops). A finished run with the same key is reused.

    Returns:
        ``(metrics[arm][seed], removed, the baseline's importance)``.
    """

    events_url, segments_url, out_dir = urls
    arms = cfg.arms
    metrics: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    removed = cfg.removed
    importance = None
    for seed in cfg.seeds:
        for arm in arms:
            if arm.startswith("remove-") and removed is None:
                raise RuntimeError("removed attributes not chosen")  # baseline first
            first_baseline = arm == "baseline" and seed == cfg.seeds[0]
            tcfg = replace(
                base_tcfg,
                policy=arm,
                seed=seed,
                removed=removed if arm.startswith("remove-") and removed else (),
                importance_rows=base_tcfg.importance_rows if first_baseline else 0,
            )
            t0 = time.perf_counter()
            run_dir = f"{out_dir}/runs/{arm}/seed{seed}"
            key = _run_key(tcfg, data.boundary_ms, inputs)
            m = _finished_run(run_dir, key) or run_train(
                events_url,
                segments_url,
                run_dir,
                tcfg,
                extra_meta={"run_key": key},
                data=data,
                progress=progress,
            )
            if m.get("ne") is None:
                raise RuntimeError(
                    f"{run_dir}: the run reported no NE (an evaluation day "
                    "with one class only?); see its metrics.json"
                )
            metrics[arm][seed] = m
            if first_baseline:
                importance = m.get("importance")
                if removed is None and any(a.startswith("remove-") for a in arms):
                    if not importance:
                        raise RuntimeError(
                            f"{run_dir}: the baseline recorded no permutation "
                            "importance to choose the removed attributes from"
                        )
                    removed = tuple(lowest_importance(importance))
                    _log(progress, f"  remove-* arms drop: {', '.join(removed)}")
            _log(
                progress,
                f"  {arm:16s} seed {seed}: NE {format_or_dash(m['ne'])} (active "
                f"{format_or_dash(m['ne_active'])}, passive "
                f"{format_or_dash(m['ne_passive'])}), "
                f"{format_or_dash(m['train_examples_per_s'], ',.0f')} examples/s "
                f"(Ray Train), {time.perf_counter() - t0:.0f} s",
            )
    return metrics, tuple(removed or ()), importance


def _spread_text(spread: dict[str, Any] | None) -> str:
    """``; over N seeds m ± s`` of the separation epsilons (empty without)."""
    if not spread or len(spread["values"]) < 2:
        return ""
    return (
        f"; over {len(spread['values'])} seeds {format_or_dash(spread['mean'])} "
        f"± {format_or_dash(spread['std'])}"
    )


def _epsilon_line(eps: dict[str, Any]) -> str:
    sep, cal = eps["separation"], eps["calibrated"]
    return (
        f"    calibrated epsilon {format_or_dash(cal['epsilon'])} (active share of "
        f"windows {format_or_dash(cal['active_share_windows'], '.3f')}); "
        "NE-separation epsilon "
        + (
            f"{format_or_dash(sep['epsilon'])} (share "
            f"{format_or_dash(sep['active_share_windows'], '.3f')}, NE passive - "
            f"active {format_or_dash(sep['separation'], '+.4f')})"
            if sep["epsilon"] is not None
            else "none (no threshold leaves both sides large enough)"
        )
        + _spread_text(eps.get("separation_by_seed"))
    )


def _inference(
    cfg: ExperimentConfig,
    metrics: dict[str, dict[int, dict[str, Any]]],
    data: Any,
    urls: tuple[str, str, str],
    progress: bool,
) -> tuple[dict[int, dict[str, list[float]]], float]:
    """Phase 3: inference QPS of every arm's checkpoints through the Serve
    rankers' code on the same requests, arms interleaved. Adds each run's
    ``inference_qps`` and ``inference_qps_change`` to ``metrics``.

    Returns:
        ``(QPS rounds per seed and arm, the requests' active share)``.
    """

    events_url, segments_url, out_dir = urls
    arms = cfg.arms
    hist_root = f"{out_dir}/histories"
    run_histories(
        data.store.url, hist_root, None, cfg.samples.max_seq_len, progress=False
    )
    hist = read_histories(hist_root)
    requests = _requests(
        events_url, segments_url, hist, cfg.qps_requests, cfg.candidates
    )
    qps_runs: dict[int, dict[str, list[float]]] = {}
    for seed in cfg.seeds:
        score = arm_scorers({a: metrics[a][seed]["checkpoint"] for a in arms}, hist)
        qps_runs[seed] = inference_qps(score, requests, cfg.qps_rounds)
        for arm in arms:
            metrics[arm][seed]["inference_qps"] = qps_runs[seed][arm]
            metrics[arm][seed]["inference_qps_change"] = paired_gain(
                qps_runs[seed][arm], qps_runs[seed]["baseline"]
            )
        _log(
            progress,
            f"    seed {seed}: "
            + ", ".join(
                f"{a} {statistics.median(qps_runs[seed][a]):.1f}/s" for a in arms
            ),
        )
    return qps_runs, float(np.mean([r[0] for r in requests]))


def summarize_experiment(
    cfg: ExperimentConfig,
    metrics: dict[str, dict[int, dict[str, Any]]],
    step: dict[str, list[float]],
    qps_runs: dict[int, dict[str, list[float]]],
    cost: dict[str, Any],
    epsilon: float | None,
) -> dict[str, dict[str, Any]]:
    """Phase 4 (plain): per arm, the seeds' NE and QPS gains
    (:func:`summarize_arms`) beside the training-step rounds and what FLOPs
    predict.

    Args:
        step: training-step examples/s rounds per arm.
        qps_runs: inference QPS rounds per seed and arm.
        cost: ``flops_train[arm]`` and ``req_flops[arm]`` (per segment),
            ``share_train`` and ``share_inf`` (active shares).
        epsilon: the calibrated epsilon the table was segmented with.
    """
    arms = cfg.arms
    summary = summarize_arms(arms, metrics)
    flops_train, req_flops = cost["flops_train"], cost["req_flops"]
    for a in arms:
        summary[a]["step_examples_per_s"] = step[a]
        summary[a]["step_qps_change_pct"] = {
            "median": 100 * paired_gain(step[a], step["baseline"]),
            "rounds": [
                100 * (x / b - 1)
                for x, b in zip(step[a], step["baseline"], strict=True)
            ],
        }
        summary[a]["flop_train_change_pct"] = 100 * predicted_gain(
            flops_train[a], flops_train["baseline"], cost["share_train"]
        )
        summary[a]["flop_inference_change_pct"] = 100 * predicted_gain(
            req_flops[a], req_flops["baseline"], cost["share_inf"]
        )
        summary[a]["mflop_per_sample"] = {
            "passive": flops_train[a][0] / 1e6,
            "active": flops_train[a][1] / 1e6,
        }
        summary[a]["mflop_per_request"] = {
            "passive": req_flops[a][0] / 1e6,
            "active": req_flops[a][1] / 1e6,
        }
        summary[a]["curve"] = {
            str(s): metrics[a][s].get("curve", []) for s in cfg.seeds
        }
        summary[a]["epsilon"] = epsilon
    for arm in ("boost-selective", "boost-selective-only"):
        if "boost-all" in arms and arm in arms:
            vs = [
                100 * paired_gain(qps_runs[s][arm], qps_runs[s]["boost-all"])
                for s in cfg.seeds
            ]
            summary[arm]["inference_qps_vs_boost_all_pct"] = mean_std(vs)
    return summary


def run_experiment(
    events_url: str,
    segments_url: str,
    out_dir: str,
    cfg: ExperimentConfig | None = None,
    progress: bool = True,
    serving_timeline: str | None = None,
) -> dict[str, Any]:
    """Train, measure and report one experiment; returns what
    ``OUT/results.json`` holds. Re-running with the same OUT resumes each
    (arm, seed) run from its last checkpoint.

    Phases: train the arms (:func:`_train_arms`), epsilon
    (:func:`epsilon_study`), training-step throughput
    (:func:`train_step_throughput`), inference QPS (:func:`_inference`),
    summarise (:func:`summarize_experiment`), report.

    Args:
        serving_timeline: a JSON with an autoscaling replica timeline
            (``benchmarks/serve_load.py``'s output, or ``dynamix demo``'s) for
            the report's serving plot.
    """
    import ray

    cfg = cfg or ExperimentConfig()
    arms = cfg.arms
    t_start = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    events_url, segments_url = absolute_url(events_url), absolute_url(segments_url)
    serving_timeline = absolute_url(serving_timeline) if serving_timeline else None
    urls = (events_url, segments_url, out_dir)
    inputs = {
        "events": relative_to(out_dir, events_url),
        "segments": _segments_fingerprint(segments_url, out_dir),
    }
    os.makedirs(out_dir, exist_ok=True)
    ensure_ray()
    _log(progress, f"experiment {cfg.kind}: arms {', '.join(arms)}; seeds {cfg.seeds}")
    _log(progress, "  building samples (Ray Data) ...")
    samples = cfg.samples
    data = prepare_train_data(
        events_url, segments_url, out_dir, samples, progress=progress
    )
    mcfg = replace(cfg.model, max_seq_len=samples.max_seq_len)
    base_tcfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=cfg.use_gpu,
        samples=samples,
        model=mcfg,
    )
    metrics, removed, importance = _train_arms(
        cfg, data, base_tcfg, inputs, urls, progress
    )

    _log(progress, "  epsilon: NE-separation sweep on the evaluation rows ...")
    rows = _eval_rows(metrics["baseline"][cfg.seeds[0]]["checkpoint"], data)
    table = read_segments(segments_url)
    eps = epsilon_study(rows, segments_url, cfg.sweep_points, cfg.min_side_share, table)
    # the spread of the paper's rule over seeds: each seed's baseline sweeps
    by_seed = [eps["separation"]["epsilon"]]
    for seed in cfg.seeds[1:]:
        other = _eval_rows(metrics["baseline"][seed]["checkpoint"], data)
        study = epsilon_study(
            other, segments_url, cfg.sweep_points, cfg.min_side_share, table
        )
        by_seed.append(study["separation"]["epsilon"])
    eps["separation_by_seed"] = mean_std(by_seed)
    _log(progress, _epsilon_line(eps))

    _log(progress, "  training-step throughput (arms interleaved) ...")
    batches = sample_batches(data, cfg.batch_size, cfg.step_batches)
    share_train = float(np.concatenate([b["segment"] for b in batches]).mean())
    step = train_step_throughput(
        batches, arms, removed, mcfg, cfg.step_rounds, threads=1
    )

    _log(progress, "  inference QPS (Serve Ranker code, arms interleaved) ...")
    qps_runs, share_inf = _inference(cfg, metrics, data, urls, progress)

    seq = {s: samples.seq_len(s) for s in mcfg.sources}
    avail = data.available
    cost = {
        "flops_train": {
            a: flops_by_segment(mcfg, a, removed, avail, seq) for a in arms
        },
        "req_flops": request_flops_by_arm(
            mcfg, arms, removed, avail, cfg.candidates, seq
        ),
        "share_train": share_train,
        "share_inf": share_inf,
    }
    summary = summarize_experiment(
        cfg, metrics, step, qps_runs, cost, eps["calibrated"]["epsilon"]
    )
    results = {
        "kind": cfg.kind,
        "arms": summary,
        "tables": {
            k: [a for a in v if a in arms]
            for k, v in ARMS.items()
            if k != "all" and (cfg.kind in (k, "all"))
        },
        "seeds": list(cfg.seeds),
        "epsilon": eps,
        "removed": list(removed),
        "planted_no_signal": list(NO_SIGNAL_ATTRIBUTES),
        "importance": importance,
        "active_share": {"training_batches": share_train, "inference": share_inf},
        "inference_harness": (
            f"serve.ranker.Ranker.score in-process, 1 torch thread, one request "
            f"of {cfg.candidates} candidates per call, {cfg.qps_requests} "
            f"requests x {cfg.qps_rounds} rounds, arms interleaved per request"
        ),
        "truth_recovery": _truth_recovery(events_url, segments_url),
        "paper": PAPER,
        "config": {**asdict(cfg), "seeds": list(cfg.seeds)},
        # relative to OUT: a moved tree still reports (report.results_inputs)
        "inputs": {
            "events": relative_to(out_dir, events_url),
            "segments": relative_to(out_dir, segments_url),
            "eval_boundary_ms": data.boundary_ms,
            "serving_timeline": (
                relative_to(out_dir, serving_timeline) if serving_timeline else None
            ),
        },
        "ray_version": ray.__version__,
        "wall_s": time.perf_counter() - t_start,
    }
    with open(f"{out_dir}/results.json", "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    index = write_report(out_dir, results)
    results["report"] = index
    _log(progress, f"  results {out_dir}/results.json\n  report  {index}")
    return results


def _segments_fingerprint(segments_url: str, out_dir: str) -> dict[str, Any]:
    """What identifies a segment table: its path (relative to ``out_dir``),
    input fingerprint, epsilon."""

    meta = read_segments_meta(segments_url)
    return {
        "url": relative_to(out_dir, segments_url),
        "input_fingerprint": meta.get("input_fingerprint"),
        "epsilon": meta.get("epsilon"),
        "params": meta.get("params"),
    }


def _run_key(tcfg: Any, boundary_ms: int, inputs: dict[str, Any]) -> dict[str, Any]:
    """Everything a finished (arm, seed) run must share with this experiment
    to be reused: the whole training config, the data and the eval day."""

    return json.loads(
        json.dumps(
            {
                "train_config": {k: v for k, v in asdict(tcfg).items() if k != "model"},
                "model": model_config_dict(tcfg.model),
                "eval_boundary_ms": boundary_ms,
                "inputs": inputs,
            },
            default=str,
        )
    )


def _finished_run(run_dir: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished run in ``run_dir`` made with the same
    :func:`_run_key` (a re-run experiment reuses it); ``None`` otherwise.

    ``run_dir/run_key.json`` is written before a run starts. A folder whose
    key differs, or that has none (a crashed run of another request, or of
    an older version), is deleted, so that Ray Train never resumes a
    checkpoint of another request; a crashed run with the same key stays,
    and ``run_train`` resumes it. A finished run that stopped before
    reporting NE is redone."""
    import shutil

    key_path = os.path.join(run_dir, "run_key.json")
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isdir(run_dir):
        same = False
        if os.path.exists(key_path):
            with open(key_path) as fh:
                same = json.load(fh) == key
        if same and os.path.exists(path):
            with open(path) as fh:
                m = json.load(fh)
            if m.get("ne") is not None:
                if m.get("checkpoint") and not os.path.isabs(m["checkpoint"]):
                    m["checkpoint"] = os.path.join(run_dir, m["checkpoint"])
                return m
            same = False
        if not same:
            shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(key_path, "w") as fh:
        json.dump(key, fh, indent=2, sort_keys=True)
    return None


def _truth_recovery(events_url: str, segments_url: str) -> dict[str, Any] | None:
    """Planted-truth recovery when the events are generated (``_truth/``)."""

    try:
        truth = read_truth_users(events_url)
    except FileNotFoundError:
        return None
    return segment_recovery(truth, read_segments(segments_url))
