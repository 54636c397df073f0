"""ALURE's user embedding as a CTR feature (issue 7 part 4): NE with and
without it, same data, same training, several seeds. Prints what it measured
and writes ``OUT/alure_feature.json``; asserts nothing.

Inputs come from ``benchmarks/train.py`` (its dataset, segments and baseline
checkpoint under ``--train-out``). The embedding model is that baseline: its
user tower embeds every user as of each midnight (``dynamix embed --daily``),
and each sample gets the embedding of the last midnight before it. The
baseline was trained on the training days, so on those days the feature comes
from a model that saw their labels; the evaluation day's labels it never saw.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynamix_ray.model import ModelConfig  # noqa: E402
from dynamix_ray.samples import SampleConfig  # noqa: E402
from dynamix_ray.train import TrainConfig, resolve_checkpoint, run_train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-out", default="bench_out/train")
    p.add_argument("--out", default="bench_out/alure")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read the metrics of (arm, seed) runs already under --out",
    )
    args = p.parse_args()

    import ray

    from dynamix_ray.alure.feature import read_daily, run_daily_embed

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(args.train_out)
    data = root / f"events_{args.users}u_{args.days}d"
    events, segments = str(data), str(data / "segments")
    ckpt = resolve_checkpoint(str(root / "runs" / "baseline"))
    out = Path(args.out)
    daily = out / "daily"
    t0 = time.perf_counter()
    if not (daily / "_daily.json").exists():
        run_daily_embed(events, ckpt, str(daily), progress=False)
    d = read_daily(str(daily))
    print(
        f"daily embeddings: {len(d.days_ms)} days x {len(d.user_id)} users x "
        f"{d.dim}, {time.perf_counter() - t0:.0f} s (embedding model {ckpt})",
        flush=True,
    )
    mcfg = ModelConfig(max_seq_len=args.max_seq_len)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "baseline+alure": []}
    for seed in args.seeds:
        for arm, alure in (("baseline", None), ("baseline+alure", str(daily))):
            tcfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=seed,
                model=mcfg,
                samples=SampleConfig(max_seq_len=args.max_seq_len),
                importance_rows=0,
                alure=alure,
            )
            t1 = time.perf_counter()
            run_dir = out / "runs" / f"{arm}-s{seed}"
            if args.reuse and (run_dir / "metrics.json").exists():
                m = json.loads((run_dir / "metrics.json").read_text())
            else:
                shutil.rmtree(run_dir, ignore_errors=True)  # fresh, not resumed
                m = run_train(events, segments, str(run_dir), tcfg)
            keep = ("ne", "ne_active", "ne_passive", "auc", "train_examples_per_s")
            runs[arm].append({"seed": seed, **{k: m[k] for k in keep}})
            print(
                f"  seed {seed} {arm:15s} NE {m['ne']:.4f} (active {m['ne_active']:.4f}, "
                f"passive {m['ne_passive']:.4f}) AUC {m['auc']:.4f} "
                f"{m['train_examples_per_s']:,.0f} ex/s, {time.perf_counter() - t1:.0f} s",
                flush=True,
            )
    deltas = [
        (a["ne"] - b["ne"]) / b["ne"]
        for a, b in zip(runs["baseline+alure"], runs["baseline"], strict=True)
    ]
    summary = {
        arm: {
            "ne_mean": statistics.mean(r["ne"] for r in rs),
            "ne_std": statistics.stdev([r["ne"] for r in rs]) if len(rs) > 1 else 0.0,
        }
        for arm, rs in runs.items()
    }
    res = {
        "seeds": args.seeds,
        "runs": runs,
        "summary": summary,
        "ne_change_per_seed": deltas,
        "ne_change_mean": statistics.mean(deltas),
        "embedding": {"days": len(d.days_ms), "users": len(d.user_id), "dim": d.dim},
        "wall_s": time.perf_counter() - t0,
    }
    print(
        "NE change with the ALURE embedding (negative = better): "
        + ", ".join(f"{100 * x:+.2f}%" for x in deltas)
        + f"; mean {100 * res['ne_change_mean']:+.2f}% (paper: -0.1% to -0.37%)"
    )
    path = out / "alure_feature.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
