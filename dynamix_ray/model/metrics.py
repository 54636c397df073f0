"""Offline metrics of CTR predictions: normalized entropy (docs/contract.md §7) and AUC.

Both take logits or scores as numpy arrays or tensors and return a float;
both are computed in float64 numpy, so they are exact enough to compare arms.
At scale neither needs the rows in one place: NE from summed log loss, rows
and positives (:func:`ne_from_sums`), AUC from the mergeable per-label counts
of binned logits of :class:`ScoreHistogram`, with an exact bound on its error.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["ScoreHistogram", "auc", "ne_from_sums", "normalized_entropy"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def ne_from_sums(ll_sum: float, n: float, pos: float) -> float | None:
    """NE from sufficient sums: (summed log loss / rows) / base-rate entropy;
    ``None`` when the rows hold one class only (or none)."""
    if n == 0 or pos == 0 or pos == n:
        return None
    p = pos / n
    return (ll_sum / n) / float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


def normalized_entropy(logits: Any, labels: Any) -> float:
    """``NE = mean log loss / entropy of the base rate`` (DynamiX Eq. 10).

    Args:
        logits: (N,) predicted log-odds.
        labels: (N,) 0/1.
    Returns:
        NE (lower is better; 1.0 = predicting the base rate).
    Raises:
        ValueError: on empty input, mismatched lengths, or a base rate of 0 or 1
            (the entropy in the denominator is 0).
    """
    z, y = _np(logits), _np(labels)
    if z.shape != y.shape or z.size == 0:
        raise ValueError(
            f"normalized_entropy: need equal non-empty lengths, got logits {z.size} "
            f"and labels {y.size}"
        )
    p = float(y.mean())
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"normalized_entropy: base rate is {p}; NE needs both labels present"
        )
    log_loss = float(np.mean(np.logaddexp(0.0, z) - y * z))  # BCE with logits
    base_entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    return log_loss / base_entropy


def auc(scores: Any, labels: Any) -> float:
    """ROC AUC by ranks (Mann-Whitney U); tied scores share their mean rank.

    Args:
        scores: (N,) any monotone score (logits or probabilities).
        labels: (N,) 0/1.
    Raises:
        ValueError: when only one class is present.
    """
    s, y = _np(scores), _np(labels) > 0.5
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc: need both classes, got {n_pos} positives of {y.size}")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value
    mean_rank = first_rank + (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class ScoreHistogram:
    """Per-label counts of binned logits: an AUC that merges across workers.

    ``bins`` equal-width bins of the logit over ``[lo, hi]``; logits outside
    (``±inf`` included) fall into the end bins. Binning is monotone, so a
    positive in a higher bin than a negative has the higher logit: those pairs
    count exactly; pairs sharing a bin count 1/2, which is off by at most 1/2
    each (the exact AUC counts them 0, 1/2 on equal logits, or 1).

    Args:
        bins: number of bins (default ``2**14``: 0.0024 logit wide over
            [-20, 20]).
        lo, hi: the binned logit range.

    Example:
        >>> h = ScoreHistogram().add([2.0, -1.0, 0.5], [1, 0, 0])
        >>> h.auc()
        (1.0, 0.0)
    """

    def __init__(self, bins: int = 2**14, lo: float = -20.0, hi: float = 20.0) -> None:
        if bins < 1 or not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(
                f"ScoreHistogram: need bins >= 1 and finite lo < hi, got bins={bins}, "
                f"lo={lo}, hi={hi}"
            )
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self.pos = np.zeros(self.bins, dtype=np.int64)  # (bins,) positives
        self.neg = np.zeros(self.bins, dtype=np.int64)  # (bins,) negatives

    def bin_of(self, logits: Any) -> np.ndarray:
        """(N,) bin index of each logit (monotone in the logit).

        Raises:
            ValueError: on a NaN logit (it has no bin).
        """
        z = _np(logits)
        if np.isnan(z).any():
            raise ValueError(
                f"ScoreHistogram: {int(np.isnan(z).sum())} NaN logits of {z.size}"
            )
        scaled = (np.clip(z, self.lo, self.hi) - self.lo) * (
            self.bins / (self.hi - self.lo)
        )
        return np.minimum(np.floor(scaled), self.bins - 1).astype(np.intp)

    def add(self, logits: Any, labels: Any) -> ScoreHistogram:
        """Count rows (in place; returns ``self``).

        Args:
            logits: (N,) predicted log-odds.
            labels: (N,) 0/1 (``> 0.5`` is positive, as in :func:`auc`).
        """
        b, y = self.bin_of(logits), _np(labels) > 0.5
        if b.shape != y.shape:
            raise ValueError(f"ScoreHistogram.add: {b.size} logits but {y.size} labels")
        self.pos += np.bincount(b[y], minlength=self.bins)
        self.neg += np.bincount(b[~y], minlength=self.bins)
        return self

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """A new histogram of both histograms' rows (same bins required)."""
        if (self.bins, self.lo, self.hi) != (other.bins, other.lo, other.hi):
            raise ValueError(
                f"ScoreHistogram.merge: bins/lo/hi differ: "
                f"{(self.bins, self.lo, self.hi)} vs {(other.bins, other.lo, other.hi)}"
            )
        out = ScoreHistogram(self.bins, self.lo, self.hi)
        out.pos, out.neg = self.pos + other.pos, self.neg + other.neg
        return out

    __add__ = merge

    def to_array(self) -> np.ndarray:
        """(2 * bins,) int64 ``[pos..., neg...]``: sum it across workers
        (``torch.distributed.all_reduce``) and read it with :meth:`from_array`."""
        return np.concatenate([self.pos, self.neg])

    @classmethod
    def from_array(
        cls, counts: Any, lo: float = -20.0, hi: float = 20.0
    ) -> ScoreHistogram:
        """The histogram of :meth:`to_array` (or of a sum of them; float64
        arrays must hold non-negative whole numbers)."""
        c = np.asarray(counts).reshape(-1)
        if c.size % 2 or c.size == 0:
            raise ValueError(
                f"ScoreHistogram.from_array: need 2 * bins counts, got {c.size}"
            )
        if (c < 0).any() or not np.array_equal(c, np.round(c)):
            raise ValueError(
                "ScoreHistogram.from_array: counts must be non-negative whole numbers"
            )
        out = cls(c.size // 2, lo, hi)
        out.pos = c[: out.bins].astype(np.int64)
        out.neg = c[out.bins :].astype(np.int64)
        return out

    def auc(self) -> tuple[float | None, float]:
        """AUC with pairs sharing a bin counted 1/2, and its worst-case error.

        Returns:
            ``(auc, bound)``: ``|auc - exact AUC| <= bound``, with ``bound =
            0.5 * sum_b pos_b * neg_b / (P * N)``; both from exact integer
            sums, rounded once. ``(None, 0.0)`` when there are no positives or
            no negatives.
        """
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return None, 0.0
        neg_below = np.cumsum(self.neg) - self.neg  # (bins,) negatives in lower bins
        # Python ints: P * N reaches 1e20 at 1e10 rows, past int64
        wins = sum(map(operator.mul, self.pos.tolist(), neg_below.tolist()))
        shared = sum(map(operator.mul, self.pos.tolist(), self.neg.tolist()))
        pairs2 = 2 * n_pos * n_neg
        return (2 * wins + shared) / pairs2, shared / pairs2
