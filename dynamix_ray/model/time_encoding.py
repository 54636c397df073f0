"""CFEE: ALURE's time encodings of an event sequence (ALURE §2.2).

Four encoders of the raw timestamps, the first three added to the event
representation, the fourth added to the self-attention scores:

- absolute position: order from the newest real event (0 = newest);
- temporal decay: radial basis features of ``log1p(elapsed seconds)`` before the
  request time ``t_ms``;
- cyclic: hour-of-day and day-of-week of the event as sin/cos pairs;
- relative time: a learned per-head bias of ``floor(log2(1 + |ts_i - ts_j| s))``.

All functions take int64 epoch milliseconds and do the calendar arithmetic in
int64, so float32 never has to hold a 13-digit timestamp.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CFEE",
    "RelativeTimeBias",
    "cyclic_features",
    "log_elapsed_s",
    "position_from_newest",
    "relative_time_buckets",
]

_MS_PER_S = 1000
_S_PER_DAY = 86_400
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_MAX_LOG_ELAPSED = 20.0  # log1p(s) of ~15 years: the last decay centre


def position_from_newest(mask: Tensor) -> Tensor:
    """Rank of each real event counted from the newest (0 = newest).

    Works for left- and right-padded rows alike; padded slots get 0.

    Args:
        mask: (B, L) bool, True = real event, newest last.
    Returns:
        (B, L) int64.
    """
    at_or_after = mask.flip(-1).long().cumsum(-1).flip(-1)  # (B, L)
    return torch.where(mask, at_or_after - 1, torch.zeros_like(at_or_after))


def log_elapsed_s(ts_ms: Tensor, t_ms: Tensor) -> Tensor:
    """``log1p(max(t - ts, 0) / 1000)``: log seconds from each event to the request.

    Args:
        ts_ms: (B, L) int64 event times; t_ms: (B,) int64 request times.
    Returns:
        (B, L) float32.
    """
    elapsed_ms = (t_ms[:, None] - ts_ms).clamp(min=0)  # (B, L) int64
    return torch.log1p(elapsed_ms.float() / _MS_PER_S)


def cyclic_features(ts_ms: Tensor, n_harmonics: int = 2) -> Tensor:
    """Hour-of-day (``n_harmonics`` sin/cos pairs) and day-of-week (one pair), UTC.

    Args:
        ts_ms: (B, L) int64.
    Returns:
        (B, L, 2 * n_harmonics + 2) float32.
    """
    sec = torch.div(ts_ms, _MS_PER_S, rounding_mode="floor")  # (B, L) int64
    day_frac = torch.remainder(sec, _S_PER_DAY).float() / _S_PER_DAY
    day = torch.div(sec, _S_PER_DAY, rounding_mode="floor")
    week_frac = torch.remainder(day + _EPOCH_WEEKDAY, 7).float() / 7
    angles = [2 * math.pi * k * day_frac for k in range(1, n_harmonics + 1)]
    angles.append(2 * math.pi * week_frac)
    a = torch.stack(angles, -1)  # (B, L, n_harmonics + 1)
    return torch.cat([a.sin(), a.cos()], -1)


def relative_time_buckets(ts_ms: Tensor, n_buckets: int) -> Tensor:
    """``floor(log2(1 + |ts_i - ts_j| seconds))`` clipped to ``n_buckets - 1``.

    Args:
        ts_ms: (B, L) int64.
    Returns:
        (B, L, L) int64 in ``[0, n_buckets)``.
    """
    dt_s = torch.div(
        (ts_ms[:, :, None] - ts_ms[:, None, :]).abs(), _MS_PER_S, rounding_mode="floor"
    )  # (B, L, L) int64
    b = torch.log2((dt_s + 1).float()).floor().long()  # float32: MPS has no f64
    return b.clamp(0, n_buckets - 1)


class CFEE(nn.Module):
    """Position, decay and cyclic encodings of one source, projected to ``D``.

    Args:
        d_model: output width ``D``.
        max_positions: position embeddings; older events share the last one.
        n_decay: radial basis features on log elapsed seconds.
        n_harmonics: hour-of-day harmonics.

    Shapes: ``forward(ts_ms (B, L) int64, t_ms (B,) int64, mask (B, L) bool)``
    -> (B, L, D).
    """

    def __init__(
        self, d_model: int, max_positions: int, n_decay: int = 8, n_harmonics: int = 2
    ) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.n_harmonics = n_harmonics
        self.position = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.position.weight, std=0.1)
        self.proj = nn.Linear(n_decay + 2 * n_harmonics + 2, d_model)
        centres = torch.linspace(0.0, _MAX_LOG_ELAPSED, n_decay)
        self.register_buffer("centres", centres, persistent=False)
        self.width = _MAX_LOG_ELAPSED / max(n_decay - 1, 1)

    def features(self, ts_ms: Tensor, t_ms: Tensor) -> Tensor:
        """The continuous features before projection: (B, L, n_time_features)."""
        u = log_elapsed_s(ts_ms, t_ms)  # (B, L)
        centres: Tensor = self.centres  # type: ignore[assignment]
        decay = torch.exp(-(((u[..., None] - centres) / self.width) ** 2))
        return torch.cat([decay, cyclic_features(ts_ms, self.n_harmonics)], -1)

    def forward(self, ts_ms: Tensor, t_ms: Tensor, mask: Tensor) -> Tensor:
        pos = position_from_newest(mask).clamp(max=self.max_positions - 1)  # (B, L)
        feats = self.features(ts_ms, t_ms).to(self.proj.weight.dtype)  # (B, L, F)
        return self.position(pos) + self.proj(feats)  # (B, L, D)


class RelativeTimeBias(nn.Module):
    """Learned per-head attention bias of the log-bucketed time between events.

    Starts at zero (no bias) and learns which time gaps should attend more.

    Shapes: ``forward(buckets (B, L, L) int64)`` -> (B, H, L, L).
    """

    def __init__(self, n_buckets: int, n_heads: int) -> None:
        super().__init__()
        self.table = nn.Embedding(n_buckets, n_heads)
        nn.init.zeros_(self.table.weight)

    def forward(self, buckets: Tensor) -> Tensor:
        bias = _GatherRows.apply(self.table.weight, buckets)  # (B, L, L, H)
        return bias.permute(0, 3, 1, 2)  # (B, H, L, L)


class _GatherRows(torch.autograd.Function):
    """``table[idx]`` for a small table and many indices.

    Same values and gradients as ``nn.Embedding``, but the backward is one
    ``index_add_`` into the few rows: the embedding's CPU backward sorts all
    ``B * L * L`` indices, which took a fifth of a training step.
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = table.shape[0]
        return table[idx]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        out = torch.zeros(
            ctx.rows, grad.shape[-1], dtype=grad.dtype, device=grad.device
        )
        out.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return out, None
