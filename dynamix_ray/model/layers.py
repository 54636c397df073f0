"""Building blocks: a linear layer over any subset of named inputs, and masked
attention (self, target, pooling) that never reads padding and never yields NaN.

``SlicedLinear`` is how a narrower ``FeatureSet`` saves compute: it multiplies
the concatenation of the inputs it is given by only their columns of the weight,
``F.linear(cat(used), W[:, used_cols], b)``. Because a missing input would have
contributed ``W[:, cols] @ 0``, the result equals the full layer applied with
zeros in place of the missing inputs (``tests/test_model.py`` checks this).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionPool",
    "MultiHeadSelfAttention",
    "SlicedLinear",
    "TargetAttention",
    "masked_softmax",
]


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis that gives padded keys exactly zero weight.

    A row with no real key gets all-zero weights (not NaN).

    Args:
        scores: (..., Lk) attention logits.
        mask: bool, broadcastable to ``scores``; True = real key.
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, -1).masked_fill(~mask, 0.0)


class SlicedLinear(nn.Module):
    """``nn.Linear`` over the concatenation of named inputs, any subset given.

    Args:
        inputs: ``(name, width)`` of every input the layer may ever see; their
            order is the column order of ``weight``.
        out_features: output width.
        label: what the layer belongs to, for error messages.

    Shapes: ``forward({name: (..., width)})`` -> (..., out_features).

    Example:
        >>> lin = SlicedLinear([("a", 2), ("b", 3)], 4)
        >>> lin({"b": torch.ones(5, 3)}).shape  # multiplies by 3 columns only
        torch.Size([5, 4])
    """

    def __init__(
        self, inputs: Sequence[tuple[str, int]], out_features: int, label: str = ""
    ) -> None:
        super().__init__()
        self.label = label
        self.names = tuple(n for n, _ in inputs)
        self.widths = {n: w for n, w in inputs}
        self.offsets: dict[str, int] = {}
        offset = 0
        for n, w in inputs:
            self.offsets[n] = offset
            offset += w
        self.in_features = offset
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, offset))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        bound = 1 / math.sqrt(offset) if offset else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    def ordered(self, names: Sequence[str]) -> tuple[str, ...]:
        """``names`` in column order; an unknown name is an error."""
        unknown = [n for n in names if n not in self.widths]
        if unknown:
            raise ValueError(
                f"{self.label or 'SlicedLinear'}: no weights for {unknown}; "
                f"the model was built with {list(self.names)}"
            )
        wanted = set(names)
        return tuple(n for n in self.names if n in wanted)

    def columns(self, names: Sequence[str]) -> list[slice]:
        """Column slices of ``names`` in column order, adjacent ones merged."""
        out: list[slice] = []
        for n in self.ordered(names):
            start, stop = self.offsets[n], self.offsets[n] + self.widths[n]
            if out and out[-1].stop == start:
                out[-1] = slice(out[-1].start, stop)
            else:
                out.append(slice(start, stop))
        return out

    def forward(self, parts: Mapping[str, Tensor]) -> Tensor:
        names = self.ordered(list(parts))
        if not names:
            raise ValueError(f"{self.label or 'SlicedLinear'}: no inputs given")
        x = torch.cat([parts[n] for n in names], -1)  # (..., sum of used widths)
        cols = self.columns(names)
        if len(cols) == 1:
            w = self.weight[:, cols[0]]  # a view: no copy when contiguous columns
        else:
            w = torch.cat([self.weight[:, c] for c in cols], 1)
        return F.linear(x, w, self.bias)  # (..., out_features)


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, L, D) -> (B, H, L, D/H)."""
    b, length, d = x.shape
    return x.view(b, length, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, H, L, D/H) -> (B, L, D)."""
    b, h, length, dh = x.shape
    return x.transpose(1, 2).reshape(b, length, h * dh)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with a key padding mask and an additive score bias.

    Shapes: ``forward(x (B, L, D), mask (B, L) bool, bias (B, H, L, L) | None)``
    -> (B, L, D). Padded keys get zero weight; a row without real events
    attends to nothing and yields ``out.bias`` (its slots are padding anyway).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        d = x.shape[-1]
        q, k, v = (_heads(t, self.n_heads) for t in self.qkv(x).split(d, -1))
        q = q * (d // self.n_heads) ** -0.5  # (B, H, L, dh)
        scores = q @ k.transpose(-2, -1)  # (B, H, L, L)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        w = masked_softmax(scores, mask[:, None, None, :])  # (B, H, L, L)
        return self.out(_merge(w.to(v.dtype) @ v))  # (B, L, D)


class TargetAttention(nn.Module):
    """A query vector (the candidate ad) attends over an encoded history.

    Shapes: ``forward(query (B, D), keys (U, L, D), mask (U, L), user_index
    (B,))`` -> (B, D); without ``user_index``, U = B (one history a query).
    The keys' K/V projection depends on the history alone, so serving runs it
    once per user row and only gathers it per candidate. A row without real
    events gives exactly zeros.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        mask: Tensor,
        user_index: Tensor | None = None,
    ) -> Tensor:
        d = keys.shape[-1]
        q = _heads(self.q(query)[:, None, :], self.n_heads)  # (B, H, 1, dh)
        q = q * (d // self.n_heads) ** -0.5
        k, v = (_heads(t, self.n_heads) for t in self.kv(keys).split(d, -1))
        if user_index is not None:  # (U, H, L, dh) -> (B, H, L, dh)
            k, v, mask = k[user_index], v[user_index], mask[user_index]
        w = masked_softmax(q @ k.transpose(-2, -1), mask[:, None, None, :])
        y = self.out(_merge(w.to(v.dtype) @ v)[:, 0])  # (B, D)
        return y * mask.any(-1, keepdim=True).to(y.dtype)


class AttentionPool(nn.Module):
    """Pool a sequence with a learned query per head (no candidate involved).

    Shapes: ``forward(x (B, L, D), mask (B, L))`` -> (B, D); a row without real
    events gives exactly zeros.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Parameter(torch.randn(n_heads, d_model // n_heads, 1) * 0.1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        xh = _heads(x, self.n_heads)  # (B, H, L, dh)
        scores = (xh @ self.query.to(xh.dtype)).transpose(-2, -1)  # (B, H, 1, L)
        w = masked_softmax(scores, mask[:, None, None, :])
        return _merge(w.to(xh.dtype) @ xh)[:, 0]  # (B, D)
