"""Epsilon from a compute budget over a simulated day of diurnal traffic
(issue 17 §4; docs/segments.md, "Epsilon from a compute budget"). Prints what
it measured; never asserts.

The world (generated, cached under ``--out``): half the users are switchers
whose 12-hour active block starts within the first ``--switch-spread-h``
hours of the UTC day, so the active share of traffic follows the clock. It is
segmented at ``--window-h`` windows with a calibrated epsilon. Every ad
impression of the last ``--days-replayed`` days is a request. It carries the
``|corr|`` of its user's last window with a value that ended before it (a
null window keeps the user's state, as ``tiers.hysteresis_tiers`` does;
NaN: none yet, passive).

A request costs the model FLOPs of its segment under ``--policy``
(``features.flops_by_segment``). The budget is the cost of serving a share
``--budget-share`` of the traffic as active. Three thresholds are compared
interval by interval (``--interval-min``):

* **fixed**: the segment table's calibrated epsilon (today);
* **bisection once**: ``budget.epsilon_for_budget`` on the day before;
* **controller**: ``budget.BudgetController``, which starts from the
  bisection's epsilon and updates it after each interval from that
  interval's spend.

Figures go to ``<out>/budget_bench.json``.

    python benchmarks/budget.py                 # 20k users, 7 days
    python benchmarks/budget.py --users 4000    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
from segment import cached_dataset  # noqa: E402  (benchmarks share helpers)

from dynamix_ray.config import GenerateConfig, SegmentConfig  # noqa: E402
from dynamix_ray.features import flops_by_segment  # noqa: E402
from dynamix_ray.gather import last_at_or_before  # noqa: E402
from dynamix_ray.model import ModelConfig  # noqa: E402
from dynamix_ray.segments.budget import (  # noqa: E402
    BudgetController,
    SegmentCost,
    epsilon_for_budget,
    expected_cost,
)
from dynamix_ray.segments.pipeline import read_segments, run_segment  # noqa: E402

_H = 3_600_000
_DAY = 24 * _H


def request_values(plain: str, seg_out: str) -> tuple[np.ndarray, np.ndarray]:
    """Every ad impression as a request: its time and the ``|corr|`` of its
    user's last window with a value that ended at or before it (NaN: none)."""
    imp = pq.read_table(f"{plain}/ad_impressions", columns=["user_id", "ts"])
    imp = imp.filter(pa.compute.is_valid(imp.column("user_id")))
    u = imp.column("user_id").to_numpy().astype(np.int64)
    t = imp.column("ts").to_numpy().astype(np.int64)
    seg = read_segments(seg_out)
    su = seg.column("user_id").to_numpy()
    end = seg.column("window_end").cast(pa.int64()).to_numpy()
    corr = np.abs(seg.column("corr").to_numpy(zero_copy_only=False).astype(float))
    # the last window *with* a value: a null window keeps the user's state,
    # as hysteresis_tiers does (docs/segments.md)
    has = ~np.isnan(corr)
    su, end, corr = su[has], end[has], corr[has]
    order = np.lexsort((end, su))
    value = last_at_or_before(su[order], end[order], corr[order], u, t, np.nan)
    keep = np.argsort(t, kind="stable")
    return t[keep], value[keep]


