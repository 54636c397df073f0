"""Offline metrics of CTR predictions: normalized entropy (SPEC §7) and AUC.

Both take logits or scores as numpy arrays or tensors and return a float;
both are computed in float64 numpy, so they are exact enough to compare arms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["auc", "ne_from_sums", "normalized_entropy"]


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
