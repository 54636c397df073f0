"""Two follow-ups to a ``dynamix experiment all`` run (prints figures; never
asserts times):

1. **Inference QPS against candidates per request.** The experiment measures
   one request of 100 candidates, whose history is encoded once and shared,
   so history features are a small part of a request's work. This re-measures
   every arm's checkpoints (each seed) at several candidate counts with the
   same harness (``experiments.inference_qps``), beside the change FLOPs
   predict at each count.
2. **remove-active with the generator's no-signal attributes**
   (``--planted``): the experiment's remove-* arms drop what permutation
   importance ranks lowest; this trains ``remove-active`` dropping exactly the
   4 planted no-signal attributes, for the same seeds and on the same samples,
   and compares NE with the experiment's baselines.

Figures go to ``<experiment>/extra.json``.

    python benchmarks/experiment_extra.py bench_out/experiment_all --candidates 1 10 100
    python benchmarks/experiment_extra.py bench_out/experiment_all --planted
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dynamix_ray.report import results_inputs


def inference_by_candidates(
    results: dict[str, Any], root: Path, counts: list[int], rounds: int, n: int
) -> dict[str, Any]:
    import numpy as np

    from dynamix_ray.experiments import (
        _requests,
        arm_scorers,
        inference_qps,
        paired_gain,
        predicted_gain,
        request_flops_by_arm,
    )
    from dynamix_ray.histories import read_histories
    from dynamix_ray.loader import features_of
    from dynamix_ray.model.checkpoint import load_checkpoint

    arms = list(results["arms"])
    inputs = results_inputs(str(root), results)
    hist = read_histories(str(root / "histories"))
    removed = tuple(results["removed"])
    ckpt = {
        (a, s): json.loads(
            (root / "runs" / a / f"seed{s}" / "metrics.json").read_text()
        )["checkpoint"]
        for a in arms
        for s in results["seeds"]
    }
    _, mcfg, ck = load_checkpoint(ckpt[("baseline", results["seeds"][0])])
    seq = ck["samples"].lengths()
    avail = features_of(hist.attributes())
    out: dict[str, Any] = {}
    for c in counts:
        reqs = _requests(inputs["events"], inputs["segments"], hist, n, c)
        share = float(np.mean([r[0] for r in reqs]))
        flops = request_flops_by_arm(mcfg, arms, removed, avail, c, seq)
        per_seed: dict[str, list[float]] = {a: [] for a in arms}
        for seed in results["seeds"]:
            score = arm_scorers({a: ckpt[(a, seed)] for a in arms}, hist)
            q = inference_qps(score, reqs, rounds)
            for a in arms:
                per_seed[a].append(100 * paired_gain(q[a], q["baseline"]))
        row = {
            a: {
                "change_pct_per_seed": per_seed[a],
                "change_pct_mean": statistics.fmean(per_seed[a]),
                "flop_change_pct": 100
                * predicted_gain(flops[a], flops["baseline"], share),
            }
            for a in arms
        }
        if "boost-all" in arms and "boost-selective" in arms:
            vs = [
                (1 + sel / 100) / (1 + al / 100) - 1
                for sel, al in zip(
                    per_seed["boost-selective"], per_seed["boost-all"], strict=True
                )
            ]
            row["boost-selective_vs_boost-all_pct"] = 100 * statistics.fmean(vs)
            row["boost-selective_vs_boost-all_flop_pct"] = 100 * predicted_gain(
                flops["boost-selective"], flops["boost-all"], share
            )
        out[str(c)] = row
        print(f"{c} candidates/request (active share {share:.2f}):", flush=True)
        for a in arms:
            print(
                f"  {a:16s} QPS {row[a]['change_pct_mean']:+6.1f}% "
                f"(seeds {', '.join(f'{x:+.1f}' for x in per_seed[a])}), "
                f"FLOP-predicted {row[a]['flop_change_pct']:+6.1f}%",
                flush=True,
            )
        if "boost-selective_vs_boost-all_pct" in row:
            print(
                f"  boost-selective vs boost-all: {row['boost-selective_vs_boost-all_pct']:+.1f}% "
                f"(FLOP-predicted {row['boost-selective_vs_boost-all_flop_pct']:+.1f}%)",
                flush=True,
            )
    return out


def planted_removal(results: dict[str, Any], root: Path) -> dict[str, Any]:
    from dynamix_ray.model import ModelConfig
    from dynamix_ray.samples import SampleConfig
    from dynamix_ray.synth import NO_SIGNAL_ATTRIBUTES
    from dynamix_ray.train import TrainConfig, prepare_train_data, run_train

    cfg = results["config"]
    inputs = results_inputs(str(root), results)
    samples = SampleConfig(**cfg["samples"])
    data = prepare_train_data(
        inputs["events"], inputs["segments"], str(root), samples, progress=False
    )
    removed = tuple(NO_SIGNAL_ATTRIBUTES)
    rows = []
    for seed in results["seeds"]:
        tcfg = TrainConfig(
            policy="remove-active",
            removed=removed,
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            seed=seed,
            importance_rows=0,
            samples=samples,
            model=ModelConfig(max_seq_len=samples.max_seq_len),
        )
        t0 = time.perf_counter()
        m = run_train(
            inputs["events"],
            inputs["segments"],
            str(root / "runs_planted" / f"seed{seed}"),
            tcfg,
            data=data,
        )
        base = results["arms"]["baseline"]["ne"]["values"][results["seeds"].index(seed)]
        rows.append(
            {
                "seed": seed,
                "ne": m["ne"],
                "ne_active": m["ne_active"],
                "baseline_ne": base,
                "ne_gain_pct": 100 * (base - m["ne"]) / base,
                "train_examples_per_s": m["train_examples_per_s"],
            }
        )
        print(
            f"  remove-active (planted {', '.join(removed)}) seed {seed}: NE "
            f"{m['ne']:.4f} vs baseline {base:.4f} ({rows[-1]['ne_gain_pct']:+.2f}%), "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    gains = [r["ne_gain_pct"] for r in rows]
    return {
        "removed": list(removed),
        "runs": rows,
        "ne_gain_pct_mean": statistics.fmean(gains),
        "ne_gain_pct_std": statistics.stdev(gains) if len(gains) > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="OUT of `dynamix experiment all`")
    p.add_argument("--candidates", type=int, nargs="*", default=[])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--planted", action="store_true")
    args = p.parse_args(argv)
    import ray

    root = Path(args.experiment)
    results = json.loads((root / "results.json").read_text())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    path = root / "extra.json"
    extra = json.loads(path.read_text()) if path.exists() else {}
    if args.candidates:
        extra["inference_by_candidates"] = inference_by_candidates(
            results, root, args.candidates, args.rounds, args.requests
        )
    if args.planted:
        extra["planted_removal"] = planted_removal(results, root)
        pr = extra["planted_removal"]
        print(
            f"remove-active (planted no-signal attributes): NE gain "
            f"{pr['ne_gain_pct_mean']:+.2f}% ± {pr['ne_gain_pct_std'] or 0:.2f}"
        )
    path.write_text(json.dumps(extra, indent=2))
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
