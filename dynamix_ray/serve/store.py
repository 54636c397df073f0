"""The router's segment store: who is active at an instant, in compact numpy.

Plain numpy (no Ray, no Serve). SPEC §5: a request's segment is the one of the
user's latest window that ended at or before the request's ``ts``; users with
none are passive.

Compaction: a window whose segment equals the user's previous window's (or,
for the first window, passive) never changes an answer, so only the windows
where a user's segment *changes* are kept. Three arrays sorted by (user,
window end): ``user_id`` int64, ``window_end_ms`` int64, ``segment`` int8.

Publishing: ``dynamix segment`` replaces ``OUT/segments/`` atomically; the
table's version is a hash of its ``_meta.json``. :class:`SegmentStore` objects
never change; a reloader builds a new one and swaps the reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from dynamix_ray.gather import last_at_or_before
from dynamix_ray.io import resolve

__all__ = ["SegmentStore", "compact_changes", "read_segment_store", "segments_version"]


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

    @classmethod
    def from_rows(
        cls,
        user_id: np.ndarray,
        window_end_ms: np.ndarray,
        segment: np.ndarray,
        version: str = "",
    ) -> SegmentStore:
        bad = np.setdiff1d(np.unique(np.asarray(segment)), (0, 1))
        if len(bad):
            raise ValueError(f"segment values {bad.tolist()}; expected 0 or 1")
        u, e, s = compact_changes(user_id, window_end_ms, segment)
        n_users = int((np.diff(u) != 0).sum() + 1) if len(u) else 0  # u is sorted
        return cls(u, e, s, version, len(np.asarray(user_id)), n_users)

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
            "rows": int(self.source_rows),
            "change_rows": len(self.user_id),
            "users_with_changes": self.users_with_changes,
            "bytes": int(self.nbytes),
        }


def segments_version(url: str) -> str | None:
    """A hash of ``OUT/segments/_meta.json`` (``None`` while none is committed,
    e.g. for the instant between the old table's move and the new one's)."""
    fs, root = resolve(url)
    try:
        with fs.open(f"{root}/segments/_meta.json", "rb") as fh:
            return hashlib.sha1(fh.read()).hexdigest()[:16]
    except FileNotFoundError:  # other errors reach the caller (and its counters)
        return None


def read_segment_store(url: str) -> SegmentStore:
    """The :class:`SegmentStore` of a ``dynamix segment`` output root.

    Raises:
        FileNotFoundError: no committed segment table.
        RuntimeError: the table changed while it was read (retry later).
    """
    from dynamix_ray.samples import segment_rows
    from dynamix_ray.segments.pipeline import read_segments

    before = segments_version(url)
    if before is None:
        raise FileNotFoundError(f"{url}: no committed segment table (no _meta.json)")
    rows = segment_rows(read_segments(url))
    after = segments_version(url)
    if after != before:
        raise RuntimeError(f"{url}: the segment table changed while it was read")
    return SegmentStore.from_rows(
        rows["user_id"], rows["window_end_ms"], rows["segment"], before
    )
