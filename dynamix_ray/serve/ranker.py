"""Rankers: one checkpoint, one feature policy, one segment.

:class:`Ranker` is the plain core (no Ray): it holds a model, the feature set
its policy gives its segment, and the users' histories
(:class:`~dynamix_ray.histories.HistoryStore`), and scores a batch of requests
in one forward pass. Each request's history is encoded once and shared by its
candidates (``DynamixCTR.forward(..., user_index=...)``), so a request costs one
history encoding plus, per candidate, the target attention and the head.

:class:`RankerDeployment` is its Ray Serve wrapper: ``@serve.batch`` gathers
concurrent requests, the forward pass runs off the event loop, and it counts
what reached the model (``stats``) and exports batch sizes through
``ray.util.metrics``. The app deploys it twice, as ``ActiveRanker`` and
``PassiveRanker``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
from ray import serve

from dynamix_ray.features import policy_features, to_model_batch
from dynamix_ray.histories import HistoryStore
from dynamix_ray.loader import features_of
from dynamix_ray.model.checkpoint import (
    load_checkpoint,
    model_version,
    resolve_checkpoint,
)
from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
from dynamix_ray.online import RedisHistories, is_redis_url

__all__ = ["CANDIDATE_ATTRIBUTES", "Ranker", "RankerDeployment", "score_isolated"]

SEGMENT_NAMES = {0: "passive", 1: "active"}

log = logging.getLogger("ray.serve")


class Ranker:
    """Scores candidates for users of one segment.

    Args:
        checkpoint: a checkpoint folder or a ``dynamix train`` OUT.
        histories: the users' histories.
        segment: 1 active, 0 passive: which side of the policy applies.
        policy, removed: default to the checkpoint's.
        device: torch device.
    """

    def __init__(
        self,
        checkpoint: str,
        histories: HistoryStore | Any,
        segment: int,
        policy: str | None = None,
        removed: Sequence[str] | None = None,
        device: str = "cpu",
    ) -> None:
        ckpt = resolve_checkpoint(checkpoint)
        self.model, self.model_cfg, meta = load_checkpoint(ckpt)
        self.device = device
        self.model.to(device)
        self.segment = segment
        self.policy = policy or meta.get("policy") or "baseline"
        self.removed = tuple(
            removed if removed is not None else meta.get("removed") or ()
        )
        if self.policy.startswith("remove-") and not self.removed:
            raise ValueError(
                f"policy {self.policy} needs the removed attributes; the checkpoint "
                f"{ckpt} records none, so pass `removed`"
            )
        # the sample settings the model was trained with, from its checkpoint
        self.samples = meta["samples"]
        if histories.max_seq_len < self.samples.max_seq_len:
            raise ValueError(
                f"the histories hold {histories.max_seq_len} events per source, "
                f"the checkpoint {ckpt} was trained on {self.samples.max_seq_len}: "
                "re-run `dynamix histories` with --max-seq-len "
                f"{self.samples.max_seq_len} or more"
            )
        self.histories = histories
        self.features = policy_features(
            self.policy, segment, self.removed, features_of(histories.attributes())
        )
        self.model_version = model_version(ckpt)

    def batch(
        self,
        user_ids: Sequence[int],
        ts_ms: Sequence[int],
        candidates: Sequence[np.ndarray],
    ) -> tuple[Any, Any]:
        """The model's input for requests: the users' histories as a
        ``ModelBatch`` (U user rows, every candidate row) and ``user_index``
        (B,), which user row each candidate belongs to. Arguments as
        :meth:`score`."""
        import torch

        counts = np.array([len(c) for c in candidates], np.int64)
        t_ms = np.asarray(ts_ms, np.int64)
        # as in training (docs/contract.md §6, gather.history_window): the last L events
        # before t - buffer, also when a request's ts is before the snapshot's
        cols = self.histories.rows(
            np.asarray(user_ids, np.int64),
            t_ms,
            self.features,
            self.samples.buffer_ms,
            self.samples.lengths(),
        )
        cols["t_ms"] = t_ms
        cand = np.concatenate(candidates).astype(np.int64, copy=False)
        for j, a in enumerate(CANDIDATE_ATTRIBUTES):
            cols[f"cand.{a}"] = cand[:, j]
        index = torch.as_tensor(
            np.repeat(np.arange(len(counts)), counts), device=self.device
        )
        return to_model_batch(cols, self.device), index

    def score(
        self,
        user_ids: Sequence[int],
        ts_ms: Sequence[int],
        candidates: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """Click/conversion probabilities, one (C_i,) array per request.

        Args:
            user_ids, ts_ms: (R,) the requests' users and instants.
            candidates: R arrays (C_i, len(CANDIDATE_ATTRIBUTES)) int64, columns
                in ``CANDIDATE_ATTRIBUTES`` order.
        """
        import torch

        batch, index = self.batch(user_ids, ts_ms, candidates)
        with torch.inference_mode():
            logits = self.model(batch, self.features, user_index=index)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        counts = [len(c) for c in candidates]
        return np.split(probs, np.cumsum(counts)[:-1])


def score_isolated(
    score: Callable[[list[int], list[int], list[np.ndarray]], list[np.ndarray]],
    user_ids: list[int],
    ts_ms: list[int],
    candidates: list[np.ndarray],
    name: str = "ranker",
) -> list[np.ndarray | Exception]:
    """``score`` of a batch in one pass; when that raises, each request is
    scored alone, so a bad request gets its own error (logged with its
    traceback) and its batch mates still get their scores."""
    try:
        return list(score(user_ids, ts_ms, candidates))
    except Exception as e:  # noqa: BLE001 - isolate the request that raised
        if len(user_ids) == 1:
            log.error("%s: a request failed", name, exc_info=e)
            return [e]
    out: list[np.ndarray | Exception] = []
    for u, t, c in zip(user_ids, ts_ms, candidates, strict=True):
        try:
            out.append(score([u], [t], [c])[0])
        except Exception as e:  # noqa: BLE001 - this request's own failure
            log.error("%s: a request failed", name, exc_info=e)
            out.append(e)
    return out


def open_histories(url: str, shared: bool = True) -> Any:
    """The rankers' features: a Redis online store (``redis://...``, fresh,
    :mod:`dynamix_ray.online`), else a published snapshot, memory-mapped from
    one copy per node (``shared``) or read into this process."""
    from dynamix_ray.histories import open_shared_histories, read_histories

    if is_redis_url(url):
        return RedisHistories.connect(url)
    return open_shared_histories(url) if shared else read_histories(url)


class RankerDeployment:
    """Ray Serve replica around :class:`Ranker` (deployed as ``ActiveRanker``
    and ``PassiveRanker`` by :func:`dynamix_ray.serve.app.build_app`)."""

    def __init__(self, spec: dict[str, Any], histories: str, segment: int) -> None:
        import torch
        from ray.util import metrics

        torch.set_num_threads(int(spec.get("torch_threads", 1)))
        use_gpu = bool(spec.get("use_gpu")) and torch.cuda.is_available()
        self.name = f"{SEGMENT_NAMES[segment].capitalize()}Ranker"
        self.ranker = Ranker(
            spec["checkpoint"],
            open_histories(histories, bool(spec.get("shared_histories", True))),
            segment,
            spec.get("policy"),
            spec.get("removed"),
            "cuda" if use_gpu else "cpu",
        )
        batched = cast(Any, self)._rank_batch
        batched.set_max_batch_size(int(spec.get("max_batch_size", 8)))
        batched.set_batch_wait_timeout_s(float(spec.get("batch_wait_timeout_s", 0.0)))
        self._lock = threading.Lock()
        self.requests = self.rows = self.batches = 0
        tags = {"deployment": self.name}
        self._batch_requests = metrics.Histogram(
            "dynamix_ranker_batch_requests",
            "Requests per model forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("deployment",),
        )
        self._batch_rows = metrics.Histogram(
            "dynamix_ranker_batch_rows",
            "Candidate rows per model forward pass.",
            boundaries=[10, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
            tag_keys=("deployment",),
        )
        self._forward_ms = metrics.Histogram(
            "dynamix_ranker_forward_ms",
            "Wall time of one model forward pass (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            tag_keys=("deployment",),
        )
        for m in (self._batch_requests, self._batch_rows, self._forward_ms):
            m.set_default_tags(tags)

    def _score(
        self, user_ids: list[int], ts_ms: list[int], candidates: list[np.ndarray]
    ) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = self.ranker.score(user_ids, ts_ms, candidates)
        ms = 1000 * (time.perf_counter() - t0)
        n_rows = int(sum(len(c) for c in candidates))
        with self._lock:
            self.requests += len(user_ids)
            self.rows += n_rows
            self.batches += 1
        self._batch_requests.observe(len(user_ids))
        self._batch_rows.observe(n_rows)
        self._forward_ms.observe(ms)
        return out

    async def rank(
        self, user_id: int, ts_ms: int, candidates: np.ndarray
    ) -> dict[str, Any]:
        """One request: ``(user_id, ts_ms, (C, A) int64)`` -> ``{"scores",
        "model_version", "policy"}``; concurrent calls share a forward pass.
        Raises this request's own error only."""
        out = await cast(Any, self)._rank_batch(user_id, ts_ms, candidates)
        if isinstance(out, BaseException):
            raise out
        return cast(dict[str, Any], out)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # type: ignore[arg-type]
    async def _rank_batch(  # type: ignore[misc]
        self, user_ids: list[int], ts_ms: list[int], candidates: list[np.ndarray]
    ) -> list[dict[str, Any] | Exception]:
        """A batch of requests in one forward pass (:func:`score_isolated`)."""
        scores = await asyncio.to_thread(
            score_isolated, self._score, user_ids, ts_ms, candidates, self.name
        )
        return [
            s
            if isinstance(s, Exception)
            else {
                "scores": s.tolist(),
                "model_version": self.ranker.model_version,
                "policy": self.ranker.policy,
            }
            for s in scores
        ]

    def stats(self) -> dict[str, Any]:
        """What reached the model: requests, candidate rows, forward passes."""
        with self._lock:
            return {
                "deployment": self.name,
                "requests": self.requests,
                "rows": self.rows,
                "batches": self.batches,
                "policy": self.ranker.policy,
                "model_version": self.ranker.model_version,
            }
