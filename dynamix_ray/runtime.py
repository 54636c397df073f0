"""Connecting to Ray: an existing cluster when ``RAY_ADDRESS`` is set, else a
local one. Nothing here runs at import time."""

from __future__ import annotations

import logging
import os

__all__ = ["ensure_ray", "cluster_cpus"]

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` once: joins ``RAY_ADDRESS`` if set, else starts a local Ray with
    ``num_cpus`` (default: all cores)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        log.info("connecting to Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=True)
    else:
        # address="local": a new local Ray even when another one runs on this
        # machine (plain ray.init() would join the last `ray start` cluster).
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
        )


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
