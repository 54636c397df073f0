"""The experiment report: ``OUT/report/index.html`` and its PNGs (matplotlib).

:func:`write_report` reads ``results.json``'s figures and the experiment's
inputs (events, segment table, an optional serving timeline) and draws:

* ``dwell.png``: log-dwell histograms of impressions near vs far from a
  conversion, for planted active and passive users (the paper's Fig. 3);
* ``corr_hours.png``: ``corr`` over the windows of a few users' days (Fig. 4);
* ``curves.png``: progressive NE over training examples per arm (Fig. 5);
* ``epsilon_sweep.png``: the baseline's NE on each side of epsilon;
* ``corr_dist.png``: the distribution of ``corr`` with both epsilons marked;
* ``recovery.png``: planted-truth precision and recall against epsilon;
* ``serving.png``: replicas of the active and passive rankers over time.

Each plot function takes plain arrays and a path, so a test can call it on
tiny data; a figure whose data is missing is left out with a note saying why.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynamix_ray.alure.evaluate import read_events_frame
from dynamix_ray.config import SegmentConfig
from dynamix_ray.io import located, relative_to
from dynamix_ray.segments.pipeline import read_segments, read_segments_meta
from dynamix_ray.segments.stats import near_mask
from dynamix_ray.synth import KINDS, planted_rows, read_truth_users

__all__ = [
    "ReportData",
    "draw_figures",
    "experiment_summary",
    "load_report_data",
    "render_html",
    "results_inputs",
    "format_or_dash",
    "plot_corr_dist",
    "plot_corr_hours",
    "plot_curves",
    "plot_dwell",
    "plot_epsilon_sweep",
    "plot_recovery",
    "plot_timeline",
    "write_report",
]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# ----------------------------------------------------------------- plots


def plot_dwell(
    log_dwell: dict[str, dict[str, np.ndarray]], path: str, horizon_s: int
) -> str:
    """Histograms of log dwell near vs far from conversions.

    Args:
        log_dwell: ``{panel title: {"near": (N,), "far": (M,)}}``.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(log_dwell), figsize=(5 * len(log_dwell), 3.4))
    axes = np.atleast_1d(axes)
    for ax, (title, d) in zip(axes, log_dwell.items(), strict=True):
        both = np.concatenate([d["near"], d["far"]])
        if len(both) == 0:
            ax.set_title(f"{title}: no impressions")
            continue
        bins = np.linspace(np.percentile(both, 0.5), np.percentile(both, 99.5), 50)
        for k, color in (("far", "tab:grey"), ("near", "tab:red")):
            ax.hist(
                d[k],
                bins=bins,
                density=True,
                alpha=0.55,
                color=color,
                label=f"{k} ({len(d[k]):,}; mean {np.mean(d[k]):.2f})"
                if len(d[k])
                else k,
            )
        ax.set_title(title)
        ax.set_xlabel("log dwell (ms)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    fig.suptitle(
        f"Dwell of ad impressions near (within {horizon_s} s before) vs far from "
        "a conversion",
        fontsize=10,
    )
    return _save(fig, path)


