"""The router's segment store: who is active at an instant, in compact numpy.

Plain numpy (no Ray, no Serve). docs/contract.md §5: a request's segment is the one of the
user's latest window that ended at or before the request's ``ts``; users with
none are passive.

Compaction: a window whose segment equals the user's previous window's (or,
for the first window, passive) never changes an answer, so only the windows
where a user's segment *changes* are kept. Three arrays sorted by (user,
window end): ``user_id`` int64, ``window_end_ms`` int64, ``segment`` int8.

Publishing: ``dynamix segment`` writes a new version of ``OUT/segments/``
and publishes it by its pointer (``io.publish``); the store's version is the
pointer's. :class:`SegmentStore` objects never change; a reloader builds a new
one and swaps the reference. :class:`TableWatch` is that reloader's plain
core: which version to try when, and whether the app is healthy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from dynamix_ray.gather import last_at_or_before
from dynamix_ray.io import resolve

__all__ = [
    "SegmentStore",
    "TableWatch",
    "compact_changes",
    "read_segment_store",
    "segments_version",
]


def compact_changes(
    user_id: np.ndarray, window_end_ms: np.ndarray, segment: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows, sorted by (user, window end), where a user's segment changes
    (from passive before the first window). Answers are the same as the full
    table's."""
    uid = np.asarray(user_id, np.int64)
    end = np.asarray(window_end_ms, np.int64)
    seg = np.asarray(segment, np.int8)
    order = np.lexsort((end, uid))
    uid, end, seg = uid[order], end[order], seg[order]
    first = np.r_[True, uid[1:] != uid[:-1]] if len(uid) else np.zeros(0, bool)
    prev = np.r_[np.int8(0), seg[:-1]] if len(seg) else seg
    prev = np.where(first, np.int8(0), prev)
    keep = seg != prev
    return uid[keep], end[keep], seg[keep]


