"""The model's batch: typed, so that a missing or misspelt field fails where
it is built, not deep in a forward pass.

``features.to_model_batch`` builds one from the loader's flat columns;
serving and the tests build them the same way. Histories are newest last,
padded to the batch's widest row (``SourceBatch.mask`` says which slots hold
an event); a row may have no events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["ModelBatch", "SourceBatch"]


@dataclass
class SourceBatch:
    """One history source of a batch, every tensor (B, L).

    Attributes:
        mask: bool, True where a slot holds an event.
        ts_ms: int64 event times (epoch ms).
        attrs: int64 attribute ids by attribute name (only those loaded).
        dwell: float32 ln(1 + dwell ms), or ``None`` when not loaded.
    """

    mask: Tensor
    ts_ms: Tensor
    attrs: dict[str, Tensor] = field(default_factory=dict)
    dwell: Tensor | None = None

    def map(self, f: Callable[[Tensor], Tensor]) -> SourceBatch:
        """``f`` applied to every tensor."""
        return SourceBatch(
            mask=f(self.mask),
            ts_ms=f(self.ts_ms),
            attrs={a: f(v) for a, v in self.attrs.items()},
            dwell=None if self.dwell is None else f(self.dwell),
        )

    def rows(self, index: Any) -> SourceBatch:
        """The rows ``index`` (a tensor of row numbers, a slice or a mask)."""
        return self.map(lambda t: t[index])

    def to(self, device: Any) -> SourceBatch:
        return self.map(lambda t: t.to(device))


@dataclass
class ModelBatch:
    """B rows for ``DynamixCTR``.

    Attributes:
        t_ms: (B,) int64 request / impression times.
        cand: (B,) int64 candidate attribute ids by attribute name.
        hist: the history sources present, by source name.
        label: (B,) float32 clicks-to-conversion labels (training only).
        alure: (B, E) float32 external user embedding, when the model takes one.
    """

    t_ms: Tensor
    cand: dict[str, Tensor] = field(default_factory=dict)
    hist: dict[str, SourceBatch] = field(default_factory=dict)
    label: Tensor | None = None
    alure: Tensor | None = None

    def __len__(self) -> int:
        return int(self.t_ms.shape[0])

    def map(self, f: Callable[[Tensor], Tensor]) -> ModelBatch:
        """``f`` applied to every tensor of every field."""
        return ModelBatch(
            t_ms=f(self.t_ms),
            cand={a: f(v) for a, v in self.cand.items()},
            hist={s: h.map(f) for s, h in self.hist.items()},
            label=None if self.label is None else f(self.label),
            alure=None if self.alure is None else f(self.alure),
        )

    def rows(self, index: Any) -> ModelBatch:
        """The rows ``index`` of every field."""
        return self.map(lambda t: t[index])

    def to(self, device: Any) -> ModelBatch:
        return self.map(lambda t: t.to(device))

    def replace(self, **changes: Any) -> ModelBatch:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
