"""Per-user, per-window segmentation: kernel (``stats``), epsilon, Ray pipeline."""

from dynamix_ray.segments.epsilon import calibrate_epsilon
from dynamix_ray.segments.stats import (
    STAT_COLUMNS,
    compute_stats,
    finalize,
    merge_stats,
    reference_stats,
    window_origin_ms,
)

__all__ = [
    "STAT_COLUMNS",
    "calibrate_epsilon",
    "compute_stats",
    "finalize",
    "merge_stats",
    "reference_stats",
    "window_origin_ms",
]