@dataclass(frozen=True)
class SegmentStore:
    """Immutable; build with :meth:`from_rows` or :func:`read_segment_store`."""

    user_id: np.ndarray  # (S,) int64, sorted with window_end_ms
    window_end_ms: np.ndarray  # (S,) int64
    segment: np.ndarray  # (S,) int8
    version: str = ""
    source_rows: int = 0
    users_with_changes: int = 0
    published_ms: int = 0

    @classmethod
    def from_rows(
        cls,
        user_id: np.ndarray,
        window_end_ms: np.ndarray,
        segment: np.ndarray,
        version: str = "",
        published_ms: int = 0,
    ) -> SegmentStore:
        bad = np.setdiff1d(np.unique(np.asarray(segment)), (0, 1))
        if len(bad):
            raise ValueError(f"segment values {bad.tolist()}; expected 0 or 1")
        u, e, s = compact_changes(user_id, window_end_ms, segment)
        n_users = int((np.diff(u) != 0).sum() + 1) if len(u) else 0  # u is sorted
        return cls(u, e, s, version, len(np.asarray(user_id)), n_users, published_ms)

    def lookup(self, user_ids: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """(N,) int8 segments of users at instants (0 passive, 1 active)."""
        q = np.atleast_1d(np.asarray(user_ids, np.int64))
        t = np.broadcast_to(np.asarray(ts_ms, np.int64), q.shape)
        # the training rule (samples.segment_at) on the compacted rows
        return last_at_or_before(
            self.user_id, self.window_end_ms, self.segment, q, t, np.int8(0)
        )

    def segment_of(self, user_id: int, ts_ms: int) -> int:
        return int(self.lookup(np.array([user_id]), np.array([ts_ms]))[0])

    @property
    def nbytes(self) -> int:
        return self.user_id.nbytes + self.window_end_ms.nbytes + self.segment.nbytes

    def summary(self) -> dict[str, object]:
        return {
            "version": self.version,
            "published_ms": self.published_ms,
            "rows": int(self.source_rows),
            "change_rows": len(self.user_id),
            "users_with_changes": self.users_with_changes,
            "bytes": int(self.nbytes),
        }


def segments_version(url: str) -> str | None:
    """The published version of ``OUT/segments/`` (``None`` while none is)."""
    from dynamix_ray.io import current_version

    fs, root = resolve(url)
    ptr = current_version(fs, root, "segments")  # other errors reach the caller
    return None if ptr is None else str(ptr["version"])


def read_segment_store(url: str) -> SegmentStore:
    """The :class:`SegmentStore` of the published version of a ``dynamix
    segment`` output root.

    Raises:
        FileNotFoundError: no published segment table.
        io.IncompleteTable: the version's files are not the ones published.
    """
    from dynamix_ray.samples import segment_rows
    from dynamix_ray.segments.pipeline import read_segments, segments_pointer

    ptr = segments_pointer(url)
    rows = segment_rows(read_segments(url, ptr))
    return SegmentStore.from_rows(
        rows["user_id"],
        rows["window_end_ms"],
        rows["segment"],
        str(ptr["version"]),
        int(ptr.get("published_ms", 0)),
    )


T = TypeVar("T")
log = logging.getLogger("ray.serve")


@dataclass
class TableWatch(Generic[T]):
    """Which published table to serve, and whether that is healthy.

    Plain state, no threads: :meth:`poll` is called every reload interval
    with the published version; it reads a new one with ``read`` and swaps
    it in, or keeps the current table when the read fails. A version that
    failed is retried with exponential backoff (``retry_s * 2**failures``, at
    most ``max_retry_s``), not re-read every poll. :meth:`health` is what
    ``/healthz`` answers: healthy only when a table is loaded, the last
    ``max_failures`` reloads did not all fail, and the table is younger than
    ``max_age_s``. Error texts are kept for the logs; callers see the type.
    """

    read: Callable[[], T]
    version_of: Callable[[T], str]
    published_ms_of: Callable[[T], int]
    retry_s: float = 10.0
    max_retry_s: float = 600.0
    max_failures: int = 3
    max_age_s: float | None = None
    clock: Callable[[], float] = time.time
    current: T | None = None
    reloads: int = 0
    failures: int = 0  # consecutive failed reloads
    total_failures: int = 0
    last_error: str | None = None  # for the logs: may name paths
    last_error_type: str | None = None
    _failed: dict[str, tuple[int, float]] = field(default_factory=dict)

    def poll(self, published: str | None) -> bool:
        """Load ``published`` if it is new and not backing off; ``True`` when
        a new table was swapped in."""
        if published is None or (
            self.current is not None and published == self.version_of(self.current)
        ):
            return False
        tries, not_before = self._failed.get(published, (0, 0.0))
        now = self.clock()
        if now < not_before:
            return False
        try:
            table = self.read()
        except Exception as e:  # noqa: BLE001 - keep serving the old table
            self.note_failure(e, published, tries, now)
            return False
        self.current = table  # one assignment: readers see the old or the new
        self.reloads += 1
        self.failures = 0
        self._failed.pop(published, None)
        return True

    def refresh(self, version: Callable[[], str | None], name: str) -> bool:
        """One reload check: the published version (``version()``, whose
        errors count as failed reloads), then :meth:`poll`; logged as
        ``name``. What the router's and the retriever's pollers call."""
        try:
            published = version()
        except Exception as e:  # noqa: BLE001 - the store is down: keep serving
            self.note_failure(e, None)
            log.warning("%s: cannot read the pointer: %s", name, e)
            return False
        swapped = self.poll(published)
        if swapped:
            log.info("%s: now version %s", name, published)
        elif self.last_error and published in self._failed:
            log.warning(
                "%s: version %s failed to load, keeping the old table: %s",
                name,
                published,
                self.last_error,
            )
        return swapped

    def note_failure(
        self, err: Exception, version: str | None, tries: int = 0, now: float = 0.0
    ) -> None:
        self.failures += 1
        self.total_failures += 1
        self.last_error = f"{type(err).__name__}: {err}"
        self.last_error_type = type(err).__name__
        if version is not None:
            wait = min(self.max_retry_s, self.retry_s * 2**tries)
            self._failed[version] = (tries + 1, (now or self.clock()) + wait)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, body)``; ``body`` names no path and no error text."""
        body: dict[str, Any] = {
            "reloads": self.reloads,
            "consecutive_failures": self.failures,
            "failures": self.total_failures,
            "last_error_type": self.last_error_type,
        }
        if self.current is None:
            return False, {**body, "reason": "no table is loaded"}
        age_s = max(0.0, self.clock() - self.published_ms_of(self.current) / 1000)
        body.update(version=self.version_of(self.current), age_s=round(age_s, 1))
        if self.failures >= self.max_failures:
            return False, {
                **body,
                "reason": f"the last {self.failures} reloads failed",
            }
        if self.max_age_s is not None and age_s > self.max_age_s:
            return False, {
                **body,
                "reason": f"the table is {age_s:.0f} s old (bound {self.max_age_s:.0f} s)",
            }
        return True, body
