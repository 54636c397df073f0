"""Named model shapes (``dynamix train|experiment --preset``): the one home of
each preset's model and history lengths (docs/experiments.md, "The prod
preset").

* ``small``: the commands' defaults (one 32-wide encoder block per source,
  the command's own history length).
* ``prod``: a model whose history encoding dominates a request's cost, as
  DynamiX's target models' does: 256 ad impressions, 128 organic
  impressions, 64 page views and 64 conversions per user, two 64-wide
  encoder blocks per source with 4 heads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dynamix_ray.model import ModelConfig
from dynamix_ray.samples import SampleConfig

__all__ = ["MODEL_PRESETS", "model_preset"]

#: preset -> (ModelConfig fields, SampleConfig fields); ``small`` changes
#: nothing (each command keeps its own default history length).
MODEL_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "small": ({}, {}),
    "prod": (
        {"emb_dim": 16, "d_model": 64, "n_heads": 4, "n_layers": 2, "head_hidden": 128},
        {
            "max_seq_len": 256,
            "seq_lens": {
                "organic_impressions": 128,
                "page_views": 64,
                "conversions": 64,
            },
        },
    ),
}


def model_preset(
    name: str, samples: SampleConfig, max_seq_len: int | None = None
) -> tuple[ModelConfig, SampleConfig]:
    """The model and sample settings of preset ``name`` over ``samples`` (the
    command's defaults); ``max_seq_len``, when given, overrides the longest
    history (per-source lengths above it are capped to it)."""
    if name not in MODEL_PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; expected one of {list(MODEL_PRESETS)}"
        )
    model_kw, sample_kw = MODEL_PRESETS[name]
    samples = replace(samples, **sample_kw)
    if max_seq_len is not None:
        lens = {s: min(n, max_seq_len) for s, n in dict(samples.seq_lens).items()}
        samples = replace(
            samples, max_seq_len=max_seq_len, seq_lens=tuple(lens.items())
        )
    model = ModelConfig(**model_kw, max_seq_len=samples.max_seq_len)
    return model, samples
