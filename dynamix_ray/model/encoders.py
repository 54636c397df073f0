"""Per-source event encoders (ALURE §2.2: one module per source per layer).

An event of a source becomes ``D`` wide: the used attribute embeddings (and
dwell) are concatenated and projected by a :class:`SlicedLinear`, the CFEE time
encodings are added, then ``n_layers`` pre-norm blocks of self-attention (with
the relative-time bias) and an MLP run over the sequence.

Padding never reaches the output: padded ids index the zero row, padded dwell
and timestamps are replaced by 0 before anything reads them, padded keys get
zero attention weight, and pooling skips padded slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dynamix_ray.model.batch import SourceBatch
from dynamix_ray.model.config import DWELL, ModelConfig
from dynamix_ray.model.embeddings import AttributeEmbeddings
from dynamix_ray.model.layers import MultiHeadSelfAttention, SlicedLinear
from dynamix_ray.model.time_encoding import (
    CFEE,
    RelativeTimeBias,
    relative_time_buckets,
)

__all__ = ["EventBlock", "SourceEncoder"]


class EventBlock(nn.Module):
    """Pre-norm Transformer block: self-attention + relative-time bias, then MLP.

    Args:
        d_model: width ``D``; n_heads: heads ``H``; mlp_ratio: MLP hidden ``/ D``;
        rel_time_buckets: buckets of the relative-time bias.

    Shapes: ``forward(x (B, L, D), mask (B, L) bool, buckets (B, L, L) int64)``
    -> (B, L, D).
    """

    def __init__(
        self, d_model: int, n_heads: int, mlp_ratio: int, rel_time_buckets: int
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, n_heads)
        self.rel_bias = RelativeTimeBias(rel_time_buckets, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), mask, self.rel_bias(buckets))  # (B, L, D)
        return x + self.mlp(self.ln2(x))  # (B, L, D)


class SourceEncoder(nn.Module):
    """Encodes the event sequence of one source.

    Args:
        source: the source's name (for error messages).
        attrs: every attribute the encoder may ever use (``"dwell_ms"`` allowed).
        cfg: widths, heads, layers, time-encoding sizes.

    Shapes: ``forward(events, used, tables, t_ms (B,))`` -> ``(h (B, L, D),
    mask (B, L))`` where ``events`` is one source of the batch
    (:class:`~dynamix_ray.model.batch.SourceBatch`). Only the ``used``
    attributes are looked up.
    """

    def __init__(self, source: str, attrs: Sequence[str], cfg: ModelConfig) -> None:
        super().__init__()
        self.source = source
        self.attrs = tuple(attrs)
        self.rel_time_buckets = cfg.rel_time_buckets
        self.dwell = nn.Linear(1, cfg.emb_dim) if DWELL in self.attrs else None
        self.proj = SlicedLinear(
            [(a, cfg.emb_dim) for a in self.attrs], cfg.d_model, label=source
        )
        self.cfee = CFEE(cfg.d_model, cfg.max_seq_len, cfg.n_decay, cfg.n_harmonics)
        self.blocks = nn.ModuleList(
            EventBlock(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.rel_time_buckets)
            for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def embed(
        self,
        events: SourceBatch,
        used: Sequence[str],
        tables: AttributeEmbeddings,
        mask: Tensor,
    ) -> dict[str, Tensor]:
        """Per used attribute, its (B, L, e) embedding; nothing else is looked up."""
        attrs = events.attrs
        parts: dict[str, Tensor] = {}
        for a in self.proj.ordered(used):
            if a == DWELL:
                dwell = events.dwell
                if dwell is None or self.dwell is None:
                    raise KeyError(
                        f"batch.hist[{self.source!r}].dwell is missing; "
                        f"the feature set asks for {DWELL} of {self.source}"
                    )
                x = torch.where(mask, dwell, torch.zeros_like(dwell))  # (B, L)
                parts[a] = self.dwell(x[..., None].to(self.dwell.weight.dtype))
            else:
                if a not in attrs:
                    raise KeyError(
                        f"batch.hist[{self.source!r}].attrs lacks {a!r}; "
                        f"it has {sorted(attrs)}"
                    )
                parts[a] = tables[a](attrs[a], mask)  # (B, L, e)
        return parts

    def forward(
        self,
        events: SourceBatch,
        used: Sequence[str],
        tables: AttributeEmbeddings,
        t_ms: Tensor,
        embedded: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``embedded``, when given, receives the (B, L, e) attribute embeddings
        (not dwell) so that the caller can reuse them without a second look-up."""
        mask = events.mask.bool()  # (B, L)
        ts_ms = events.ts_ms.long()
        ts_ms = torch.where(mask, ts_ms, torch.zeros_like(ts_ms))  # (B, L)
        parts = self.embed(events, used, tables, mask)
        if embedded is not None:
            embedded.update({a: t for a, t in parts.items() if a != DWELL})
        x = self.proj(parts)  # (B, L, D)
        x = x + self.cfee(ts_ms, t_ms.long(), mask)
        x = x.masked_fill(~mask[..., None], 0.0)
        buckets = relative_time_buckets(ts_ms, self.rel_time_buckets)  # (B, L, L)
        for block in self.blocks:
            x = block(x, mask, buckets)
        return self.ln_f(x), mask  # (B, L, D), (B, L)
