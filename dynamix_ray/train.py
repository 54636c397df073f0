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
It also reports a progressive-validation NE curve: every batch's loss is taken
before the step that learns from it, so the NE of each ``curve_steps`` window
is an out-of-sample figure at no extra cost (the paper's Fig. 5 analog).

:func:`prepare_train_data` builds and splits the samples once; several runs
(the experiment's arms and seeds) can share them through ``run_train(data=)``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np

from dynamix_ray.features import (
    available_features,
    flops_by_segment,
    lowest_importance,
    permutation_importance,
    policy_features,
    split_by_segment,
    to_model_batch,
)
from dynamix_ray.model import DynamixCTR, ModelConfig
from dynamix_ray.model.metrics import ne_from_sums

__all__ = [
    "TrainConfig",
    "TrainData",
    "prepare_train_data",
    "train_step",
    "baseline_importance",
    "load_checkpoint",
    "model_config_dict",
    "resolve_checkpoint",
    "removed_from_baseline",
    "run_train",
    "save_checkpoint",
    "score_by_segment",
    "train_loop_per_worker",
]


@dataclass(frozen=True)
class TrainConfig:
    """Args:
    policy: one of ``features.POLICIES``.
    removed: ad-impression attributes the ``remove-*`` policies drop.
    epochs / batch_size / lr / seed: the optimisation.
    num_workers / use_gpu: ``ScalingConfig`` (DDP when num_workers > 1).
    cpus_per_worker: CPUs each training worker reserves. Ray Data needs CPUs
        left over to feed the workers: on a 2-CPU machine two workers take
        0.5 each (the default 1 CPU each would leave Ray Data none).
    mixed_precision: autocast (bf16) on GPU; ignored on CPU.
    max_failures: ``FailureConfig``: worker failures tolerated (restart from
        the last checkpoint).
    warmup_steps: steps per epoch excluded from examples/s.
    checkpoint_steps: also checkpoint every this many steps inside an epoch
        (0: only at epoch ends); a resumed run skips the batches already done.
    eval_days: last days held out for evaluation.
    shuffle_buffer: rows of Ray Data's local shuffle buffer when reading
        training batches (samples come sorted by user and time; without it a
        batch holds a handful of users). 0: no shuffle.
    alure: a ``dynamix embed --daily`` OUT: feed each sample's ALURE user
        embedding (as of the last midnight before it) to the head
        (``ModelConfig.ext_dim`` is set from it); ``None``: no such feature.
    importance_rows: evaluation rows on which a ``baseline`` run measures the
        permutation importance of the ad-impression attributes (0: skip).
    curve_steps: steps per point of the progressive NE curve (``curve`` in the
        metrics: ``[examples seen, NE of that window's batches]``).
    """

    policy: str = "baseline"
    removed: tuple[str, ...] = ()
    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    mixed_precision: bool = False
    max_failures: int = 0
    warmup_steps: int = 3
    checkpoint_steps: int = 0
    eval_days: int = 1
    alure: str | None = None
    importance_rows: int = 20_000
    shuffle_buffer: int = 50_000
    curve_steps: int = 10
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
    return ne_from_sums(sums[f"{name}.ll"], sums[f"{name}.n"], sums[f"{name}.pos"])


def train_step(
    model: Any,
    opt: Any,
    batch: dict[str, np.ndarray],
    policy: str,
    removed: tuple[str, ...],
    device: Any = "cpu",
    use_amp: bool = False,
) -> float:
    """One optimisation step on a batch of sample columns; returns the mean loss.

    The batch is split by segment and each part runs with its policy's
    ``FeatureSet``; the summed loss gets one backward pass and one optimizer
    step (DDP workers stay in lock-step whatever segments they hold).
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    available = available_features(batch)
    loss = torch.zeros((), device=dev)
    for seg, part in split_by_segment(batch).items():
        feats = policy_features(policy, seg, removed, available)
        mb = to_model_batch(part, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(mb, feats)
        loss = loss + F.binary_cross_entropy_with_logits(
            logits.float(), mb["label"], reduction="sum"
        )
    opt.zero_grad(set_to_none=True)
    mean = loss / len(batch["label"])
    mean.backward()
    opt.step()
    return float(mean.detach())


def score_by_segment(
    model: Any,
    batch: dict[str, np.ndarray],
    policy: str,
    removed: tuple[str, ...],
    device: Any = "cpu",
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Logits of a batch, each segment with its policy's ``FeatureSet`` (no
    gradients): ``[(segment, logits, labels)]``, one entry per segment present."""
    import torch

    available = available_features(batch)
    out = []
    with torch.no_grad():
        for seg, part in split_by_segment(batch).items():
            feats = policy_features(policy, seg, removed, available)
            logits = model(to_model_batch(part, device), feats).float().cpu().numpy()
            out.append((seg, logits, part["label"]))
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (one process per worker)."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from dynamix_ray.model import auc

    tcfg: TrainConfig = config["tcfg"]
    torch.manual_seed(tcfg.seed)
    device = get_device()
    model: Any = DynamixCTR(tcfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    start_epoch, skip_steps = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(
                os.path.join(d, "state.pt"), weights_only=True, map_location="cpu"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_epoch = int(state["epoch"]) + 1
        if state.get("resume_step"):  # saved in the middle of an epoch
            start_epoch, skip_steps = (
                int(state["resume_epoch"]),
                int(state["resume_step"]),
            )
    model = prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    raw: Any = model.module if hasattr(model, "module") else model
    world = ray.train.get_context().get_world_size()
    use_amp = tcfg.mixed_precision and device.type == "cuda"

    def report(
        metrics: dict[str, Any], done_epoch: int, resume: tuple[int, int] | None
    ) -> None:
        """Report ``metrics`` with a checkpoint (rank 0 writes it): weights,
        optimizer, the last completed epoch and, mid-epoch, where to resume."""
        with tempfile.TemporaryDirectory() as d:
            if ray.train.get_context().get_world_rank() != 0:
                ray.train.report(metrics)
                return
            extra: dict[str, Any] = {"opt": opt.state_dict()}
            if resume is not None:
                extra["resume_epoch"], extra["resume_step"] = resume
            save_checkpoint(
                d, raw, tcfg.model, tcfg.policy, tcfg.removed, done_epoch, **extra
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    curve: list[list[float]] = []  # [examples seen (all workers), window NE]
    seen = 0
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        steady_n, steady_t0, steps = 0, None, 0
        win = [0.0, 0.0, 0.0]  # summed loss, rows, positives of the window
        batches = train_shard.iter_batches(
            batch_size=tcfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=tcfg.shuffle_buffer or None,
            local_shuffle_seed=tcfg.seed + epoch if tcfg.shuffle_buffer else None,
        )
        skip = skip_steps if epoch == start_epoch else 0
        for step, batch in enumerate(batches):
            steps = step + 1
            if step < skip:  # done before the checkpoint this run resumed from
                continue
            if step == skip + tcfg.warmup_steps:
                steady_t0 = time.perf_counter()
            loss = train_step(
                model, opt, batch, tcfg.policy, tcfg.removed, device, use_amp
            )
            n = len(batch["label"])
            seen += n * world
            win = [win[0] + loss * n, win[1] + n, win[2] + float(batch["label"].sum())]
            if tcfg.curve_steps and steps % tcfg.curve_steps == 0:
                ne = ne_from_sums(*win)
                if ne is not None:
                    curve.append([seen, ne])
                win = [0.0, 0.0, 0.0]
            if tcfg.checkpoint_steps and steps % tcfg.checkpoint_steps == 0:
                report(
                    {"epoch": epoch, "step": steps, "partial": True},
                    epoch - 1,
                    (epoch, steps),
                )
            if steady_t0 is not None:
                steady_n += len(batch["label"])
        steady_s = time.perf_counter() - steady_t0 if steady_t0 else 0.0
        last = ne_from_sums(*win)  # the epoch's last, partial window
        if last is not None:
            curve.append([seen, last])

        model.eval()
        scores, labels, segs = [], [], []
        for batch in eval_shard.iter_batches(
            batch_size=4 * tcfg.batch_size, batch_format="numpy"
        ):
            for seg, logits, lab in score_by_segment(
                raw, batch, tcfg.policy, tcfg.removed, device
            ):
                scores.append(logits)
                labels.append(lab)
                segs.append(np.full(len(lab), seg, np.int8))
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
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (s, y))  # AUC over every eval row
            s = np.concatenate([g[0] for g in gathered])
            y = np.concatenate([g[1] for g in gathered])
        metrics = {
            "epoch": epoch,
            "resumed_at_epoch": start_epoch,
            "resumed_at_step": skip_steps,
            "ne": _ne(sums, "all"),
            "ne_active": _ne(sums, "active"),
            "ne_passive": _ne(sums, "passive"),
            "auc": auc(s, y) if len(y) and 0 < y.sum() < len(y) else None,
            "eval_rows": int(sums["all.n"]),
            "train_steps": steps,
            "curve": curve,  # rank 0's batches; resumed runs restart it
            "train_examples_per_s": (
                sums["steady_n"] / (sums["steady_s"] / world)
                if sums["steady_s"]
                else None
            ),
        }
        report(metrics, epoch, None)


def _take_columns(ds: Any, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a Ray Dataset as numpy columns."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in ds.limit(n).iter_batches(batch_size=4096, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg`` as plain containers (what a weights-only checkpoint may hold)."""
    d = asdict(cfg)
    d["sources"] = {k: list(v) for k, v in cfg.sources.items()}
    d["num_buckets"] = dict(cfg.num_buckets)
    return d


def _model_config(d: dict[str, Any]) -> ModelConfig:
    tuples = ("candidate_attrs", "direct_attrs")
    return ModelConfig(
        **{
            **d,
            "sources": {k: tuple(v) for k, v in d["sources"].items()},
            **{k: tuple(d[k]) for k in tuples},
        }
    )


def save_checkpoint(
    folder: str,
    model: Any,
    cfg: ModelConfig,
    policy: str = "baseline",
    removed: tuple[str, ...] = (),
    epoch: int = 0,
    **extra: Any,
) -> str:
    """Write ``folder/state.pt`` in the format :func:`load_checkpoint` reads
    (weights-only loadable: tensors and plain containers)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "epoch": epoch,
        "model_config": model_config_dict(cfg),
        "policy": policy,
        "removed": list(removed),
        **extra,
    }
    torch.save(state, os.path.join(folder, "state.pt"))
    return folder


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder of ``path``: a folder holding ``state.pt``, or a
    ``dynamix train`` OUT folder (its ``metrics.json`` names the last one)."""
    if os.path.exists(os.path.join(path, "state.pt")):
        return path
    metrics = os.path.join(path, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as fh:
            ckpt = json.load(fh).get("checkpoint")
        if ckpt and os.path.exists(os.path.join(ckpt, "state.pt")):
            return str(ckpt)
    raise FileNotFoundError(
        f"{path}: neither a checkpoint folder (state.pt) nor a `dynamix train` "
        "output folder whose metrics.json names one"
    )


def load_checkpoint(
    path: str, cfg: ModelConfig | None = None
) -> tuple[Any, ModelConfig, dict[str, Any]]:
    """``(model in eval mode, its ModelConfig, {"policy", "removed", "epoch"})``.

    Weights-only loading. ``cfg`` is needed only for checkpoints that predate
    the saved ``model_config``.
    """
    import torch

    d = resolve_checkpoint(path)
    state = torch.load(
        os.path.join(d, "state.pt"), weights_only=True, map_location="cpu"
    )
    if "model_config" in state:
        cfg = _model_config(state["model_config"])
    elif cfg is None:
        raise ValueError(f"{d}/state.pt records no model_config; pass cfg")
    model = DynamixCTR(cfg)
    model.load_state_dict(state["model"])
    meta = {k: state.get(k) for k in ("policy", "removed", "epoch")}
    meta["path"] = d
    return model.eval(), cfg, meta


def baseline_importance(
    checkpoint_dir: str,
    cfg: ModelConfig,
    cols: dict[str, np.ndarray],
    rng_seed: int = 0,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Permutation importance of every ad-impression history attribute.

    The model of ``checkpoint_dir`` scores ``cols`` (validation samples) with
    the ``baseline`` feature set of each row's segment; the score is NE, and an
    attribute's importance is how much NE rises when its column is permuted
    between rows (:func:`features.permutation_importance`).

    Returns:
        ``{model attribute name: NE increase}`` (``dwell_ms`` for dwell).
    """
    from dynamix_ray.model import normalized_entropy

    model, _, _ = load_checkpoint(checkpoint_dir, cfg)

    def score(c: dict[str, np.ndarray]) -> float:
        parts = [
            part
            for i in range(0, len(c["label"]), batch_size)
            for part in score_by_segment(
                model, {k: v[i : i + batch_size] for k, v in c.items()}, "baseline", ()
            )
        ]
        return normalized_entropy(
            np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
        )

    # bare model names address the ad-impression history (dwell_ms included)
    names = available_features(cols).attrs("ad_impressions")
    return permutation_importance(score, cols, names, rng_seed=rng_seed)


def removed_from_baseline(baseline_out: str, k: int = 4) -> tuple[str, ...]:
    """The ``k`` lowest-importance attributes recorded by a baseline run.

    Args:
        baseline_out: the ``OUT`` folder of a ``dynamix train --policy
            baseline`` run (its ``metrics.json`` holds ``importance``).
    Raises:
        FileNotFoundError: no ``metrics.json`` there.
        ValueError: the run recorded no importance (not a baseline run, or
            ``importance_rows`` was 0).
    """

    path = os.path.join(baseline_out, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: train a baseline into {baseline_out} first "
            "(dynamix train EVENTS SEGMENTS OUT --policy baseline)"
        )
    with open(path) as fh:
        importance = json.load(fh).get("importance")
    if not importance:
        raise ValueError(
            f"{path} records no permutation importance; it must come from a "
            "--policy baseline run with importance_rows > 0"
        )
    return lowest_importance(importance, k)


@dataclass
class TrainData:
    """Samples built and split once (:func:`prepare_train_data`).

    Attributes:
        train / eval: Ray Datasets (materialised samples, split by time).
        boundary_ms: first instant of the evaluation days.
        available: the feature names the samples carry.
        ext_dim: width of the ALURE embedding column (0: none).
    """

    train: Any
    eval: Any
    boundary_ms: int
    available: Any
    ext_dim: int = 0


def prepare_train_data(
    events_url: str,
    segments_url: str,
    max_seq_len: int = 64,
    eval_days: int = 1,
    alure: str | None = None,
) -> TrainData:
    """Build the samples (SPEC §6) on Ray Data, materialise them, and split by
    time: the last ``eval_days`` full days are evaluated on."""
    from ray.data.expressions import col

    from dynamix_ray.runtime import ensure_ray
    from dynamix_ray.samples import SampleConfig, eval_boundary_ms, sample_dataset

    ensure_ray()
    samples = sample_dataset(
        events_url, segments_url, SampleConfig(max_seq_len=max_seq_len)
    )
    ext_dim = 0
    if alure:
        from dynamix_ray.alure.feature import attach_batch, read_daily

        daily = read_daily(alure)
        ext_dim = daily.dim
        samples = samples.map_batches(
            cast(Any, attach_batch),
            fn_args=(
                daily.user_id,
                daily.days_ms,
                daily.emb,
                int(SampleConfig().buffer_s * 1000),
            ),
            batch_format="numpy",
        )
    samples = samples.materialize()
    t_ms = np.concatenate(
        [
            b["t_ms"]
            for b in samples.select_columns(["t_ms"]).iter_batches(
                batch_size=None, batch_format="numpy"
            )
        ]
    )
    boundary = eval_boundary_ms(t_ms, eval_days)
    return TrainData(
        train=samples.filter(expr=col("t_ms") < boundary),
        eval=samples.filter(expr=col("t_ms") >= boundary),
        boundary_ms=boundary,
        available=available_features(samples.take_batch(1, batch_format="numpy")),
        ext_dim=ext_dim,
    )


def run_train(
    events_url: str,
    segments_url: str,
    out_dir: str,
    tcfg: TrainConfig | None = None,
    max_seq_len: int = 64,
    name: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    data: TrainData | None = None,
) -> dict[str, Any]:
    """Train one policy; write checkpoints under ``out_dir`` and ``metrics.json``.

    Re-running with the same ``out_dir`` and ``name`` resumes from the last
    checkpoint of that run. A ``baseline`` run also measures the permutation
    importance of the ad-impression attributes on up to
    ``tcfg.importance_rows`` evaluation rows and records it (``importance``,
    ``lowest_importance``) for the ``remove-*`` policies
    (:func:`removed_from_baseline`). ``extra_meta`` is merged into
    ``metrics.json``. ``data``: samples already built by
    :func:`prepare_train_data` from the same inputs (``tcfg.eval_days`` and
    ``tcfg.alure`` must match how they were built).

    Raises:
        ValueError: a ``remove-*`` policy without ``tcfg.removed``.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tcfg = tcfg or TrainConfig()
    if tcfg.policy.startswith("remove-") and not tcfg.removed:
        raise ValueError(
            f"policy {tcfg.policy} needs the attributes to remove: pass "
            "--removed-from BASELINE_OUT (a baseline run's permutation "
            "importance) or --removed a,b,c,d"
        )
    t0 = time.perf_counter()
    if data is None:
        data = prepare_train_data(
            events_url, segments_url, max_seq_len, tcfg.eval_days, tcfg.alure
        )
    if data.ext_dim:
        tcfg = replace(tcfg, model=replace(tcfg.model, ext_dim=data.ext_dim))
    boundary, available = data.boundary_ms, data.available
    train_ds, eval_ds = data.train, data.eval
    if tcfg.shuffle_buffer:
        train_ds = train_ds.randomize_block_order(seed=tcfg.seed)
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
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker},
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
        **(extra_meta or {}),
    }
    if tcfg.policy == "baseline" and tcfg.importance_rows > 0 and result.checkpoint:
        cols = _take_columns(eval_ds, tcfg.importance_rows)
        with result.checkpoint.as_directory() as d:
            importance = baseline_importance(d, tcfg.model, cols, tcfg.seed)
        metrics["importance"] = importance
        metrics["importance_rows"] = len(cols["label"])
        metrics["lowest_importance"] = list(lowest_importance(importance))
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2, default=str)
    return metrics
