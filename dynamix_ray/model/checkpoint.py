"""Checkpoints: save, resolve, load, and what a model was trained with.

A checkpoint is a folder holding ``state.pt``: the weights, the
``ModelConfig``, the feature policy and its removed attributes, and the
sample settings (sequence length, buffer, horizon) the model was trained on.
Serving and ALURE read those settings from here, so they cut histories the way
training did (nanoGPT's rule: the shape travels with the weights).

Plain torch; no Ray Train import, so that serving and batch inference load a
model without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any

from dynamix_ray.model.config import ModelConfig
from dynamix_ray.samples import SampleConfig

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "model_config_dict",
    "model_version",
    "resolve_checkpoint",
    "sample_config_of",
    "save_checkpoint",
]

#: What :func:`load_checkpoint` returns besides the model: policy, removed,
#: epoch, path, and ``samples`` (a :class:`SampleConfig`).
Checkpoint = dict[str, Any]


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
    samples: SampleConfig | None = None,
    **extra: Any,
) -> str:
    """Write ``folder/state.pt`` in the format :func:`load_checkpoint` reads
    (weights-only loadable: tensors and plain containers)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    samples = samples or SampleConfig(max_seq_len=cfg.max_seq_len)
    state = {
        "model": model.state_dict(),
        "epoch": epoch,
        "model_config": model_config_dict(cfg),
        "policy": policy,
        "removed": list(removed),
        "sample_config": asdict(samples),
        **extra,
    }
    torch.save(state, os.path.join(folder, "state.pt"))
    return folder


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder of ``path``: a folder holding ``state.pt``, or a
    ``dynamix train`` OUT folder (its ``metrics.json`` names the last one,
    relative to OUT or absolute)."""
    if os.path.exists(os.path.join(path, "state.pt")):
        return path
    metrics = os.path.join(path, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as fh:
            ckpt = json.load(fh).get("checkpoint")
        if ckpt:
            ckpt = ckpt if os.path.isabs(ckpt) else os.path.join(path, ckpt)
            if os.path.exists(os.path.join(ckpt, "state.pt")):
                return str(ckpt)
    raise FileNotFoundError(
        f"{path}: neither a checkpoint folder (state.pt) nor a `dynamix train` "
        "output folder whose metrics.json names one"
    )


def sample_config_of(state: dict[str, Any], cfg: ModelConfig) -> SampleConfig:
    """The sample settings a checkpoint was trained with (older checkpoints:
    the defaults, with the model's sequence length)."""
    if state.get("sample_config"):
        return SampleConfig(**state["sample_config"])
    return SampleConfig(max_seq_len=cfg.max_seq_len)


def load_checkpoint(
    path: str, cfg: ModelConfig | None = None
) -> tuple[Any, ModelConfig, Checkpoint]:
    """``(model in eval mode, its ModelConfig, {"policy", "removed", "epoch",
    "path", "samples"})``.

    Weights-only loading. ``cfg`` is needed only for checkpoints that predate
    the saved ``model_config``.
    """
    import torch

    from dynamix_ray.model.ctr import DynamixCTR

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
    meta: Checkpoint = {k: state.get(k) for k in ("policy", "removed", "epoch")}
    meta["path"] = d
    meta["samples"] = sample_config_of(state, cfg)
    return model.eval(), cfg, meta


def model_version(checkpoint_dir: str) -> str:
    """A short content hash of the checkpoint's weights file."""
    h = hashlib.sha1()
    with open(os.path.join(resolve_checkpoint(checkpoint_dir), "state.pt"), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
