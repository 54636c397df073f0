"""Connecting to Ray, and running one small task per item (a bucket, an input
piece) on Ray Data or in-process. Nothing here runs at import time."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np

__all__ = [
    "cluster_cpus",
    "configure_logging",
    "apply_ray_log_levels",
    "ensure_ray",
    "map_items",
    "ray_logs_hint",
]

log = logging.getLogger(__name__)


#: Where a local Ray started for serving exports its Prometheus metrics
#: (``cluster.yaml`` starts every node with the same port): docs/serving.md.
METRICS_EXPORT_PORT = 8090


#: Whether Ray's worker and actor output is streamed to this terminal
#: (``log_to_driver``): off unless ``-v``; :func:`configure_logging` sets it.
_worker_logs = True
#: The level of Ray's driver-side loggers (``None``: as Ray sets them).
_ray_log_level: int | None = None

#: Ray's driver-side loggers that report routine progress at INFO.
_RAY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune")


def configure_logging(verbose: bool) -> None:
    """One place for what a command prints besides its results.

    Quiet (the default): this process logs warnings and errors only, Ray's
    worker and actor output goes to its session folder instead of the
    terminal (``ray_logs_hint`` says where), and Ray's own deprecation
    warnings are not shown. Errors are not hidden: a failed task, actor or
    training run raises here with its traceback. ``verbose``: info logs and
    Ray's worker output stream here, as Ray does by default.
    """
    global _worker_logs, _ray_log_level
    _worker_logs = verbose
    _ray_log_level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=_ray_log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel(_ray_log_level)
    apply_ray_log_levels()


def apply_ray_log_levels() -> None:
    """Set Ray's driver-side loggers to the chosen level. Ray, Ray Data and
    Serve configure their loggers (INFO) when imported, so this runs again
    after each import: in :func:`ensure_ray`, :func:`map_items` and where
    Serve starts. A no-op unless :func:`configure_logging` ran."""
    if _ray_log_level is None:
        return
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(_ray_log_level)
    quiet = _ray_log_level > logging.INFO
    # "Progress bars disabled": Ray Data's once-only advice about a pass run
    # with progress=False on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.ERROR if quiet else logging.NOTSET
    )
    if quiet:
        # Ray adds its own filter for its deprecation warnings when imported
        # (ray.util.annotations): ours goes in front of it again
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")


def _init_level() -> int:
    return logging.INFO if _ray_log_level is None else _ray_log_level


def ray_logs_hint() -> str | None:
    """Where this process's Ray keeps its logs (``None`` without Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private.worker import global_worker

        node = getattr(global_worker, "node", None)
        return f"{node.get_session_dir_path()}/logs" if node else None
    except Exception:  # noqa: BLE001 - a hint, never an error of its own
        return None


def ensure_ray(num_cpus: int | None = None, serving: bool = False) -> None:
    """``ray.init`` once: joins ``RAY_ADDRESS`` if set, else starts a local Ray with
    ``num_cpus`` (default: all cores). ``serving``: the local Ray runs its
    dashboard on 127.0.0.1 (``serve status`` and the dashboard's Serve view
    need it) and exports metrics on :data:`METRICS_EXPORT_PORT`."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        log.info("connecting to Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=_worker_logs, logging_level=_init_level())
    else:
        # address="local": a new local Ray even when another one runs on this
        # machine (plain ray.init() would join the last `ray start` cluster).
        extra: dict[str, Any] = (
            {
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "_metrics_export_port": METRICS_EXPORT_PORT,
            }
            if serving
            else {"include_dashboard": False}
        )
        ray.init(
            address="local",
            num_cpus=num_cpus,
            log_to_driver=_worker_logs,
            logging_level=_init_level(),
            **extra,
        )
    apply_ray_log_levels()


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1); connects first
    (:func:`ensure_ray`) when this process has no Ray yet."""
    import ray

    ensure_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_one(batch: dict[str, np.ndarray], fn: Callable, fn_args: tuple) -> dict:
    """Ray Data map: one JSON item in, one pickled result out (and the seconds
    the item took in its worker)."""
    out, took = [], []
    for s in batch["item"]:
        t0 = time.perf_counter()
        out.append(pickle.dumps(fn(json.loads(str(s)), *fn_args)))
        took.append(time.perf_counter() - t0)
    return {"result": np.array(out, dtype=object), "task_s": np.array(took)}


def map_items(
    fn: Callable[..., Any],
    items: Sequence[dict[str, Any]],
    fn_args: tuple = (),
    *,
    local: bool = False,
    name: str = "tasks",
    progress: bool = True,
    stats: dict[str, float] | None = None,
) -> Iterator[Any]:
    """``fn(item, *fn_args)`` once per item, one Ray Data task each; yields the
    results in item order as they arrive, so the caller can fold them into a
    running total instead of holding them all.

    Items are JSON-able dicts (paths, bucket ids); results should be small
    summaries (the work writes its output to storage itself). ``local`` runs
    every item in this process instead (for ``memory://``, which Ray workers
    cannot see). Ray Data retries a failed task; ``fn`` must therefore write
    its output under names derived from its item only, so that a retry
    overwrites instead of duplicating.

    ``stats``, when given, receives ``tasks``, ``wall_s`` and ``task_s`` (the
    items' summed seconds in their workers): ``task_s / wall_s`` over the CPUs
    is how busy the pass kept them, and a task time that grows with the node
    count points at contention rather than at a serial part.
    """
    t0 = time.perf_counter()
    task_s = 0.0
    say = log.info if progress else log.debug
    if local or not items:
        for i, item in enumerate(items):
            t_item = time.perf_counter()
            result = fn(item, *fn_args)
            task_s += time.perf_counter() - t_item
            yield result
            say("%s: %d/%d (%.1f s)", name, i + 1, len(items), time.perf_counter() - t0)
        _fill(stats, len(items), time.perf_counter() - t0, task_s)
        return
    import ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    saved = (
        ctx.execution_options.preserve_order,
        ctx.enable_progress_bars,
        ctx.print_on_execution_start,
        ctx.op_resource_reservation_enabled,
    )
    # the context is captured when the dataset is created: set it first
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    # one operator of equal tasks: a per-operator CPU reservation only idles
    # cores (the segmentation measured 3.1 s -> 2.0 s without it, 2 CPUs)
    ctx.op_resource_reservation_enabled = False
    apply_ray_log_levels()
    data_log = logging.getLogger("ray.data")
    data_level = data_log.level
    if not progress:  # no "Dataset ... execution finished" line per pass
        data_log.setLevel(max(data_level, logging.WARNING))
    try:
        ds = ray.data.from_items(
            [{"item": json.dumps(it)} for it in items], override_num_blocks=len(items)
        ).map_batches(
            cast(Any, _run_one),
            fn_args=(fn, fn_args),
            batch_size=1,
            batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            task_s += float(np.sum(batch["task_s"]))
            for blob in batch["result"]:
                yield pickle.loads(blob)
    finally:
        (
            ctx.execution_options.preserve_order,
            ctx.enable_progress_bars,
            ctx.print_on_execution_start,
            ctx.op_resource_reservation_enabled,
        ) = saved
        data_log.setLevel(data_level)
    wall = time.perf_counter() - t0
    _fill(stats, len(items), wall, task_s)
    say("%s: %d done (%.1f s; tasks %.1f s in all)", name, len(items), wall, task_s)


def _fill(stats: dict[str, float] | None, n: int, wall: float, task_s: float) -> None:
    if stats is not None:
        stats.update(tasks=n, wall_s=round(wall, 3), task_s=round(task_s, 3))
