"""Benchmark of segment-conditional training: examples/s and NE of every
feature policy side by side (prints figures; never asserts times).

On one generated dataset (cached under ``--out``), segmented once:

1. ``baseline`` is trained with ``run_train`` (Ray Train, 1 worker); its
   permutation importance picks the 4 ad-impression attributes the
   ``remove-*`` policies drop.
2. Throughput, in this process on a quiet machine: the same fixed batches of
   training samples go through ``train.train_step`` (forward, backward, Adam)
   under every policy, round-robin for ``--reps`` rounds, each round from the
   same initial weights; the median examples/s per policy is printed beside
   the speed-up its FLOPs predict for the batches' actual segment mix
   (``features.flops_by_segment``). Data loading is excluded here: the figure
   is the model's work. The measured gain is the median over rounds of each
   round's policy / baseline ratio (the policies interleave batch by batch).
   The same is done on batches of active users only, where ``remove-active``
   acts.
3. The other four policies are trained with ``run_train`` like the baseline:
   NE overall and per segment, AUC, and Ray Train's steady-state examples/s
   (which includes reading batches from Ray Data).

Figures go to ``<out>/train_bench.json``.

    python benchmarks/train.py            # 2,000 users, 7 days, 1 epoch
    python benchmarks/train.py --quick    # 300 users, 3 days: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segment import cached_dataset  # noqa: E402

from dynamix_ray.config import GenerateConfig, SegmentConfig  # noqa: E402
from dynamix_ray.experiments import (  # noqa: E402
    paired_gain,
    predicted_gain,
    sample_batches,
    train_step_throughput,
)
from dynamix_ray.features import POLICIES, flops_by_segment  # noqa: E402
from dynamix_ray.model import ModelConfig  # noqa: E402
from dynamix_ray.samples import SampleConfig  # noqa: E402
from dynamix_ray.train import TrainConfig, prepare_train_data, run_train  # noqa: E402

NE_TARGET = 0.95  # baseline vs a base-rate model
RATIO_TARGET = 0.8  # remove-active: measured gain / FLOP-predicted gain


def cached_segments(events: str, root: Path) -> str:
    out = root / "segments"
    if not (out / "_meta.json").exists():
        from dynamix_ray.segments.pipeline import run_segment

        run_segment(events, str(out), SegmentConfig(), progress=False)
    return str(out)


def batches_of_samples(
    data: Any, batch: int, n_batches: int
) -> list[dict[str, np.ndarray]]:
    """``n_batches`` batches drawn at random from the training samples (every
    training day and user, so the segment mix is the data's), in a fixed
    order, with (B, L) histories."""
    return sample_batches(data, batch, n_batches)


def throughput(
    batches: list[dict[str, np.ndarray]],
    policies: list[str],
    removed: tuple[str, ...],
    mcfg: ModelConfig,
    reps: int,
    threads: int,
    label: str,
) -> dict[str, list[float]]:
    """``experiments.train_step_throughput``, printing each round."""

    def show(r: int, out: dict[str, list[float]]) -> None:
        line = "  ".join(f"{p} {out[p][-1]:,.0f}" for p in policies)
        print(f"  {label} round {r + 1}/{reps}: examples/s  {line}", flush=True)

    return train_step_throughput(batches, policies, removed, mcfg, reps, threads, show)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--batches", type=int, default=40, help="batches per round")
    p.add_argument("--reps", type=int, default=5, help="throughput rounds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (a Ray Train worker with 1 CPU gets 1)",
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench_out/train")
    p.add_argument(
        "--focus-rounds",
        type=int,
        default=15,
        help="extra rounds of baseline vs remove-active on the mixed batches "
        "(its predicted gain is small: more rounds narrow the median)",
    )
    p.add_argument(
        "--reuse-runs",
        action="store_true",
        help="read each policy's metrics.json from an earlier run under --out "
        "instead of training again (throughput is always measured anew)",
    )
    p.add_argument("--quick", action="store_true", help="300 users, 3 days, 1 rep")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.days, args.reps, args.batches = 300, 3, 1, 5
    import ray

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if not args.reuse_runs:
        shutil.rmtree(root / "runs", ignore_errors=True)  # fresh runs, no resume
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    gcfg = GenerateConfig(users=args.users, days=args.days, seed=args.seed)
    events, truth = cached_dataset(root / f"events_{args.users}u_{args.days}d", gcfg)
    segments = cached_segments(events, root / f"events_{args.users}u_{args.days}d")
    mcfg = ModelConfig(max_seq_len=args.max_seq_len)
    seq = args.max_seq_len
    samples = SampleConfig(max_seq_len=seq)
    data = prepare_train_data(
        events, segments, str(root / "runs"), samples, progress=False
    )

    def train(policy: str, removed: tuple[str, ...] = ()) -> dict[str, Any]:
        tcfg = TrainConfig(
            policy=policy,
            removed=removed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            samples=samples,
            model=mcfg,
        )
        t0 = time.perf_counter()
        saved = root / "runs" / policy / "metrics.json"
        if args.reuse_runs and saved.exists():
            m = json.loads(saved.read_text())
            print(f"  {policy:16s} metrics reused from {saved}")
        else:
            m = run_train(
                events, segments, str(root / "runs" / policy), tcfg, data=data
            )
        print(
            f"  {policy:16s} NE {m['ne']:.4f} (active {m['ne_active']:.4f}, passive "
            f"{m['ne_passive']:.4f}), AUC {m['auc']:.4f}, Ray Train "
            f"{m['train_examples_per_s']:,.0f} examples/s, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        return m

    print(f"data: {args.users} users x {args.days} days, seq {seq}", flush=True)
    runs: dict[str, dict[str, Any]] = {"baseline": train("baseline")}
    removed = tuple(runs["baseline"]["lowest_importance"])
    importance = runs["baseline"]["importance"]
    print(
        "  permutation importance (NE increase): "
        + ", ".join(
            f"{a} {v:+.4f}" for a, v in sorted(importance.items(), key=lambda kv: kv[1])
        )
        + f"\n  removed by remove-*: {', '.join(removed)}"
    )

    batches = batches_of_samples(data, args.batch_size, args.batches)
    seg = np.concatenate([b["segment"] for b in batches])
    share = float((seg == 1).mean())
    print(
        f"throughput: {len(batches)} batches of {args.batch_size}, active share "
        f"{share:.3f}, {args.reps} rounds, {args.threads} torch thread(s)",
        flush=True,
    )
    from dynamix_ray.features import available_features

    available = available_features(batches[0])
    flops = {
        pol: flops_by_segment(mcfg, pol, removed, available, seq) for pol in POLICIES
    }
    eps = throughput(
        batches, list(POLICIES), removed, mcfg, args.reps, args.threads, "mixed"
    )
    # the same for batches of active users only, where remove-active acts:
    # drawn from enough random rows to fill --batches batches of them
    bs = args.batch_size
    pool = batches_of_samples(
        data, bs, int(np.ceil(args.batches / max(share, 0.05) * 1.2))
    )
    active_rows = {k: np.concatenate([b[k] for b in pool]) for k in pool[0]}
    keep = np.flatnonzero(active_rows["segment"] == 1)[: args.batches * bs]
    del pool
    active_batches = [
        {k: v[keep[i : i + bs]] for k, v in active_rows.items()}
        for i in range(0, len(keep) - bs + 1, bs)
    ]
    eps_active = throughput(
        active_batches,
        ["baseline", "remove-active"],
        removed,
        mcfg,
        args.reps,
        args.threads,
        "active-only",
    )

    focus = throughput(
        batches,
        ["baseline", "remove-active"],
        removed,
        mcfg,
        args.focus_rounds,
        args.threads,
        "focus",
    )

    for pol in POLICIES[1:]:
        runs[pol] = train(pol, removed if pol.startswith("remove-") else ())

    rows = {}
    print(
        f"\n{'policy':16s} {'NE':>7s} {'NE act':>7s} {'NE pas':>7s} "
        f"{'MFLOP act':>9s} {'MFLOP pas':>9s} {'ex/s':>7s} {'measured':>9s} "
        f"{'predicted':>9s} {'ratio':>6s} {'RayTrain ex/s':>13s}"
    )
    for pol in POLICIES:
        med = statistics.median(eps[pol])
        measured = paired_gain(eps[pol], eps["baseline"])
        predicted = predicted_gain(flops[pol], flops["baseline"], share)
        ratio = measured / predicted if abs(predicted) > 1e-9 else None
        m = runs[pol]
        rows[pol] = {
            "ne": m["ne"],
            "ne_active": m["ne_active"],
            "ne_passive": m["ne_passive"],
            "auc": m["auc"],
            "flops_per_sample": {str(k): v for k, v in flops[pol].items()},
            "examples_per_s_runs": eps[pol],
            "examples_per_s_median": med,
            "measured_gain": measured,
            "predicted_gain": predicted,
            "measured_over_predicted": ratio,
            "ray_train_examples_per_s": m["train_examples_per_s"],
        }
        print(
            f"{pol:16s} {m['ne']:7.4f} {m['ne_active']:7.4f} {m['ne_passive']:7.4f} "
            f"{flops[pol][1] / 1e6:9.3f} {flops[pol][0] / 1e6:9.3f} {med:7,.0f} "
            f"{measured:+9.2%} {predicted:+9.2%} "
            f"{'' if ratio is None else f'{ratio:6.2f}':>6s} "
            f"{m['train_examples_per_s']:13,.0f}"
        )
    act_meas = paired_gain(eps_active["remove-active"], eps_active["baseline"])
    act_pred = predicted_gain(flops["remove-active"], flops["baseline"], 1.0)
    act_ratio = act_meas / act_pred
    print(
        f"\nactive-only batches ({len(active_batches)} x {bs}): remove-active "
        f"measured {act_meas:+.2%}, FLOP-predicted {act_pred:+.2%}, ratio "
        f"{act_ratio:.2f}"
    )
    focus_meas = paired_gain(focus["remove-active"], focus["baseline"])
    focus_ratio = focus_meas / rows["remove-active"]["predicted_gain"]
    print(
        f"mixed batches, {args.focus_rounds} rounds of baseline vs remove-active "
        f"only: measured {focus_meas:+.2%}, FLOP-predicted "
        f"{rows['remove-active']['predicted_gain']:+.2%}, ratio {focus_ratio:.2f}"
    )
    ne = runs["baseline"]["ne"]
    ratio = rows["remove-active"]["measured_over_predicted"]
    print(
        f"\nbaseline NE {ne:.4f} (target < {NE_TARGET}: "
        f"{'met' if ne < NE_TARGET else 'NOT met'}); remove-active measured/"
        f"predicted gain: mixed batches {ratio:.2f} ({args.focus_rounds} focused "
        f"rounds: {focus_ratio:.2f}), active-only {act_ratio:.2f} "
        f"(target >= {RATIO_TARGET})"
    )
    result = {
        "config": vars(args),
        "active_share": share,
        "removed": list(removed),
        "importance": importance,
        "policies": rows,
        "focus_mixed": {
            "rounds": args.focus_rounds,
            "examples_per_s_runs": focus,
            "remove_active_measured_gain": focus_meas,
            "measured_over_predicted": focus_ratio,
        },
        "active_only": {
            "batches": len(active_batches),
            "examples_per_s_runs": eps_active,
            "remove_active_measured_gain": act_meas,
            "remove_active_predicted_gain": act_pred,
            "measured_over_predicted": act_ratio,
        },
        "targets": {"ne_baseline": NE_TARGET, "remove_active_ratio": RATIO_TARGET},
        "ray_version": ray.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "truth_planted": truth.get("planted"),
    }
    path = root / "train_bench.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
