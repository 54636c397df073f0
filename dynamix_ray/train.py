"""Segment-conditional training on Ray Train (SPEC §4, §6, §7).

``run_train`` builds the sample dataset (``samples.sample_dataset``), splits it
by time (train on the earlier days, evaluate on the last), and runs a
``TorchTrainer`` whose workers read their shard with
``ray.train.get_dataset_shard``. Every batch is split by segment, and each part
runs the model with its policy's ``FeatureSet`` (``features.policy_features``),
so a policy that removes features does less work for that segment. The loss of
the parts is summed into one backward pass per step, so DDP workers stay in
lock-step whatever segments their batches hold.

Each epoch reports NE overall and per segment, AUC and the steady-state
training examples/s (the first ``warmup_steps`` excluded), with a checkpoint
(weights, optimizer, epoch) that a resumed or restarted run continues from.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dynamix_ray.model import DynamixCTR, ModelConfig

__all__ = ["TrainConfig", "run_train", "train_loop_per_worker"]


@dataclass(frozen=True)
class TrainConfig:
    """Args:
    policy: one of ``features.POLICIES``.
    removed: ad-impression attributes the ``remove-*`` policies drop.
    epochs / batch_size / lr / seed: the optimisation.
    num_workers / use_gpu: ``ScalingConfig`` (DDP when num_workers > 1).
    mixed_precision: autocast (bf16) on GPU; ignored on CPU.
    max_failures: ``FailureConfig``: worker failures tolerated (restart from
        the last checkpoint).
    warmup_steps: steps per epoch excluded from examples/s.
    eval_days: last days held out for evaluation.
    """

    policy: str = "baseline"
    removed: tuple[str, ...] = ()
    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    mixed_precision: bool = False
    max_failures: int = 0
    warmup_steps: int = 3
    eval_days: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)


def _segment_sums(
    logits: np.ndarray, labels: np.ndarray, segment: np.ndarray
) -> dict[str, float]:
    """Sufficient sums for NE per segment: log loss, rows, positives."""
    p = 1.0 / (1.0 + np.exp(-logits))
    eps = 1e-7
    ll = -(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
    out: dict[str, float] = {}
    for name, sel in (
        ("all", slice(None)),
        ("passive", segment == 0),
        ("active", segment == 1),
    ):
        out[f"{name}.ll"] = float(ll[sel].sum())
        out[f"{name}.n"] = float(np.size(labels[sel]))
        out[f"{name}.pos"] = float(labels[sel].sum())
    return out


def _ne(sums: dict[str, float], name: str) -> float | None:
    n, pos, ll = sums[f"{name}.n"], sums[f"{name}.pos"], sums[f"{name}.ll"]
    if n == 0 or pos == 0 or pos == n:
        return None
    p = pos / n
    return (ll / n) / float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (one process per worker)."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from dynamix_ray.features import (
        available_features,
        policy_features,
        split_by_segment,
        to_model_batch,
    )
    from dynamix_ray.model import auc

    tcfg: TrainConfig = config["tcfg"]
    torch.manual_seed(tcfg.seed)
    device = get_device()
    model: Any = DynamixCTR(tcfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(
                os.path.join(d, "state.pt"), weights_only=True, map_location="cpu"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_epoch = int(state["epoch"]) + 1
    model = prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    raw: Any = model.module if hasattr(model, "module") else model
    world = ray.train.get_context().get_world_size()
    use_amp = tcfg.mixed_precision and device.type == "cuda"
    bce = torch.nn.BCEWithLogitsLoss(reduction="sum")

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        steady_n, steady_t0, steps = 0, None, 0
        batches = train_shard.iter_batches(
            batch_size=tcfg.batch_size, batch_format="numpy"
        )
        for step, batch in enumerate(batches):
            steps = step + 1
            if step == tcfg.warmup_steps:
                steady_t0 = time.perf_counter()
            available = available_features(batch)
            loss = torch.zeros((), device=device)
            for seg, part in split_by_segment(batch).items():
                feats = policy_features(tcfg.policy, seg, tcfg.removed, available)
                mb = to_model_batch(part, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(mb, feats)
                loss = loss + bce(logits.float(), mb["label"])
            opt.zero_grad(set_to_none=True)
            (loss / len(batch["label"])).backward()
            opt.step()
            if steady_t0 is not None:
                steady_n += len(batch["label"])
        steady_s = time.perf_counter() - steady_t0 if steady_t0 else 0.0

        model.eval()
        scores, labels, segs = [], [], []
        with torch.no_grad():
            for batch in eval_shard.iter_batches(
                batch_size=4 * tcfg.batch_size, batch_format="numpy"
            ):
                available = available_features(batch)
                for seg, part in split_by_segment(batch).items():
                    feats = policy_features(tcfg.policy, seg, tcfg.removed, available)
                    scores.append(
                        raw(to_model_batch(part, device), feats).float().cpu().numpy()
                    )
                    labels.append(part["label"])
                    segs.append(np.full(len(part["label"]), seg, np.int8))
        s = np.concatenate(scores) if scores else np.zeros(0)
        y = np.concatenate(labels) if labels else np.zeros(0)
        g = np.concatenate(segs) if segs else np.zeros(0, np.int8)
        sums = _segment_sums(s, y, g)
        sums["steady_n"], sums["steady_s"] = float(steady_n), steady_s
        if world > 1:
            import torch.distributed as dist

            keys = sorted(sums)
            t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            sums = dict(zip(keys, t.tolist(), strict=True))
        metrics = {
            "epoch": epoch,
            "resumed_at_epoch": start_epoch,
            "ne": _ne(sums, "all"),
            "ne_active": _ne(sums, "active"),
            "ne_passive": _ne(sums, "passive"),
            "auc": auc(s, y) if len(y) and 0 < y.sum() < len(y) else None,
            "eval_rows": int(sums["all.n"]),
            "train_steps": steps,
            "train_examples_per_s": (
                sums["steady_n"] / (sums["steady_s"] / world)
                if sums["steady_s"]
                else None
            ),
        }
        with tempfile.TemporaryDirectory() as d:
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(
                    {
                        "model": raw.state_dict(),
                        "opt": opt.state_dict(),
                        "epoch": epoch,
                    },
                    os.path.join(d, "state.pt"),
                )
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                )
            else:
                ray.train.report(metrics)


def run_train(
    events_url: str,
    segments_url: str,
    out_dir: str,
    tcfg: TrainConfig | None = None,
    max_seq_len: int = 64,
    name: str | None = None,
) -> dict[str, Any]:
    """Train one policy; write checkpoints under ``out_dir`` and ``metrics.json``.

    Re-running with the same ``out_dir`` and ``name`` resumes from the last
    checkpoint of that run.
    """
    import ray
    from ray.data.expressions import col
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dynamix_ray.features import available_features, flops_by_segment
    from dynamix_ray.runtime import ensure_ray
    from dynamix_ray.samples import SampleConfig, eval_boundary_ms, sample_dataset

    tcfg = tcfg or TrainConfig()
    ensure_ray()
    t0 = time.perf_counter()
    samples = sample_dataset(
        events_url, segments_url, SampleConfig(max_seq_len=max_seq_len)
    ).materialize()
    t_ms = np.concatenate(
        [
            b["t_ms"]
            for b in samples.select_columns(["t_ms"]).iter_batches(
                batch_size=None, batch_format="numpy"
            )
        ]
    )
    boundary = eval_boundary_ms(t_ms, tcfg.eval_days)
    available = available_features(samples.take_batch(1, batch_format="numpy"))
    train_ds = samples.filter(expr=col("t_ms") < boundary)
    eval_ds = samples.filter(expr=col("t_ms") >= boundary)
    out_dir = os.path.abspath(out_dir)
    name = name or f"train-{tcfg.policy}"
    run_config = RunConfig(
        name=name,
        storage_path=out_dir,
        failure_config=FailureConfig(max_failures=tcfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    # Same name and storage path: Ray Train hands the loop the run's latest
    # checkpoint (ray.train.get_checkpoint), so an interrupted run resumes.
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"tcfg": tcfg},
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu
        ),
        datasets={"train": train_ds, "eval": eval_ds},
        run_config=run_config,
    )
    result = trainer.fit()
    seq = {s: max_seq_len for s in tcfg.model.sources}
    metrics = {
        **(result.metrics or {}),
        "policy": tcfg.policy,
        "removed": list(tcfg.removed),
        "flops_per_sample": flops_by_segment(
            tcfg.model, tcfg.policy, tcfg.removed, available, seq
        ),
        "eval_boundary_ms": boundary,
        "train_config": {k: v for k, v in asdict(tcfg).items() if k != "model"},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_s": time.perf_counter() - t0,
        "ray_version": ray.__version__,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2, default=str)
    return metrics
