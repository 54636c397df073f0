"""``dynamix`` — one CLI, a subcommand per stage (``dynamix COMMAND --help``).

Each command connects to the Ray cluster in ``RAY_ADDRESS`` when set, else starts
a local Ray. ``pipelines/<name>.py`` run the same functions as Ray jobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from dynamix_ray.config import GenerateConfig, SegmentConfig, parse_duration_s

__all__ = ["build_parser", "main"]

_SEG = SegmentConfig()
_GEN = GenerateConfig()


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write synthetic EBFs with planted, recorded ground truth",
        description="Write the four EBF sources (SPEC §1) and OUT/_truth/ (what "
        "was planted: segments, interest clusters, no-signal attributes, bad rows).",
    )
    p.add_argument("out", help="dataset root (any fsspec URL)")
    p.add_argument(
        "--users",
        type=int,
        default=_GEN.users,
        help="number of users (default %(default)s)",
    )
    p.add_argument(
        "--days",
        type=int,
        default=_GEN.days,
        help="days of events (default %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=_GEN.seed, help="random seed (default %(default)s)"
    )
    p.add_argument(
        "--events-per-user-day",
        type=float,
        default=_GEN.impressions_per_user_day,
        help="mean ad impressions per user and day (default %(default)s)",
    )
    p.add_argument(
        "--active-share",
        type=float,
        default=_GEN.active_share,
        help="users with the planted dwell effect (default %(default).4g)",
    )
    p.add_argument(
        "--switcher-share",
        type=float,
        default=_GEN.switcher_share,
        help="users (of the active ones) active only 12 h a day "
        "(default %(default).4g)",
    )
    p.add_argument(
        "--countries",
        type=int,
        default=_GEN.n_countries,
        help="values of the country column; 0 writes no column",
    )
    p.add_argument(
        "--ts-type",
        choices=("ms", "timestamp"),
        default=_GEN.ts_type,
        help="int64 epoch ms or Parquet timestamp (default %(default)s)",
    )
    p.add_argument(
        "--bucketed",
        type=int,
        default=0,
        metavar="N",
        help="partition files by user-id hash into N buckets",
    )
    p.add_argument(
        "--chunk-users",
        type=int,
        default=_GEN.chunk_users,
        help="users per written chunk (bounds memory)",
    )
    p.add_argument(
        "--bad-row-rate",
        type=float,
        default=_GEN.bad_row_rate,
        help="share of rows made invalid on purpose (default %(default)s)",
    )
    p.add_argument("--start", default=_GEN.start, help="first day (UTC, ISO date)")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="per-user, per-window active/passive segmentation on Ray Data",
        description="Compute the DynamiX statistic per (user, window) and write "
        "OUT/segments (Parquet + _meta.json) and OUT/rejects atomically.",
    )
    p.add_argument("events", help="dataset root with ad_impressions/ and conversions/")
    p.add_argument("out", help="output root")
    p.add_argument("--window", default="6h", help="window length (default %(default)s)")
    p.add_argument(
        "--horizon-s",
        default=f"{_SEG.horizon_s}s",
        help="forecast horizon (default %(default)s)",
    )
    p.add_argument(
        "--buffer-s",
        default=f"{_SEG.buffer_s}s",
        help="logging buffer (default %(default)s)",
    )
    p.add_argument(
        "--min-dwell-ms",
        type=float,
        default=_SEG.min_dwell_ms,
        help="denoising lower bound, inclusive (default %(default)s)",
    )
    p.add_argument(
        "--max-dwell-ms",
        type=float,
        default=_SEG.max_dwell_ms,
        help="denoising upper bound, inclusive (default %(default)s)",
    )
    p.add_argument(
        "--min-events",
        type=int,
        default=_SEG.min_events,
        help="near and far impressions needed for a corr (default %(default)s)",
    )
    eps = p.add_mutually_exclusive_group()
    eps.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="fixed threshold on |corr| (default: calibrate)",
    )
    eps.add_argument(
        "--active-fraction",
        type=float,
        default=_SEG.active_fraction,
        help="target active share of eligible rows (default %(default)s)",
    )
    p.add_argument(
        "--num-buckets",
        type=int,
        default=None,
        help="hash buckets for unbucketed input (default: from data size)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--json", action="store_true", help="print _meta.json, not a summary"
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    from dynamix_ray.train import TrainConfig

    t = TrainConfig()
    p = sub.add_parser(
        "train",
        help="segment-conditional training of the sequence CTR model on Ray Train",
        description="Build samples (SPEC §6) on Ray Data, train with a TorchTrainer "
        "(DDP when --num-workers > 1), evaluate on the last day, and write "
        "checkpoints and OUT/metrics.json. Re-running with the same OUT resumes.",
    )
    p.add_argument("events", help="dataset root (SPEC §1)")
    p.add_argument("segments", help="output root of `dynamix segment`")
    p.add_argument("out", help="output folder (checkpoints, metrics.json)")
    p.add_argument(
        "--policy",
        default=t.policy,
        choices=(
            "baseline",
            "remove-active",
            "remove-passive",
            "boost-all",
            "boost-selective",
        ),
    )
    p.add_argument(
        "--removed",
        default="",
        help="comma-separated ad-impression attributes that the remove-* "
        "policies drop (e.g. campaign_id,media_type,surface,position)",
    )
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--num-workers", type=int, default=t.num_workers)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="bf16 autocast on GPU (ignored on CPU)",
    )
    p.add_argument("--max-failures", type=int, default=t.max_failures)
    p.add_argument("--max-seq-len", type=int, default=64)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="generate small data and segment it end to end",
        description="Generate a small dataset, segment it, and print the planted-"
        "truth recovery and where the outputs are.",
    )
    p.add_argument(
        "--out", default="demo_out", help="output folder (default %(default)s)"
    )
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamix",
        description="DynamiX user segmentation on Ray. Connects to RAY_ADDRESS when "
        "set, else starts a local Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_segment(sub)
    _add_train(sub)
    _add_demo(sub)
    return parser


def generate_config(args: argparse.Namespace) -> GenerateConfig:
    return GenerateConfig(
        users=args.users,
        days=args.days,
        seed=args.seed,
        impressions_per_user_day=args.events_per_user_day,
        active_share=args.active_share,
        switcher_share=args.switcher_share,
        n_countries=args.countries,
        ts_type=args.ts_type,
        bucketed=args.bucketed,
        chunk_users=args.chunk_users,
        bad_row_rate=args.bad_row_rate,
        start=args.start,
    )


def segment_config(args: argparse.Namespace) -> SegmentConfig:
    return SegmentConfig(
        window_s=int(parse_duration_s(args.window)),
        buffer_s=int(parse_duration_s(args.buffer_s)),
        horizon_s=int(parse_duration_s(args.horizon_s)),
        min_dwell_ms=args.min_dwell_ms,
        max_dwell_ms=args.max_dwell_ms,
        min_events=args.min_events,
        epsilon=args.epsilon,
        active_fraction=args.active_fraction,
        num_buckets=args.num_buckets,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from dynamix_ray.synth import generate

    truth = generate(args.out, generate_config(args))
    print(
        f"generate: wrote {truth['rows']['ad_impressions']:,} ad impressions, "
        f"{truth['rows']['conversions']:,} conversions, "
        f"{truth['rows']['organic_impressions']:,} organic impressions, "
        f"{truth['rows']['page_views']:,} page views in {truth['wall_s']:.1f} s\n"
        f"  data   {args.out}\n  truth  {args.out.rstrip('/')}/_truth/"
    )
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from dynamix_ray.segments.pipeline import run_segment

    result = run_segment(
        args.events, args.out, segment_config(args), progress=not args.no_progress
    )
    print(
        json.dumps(result.meta, indent=2, default=str)
        if args.json
        else result.summary()
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dynamix_ray.segments.pipeline import read_segments, run_segment
    from dynamix_ray.synth import generate, read_truth_users, segment_recovery

    out = args.out.rstrip("/")
    events = f"{out}/events"
    generate(events, GenerateConfig(users=args.users, days=args.days, seed=args.seed))
    result = run_segment(events, f"{out}/segments_run", progress=True)
    print(result.summary())
    rec = segment_recovery(
        read_truth_users(events), read_segments(f"{out}/segments_run")
    )
    print(
        f"planted-truth recovery over {rec['eligible_rows']:,} eligible rows: "
        f"precision {rec['precision']:.3f}, recall {rec['recall']:.3f} "
        f"(planted active share {rec['planted_active_share']:.3f})"
    )
    print(
        f"demo: outputs under {out}/ (events/, segments_run/segments, "
        "segments_run/rejects)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dynamix_ray.model import ModelConfig
    from dynamix_ray.train import TrainConfig, run_train

    tcfg = TrainConfig(
        policy=args.policy,
        removed=tuple(a for a in args.removed.split(",") if a),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        mixed_precision=args.mixed_precision,
        max_failures=args.max_failures,
        model=ModelConfig(max_seq_len=args.max_seq_len),
    )
    m = run_train(args.events, args.segments, args.out, tcfg, args.max_seq_len)
    print(
        f"dynamix train: policy {m['policy']}, NE {m.get('ne')}, "
        f"NE active {m.get('ne_active')}, NE passive {m.get('ne_passive')}, "
        f"AUC {m.get('auc')}, {m.get('train_examples_per_s')} examples/s\n"
        f"  metrics {args.out.rstrip('/')}/metrics.json\n"
        f"  checkpoint {m.get('checkpoint')}"
    )
    return 0


_COMMANDS = {
    "generate": cmd_generate,
    "segment": cmd_segment,
    "train": cmd_train,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dynamix {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
