"""Hashed attribute embeddings.

Raw ids are int64 and may be huge (ad ids, content ids); each attribute hashes
them into a fixed number of buckets. Row 0 of every table is the padding row:
padded events index it whatever their raw id, so padding carries no information.
Small enums (media type, surface, position, conversion kind) skip the hash and
take ``id mod (buckets - 1) + 1`` so their few values never collide.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from dynamix_ray.io import SPLITMIX64, splitmix64
from dynamix_ray.model.config import ModelConfig

__all__ = [
    "AttributeEmbeddings",
    "HashEmbedding",
    "hash_ids",
    "hash_ids_reference",
]

_U64 = 1 << 64


def _i64(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned constant ``c``."""
    return c - _U64 if c >= 1 << 63 else c


_GOLDEN, _MUL1, _MUL2 = (_i64(c) for c in SPLITMIX64)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (``>>`` on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash_ids(ids: Tensor) -> Tensor:
    """splitmix64 finaliser of int64 ids, element-wise, wrapping like uint64.

    Deterministic across devices and runs; equals :func:`hash_ids_reference`.

    Args:
        ids: int64 tensor of any shape.
    Returns:
        int64 tensor, same shape (the uint64 hash's bits).
    """
    z = ids.long() + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def hash_ids_reference(ids: np.ndarray) -> np.ndarray:
    """The plain numpy form of :func:`hash_ids` (``io.splitmix64``, the
    project's one hash; returns the int64 bits)."""
    return splitmix64(ids).view(np.int64)


class HashEmbedding(nn.Module):
    """An embedding table indexed by hashed raw ids; row 0 is padding.

    Args:
        num_buckets: rows, including the padding row 0.
        dim: embedding width.
        direct: index by ``id mod (num_buckets - 1) + 1`` instead of the hash.

    Shapes: ``forward(ids (...,) int64, mask (...,) bool | None)`` -> (..., dim).
    """

    def __init__(self, num_buckets: int, dim: int, direct: bool = False) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.direct = direct
        self.table = nn.Embedding(num_buckets, dim, padding_idx=0)

    def index(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Row of each id: 1..num_buckets-1 for real events, 0 where ``mask`` is False."""
        ids = ids.long()
        keyed = ids if self.direct else hash_ids(ids)
        idx = torch.remainder(keyed, self.num_buckets - 1) + 1
        if mask is not None:
            idx = torch.where(mask, idx, torch.zeros_like(idx))
        return idx

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.table(self.index(ids, mask))


class AttributeEmbeddings(nn.Module):
    """One table per attribute name, shared by every source and the candidate.

    An ``ad_id`` in the history and the candidate's ``ad_id`` look up the same
    row, which is what lets target attention match them.

    Args:
        cfg: bucket counts, ``emb_dim`` and the attributes (``cfg.id_attrs``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tables = nn.ModuleDict(
            {
                a: HashEmbedding(cfg.buckets(a), cfg.emb_dim, a in cfg.direct_attrs)
                for a in cfg.id_attrs
            }
        )

    def __getitem__(self, attr: str) -> HashEmbedding:
        return self.tables[attr]  # type: ignore[return-value]

    def __contains__(self, attr: str) -> bool:
        return attr in self.tables
