"""What a ranking request costs, per policy, at the small and the prod model
(issue 16 §2, §4; docs/experiments.md, "The prod preset"). Prints what it
measured; never asserts.

On the paper's world (``dynamix generate --preset paper``, cached under
``--out``), segmented with ``--active-traffic 0.6667``, for each model preset:

* **inference QPS of every policy** through the Serve rankers' code
  (``experiments.arm_scorers``: ``serve.ranker.Ranker``, one torch thread, arms
  interleaved request by request), at each ``--candidates`` count, with 2/3 of
  the requests for active users, beside the change FLOPs predict
  (``experiments.request_flops_by_arm``); each policy's checkpoint holds the
  same untrained weights (speed does not depend on their values);
* **the share of request time spent encoding histories**: the user tower
  alone (histories encoded and pooled) against the whole request, timed on
  the same baseline requests, beside the FLOPs share.

The ``remove-*`` policies drop the generator's 4 no-signal attributes (an
experiment drops its baseline's 4 lowest permutation importances instead).
Figures go to ``<out>/request_cost.json``.

    python benchmarks/request_cost.py                      # 2,000 users, 3 days
    python benchmarks/request_cost.py --presets prod --candidates 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from segment import cached_dataset  # noqa: E402  (benchmarks share helpers)

from dynamix_ray.config import GENERATE_PRESETS, GenerateConfig, SegmentConfig  # noqa: E402
from dynamix_ray.experiments import (  # noqa: E402
    _requests,
    arm_scorers,
    inference_qps,
    paired_gain,
    predicted_gain,
    request_flops_by_arm,
)
from dynamix_ray.features import POLICIES, policy_features  # noqa: E402
from dynamix_ray.histories import read_histories, run_histories  # noqa: E402
from dynamix_ray.loader import features_of  # noqa: E402
from dynamix_ray.model import DynamixCTR, flops_per_sample  # noqa: E402
from dynamix_ray.model.checkpoint import save_checkpoint  # noqa: E402
from dynamix_ray.presets import model_preset  # noqa: E402
from dynamix_ray.runtime import ensure_ray  # noqa: E402
from dynamix_ray.samples import SampleConfig  # noqa: E402
from dynamix_ray.segments.pipeline import read_segments_meta, run_segment  # noqa: E402
from dynamix_ray.synth import NO_SIGNAL_ATTRIBUTES  # noqa: E402


def encoding_share(ranker: Any, requests: list[Any], repeats: int = 3) -> float:
    """Median over requests of (user tower time) / (whole request time), the
    two timed back to back on the same prepared batch."""
    import torch

    shares = []
    for _, user, ts, cands in requests:
        batch, index = ranker.batch([user], [ts], [cands])  # as score() builds it
        t_user, t_all = [], []
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                ranker.model.user_tower(batch, ranker.features)
                t1 = time.perf_counter()
                ranker.model(batch, ranker.features, user_index=index)
                t2 = time.perf_counter()
                t_user.append(t1 - t0)
                t_all.append(t2 - t1)
        shares.append(min(t_user) / min(t_all))
    return float(statistics.median(shares))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/request_cost")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--presets", nargs="+", default=["small", "prod"])
    p.add_argument("--candidates", nargs="+", type=int, default=[1, 100])
    p.add_argument("--requests", type=int, default=60, help="requests per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paper = GenerateConfig(
        users=args.users, days=args.days, seed=0, **GENERATE_PRESETS["paper"]
    )
    events, _ = cached_dataset(out / "events_paper", paper)
    ensure_ray(num_cpus=2)
    seg_out = str(out / "seg")
    if not (out / "seg" / "segments").exists():
        run_segment(
            events, seg_out, SegmentConfig(active_traffic=0.6667), progress=False
        )
    counts = read_segments_meta(seg_out)["counts"]
    print(
        f"paper world: {args.users:,} users x {args.days} days; active share of "
        f"ad traffic {counts['active_share_traffic']:.3f}, eligible "
        f"{counts['eligible_share_traffic']:.3f}",
        flush=True,
    )
    policies = ["baseline", *[a for a in args.policies if a != "baseline"]]
    removed = tuple(NO_SIGNAL_ATTRIBUTES)
    results: dict[str, Any] = {
        "world": {"users": args.users, "days": args.days, "counts": counts},
        "removed": list(removed),
        "presets": {},
    }
    for name in args.presets:
        mcfg, samples = model_preset(name, SampleConfig(max_seq_len=32))
        hist_root = out / f"histories_{samples.max_seq_len}"
        if not hist_root.exists():
            run_histories(
                f"{seg_out}/events",
                str(hist_root),
                None,
                samples.max_seq_len,
                progress=False,
            )
        hist = read_histories(str(hist_root))
        torch.manual_seed(0)
        model = DynamixCTR(mcfg).eval()
        ckpts = {
            a: save_checkpoint(
                str(out / "ckpt" / name / a),
                model,
                mcfg,
                policy=a,
                removed=removed if a.startswith("remove-") else (),
                samples=samples,
            )
            for a in policies
        }
        avail = features_of(hist.attributes())
        seq = samples.lengths()
        score = arm_scorers(ckpts, hist)
        per_preset: dict[str, Any] = {
            "lengths": seq,
            "model": {
                "d_model": mcfg.d_model,
                "n_layers": mcfg.n_layers,
                "n_heads": mcfg.n_heads,
            },
        }
        for c in args.candidates:
            reqs = _requests(events, seg_out, hist, args.requests, c)
            share = float(np.mean([r[0] for r in reqs]))
            qps = inference_qps(score, reqs, args.rounds)
            flops = request_flops_by_arm(mcfg, policies, removed, avail, c, seq)
            base_fs = policy_features("baseline", 1, removed, avail)
            user_flops = flops_per_sample(mcfg, base_fs, seq, part="user_tower")
            from dynamix_ray.serve.ranker import Ranker

            enc = encoding_share(Ranker(ckpts["baseline"], hist, 1), reqs[:20])
            rows = {}
            for a in policies:
                rows[a] = {
                    "qps_median": statistics.median(qps[a]),
                    "qps_change_pct": 100 * paired_gain(qps[a], qps["baseline"]),
                    "flop_change_pct": 100
                    * predicted_gain(flops[a], flops["baseline"], share),
                    "mflop_per_request": {k: v / 1e6 for k, v in flops[a].items()},
                }
                if "boost-all" in qps and a.startswith("boost-selective"):
                    rows[a]["qps_vs_boost_all_pct"] = 100 * paired_gain(
                        qps[a], qps["boost-all"]
                    )
                    rows[a]["flop_vs_boost_all_pct"] = 100 * predicted_gain(
                        flops[a], flops["boost-all"], share
                    )
            per_preset[str(c)] = {
                "active_share": share,
                "encoding_share_time": enc,
                "encoding_share_flops": user_flops / flops["baseline"][1],
                "rounds": qps,
                "policies": rows,
            }
            print(
                f"\n{name} model, {c} candidates/request (active share {share:.3f}): "
                f"history encoding {100 * enc:.1f}% of request time "
                f"({100 * user_flops / flops['baseline'][1]:.1f}% of FLOPs)",
                flush=True,
            )
            print(
                f"  {'policy':22s} {'QPS':>8s} {'vs base':>8s} {'FLOPs':>8s} "
                f"{'vs b-all':>9s} {'FLOPs':>8s}"
            )
            for a, r in rows.items():
                vs = r.get("qps_vs_boost_all_pct")
                fl = r.get("flop_vs_boost_all_pct")
                print(
                    f"  {a:22s} {r['qps_median']:8.1f} {r['qps_change_pct']:+7.1f}% "
                    f"{r['flop_change_pct']:+7.1f}% "
                    + (f"{vs:+8.1f}% {fl:+7.1f}%" if vs is not None else "")
                )
        results["presets"][name] = per_preset
    (out / "request_cost.json").write_text(json.dumps(results, indent=2))
    print(f"\nfigures: {out / 'request_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