def plot_corr_hours(
    series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    epsilon: float,
    path: str,
) -> str:
    """``corr`` of a few users' windows over time.

    Args:
        series: ``{label: (window start hours since the first, corr, segment)}``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for label, (hours, corr, seg) in series.items():
        (line,) = ax.plot(hours, corr, "-", lw=1, alpha=0.8, label=label)
        act = seg == 1
        ax.plot(hours[act], corr[act], "o", color=line.get_color(), ms=5)
        ax.plot(hours[~act], corr[~act], "o", mfc="none", color=line.get_color(), ms=5)
    for e in (epsilon, -epsilon):
        ax.axhline(e, color="k", ls="--", lw=0.8)
    ax.set_xlabel("hours since the first window (filled: active, hollow: passive)")
    ax.set_ylabel("corr")
    ax.set_title(f"corr per window for a few users (dashed: ±epsilon {epsilon:.3f})")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_curves(
    curves: dict[str, list[list[list[float]]]], path: str, smooth: int = 5
) -> str:
    """Progressive NE over training examples, one line per arm (mean over
    seeds, a ``smooth``-point running mean; the band is the seeds' range).

    Args:
        curves: ``{arm: [per seed: [[examples, NE], ...]]}``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for arm, seed_curves in curves.items():
        runs = [np.asarray(r, np.float64) for r in seed_curves if len(r)]
        if not runs:
            continue
        # seeds on one grid of examples seen (points may differ between seeds)
        x = runs[int(np.argmin([len(r) for r in runs]))][:, 0]
        ys = np.stack([np.interp(x, r[:, 0], r[:, 1]) for r in runs])
        n = len(x)
        k = max(1, min(smooth, n))
        kernel = np.ones(k) / k
        ys = np.stack([np.convolve(y, kernel, mode="valid") for y in ys])
        x = x[k - 1 :]
        ax.plot(x, ys.mean(0), label=arm, lw=1.4)
        if len(ys) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.15)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("progressive NE (batch before its step)")
    ax.set_title("NE convergence per arm (mean over seeds; band: min-max)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_epsilon_sweep(
    sweep: dict[str, list[float | None]],
    calibrated: float,
    separation: float | None,
    path: str,
) -> str:
    """The baseline's NE on each side of epsilon, and the separation."""
    plt = _plt()

    def arr(k: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in sweep[k]], np.float64)

    eps = arr("epsilon")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(eps, arr("ne_active"), "o-", ms=3, label="NE, active side (|corr| > eps)")
    ax.plot(eps, arr("ne_passive"), "s-", ms=3, label="NE, passive side")
    ax.set_xlabel("epsilon")
    ax.set_ylabel("baseline NE")
    ax2 = ax.twinx()
    ax2.plot(eps, arr("separation"), "k:", lw=1.2, label="passive - active")
    ax2.set_ylabel("NE separation")
    ax.axvline(
        calibrated, color="tab:green", lw=1, label=f"calibrated {calibrated:.3f}"
    )
    if separation is not None:
        ax.axvline(
            separation, color="tab:red", lw=1, label=f"max separation {separation:.3f}"
        )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    ax.set_title("Epsilon sweep: one baseline evaluated on each side")
    return _save(fig, path)