def summarize(spent: np.ndarray, budget: float) -> dict[str, float]:
    dev = (spent - budget) / budget
    return {
        "mean_abs_dev": float(np.abs(dev).mean()),
        "max_over": float(dev.max()),
        "max_under": float(-dev.min()),
        "intervals_over_2pct": float((dev > 0.02).mean()),
        "mean_spend_over_budget": float(spent.mean() / budget),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switcher-share", type=float, default=0.5)
    p.add_argument("--switch-spread-h", type=int, default=2)
    p.add_argument("--window-h", type=int, default=3)
    p.add_argument("--policy", default="boost-selective")
    p.add_argument(
        "--cost-ratio",
        type=float,
        default=None,
        help="active cost over passive instead of the policy's FLOPs",
    )
    p.add_argument("--budget-share", type=float, default=0.5)
    p.add_argument("--interval-min", type=int, default=10)
    p.add_argument("--days-replayed", type=int, default=3)
    p.add_argument("--out", default="bench_out/budget")
    args = p.parse_args(argv)

    out = Path(args.out)
    gen = GenerateConfig(
        users=args.users,
        days=args.days,
        seed=args.seed,
        switcher_share=args.switcher_share,
        switch_spread_h=args.switch_spread_h,
    )
    tag = f"u{args.users}_d{args.days}_s{args.seed}_sw{args.switcher_share:g}_{args.switch_spread_h}h"
    plain, _ = cached_dataset(out / f"data_{tag}", gen)
    seg_out = str(out / f"seg_{args.window_h}h_{tag}")
    meta = run_segment(
        plain, seg_out, SegmentConfig(window_s=args.window_h * 3600), progress=False
    ).meta
    t, v = request_values(plain, seg_out)
    if args.cost_ratio:
        cost = SegmentCost(passive=1.0, active=args.cost_ratio)
        unit = "cost units"
    else:
        flops = flops_by_segment(
            ModelConfig(),
            args.policy,
            ("campaign_id", "media_type", "surface", "position"),
            None,
        )
        cost = SegmentCost(passive=float(flops[0]), active=float(flops[1]))
        unit = "FLOPs"
    budget = cost.at(args.budget_share)

    end = int(t.max()) // _DAY * _DAY
    start = end - args.days_replayed * _DAY
    before = (t >= start - _DAY) & (t < start)
    choice = epsilon_for_budget(v[before], cost, budget)
    fixed_eps = float(meta["epsilon"])
    ctl = BudgetController(budget, cost, choice.epsilon)
    step = args.interval_min * 60_000
    rows: list[dict[str, Any]] = []
    for lo in range(start, end, step):
        sel = (t >= lo) & (t < lo + step)
        if not sel.any():
            continue
        mix = v[sel]
        spent_ctl = expected_cost(mix, ctl.epsilon, cost)
        rows.append(
            {
                "t_ms": lo,
                "requests": int(sel.sum()),
                "fixed": expected_cost(mix, fixed_eps, cost),
                "bisection_once": expected_cost(mix, choice.epsilon, cost),
                "controller": spent_ctl,
                "controller_epsilon": ctl.epsilon,
            }
        )
        ctl.update(spent_ctl)
    spent = {
        k: np.array([r[k] for r in rows])
        for k in ("fixed", "bisection_once", "controller")
    }
    share_at_fixed = (spent["fixed"] - cost.passive) / (cost.active - cost.passive)
    result = {
        "args": vars(args),
        "cost": {"passive": cost.passive, "active": cost.active, "budget": budget},
        "fixed_epsilon": fixed_eps,
        "bisection": choice.__dict__,
        "active_share_at_fixed_epsilon": {
            "min": float(share_at_fixed.min()),
            "max": float(share_at_fixed.max()),
        },
        "summary": {k: summarize(s, budget) for k, s in spent.items()},
        "intervals": rows,
    }
    name = f"budget_bench{'_ratio' + format(args.cost_ratio, 'g') if args.cost_ratio else ''}.json"
    (out / name).write_text(json.dumps(result, indent=2))

    print(
        f"\n{args.users:,} users, {args.days_replayed} days replayed in "
        f"{args.interval_min}-minute intervals ({len(rows)}); "
        f"{'cost ratio' if args.cost_ratio else args.policy}: "
        f"{cost.passive:,.6g} {unit} passive, {cost.active:,.6g} active; budget = "
        f"{args.budget_share:.0%} of traffic active ({budget:,.6g} {unit} a request)"
    )
    print(
        f"active share at the table's epsilon ({fixed_eps:.4f}) moved between "
        f"{share_at_fixed.min():.3f} and {share_at_fixed.max():.3f} over the day"
    )
    print(
        "\n| threshold | mean spend / budget | mean abs deviation | max over | max under | intervals > 2% over |"
    )
    print("|---|---|---|---|---|---|")
    for k, s in result["summary"].items():
        print(
            f"| {k} | {s['mean_spend_over_budget']:.4f} | {s['mean_abs_dev']:.2%} | "
            f"{s['max_over']:.2%} | {s['max_under']:.2%} | {s['intervals_over_2pct']:.1%} |"
        )
    hours = (np.array([r["t_ms"] for r in rows]) % _DAY) // _H
    print("\n| UTC hour | fixed | bisection once | controller | controller epsilon |")
    print("|---|---|---|---|---|")
    eps = np.array([r["controller_epsilon"] for r in rows])
    for h in range(24):
        m = hours == h
        if m.any():
            print(
                f"| {h:02d} | {spent['fixed'][m].mean() / budget:.4f} | "
                f"{spent['bisection_once'][m].mean() / budget:.4f} | "
                f"{spent['controller'][m].mean() / budget:.4f} | {eps[m].mean():.4f} |"
            )
    print(f"\nfigures: {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
