"""Segment-conditional training on Ray Train (docs/contract.md §4, §6, §7;
docs/data-path.md, "Streamed, deterministic, resumable").

``run_train`` builds (or reuses) the compact sample table
(``samples.run_samples``: one Parquet file per user bucket and split), and
runs a ``TorchTrainer`` whose workers stream their shard of it with
``ray.train.get_dataset_shard``: a seeded block order, a seeded local shuffle
buffer, then per batch the worker's :class:`loader.SegmentBatcher` cuts each
row's histories out of its bucket's events, per segment only for the
attributes that segment's policy uses. Nothing is materialised; memory per
node is a shuffle buffer of compact rows plus a few buckets of events.

Every batch's parts (one per segment present) run the model with their
policy's ``FeatureSet``; their losses are summed into one backward pass per
step, so DDP workers stay in lock-step whatever segments their batches hold.

The same seed on the same data gives the same run (bitwise on CPU with one
worker): Ray Data keeps block order (``preserve_order``), the shuffles are
seeded, and a mid-epoch resume skips exactly the batches done (their compact
rows are read but not gathered). Each epoch reports NE overall and per
segment, AUC from mergeable binned counts (with its error bound), the
steady-state training examples/s, the loader's rows/s and bytes per batch,
and the count and id sums of the rows trained (every row exactly once).

:func:`prepare_train_data` builds the samples once; several runs (the
experiment's arms and seeds) share them through ``run_train(data=)``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from dynamix_ray.events import EventStore, open_store
from dynamix_ray.features import (
    available_features,
    flops_by_segment,
    lowest_importance,
    permutation_importance,
    policy_features,
    split_by_segment,
    to_model_batch,
)
from dynamix_ray.io import absolute_url, pyarrow_fs, resolve
from dynamix_ray.loader import LoaderSpec, SegmentBatcher, store_features
from dynamix_ray.model import DynamixCTR, ModelConfig, PartsLoss
from dynamix_ray.model.checkpoint import (
    load_checkpoint,
    model_config_dict,
    resolve_checkpoint,
    save_checkpoint,
)
from dynamix_ray.model.metrics import ScoreHistogram, ne_from_sums
from dynamix_ray.runtime import ensure_ray
from dynamix_ray.samples import SampleConfig, SampleTable, run_samples

__all__ = [
    "TrainConfig",
    "TrainData",
    "baseline_importance",
    "evaluate",
    "fit_epoch",
    "load_checkpoint",
    "model_config_dict",
    "prepare_train_data",
    "removed_from_baseline",
    "resolve_checkpoint",
    "run_train",
    "save_checkpoint",
    "score_by_segment",
    "train_loop_per_worker",
    "train_step",
]


@dataclass(frozen=True)
class TrainConfig:
    """Args:
    policy: one of ``features.POLICIES``.
    removed: ad-impression attributes the ``remove-*`` policies drop.
    epochs / batch_size / lr / seed: the optimisation. The seed fixes the
        weights' initialisation, the block order and the shuffle buffer: the
        same seed on the same samples gives the same run.
    num_workers / use_gpu: ``ScalingConfig`` (DDP when num_workers > 1).
    cpus_per_worker: CPUs each training worker reserves. Ray Data needs CPUs
        left over to feed the workers: on a 2-CPU machine two workers take
        0.5 each (the default 1 CPU each would leave Ray Data none).
    mixed_precision: autocast (bf16) on GPU; ignored on CPU.
    max_failures: ``FailureConfig``: worker failures tolerated (restart from
        the last checkpoint).
    warmup_steps: steps per epoch excluded from examples/s.
    checkpoint_steps: also checkpoint every this many steps inside an epoch
        (0: only at epoch ends); a resumed run skips exactly the batches done.
    samples: the sample settings (sequence length, buffer, horizon, evaluation
        days): their one owner. ``model.max_seq_len`` follows
        ``samples.max_seq_len``; the checkpoint records both.
    shuffle_buffer: compact rows in Ray Data's local shuffle buffer (rows come
        one user bucket after another, each bucket already permuted). 0: none.
    cache_bytes: budget of each worker's cache of buckets' events.
    alure: a ``dynamix embed --daily`` OUT: feed each sample's ALURE user
        embedding (as of the last midnight before it) to the head
        (``ModelConfig.ext_dim`` is set from it); ``None``: no such feature.
    importance_rows: evaluation rows on which a ``baseline`` run measures the
        permutation importance of the ad-impression attributes (0: skip).
    curve_steps: steps per point of the progressive NE curve (``curve`` in the
        metrics: ``[examples seen, NE of that window's batches]``).
    torch_threads: intra-op threads per worker (0: torch's default). One
        thread makes CPU runs bitwise repeatable whatever the machine's load.
    contrastive_weight: also train the user tower for retrieval: this
        weight times the sampled softmax of each positive row's user against
        the batch's positive ads (in-batch negatives, ``model.PartsLoss``);
        0: the CTR loss alone. Sets ``ModelConfig.ad_tower``.
    temperature: the softmax's temperature (cosine similarities).
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
    samples: SampleConfig = field(default_factory=SampleConfig)
    alure: str | None = None
    importance_rows: int = 20_000
    shuffle_buffer: int = 50_000
    cache_bytes: int = 1 << 30
    curve_steps: int = 10
    torch_threads: int = 1
    contrastive_weight: float = 0.0
    temperature: float = 0.05
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.contrastive_weight < 0 or self.temperature <= 0:
            raise ValueError(
                "need contrastive_weight >= 0 and temperature > 0, got "
                f"{self.contrastive_weight}, {self.temperature}"
            )
        if self.contrastive_weight > 0 and not self.model.ad_tower:
            object.__setattr__(self, "model", replace(self.model, ad_tower=True))
        if self.model.max_seq_len != self.samples.max_seq_len:
            # one owner: the sample settings decide the model's positions
            object.__setattr__(
                self, "model", replace(self.model, max_seq_len=self.samples.max_seq_len)
            )

    @property
    def eval_days(self) -> int:
        return self.samples.eval_days


# ----------------------------------------------------------------- plain core

Parts = dict[int, dict[str, np.ndarray]]


def _as_parts(batch: Any) -> Parts:
    """A batch as ``{segment: columns}``: the loader's parts as they are, flat
    sample columns split by segment."""
    if batch and all(isinstance(k, int) for k in batch):
        return dict(batch)
    return split_by_segment(batch)


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
    batch: Any,
    policy: str,
    removed: tuple[str, ...],
    device: Any = "cpu",
    use_amp: bool = False,
) -> float:
    """One optimisation step; returns the mean loss.

    Args:
        batch: the loader's ``{segment: columns}`` parts, or flat sample
            columns (split by segment here).
        model: a ``DynamixCTR``, or a (DDP-wrapped) ``PartsLoss`` around one.
    Each part runs with its policy's ``FeatureSet``, all in one forward call
    (``model.PartsLoss``); the summed loss gets one backward pass and one
    optimizer step, so DDP workers stay in lock-step whatever segments their
    batches hold.
    """
    import torch

    dev = torch.device(device)
    items, rows = [], 0
    for seg, part in _as_parts(batch).items():
        feats = policy_features(policy, seg, removed, available_features(part))
        items.append((to_model_batch(part, dev), feats))
        rows += len(part["label"])
    # one forward call for every part (DDP pairs one forward with one backward)
    wrapped = getattr(model, "module", model)
    fn = model if isinstance(wrapped, PartsLoss) else PartsLoss(model, use_amp)
    loss = fn(items)
    opt.zero_grad(set_to_none=True)
    mean = loss / max(rows, 1)
    mean.backward()
    opt.step()
    return float(mean.detach())


def score_by_segment(
    model: Any,
    batch: Any,
    policy: str,
    removed: tuple[str, ...],
    device: Any = "cpu",
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Logits of a batch (parts or flat columns), each segment with its
    policy's ``FeatureSet`` (no gradients): ``[(segment, logits, labels)]``."""
    import torch

    out = []
    with torch.no_grad():
        for seg, part in _as_parts(batch).items():
            feats = policy_features(policy, seg, removed, available_features(part))
            logits = model(to_model_batch(part, device), feats).float().cpu().numpy()
            out.append((seg, logits, part["label"]))
    return out


@dataclass
class EpochProgress:
    """What an epoch has trained so far (kept in mid-epoch checkpoints): rows,
    and the sum and sum of squares of their ``sample_id`` (a resumed epoch
    that trains every row exactly once ends with the same three numbers as an
    uninterrupted one)."""

    rows: int = 0
    id_sum: int = 0
    id_sq_sum: int = 0

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        self.rows += len(ids)
        exact = [int(i) for i in ids]  # Python ints: the sums never overflow
        self.id_sum += sum(exact)
        self.id_sq_sum += sum(i * i for i in exact)


@dataclass
class EpochStats:
    """Timings and sizes of one epoch of :func:`fit_epoch`."""

    steps: int = 0
    steady_rows: int = 0
    steady_s: float = 0.0
    load_rows: int = 0
    load_s: float = 0.0
    batch_bytes: int = 0
    batches: int = 0


def fit_epoch(
    model: Any,
    opt: Any,
    batches: Any,
    batcher: Any,
    tcfg: TrainConfig,
    device: Any,
    *,
    skip: int = 0,
    progress: EpochProgress | None = None,
    on_step: Any = None,
    use_amp: bool = False,
) -> EpochStats:
    """One pass over ``batches`` (compact sample rows): gather, step.

    Args:
        batches: iterable of compact sample batches (numpy columns).
        batcher: rows -> ``{segment: columns}`` (a :class:`SegmentBatcher`).
        skip: batches already trained (a mid-epoch resume): their rows are
            skipped before any gather.
        progress: the epoch's :class:`EpochProgress` (updated).
        on_step: ``on_step(step, loss, rows)`` after every trained step (the
            progressive NE curve, mid-epoch checkpoints).
    """
    st = EpochStats()
    steady_t0 = None
    for step, rows in enumerate(batches):
        st.steps = step + 1
        if step < skip:
            continue
        if step == skip + tcfg.warmup_steps:
            steady_t0 = time.perf_counter()
        t0 = time.perf_counter()
        parts = batcher(rows)
        st.load_s += time.perf_counter() - t0
        n = len(rows["label"])
        st.load_rows += n
        st.batch_bytes += getattr(batcher, "last_nbytes", 0)
        st.batches += 1
        loss = train_step(model, opt, parts, tcfg.policy, tcfg.removed, device, use_amp)
        if progress is not None and "sample_id" in rows:
            progress.add(rows["sample_id"])
        if steady_t0 is not None:
            st.steady_rows += n
        if on_step is not None:
            on_step(step + 1, loss, rows)
    st.steady_s = time.perf_counter() - steady_t0 if steady_t0 else 0.0
    return st


def evaluate(
    model: Any,
    batches: Any,
    batcher: Any,
    policy: str,
    removed: tuple[str, ...],
    device: Any,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, float], ScoreHistogram]:
    """NE sums per segment and the binned scores of the evaluation rows.

    Every worker reads all evaluation rows (compact, cheap) and scores the
    ones with ``sample_id % world == rank``: the workers' shares are disjoint
    and cover every row exactly once, none dropped to even them out.
    """
    sums = _segment_sums(np.zeros(0), np.zeros(0), np.zeros(0, np.int8))
    hist = ScoreHistogram()
    for rows in batches:
        if world > 1:
            mine = np.asarray(rows["sample_id"]) % world == rank
            if not mine.any():
                continue
            rows = {k: np.asarray(v)[mine] for k, v in rows.items()}
        for seg, logits, lab in score_by_segment(
            model, batcher(rows), policy, removed, device
        ):
            part = _segment_sums(logits, lab, np.full(len(lab), seg, np.int8))
            sums = {k: sums[k] + part[k] for k in sums}
            hist.add(logits, lab)
    return sums, hist


# ----------------------------------------------------------------- Ray shell


def _restore(model: Any, opt: Any) -> tuple[int, int, EpochProgress]:
    """Weights and optimizer from Ray Train's latest checkpoint; returns
    (epoch to start, batches of it done, its progress)."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, 0, EpochProgress()
    with ckpt.as_directory() as d:
        state = torch.load(
            os.path.join(d, "state.pt"), weights_only=True, map_location="cpu"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if state.get("resume_step"):  # saved in the middle of an epoch
        return (
            int(state["resume_epoch"]),
            int(state["resume_step"]),
            EpochProgress(**state.get("resume_progress", {})),
        )
    return int(state["epoch"]) + 1, 0, EpochProgress()


class NECurve:
    """The progressive NE curve: one point ``[examples seen by all workers,
    NE of the window's batches]`` every ``every`` steps (0: none), and one
    for the epoch's last, partial window (:meth:`close`)."""

    def __init__(self, every: int, world: int = 1) -> None:
        self.every, self.world = every, world
        self.points: list[list[float]] = []
        self.seen = 0
        self._win = [0.0, 0.0, 0.0]  # summed loss, rows, positives

    def add(self, step: int, loss: float, labels: np.ndarray) -> None:
        n = len(labels)
        self.seen += n * self.world
        w = self._win
        self._win = [w[0] + loss * n, w[1] + n, w[2] + float(labels.sum())]
        if self.every and step % self.every == 0:
            self._point()

    def close(self) -> None:
        self._point()

    def _point(self) -> None:
        ne = ne_from_sums(*self._win)
        if ne is not None:
            self.points.append([self.seen, ne])
        self._win = [0.0, 0.0, 0.0]


def _per_s(n: float, s: float, world: int) -> float | None:
    """Rows per second of ``world`` workers whose seconds were summed."""
    return n / (s / world) if s else None


def epoch_metrics(
    epoch: int,
    resumed_at: tuple[int, int],
    sums: dict[str, float],
    counts: np.ndarray,
    ids: tuple[int, int],
    steps: int,
    curve: list[list[float]],
    world: int,
) -> dict[str, Any]:
    """What an epoch reports, from the evaluation's and the loader's sums
    over all workers (plain: no Ray, no torch).

    Args:
        resumed_at: (epoch, step) the run resumed at.
        sums: ``<group>.n/loss/pos`` of the evaluation and the loader's
            ``steady_n/steady_s/load_rows/load_s/batch_bytes/batches/epoch_rows``
            (seconds summed over workers).
        counts: the evaluation's score histogram (``ScoreHistogram``).
        ids: sum and sum of squares of the trained rows' sample ids.
    """
    auc, auc_err = ScoreHistogram.from_array(counts).auc()
    return {
        "epoch": epoch,
        "resumed_at_epoch": resumed_at[0],
        "resumed_at_step": resumed_at[1],
        "ne": _ne(sums, "all"),
        "ne_active": _ne(sums, "active"),
        "ne_passive": _ne(sums, "passive"),
        "auc": auc,
        "auc_max_error": auc_err,
        "eval_rows": int(sums["all.n"]),
        "train_steps": steps,
        "epoch_rows": int(sums["epoch_rows"]),
        "epoch_id_sum": str(ids[0]),
        "epoch_id_sq_sum": str(ids[1]),
        "curve": curve,  # rank 0's batches; resumed runs restart it
        "train_examples_per_s": _per_s(sums["steady_n"], sums["steady_s"], world),
        "loader_rows_per_s": _per_s(sums["load_rows"], sums["load_s"], world),
        "loader_bytes_per_batch": (
            sums["batch_bytes"] / sums["batches"] if sums["batches"] else None
        ),
        "loader_bytes_per_row": (
            sums["batch_bytes"] / sums["load_rows"] if sums["load_rows"] else None
        ),
    }


def _all_reduce(
    sums: dict[str, float], counts: np.ndarray, ids: list[int], world: int
) -> tuple[dict[str, float], np.ndarray, tuple[int, int]]:
    """Sums, histogram and id sums over every worker (as given with one)."""
    if world == 1:
        return sums, counts, (ids[0], ids[1])
    import torch
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    c = torch.as_tensor(counts)
    dist.all_reduce(c)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, ids)  # two Python ints per worker
    total = (sum(g[0] for g in gathered), sum(g[1] for g in gathered))
    return dict(zip(keys, t.tolist(), strict=True)), c.numpy(), total


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (one process per worker)."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    tcfg: TrainConfig = config["tcfg"]
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    torch.manual_seed(tcfg.seed)
    device = get_device()
    model: Any = DynamixCTR(tcfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    start_epoch, skip_steps, resumed = _restore(model, opt)
    raw: Any = model
    use_amp = tcfg.mixed_precision and get_device().type == "cuda"
    model = prepare_model(
        PartsLoss(model, use_amp, tcfg.contrastive_weight, tcfg.temperature),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    batcher = SegmentBatcher(config["loader"])

    def report(
        metrics: dict[str, Any],
        done_epoch: int,
        resume: tuple[int, int, EpochProgress] | None,
    ) -> None:
        """Report ``metrics`` with a checkpoint (rank 0 writes it): weights,
        optimizer, the last completed epoch and, mid-epoch, where to resume."""
        with tempfile.TemporaryDirectory() as d:
            if rank != 0:
                ray.train.report(metrics)
                return
            extra: dict[str, Any] = {"opt": opt.state_dict()}
            if resume is not None:
                extra["resume_epoch"], extra["resume_step"] = resume[:2]
                extra["resume_progress"] = asdict(resume[2])
            save_checkpoint(
                d,
                raw,
                tcfg.model,
                tcfg.policy,
                tcfg.removed,
                done_epoch,
                samples=tcfg.samples,
                **extra,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    curve = NECurve(tcfg.curve_steps, world)
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        progress = resumed if epoch == start_epoch else EpochProgress()

        def on_step(
            step: int,
            loss: float,
            rows: dict[str, np.ndarray],
            epoch: int = epoch,
            progress: EpochProgress = progress,
        ) -> None:
            curve.add(step, loss, rows["label"])
            if tcfg.checkpoint_steps and step % tcfg.checkpoint_steps == 0:
                report(
                    {"epoch": epoch, "step": step, "partial": True},
                    epoch - 1,
                    (epoch, step, progress),
                )

        batches = train_shard.iter_batches(
            batch_size=tcfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=tcfg.shuffle_buffer or None,
            local_shuffle_seed=tcfg.seed + epoch if tcfg.shuffle_buffer else None,
        )
        st = fit_epoch(
            model,
            opt,
            batches,
            batcher,
            tcfg,
            device,
            skip=skip_steps if epoch == start_epoch else 0,
            progress=progress,
            on_step=on_step,
            use_amp=use_amp,
        )
        curve.close()

        model.eval()
        sums, hist = evaluate(
            raw,
            eval_shard.iter_batches(
                batch_size=4 * tcfg.batch_size, batch_format="numpy"
            ),
            batcher,
            tcfg.policy,
            tcfg.removed,
            device,
            rank,
            world,
        )
        sums.update(
            steady_n=float(st.steady_rows),
            steady_s=st.steady_s,
            load_rows=float(st.load_rows),
            load_s=st.load_s,
            batch_bytes=float(st.batch_bytes),
            batches=float(st.batches),
            epoch_rows=float(progress.rows),
        )
        sums, counts, ids = _all_reduce(
            sums, hist.to_array(), [progress.id_sum, progress.id_sq_sum], world
        )
        metrics = epoch_metrics(
            epoch,
            (start_epoch, skip_steps),
            sums,
            counts,
            ids,
            st.steps,
            curve.points,
            world,
        )
        report(metrics, epoch, None)


def _take_rows(ds: Any, n: int, batcher: Any) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a compact sample dataset with full baseline
    histories (flat columns; both segments' rows)."""
    parts: dict[str, list[np.ndarray]] = {}
    for rows in ds.limit(n).iter_batches(batch_size=4096, batch_format="numpy"):
        cols = batcher.part(rows, batcher.feature_sets[0])  # baseline: both alike
        for k, v in cols.items():
            parts.setdefault(k, []).append(v)
    width = {
        k: max(v.shape[1] for v in vs) for k, vs in parts.items() if vs[0].ndim == 2
    }
    out = {}
    for k, vs in parts.items():
        if k in width:  # right-aligned: pad on the left to the widest batch
            vs = [np.pad(v, ((0, 0), (width[k] - v.shape[1], 0))) for v in vs]
        out[k] = np.concatenate(vs)
    return out


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
    """Samples built once (:func:`prepare_train_data`) and what they need.

    Attributes:
        table: the compact sample table (train and eval files per bucket).
        store: the event store their histories are gathered from.
        samples: the sample settings they were built with.
        available: the feature names the store and samples can give.
        alure: the daily ALURE embeddings' folder, and their width (0: none).
    """

    table: SampleTable
    store: EventStore
    samples: SampleConfig
    available: Any
    alure: str | None = None
    ext_dim: int = 0

    @property
    def boundary_ms(self) -> int:
        return self.table.boundary_ms

    def dataset(self, split: str) -> Any:
        """A Ray Dataset streaming the split's compact rows (file by file)."""
        import ray

        fs, _ = resolve(self.table.url)
        files = self.table.files(split)
        if not files:
            raise ValueError(f"{self.table.url}: no {split} samples")
        return ray.data.read_parquet(files, filesystem=pyarrow_fs(fs))

    def loader_spec(self, tcfg: TrainConfig) -> LoaderSpec:
        return LoaderSpec.of(
            self.store,
            policy=tcfg.policy,
            removed=tcfg.removed,
            max_seq_len=self.samples.max_seq_len,
            seq_lens=self.samples.seq_lens,
            buffer_ms=self.samples.buffer_ms,
            cache_bytes=tcfg.cache_bytes,
            alure=self.alure,
        )


def prepare_train_data(
    events_url: str,
    segments_url: str,
    out_url: str,
    samples: SampleConfig | None = None,
    alure: str | None = None,
    progress: bool = True,
) -> TrainData:
    """Build (or reuse) the compact samples (docs/contract.md §6) at ``OUT/samples/``, split
    by time: the last ``samples.eval_days`` full days are evaluated on."""
    samples = samples or SampleConfig()
    alure = absolute_url(alure) if alure else None  # read by the workers
    ensure_ray()
    table = run_samples(events_url, segments_url, out_url, samples, progress=progress)
    store = open_store(table.store_url)
    if store is None:
        raise FileNotFoundError(f"{table.store_url}: the samples' event store is gone")
    ext_dim = 0
    if alure:
        from dynamix_ray.alure.feature import read_daily_meta

        ext_dim = int(read_daily_meta(alure)["dim"])
    return TrainData(table, store, samples, store_features(store), alure, ext_dim)


def run_train(
    events_url: str,
    segments_url: str,
    out_dir: str,
    tcfg: TrainConfig | None = None,
    name: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    data: TrainData | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one policy; write checkpoints under ``out_dir`` and ``metrics.json``.

    Re-running with the same ``out_dir`` and ``name`` resumes from the last
    checkpoint of that run. A ``baseline`` run also measures the permutation
    importance of the ad-impression attributes on up to
    ``tcfg.importance_rows`` evaluation rows and records it (``importance``,
    ``lowest_importance``) for the ``remove-*`` policies
    (:func:`removed_from_baseline`). ``extra_meta`` is merged into
    ``metrics.json``. ``data``: samples already built by
    :func:`prepare_train_data` (``tcfg.samples`` and ``tcfg.alure`` must match
    how they were built); else they are built into ``out_dir/samples``.

    Raises:
        ValueError: a ``remove-*`` policy without ``tcfg.removed``.
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    tcfg = tcfg or TrainConfig()
    if tcfg.policy.startswith("remove-") and not tcfg.removed:
        raise ValueError(
            f"policy {tcfg.policy} needs the attributes to remove: pass "
            "--removed-from BASELINE_OUT (a baseline run's permutation "
            "importance) or --removed a,b,c,d"
        )
    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    if data is None:
        data = prepare_train_data(
            events_url, segments_url, out_dir, tcfg.samples, tcfg.alure, progress
        )
    if data.samples != tcfg.samples:
        raise ValueError(
            f"the samples were built with {data.samples}, the run asks for "
            f"{tcfg.samples}"
        )
    if data.ext_dim:
        tcfg = replace(tcfg, model=replace(tcfg.model, ext_dim=data.ext_dim))
    train_ds = data.dataset("train")
    if tcfg.shuffle_buffer:
        train_ds = train_ds.randomize_block_order(seed=tcfg.seed)
    name = name or f"train-{tcfg.policy}"
    run_config = RunConfig(
        name=name,
        storage_path=out_dir,
        failure_config=FailureConfig(max_failures=tcfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same seed gives the same batches
    # Same name and storage path: Ray Train hands the loop the run's latest
    # checkpoint (ray.train.get_checkpoint), so an interrupted run resumes.
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"tcfg": tcfg, "loader": data.loader_spec(tcfg)},
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker},
        ),
        datasets={"train": train_ds, "eval": data.dataset("eval")},
        # train is split (equal shards keep DDP in lock-step; Ray Data may hold
        # back up to num_workers - 1 rows an epoch: counted in rows_not_trained);
        # eval is not: each worker scores its sample_id share of every row
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ingest
        ),
        run_config=run_config,
    )
    result = trainer.fit()
    seq = {s: tcfg.samples.seq_len(s) for s in tcfg.model.sources}
    ckpt = result.checkpoint.path if result.checkpoint else None
    metrics = {
        **(result.metrics or {}),
        "policy": tcfg.policy,
        "removed": list(tcfg.removed),
        "flops_per_sample": flops_by_segment(
            tcfg.model, tcfg.policy, tcfg.removed, data.available, seq
        ),
        "eval_boundary_ms": data.boundary_ms,
        "rows_not_trained": data.table.rows("train")
        - int((result.metrics or {}).get("epoch_rows", 0)),
        "samples": os.path.relpath(data.table.url, out_dir)
        if "://" not in data.table.url
        else data.table.url,
        "train_config": {
            k: v for k, v in asdict(tcfg).items() if k not in ("model", "samples")
        },
        "sample_config": asdict(tcfg.samples),
        # relative to OUT: a moved OUT still resolves (resolve_checkpoint)
        "checkpoint": os.path.relpath(ckpt, out_dir) if ckpt else None,
        "wall_s": time.perf_counter() - t0,
        "ray_version": ray.__version__,
        **(extra_meta or {}),
    }
    if tcfg.policy == "baseline" and tcfg.importance_rows > 0 and result.checkpoint:
        batcher = SegmentBatcher(data.loader_spec(tcfg))
        cols = _take_rows(data.dataset("eval"), tcfg.importance_rows, batcher)
        with result.checkpoint.as_directory() as d:
            importance = baseline_importance(d, tcfg.model, cols, tcfg.seed)
        metrics["importance"] = importance
        metrics["importance_rows"] = len(cols["label"])
        metrics["lowest_importance"] = list(lowest_importance(importance))
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2, default=str)
    # callers get the checkpoint as a usable path
    return {**metrics, "checkpoint": ckpt}