def plot_corr_dist(
    corr: np.ndarray, calibrated: float, separation: float | None, path: str
) -> str:
    """Histogram of the eligible windows' ``corr`` with ±epsilon marked."""
    plt = _plt()
    c = np.asarray(corr, np.float64)
    c = c[~np.isnan(c)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(c, bins=80, color="tab:blue", alpha=0.7)
    for e, color, name in (
        (calibrated, "tab:green", "calibrated"),
        (separation, "tab:red", "max separation"),
    ):
        if e is None:
            continue
        ax.axvline(e, color=color, lw=1, label=f"{name} ±{e:.3f}")
        ax.axvline(-e, color=color, lw=1)
    ax.set_xlabel("corr (eligible user windows)")
    ax.set_ylabel("windows")
    ax.set_title(f"Distribution of corr over {len(c):,} eligible windows")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_recovery(
    abs_corr: np.ndarray,
    truth: np.ndarray,
    calibrated: float,
    separation: float | None,
    path: str,
) -> str:
    """Precision and recall of ``|corr| > eps`` against the planted truth over
    eligible windows, as epsilon varies."""
    plt = _plt()
    a = np.asarray(abs_corr, np.float64)
    t = np.asarray(truth, bool)
    grid = np.linspace(0.0, float(np.quantile(a, 0.99)) if len(a) else 1.0, 60)
    prec, rec, share = [], [], []
    for e in grid:
        p = a > e
        tp = float((p & t).sum())
        prec.append(tp / p.sum() if p.sum() else np.nan)
        rec.append(tp / t.sum() if t.sum() else np.nan)
        share.append(p.mean() if len(p) else np.nan)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(grid, prec, label="precision")
    ax.plot(grid, rec, label="recall")
    ax.plot(grid, share, ":", label="active share")
    ax.axhline(
        float(t.mean()) if len(t) else 0,
        color="grey",
        lw=0.8,
        ls="--",
        label="planted active share",
    )
    ax.axvline(
        calibrated, color="tab:green", lw=1, label=f"calibrated {calibrated:.3f}"
    )
    if separation is not None:
        ax.axvline(
            separation, color="tab:red", lw=1, label=f"max separation {separation:.3f}"
        )
    ax.set_xlabel("epsilon")
    ax.set_ylim(0, 1.02)
    ax.set_title("Planted-truth recovery of the active segment")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_timeline(autoscaling: dict[str, Any], path: str) -> str:
    """Running replicas of each ranker (and of the router, when the timeline
    has it) over time under a load whose active share changes at ``phase_s``
    (``benchmarks/serve_load.py`` autoscaling section, or the demo's)."""
    plt = _plt()
    tl = autoscaling["timeline"]
    t = [x["t"] for x in tl]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    shown = [
        d for d in ("ActiveRanker", "PassiveRanker", "Router") if tl and d in tl[0]
    ]
    for d in shown:
        ax.step(
            t,
            [x[d] for x in tl],
            where="post",
            label=d,
            ls=":" if d == "Router" else "-",
        )
    phase = autoscaling["phase_s"]
    ax.axvline(phase, color="grey", ls="--", lw=1)
    ax.text(phase / 2, 0.2, "active share 1/3", ha="center")
    ax.text(1.5 * phase, 0.2, "active share 2/3", ha="center")
    ax.set_xlabel("seconds")
    ax.set_ylabel("running replicas")
    top = max(max(x[d] for d in shown) for x in tl) if tl else 1
    ax.set_ylim(0, top + 1)
    ax.legend(loc="upper left")
    ax.set_title(f"Autoscaling under {autoscaling['rate_qps']:.0f} QPS open-loop load")
    return _save(fig, path)


# ----------------------------------------------------------------- data


def _dwell_data(
    events_url: str,
    truth_users: Any | None,
    cfg: Any,
    max_users: int = 400,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Log dwell near / far from conversions (docs/contract.md §2's near rule and dwell
    bounds of the segment table's ``cfg``), for up to ``max_users`` users
    per planted kind."""
    import pandas as pd

    imp = read_events_frame(
        events_url, "ad_impressions", ["user_id", "ts_ms", "dwell_ms"]
    )
    conv = read_events_frame(events_url, "conversions", ["user_id", "ts_ms"])
    imp = imp[(imp.dwell_ms >= cfg.min_dwell_ms) & (imp.dwell_ms <= cfg.max_dwell_ms)]
    rng = np.random.default_rng(seed)
    groups: dict[str, np.ndarray] = {}
    if truth_users is not None:
        kind = truth_users.column("kind").to_numpy()
        uid = truth_users.column("user_id").to_numpy()
        groups = {
            "planted active users": uid[kind == 1],
            "planted passive users": uid[kind == 0],
        }
    else:
        groups = {"all users": imp.user_id.unique()}
    out = {}
    for title, users in groups.items():
        users = rng.permutation(users)[:max_users]
        i = imp[imp.user_id.isin(users)]
        c = conv[conv.user_id.isin(users)]
        uniq = pd.Index(users)
        near = near_mask(
            uniq.get_indexer(i.user_id).astype(np.int64),
            i.ts_ms.to_numpy(np.int64),
            uniq.get_indexer(c.user_id).astype(np.int64),
            c.ts_ms.to_numpy(np.int64),
            cfg.buffer_s * 1000,
            cfg.horizon_s * 1000,
        )
        d = np.log(i.dwell_ms.to_numpy(np.float64))
        out[title] = {"near": d[near], "far": d[~near]}
    return out


def _corr_series(
    segments: Any, truth_users: Any | None, days: float = 3.0
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A few users' (hours, corr, segment) over the first ``days`` days: one
    per planted kind when the truth is known, else the users with the most
    eligible windows."""
    import pyarrow as pa

    uid = segments.column("user_id").to_numpy()
    start = segments.column("window_start").cast(pa.int64()).to_numpy()
    corr = segments.column("corr").to_numpy(zero_copy_only=False).astype(np.float64)
    seg = segments.column("segment").to_numpy()
    ok = ~np.isnan(corr)
    t0 = int(start.min()) if len(start) else 0
    users_ok, inverse = np.unique(uid[ok], return_inverse=True)
    counts = np.bincount(inverse, minlength=len(users_ok))
    picks: dict[str, int] = {}
    if truth_users is not None:
        kind = dict(
            zip(
                truth_users.column("user_id").to_numpy().tolist(),
                truth_users.column("kind").to_numpy().tolist(),
                strict=True,
            )
        )
        ranked = users_ok[np.argsort(-counts, kind="stable")]
        for u in ranked:
            k = KINDS[kind.get(int(u), 0)]
            if k not in picks:
                picks[k] = int(u)
            if len(picks) == len(KINDS):
                break
        picks = {f"user {u} (planted {k})": u for k, u in picks.items()}
    else:
        for u in users_ok[np.argsort(-counts, kind="stable")][:3]:
            picks[f"user {u}"] = int(u)
    out = {}
    for label, u in picks.items():
        sel = (uid == u) & ok & (start < t0 + days * 86_400_000)
        order = np.argsort(start[sel])
        out[label] = (
            (start[sel][order] - t0) / 3_600_000,
            corr[sel][order],
            seg[sel][order],
        )
    return out


# ----------------------------------------------------------------- HTML


def format_or_dash(x: Any, fmt: str = ".4f") -> str:
    """``x`` formatted, or "–" when it is missing (``None``, NaN, inf)."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return format(x, fmt)


def _fmt(ms: dict[str, Any] | None, digits: int = 4, pct: bool = False) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    m, s = ms["mean"], ms.get("std")
    unit = "%" if pct else ""
    sign = "+" if pct else ""
    text = f"{m:{sign}.{digits}f}{unit}"
    return text + (f" ± {s:.{digits}f}" if s is not None else "")


def _table(results: dict[str, Any], arms: list[str]) -> str:
    head = (
        "<tr><th>arm</th><th>NE</th><th>NE gain</th><th>NE gain %</th>"
        "<th>NE active</th><th>NE passive</th>"
        "<th>train ex/s Δ% (Ray Train)</th><th>train step Δ% (model, median of "
        "rounds)</th><th>FLOP-predicted train Δ%</th>"
        "<th>inference QPS Δ% (Ranker harness)</th><th>FLOP-predicted "
        "inference Δ%</th></tr>"
    )
    rows = []
    for arm in arms:
        a = results["arms"][arm]
        step = a.get("step_qps_change_pct", {}).get("median")
        rows.append(
            "<tr>"
            f"<td>{html.escape(arm)}</td><td>{_fmt(a['ne'])}</td>"
            f"<td>{_fmt(a['ne_gain'])}</td><td>{_fmt(a['ne_gain_pct'], 2, True)}</td>"
            f"<td>{_fmt(a['ne_active'])}</td><td>{_fmt(a['ne_passive'])}</td>"
            f"<td>{_fmt(a['train_qps_change_pct'], 1, True)}</td>"
            f"<td>{'–' if step is None else f'{step:+.1f}%'}</td>"
            f"<td>{a['flop_train_change_pct']:+.1f}%</td>"
            f"<td>{_fmt(a['inference_qps_change_pct'], 1, True)}</td>"
            f"<td>{a['flop_inference_change_pct']:+.1f}%</td>"
            "</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
th{background:#f4f4f4}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555;max-width:900px}
.note{color:#a40;font-size:13px}
"""


#: The inputs ``results.json`` records as paths (relative to its OUT).
_INPUT_PATHS = ("events", "segments", "serving_timeline", "retrieval")


def results_inputs(out_dir: str, results: dict[str, Any]) -> dict[str, Any]:
    """``results["inputs"]`` with its paths located from ``out_dir`` (they
    are recorded relative to it: ``io.relative_to``)."""
    inputs = dict(results["inputs"])
    for k in _INPUT_PATHS:
        if inputs.get(k):
            inputs[k] = located(out_dir, inputs[k])
    return inputs


@dataclass
class ReportData:
    """What the figures read besides ``results.json``: the segment table,
    the planted truth (``None`` without ``_truth/``), the segmentation
    parameters, and notes on what is missing."""

    inputs: dict[str, Any]
    segments: Any
    truth_users: Any
    seg_cfg: Any
    notes: list[str]

    @property
    def corr(self) -> np.ndarray:
        col = self.segments.column("corr")
        return col.to_numpy(zero_copy_only=False).astype(np.float64)


def load_report_data(out_dir: str, results: dict[str, Any]) -> ReportData:
    """Load: the inputs ``results.json`` names, located from ``out_dir``."""

    inputs = results_inputs(out_dir, results)
    notes = []
    try:
        truth_users = read_truth_users(inputs["events"])
    except FileNotFoundError:
        truth_users = None
        notes.append("no planted truth (_truth/) beside the events: recovery not drawn")
    params = read_segments_meta(inputs["segments"]).get("params", {})
    # the parameters the table was made with (defaults where it names none)
    keys = ("window_s", "buffer_s", "horizon_s", "min_dwell_ms", "max_dwell_ms")
    seg_cfg = SegmentConfig(**{k: params[k] for k in keys if k in params})
    return ReportData(
        inputs, read_segments(inputs["segments"]), truth_users, seg_cfg, notes
    )


def draw_figures(
    results: dict[str, Any], data: ReportData, folder: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw: every figure the data allows into ``folder``; returns
    ``(figures as (file, caption), notes on those not drawn)``."""

    eps = results["epsilon"]
    cal = eps["calibrated"]["epsilon"]
    sep = eps["separation"]["epsilon"]
    figures: list[tuple[str, str]] = []
    notes = list(data.notes)
    inputs, segments, truth_users, seg_cfg = (
        data.inputs,
        data.segments,
        data.truth_users,
        data.seg_cfg,
    )
    corr = data.corr

    def figure(name: str, caption: str, draw: Callable[[str], str]) -> None:
        try:
            draw(os.path.join(folder, name))
            figures.append((name, caption))
        except (OSError, KeyError, ValueError, TypeError) as e:  # data missing: say so
            notes.append(f"{name} not drawn: {type(e).__name__}: {e}")

    buffer_s, horizon_s = seg_cfg.buffer_s, seg_cfg.horizon_s
    window_h = seg_cfg.window_s / 3600
    figure(
        "dwell.png",
        "Fig. 3 analog. Log dwell of ad impressions near a conversion (a "
        f"conversion in [t − {buffer_s} s, t + {horizon_s} s]) vs far from one, "
        "after the dwell bounds. Planted active users dwell longer before they "
        "convert; passive users do not.",
        lambda p: plot_dwell(
            _dwell_data(inputs["events"], truth_users, seg_cfg), p, horizon_s
        ),
    )
    figure(
        "corr_hours.png",
        f"Fig. 4 analog. corr of each {window_h:g}-hour window over three days for a few "
        "users; filled markers are windows segmented active. A switcher moves "
        "between segments within a day.",
        lambda p: plot_corr_hours(_corr_series(segments, truth_users), cal, p),
    )
    curves = {
        arm: [results["arms"][arm]["curve"][str(s)] for s in results["seeds"]]
        for arm in results["arms"]
    }
    figure(
        "curves.png",
        "Fig. 5 analog. Progressive NE while training: each batch's loss under "
        "the model before the step that learns from it, per window of steps "
        "(mean over seeds).",
        lambda p: plot_curves(curves, p),
    )
    figure(
        "epsilon_sweep.png",
        "Epsilon by NE separation: the first seed's baseline evaluated on the "
        "evaluation day, rows split by |corr| of the user's last ended window. "
        "The red line maximises NE(passive) − NE(active); the green one is the "
        "segment table's epsilon (calibrated to an active share).",
        lambda p: plot_epsilon_sweep(eps["sweep"], cal, sep, p),
    )
    figure(
        "corr_dist.png",
        "Distribution of corr over eligible (user, window) rows, with ±epsilon "
        "of both choices.",
        lambda p: plot_corr_dist(corr, cal, sep, p),
    )
    if truth_users is not None:
        truth, eligible = planted_rows(truth_users, segments)
        figure(
            "recovery.png",
            "Planted-truth recovery: precision and recall of |corr| > epsilon "
            "against the generator's planted active windows, over eligible rows.",
            lambda p: plot_recovery(
                np.abs(corr[eligible]), truth[eligible], cal, sep, p
            ),
        )
    timeline_path = inputs.get("serving_timeline")
    if timeline_path:

        def draw_timeline(p: str) -> str:
            with open(timeline_path) as fh:
                t = json.load(fh)
            return plot_timeline(t.get("autoscaling", t), p)

        figure(
            "serving.png",
            "Serving: running replicas of ActiveRanker and PassiveRanker (each "
            "autoscaling 1–2 on its own) while the active share of traffic goes "
            f"1/3 → 2/3. Source: {timeline_path}.",
            draw_timeline,
        )
    else:
        notes.append(
            "no serving timeline given (--serving-timeline: the autoscaling "
            "section of benchmarks/serve_load.py's JSON or the demo's)"
        )

    return figures, notes


def retrieval_html(ev: dict[str, Any]) -> str:
    """The retrieval evaluation's table (``u2u_eval.json``; docs/retrieval.md)
    as HTML: the same rows as ``dynamix u2u --eval`` prints."""
    metrics = ev["generators"]
    ks = list(next(iter(metrics.values())))
    head = "".join(f"<th>recall@{k}</th><th>NDCG@{k}</th>" for k in ks)
    rows = []
    for name, by_k in metrics.items():
        cells = "".join(
            f"<td>{by_k[k]['recall']:.3f}</td><td>{by_k[k]['ndcg']:.3f}</td>"
            for k in ks
        )
        last = by_k[ks[-1]]
        rows.append(
            f"<tr><td>{html.escape(name)}</td>{cells}<td>{last['hit_rate']:.3f}"
            f"</td><td>{last['coverage']:.3f}</td></tr>"
        )
    h = ev["holdout"]
    weights = ", ".join(f"{n} {w:.2f}" for n, w in ev["blend_weights"].items())
    return (
        f"<h2>Retrieval</h2><p>Held out {h['days']:g} days after the embeddings' "
        f"as_of: {ev['new_pairs']:,} new (user, ad) pairs of "
        f"{ev['users_evaluated']:,} users. Per-user averages; recency scales and "
        f"blend weights ({html.escape(weights)}) chosen on the "
        f"{ev['validation']['days']:g} days before.</p>"
        f"<table><tr><th>generator</th>{head}<th>hit rate@{ks[-1]}</th>"
        f"<th>coverage@{ks[-1]}</th></tr>" + "".join(rows) + "</table>"
    )


def render_html(
    results: dict[str, Any],
    segment_rows: int,
    figures: list[tuple[str, str]],
    notes: list[str],
    retrieval: dict[str, Any] | None = None,
) -> str:
    """Render (plain): the report page of ``results`` with its figures (and
    the retrieval evaluation's table, when given)."""
    eps = results["epsilon"]
    parts = [f"<h1>DynamiX experiment: {html.escape(results['kind'])}</h1>"]
    parts.append(
        f"<p>Seeds {results['seeds']}; {segment_rows:,} segment rows; arms "
        f"trained on the same samples and evaluated on the same last day. "
        f"Figures are mean ± std over seeds (paired per seed with that seed's "
        f"baseline). Inference: {html.escape(results['inference_harness'])}. "
        f"Ray {html.escape(str(results.get('ray_version')))}, wall "
        f"{results.get('wall_s', 0):.0f} s. Raw figures: "
        f"<a href='../results.json'>results.json</a>.</p>"
    )
    titles = {
        "removal": "Table 2 analog: feature removal",
        "boosting": "Table 3 analog: feature boosting",
    }
    for name, arms in results["tables"].items():
        parts.append(f"<h2>{titles.get(name, name)}</h2>")
        parts.append(_table(results, arms))
    bs = (
        results["arms"].get("boost-selective", {}).get("inference_qps_vs_boost_all_pct")
    )
    if bs:
        parts.append(
            f"<p>boost-selective vs boost-all inference QPS: {_fmt(bs, 1, True)} "
            f"(paper: +{results['paper']['boost-selective']['inference_qps_vs_boost_all_pct']}%).</p>"
        )
    only = results["arms"].get("boost-selective-only", {})
    if only.get("inference_qps_vs_boost_all_pct"):
        paper_only = results["paper"].get("boost-selective-only", {})
        parts.append(
            "<p>boost-selective-only (the selection reading: passive users get "
            "the organic history alone) vs boost-all inference QPS: "
            f"{_fmt(only['inference_qps_vs_boost_all_pct'], 1, True)}; vs the "
            "baseline it is in the table (paper, selective boosting vs "
            f"baseline: +{paper_only.get('inference_qps_pct', '–')}%).</p>"
        )
    removed, planted = results["removed"], results["planted_no_signal"]
    if any(a.startswith("remove-") for a in results["arms"]):
        parts.append(
            f"<p>remove-* arms drop: <b>{html.escape(', '.join(removed))}</b>; the "
            f"generator's no-signal attributes: {html.escape(', '.join(planted))} "
            f"({len(set(removed) & set(planted))} of {len(planted)} in common).</p>"
        )
    parts.append(
        "<h2>Epsilon</h2><table><tr><th>choice</th><th>epsilon</th>"
        "<th>active share of windows</th><th>active share of traffic</th>"
        "<th>NE active</th><th>NE passive</th><th>separation</th></tr>"
    )
    for label, e in (
        ("calibrated (segment table)", eps["calibrated"]),
        ("max NE separation", eps["separation"]),
    ):
        if e.get("epsilon") is None:
            parts.append(f"<tr><td>{label}</td><td colspan=6>none</td></tr>")
            continue
        parts.append(
            f"<tr><td>{label}</td><td>{format_or_dash(e['epsilon'])}</td>"
            f"<td>{format_or_dash(e['active_share_windows'], '.3f')}</td>"
            f"<td>{format_or_dash(e['active_share_traffic'], '.3f')}</td>"
            f"<td>{format_or_dash(e['ne_active'])}</td><td>{format_or_dash(e['ne_passive'])}</td>"
            f"<td>{format_or_dash(e['separation'], '+.4f')}</td></tr>"
        )
    parts.append("</table>")
    spread = eps.get("separation_by_seed")
    if spread and len(spread["values"]) > 1:
        parts.append(
            f"<p>NE-separation epsilon of each seed's baseline: "
            f"{html.escape(', '.join(format_or_dash(v) for v in spread['values']))} "
            f"(mean {format_or_dash(spread['mean'])}, std "
            f"{format_or_dash(spread['std'])}).</p>"
        )
    rec = results.get("truth_recovery")
    if rec:
        parts.append(
            f"<p>Segmentation vs planted truth ({rec['eligible_rows']:,} eligible "
            f"rows): precision {rec['precision']:.3f}, recall {rec['recall']:.3f}, "
            f"planted active share {rec['planted_active_share']:.3f}.</p>"
        )
    if retrieval is not None:
        parts.append(retrieval_html(retrieval))
    for name, caption in figures:
        parts.append(
            f"<figure><img src='{name}' alt='{name}'><figcaption>{html.escape(caption)}"
            "</figcaption></figure>"
        )
    for n in notes:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>DynamiX "
        f"experiment</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    return page


def write_report(
    out_dir: str,
    results: dict[str, Any] | None = None,
    serving_timeline: str | None = None,
    retrieval: str | None = None,
) -> str:
    """Write ``out_dir/report/index.html`` and its PNGs; returns the HTML's path.

    Phases: load (:func:`load_report_data`), draw (:func:`draw_figures`),
    render (:func:`render_html`).

    Args:
        out_dir: an experiment's OUT (``results.json`` is read when
            ``results`` is not given).
        serving_timeline: overrides ``results["inputs"]["serving_timeline"]``:
            a JSON holding an ``autoscaling`` section (with ``timeline``) or
            that section itself.
        retrieval: a ``dynamix u2u --eval`` ``u2u_eval.json`` whose table the
            report shows (remembered in ``results["inputs"]`` like the
            timeline).
    """
    results_path = os.path.join(out_dir, "results.json")
    if results is None:
        with open(results_path) as fh:
            results = json.load(fh)
    given = {"serving_timeline": serving_timeline, "retrieval": retrieval}
    if any(given.values()):  # remembered: a later redraw keeps them
        for key, path in given.items():
            if path:
                results["inputs"][key] = relative_to(out_dir, path)
        with open(results_path, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    report = os.path.join(out_dir, "report")
    os.makedirs(report, exist_ok=True)
    data = load_report_data(out_dir, results)
    figures, notes = draw_figures(results, data, report)
    ev = None
    if data.inputs.get("retrieval"):
        with open(data.inputs["retrieval"]) as fh:
            ev = json.load(fh)
    page = render_html(results, len(data.segments), figures, notes, ev)
    index = os.path.join(report, "index.html")
    with open(index, "w") as fh:
        fh.write(page)
    return index


def experiment_summary(r: dict) -> str:
    """The experiment's tables as text."""
    lines = [f"dynamix experiment {r['kind']}: seeds {r['seeds']}"]
    head = (
        f"  {'arm':16s} {'NE':>16s} {'NE gain %':>14s} {'train ex/s %':>14s} "
        f"{'step %':>7s} {'FLOP %':>7s} {'infer QPS %':>14s} {'FLOP %':>7s}"
    )

    def ms(x: dict, d: int, pct: bool = False) -> str:
        if x.get("mean") is None:
            return "-"
        sign = "+" if pct else ""
        sd = f"±{x['std']:.{d}f}" if x.get("std") is not None else ""
        return f"{x['mean']:{sign}.{d}f}{sd}"

    for table, arms in r["tables"].items():
        lines += [f" {table}:", head]
        for arm in arms:
            a = r["arms"][arm]
            lines.append(
                f"  {arm:16s} {ms(a['ne'], 4):>16s} {ms(a['ne_gain_pct'], 2, True):>14s} "
                f"{ms(a['train_qps_change_pct'], 1, True):>14s} "
                f"{a['step_qps_change_pct']['median']:+7.1f} "
                f"{a['flop_train_change_pct']:+7.1f} "
                f"{ms(a['inference_qps_change_pct'], 1, True):>14s} "
                f"{a['flop_inference_change_pct']:+7.1f}"
            )
    e = r["epsilon"]
    num = format_or_dash
    cal, sep = e["calibrated"], e["separation"]
    lines.append(
        f" epsilon: calibrated {num(cal['epsilon'], '.4f')} (active share of "
        f"windows {num(cal.get('active_share_windows'), '.3f')}, of traffic "
        f"{num(cal.get('active_share_traffic'), '.3f')}); max NE separation "
        + (
            f"{num(sep['epsilon'], '.4f')} (windows "
            f"{num(sep.get('active_share_windows'), '.3f')}, traffic "
            f"{num(sep.get('active_share_traffic'), '.3f')})"
            if sep["epsilon"] is not None
            else "none"
        )
    )
    lines.append(f" report: {r.get('report')}")
    return "\n".join(lines)
