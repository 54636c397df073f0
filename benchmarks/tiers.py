"""Tiers with hysteresis and the unequal-variance statistic on generated
switchers (issue 17 §3; docs/segments.md, "Tiers and hysteresis"). Prints what
it measured; never asserts.

On one generated world (cached under ``--out``; 1/6 of users are switchers,
active only in a 12-hour block of each day, the paper's Fig. 4), the event
store is built once and segmented at each ``--windows`` length with a
calibrated epsilon. Then, per window:

* **flips per user-day** of 2 tiers (epsilon) and of 3 tiers (epsilon and the
  ``--upper`` quantile of eligible ``|corr|``), without hysteresis (today's
  rule: a null ``corr`` is passive) and with hysteresis bands ``--bands``
  (in units of epsilon);
* **recovery** of the planted active rows (precision and recall of tier >= 1
  on eligible rows) at each band.

And at the paper's 6 h window, the **statistic ablation**: ``corr`` (Eq. 8),
``w_mle`` (Eq. 7, equal variances) and ``welch`` (unequal variances), each cut
at the same active share of eligible rows, against the planted truth
(precision, recall, and the threshold-free AUC). Figures go to
``<out>/tiers_bench.json``.

    python benchmarks/tiers.py                 # 20k users, 7 days
    python benchmarks/tiers.py --users 4000    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(__file__))
from segment import cached_dataset  # noqa: E402  (benchmarks share helpers)

from dynamix_ray.config import GenerateConfig, SegmentConfig, parse_duration_s  # noqa: E402
from dynamix_ray.events import run_bucket  # noqa: E402
from dynamix_ray.segments.pipeline import read_segments, run_segment  # noqa: E402
from dynamix_ray.segments.tiers import (  # noqa: E402
    STATISTICS,
    cut_tiers,
    flips_per_user_day,
    hysteresis_tiers,
    statistic,
)
from dynamix_ray.synth import planted_rows, read_truth_users  # noqa: E402


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Rank AUC of ``score`` for ``label`` (ties count half)."""
    import pandas as pd

    pos = label.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = pd.Series(score).rank(method="average").to_numpy()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def recovery(tier: np.ndarray, truth: np.ndarray, eligible: np.ndarray) -> dict:
    """Precision and recall of tier >= 1 against the planted truth on eligible
    rows, and recall on every row (where a null window keeps, or drops, the
    tier)."""
    p, t = tier[eligible] >= 1, truth[eligible]
    tp = int((p & t).sum())
    every = int(((tier >= 1) & truth).sum())
    return {
        "precision": tp / max(1, int(p.sum())),
        "recall": tp / max(1, int(t.sum())),
        "recall_all_rows": every / max(1, int(truth.sum())),
    }


def one_window(store: str, out: Path, window: str, truth_users: pa.Table, args) -> dict:
    cfg = SegmentConfig(window_s=int(parse_duration_s(window)))
    res = run_segment(store, str(out / f"seg_{window}"), cfg, progress=False)
    table = read_segments(str(out / f"seg_{window}"))
    eps = float(res.meta["epsilon"])
    truth, eligible = planted_rows(truth_users, table)
    u = table.column("user_id").to_numpy()
    w = table.column("window_start").cast(pa.int64()).to_numpy()
    v = statistic(table, "corr")
    upper = float(np.quantile(v[eligible], args.upper))
    row: dict[str, Any] = {
        "window": window,
        "epsilon": eps,
        "upper_threshold": upper,
        "rows": table.num_rows,
        "eligible_share": float(eligible.mean()),
        "tiers": {},
    }
    for k, th in (("2", [eps]), ("3", [eps, upper])):
        plain = cut_tiers(v, np.array(th))
        cells = {
            "no hysteresis": {
                "flips_per_user_day": flips_per_user_day(u, w, plain),
                **recovery(plain, truth, eligible),
            }
        }
        for band in args.bands:
            tier = hysteresis_tiers(u, w, v, np.array(th), band * eps)
            cells[f"band {band:g} eps"] = {
                "flips_per_user_day": flips_per_user_day(u, w, tier),
                **recovery(tier, truth, eligible),
            }
        row["tiers"][k] = cells
    return row


def ablation(seg_out: str, truth_users: pa.Table, share: float) -> dict:
    table = read_segments(seg_out)
    truth, eligible = planted_rows(truth_users, table)
    res = {}
    for name in STATISTICS:
        v = statistic(table, name)
        ok = eligible & ~np.isnan(v)
        cut = float(np.quantile(v[ok], 1 - share))
        tier = (np.nan_to_num(v, nan=-np.inf) > cut).astype(np.int8)
        res[name] = {
            "threshold": cut,
            "rows_with_value": int(ok.sum()),
            "auc": auc(v[ok], truth[ok]),
            **recovery(tier, truth, ok),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", default="1h,3h,6h,12h,1d")
    p.add_argument("--bands", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
    p.add_argument("--upper", type=float, default=0.8, help="3-tier upper quantile")
    p.add_argument(
        "--near-sigma-scales",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="worlds of the statistic ablation (generate --near-sigma-scale)",
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench_out/tiers")
    args = p.parse_args(argv)

    import ray

    out = Path(args.out)
    gen = GenerateConfig(users=args.users, days=args.days, seed=args.seed)
    plain, _ = cached_dataset(
        out / f"data_u{args.users}_d{args.days}_s{args.seed}", gen
    )
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = str(out / "store")
    run_bucket(plain, store, progress=False)
    truth_users = read_truth_users(plain)
    rows = [
        one_window(store, out, w, truth_users, args) for w in args.windows.split(",")
    ]
    share = SegmentConfig().active_fraction
    abl = {"1": ablation(str(out / "seg_6h"), truth_users, share)}
    for scale in args.near_sigma_scales:
        if scale == 1.0:
            continue
        cfg = replace(gen, near_sigma_scale=scale)
        world, _ = cached_dataset(
            out / f"data_u{args.users}_d{args.days}_s{args.seed}_ns{scale:g}", cfg
        )
        seg = str(out / f"seg_6h_ns{scale:g}")
        run_segment(world, seg, progress=False)
        abl[f"{scale:g}"] = ablation(seg, read_truth_users(world), share)
    (out / "tiers_bench.json").write_text(
        json.dumps({"args": vars(args), "windows": rows, "ablation": abl}, indent=2)
    )
    cells = list(rows[0]["tiers"]["2"])
    print(
        f"\nflips per user-day (precision / recall of tier >= 1 on eligible rows; "
        f"recall on all rows), {args.users:,} users"
    )
    print("| window | tiers | " + " | ".join(cells) + " |")
    print("|---|---|" + "---|" * len(cells))
    for r in rows:
        for k, c in r["tiers"].items():
            print(
                f"| {r['window']} | {k} | "
                + " | ".join(
                    f"{c[x]['flips_per_user_day']:.3f} ({c[x]['precision']:.3f} / "
                    f"{c[x]['recall']:.3f}; {c[x]['recall_all_rows']:.3f})"
                    for x in cells
                )
                + " |"
            )
    print("\nstatistic ablation at 6 h (same active share of eligible rows)")
    print(
        "| near/far log-dwell spread | statistic | rows with a value | AUC vs "
        "planted | precision | recall |"
    )
    print("|---|---|---|---|---|---|")
    for scale, world_abl in abl.items():
        for name, a in world_abl.items():
            print(
                f"| {scale}x | {name} | {a['rows_with_value']:,} | {a['auc']:.4f} | "
                f"{a['precision']:.4f} | {a['recall']:.4f} |"
            )
    print(f"\nfigures: {out / 'tiers_bench.json'}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
