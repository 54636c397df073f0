"""ALURE retrieval against popularity on data where popularity is strong
(issue 19; docs/retrieval.md). Prints what it measured and writes
``OUT/retrieval.json``; asserts nothing.

1. Two generations of one world (same seed, catalog, Zipf popularity and
   campaign lives; ``--days`` long): ``--train-users`` users to train the CTR
   model on (Ray Train), and ``--users`` other users to evaluate on.
2. The model's user tower embeds the evaluated users as of the split (the
   last ``--holdout-days`` are held out) and as of the validation start (the
   ``--holdout-days`` before), each into its own u2u graph, so that the
   choices made on the validation period never saw it.
3. ``evaluate_retrieval``: u2u, most-popular (global, per country), item-CF,
   random and the blend, per-user recall / NDCG / hit rate / coverage.

``--world uniform`` runs the same with no popularity skew and no campaign
lives (today's default generator) for the side-by-side.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynamix_ray.alure.embed import EmbedConfig, read_embeddings, run_embed  # noqa: E402
from dynamix_ray.alure.evaluate import evaluate_retrieval, retrieval_summary  # noqa: E402
from dynamix_ray.alure.graph import build_u2u, read_u2u  # noqa: E402
from dynamix_ray.alure.retrieval import RetrievalConfig  # noqa: E402
from dynamix_ray.config import GenerateConfig  # noqa: E402
from dynamix_ray.model import ModelConfig  # noqa: E402
from dynamix_ray.samples import SampleConfig  # noqa: E402
from dynamix_ray.segments.pipeline import run_segment  # noqa: E402
from dynamix_ray.synth import generate  # noqa: E402
from dynamix_ray.train import TrainConfig, run_train  # noqa: E402

_DAY_MS = 86_400_000


def world(args: argparse.Namespace, users: int, seed: int) -> GenerateConfig:
    skew = args.world == "skewed"
    return GenerateConfig(
        users=users,
        days=args.days,
        seed=seed,
        impressions_per_user_day=args.events_per_user_day,
        ad_zipf=args.ad_zipf if skew else 0.0,
        campaign_days=args.campaign_days if skew else 0.0,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench_out/retrieval")
    p.add_argument("--world", choices=("skewed", "uniform"), default="skewed")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--train-users", type=int, default=600)
    p.add_argument("--days", type=int, default=35)
    p.add_argument("--holdout-days", type=float, default=7.0)
    p.add_argument("--events-per-user-day", type=float, default=10.0)
    p.add_argument("--ad-zipf", type=float, default=1.0)
    p.add_argument("--campaign-days", type=float, default=10.0)
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--contrastive-weight",
        type=float,
        default=0.0,
        help="train the user tower for retrieval too (TrainConfig."
        "contrastive_weight); its run lands in OUT/<world>-contrastive",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the data, model and graphs already under --out; re-run "
        "only the evaluation",
    )
    args = p.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = Path(args.out) / (
        args.world + ("-contrastive" if args.contrastive_weight > 0 else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    reuse = args.reuse and (out / "emb_validation").exists()
    t = time.perf_counter()
    # the catalog (popularity, campaign lives) depends on the seed and the
    # span only: both generations share it. Their users share ids (the model
    # never reads them) but not clusters, countries or histories: those are
    # drawn at other offsets of the chunk's random stream
    train_events, eval_events = str(out / "train_events"), str(out / "events")
    segs, run = str(out / "train_segments"), str(out / "run")
    if reuse:
        truth = json.loads((out / "events" / "_truth" / "truth.json").read_text())
        prior = json.loads((out / "retrieval.json").read_text())
        wall = {k: v for k, v in prior["wall_s"].items() if k != "evaluate_s"}
        trained = prior.get("train_metrics") or {}
    else:
        generate(train_events, world(args, args.train_users, 0), progress=None)
        truth = generate(eval_events, world(args, args.users, 0), progress=None)
        wall["generate_s"] = time.perf_counter() - t
        trained = _train(args, train_events, segs, run)
        wall["train_s"] = time.perf_counter() - t - wall["generate_s"]

    start_ms = _start_ms(truth)
    split = start_ms + int((args.days - args.holdout_days) * _DAY_MS)
    val_start = split - int(args.holdout_days * _DAY_MS)
    t = time.perf_counter()
    graphs = {}
    for name, at in (("split", split), ("validation", val_start)):
        emb = str(out / f"emb_{name}")
        if not reuse:
            run_embed(eval_events, run, emb, EmbedConfig(as_of_ms=at), progress=False)
            build_u2u(emb, emb, progress=False)
        graphs[name] = emb
    if not reuse:
        wall["embed_and_graphs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate_retrieval(
        eval_events,
        read_embeddings(graphs["split"]),
        read_u2u(graphs["split"]),
        split,
        RetrievalConfig(holdout_days=args.holdout_days),
        validation_edges=read_u2u(graphs["validation"]),
    )
    wall["evaluate_s"] = time.perf_counter() - t
    result = {
        "args": vars(args),
        "rows": truth["rows"],
        "train_metrics": {
            k: trained.get(k) for k in ("ne", "auc", "examples_per_s") if k in trained
        },
        "wall_s": wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "evaluation": ev,
    }
    (out / "retrieval.json").write_text(json.dumps(result, indent=2, default=str))
    print(
        f"world {args.world}: {args.users:,} users x {args.days} days "
        f"({truth['rows']['ad_impressions']:,} ad impressions, "
        f"{truth['rows']['conversions']:,} conversions); model trained on "
        f"{args.train_users:,} other users (evaluation NE "
        f"{result['train_metrics'].get('ne', float('nan')):.4f}, contrastive "
        f"weight {args.contrastive_weight:g})"
    )
    print(retrieval_summary(ev))
    print("wall: " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()))
    print(f"wrote {out / 'retrieval.json'}")


def _train(args: argparse.Namespace, events: str, segs: str, run: str) -> dict:
    run_segment(events, segs, progress=False)
    samples = SampleConfig(max_seq_len=args.max_seq_len)
    return run_train(
        events,
        segs,
        run,
        TrainConfig(
            epochs=args.epochs,
            samples=samples,
            model=ModelConfig(max_seq_len=args.max_seq_len),
            importance_rows=0,
            cpus_per_worker=0.5,
            contrastive_weight=args.contrastive_weight,
        ),
    )


def _start_ms(truth: dict) -> int:
    import numpy as np

    return int(np.datetime64(truth["config"]["start"], "ms").astype(np.int64))


if __name__ == "__main__":
    main()
