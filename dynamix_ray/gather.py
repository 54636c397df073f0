"""Users' events in compact form, and the one rule that cuts a history out of
them (docs/data-path.md, "Compact events, batch-time gather").

Plain numpy. A :class:`SourceEvents` holds one source's events of a set of
users once, CSR-style: users sorted, per-user offsets, and per event its
timestamp and attributes, sorted by (user, ts) — the layout of a bucket of the
event store (``events.py``). Training batches, serving requests and ALURE's
user tower all take their histories from it with the same two functions:

* :func:`history_window` — THE rule (docs/contract.md §6): a query ``(user, bound)`` gets
  the user's last ``max_len`` events with ``ts < bound`` (``bound = t -
  buffer``), newest last;
* :func:`gather` — those windows as right-aligned ``(B, W)`` arrays plus a
  mask, only for the attributes asked for, ``W`` the longest window of the
  batch (at most ``max_len``), so padding costs nothing where histories are
  short.

:func:`segmented_searchsorted` is the search both use: a vectorised bisection
inside each row's own slice, exact for any ids and timestamps (no composite
``user * span + ts`` key that could overflow int64). :func:`reference_window`
is the obvious per-query loop the rule must equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "DWELL_COLUMN",
    "SourceEvents",
    "gather",
    "gathered_nbytes",
    "history_window",
    "last_at_or_before",
    "reference_window",
    "segmented_searchsorted",
]

#: The gathered column of ``ln(1 + dwell_ms)`` (the model's dwell input).
DWELL_COLUMN = "dwell"


def segmented_searchsorted(
    values: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    query: np.ndarray,
    side: str = "left",
) -> np.ndarray:
    """``lo[i] + np.searchsorted(values[lo[i]:hi[i]], query[i], side)`` for all i.

    Args:
        values: (M,) sorted within every slice ``[lo[i], hi[i])``.
        lo, hi: (N,) int64 slice bounds, ``lo <= hi``.
        query: (N,) values to place.
        side: ``"left"`` (first position with ``values >= q``) or ``"right"``
            (first with ``values > q``).
    Returns:
        (N,) int64 positions in ``[lo, hi]``. One bisection step per halving of
        the longest slice, all rows at once.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    left = np.array(lo, dtype=np.int64, copy=True)
    right = np.array(hi, dtype=np.int64, copy=True)
    q = np.asarray(query)
    active = np.flatnonzero(left < right)
    while len(active):
        a, b = left[active], right[active]
        mid = (a + b) >> 1
        v = values[mid]
        go_right = v < q[active] if side == "left" else v <= q[active]
        left[active] = np.where(go_right, mid + 1, a)
        right[active] = np.where(go_right, b, mid)
        active = active[left[active] < right[active]]
    return left


def last_at_or_before(
    row_user: np.ndarray,
    row_time: np.ndarray,
    row_value: np.ndarray,
    user: np.ndarray,
    t: np.ndarray,
    fill: Any = 0,
) -> np.ndarray:
    """Each query's value of its user's last row with ``time <= t``.

    The rule behind "the segment of the last window that ended at or before
    t" (docs/contract.md §2), for training (``samples.segment_at``) and serving
    (``serve.store.SegmentStore``) alike.

    Args:
        row_user, row_time, row_value: (S,) rows sorted by (user, time).
        user, t: (N,) queries.
        fill: the value where the user has no such row.
    Returns:
        (N,) of ``row_value``'s dtype.
    """
    vals = np.asarray(row_value)
    q = np.asarray(user, np.int64)
    out = np.full(len(q), fill, dtype=vals.dtype)
    if len(q) == 0 or len(vals) == 0:
        return out
    lo = np.searchsorted(row_user, q, "left")
    hi = np.searchsorted(row_user, q, "right")
    pos = segmented_searchsorted(row_time, lo, hi, np.asarray(t, np.int64), "right") - 1
    ok = pos >= lo
    out[ok] = vals[pos[ok]]
    return out


@dataclass(frozen=True)
class SourceEvents:
    """One source's events of a set of users, CSR-style.

    Attributes:
        user_id: (U,) int64, sorted, unique.
        offsets: (U + 1,) int64; user ``u``'s events are
            ``[offsets[u], offsets[u + 1])``.
        ts_ms: (M,) int64 epoch ms, sorted within each user.
        columns: attribute -> (M,) values (``dwell_ms`` raw, in ms).
    """

    user_id: np.ndarray
    offsets: np.ndarray
    ts_ms: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_table(
        cls, table: pa.Table, columns: Iterable[str] | None = None
    ) -> SourceEvents:
        """From rows sorted by (``user_id``, ``ts``) (an event-store bucket:
        ``ts`` int64 ms); ``columns``: the attributes to keep (``None``: all).

        Raises:
            ValueError: the rows are not sorted by (user, ts).
        """
        uid = table.column("user_id").to_numpy()
        ts = table.column("ts").to_numpy().astype(np.int64, copy=False)
        names = [c for c in table.column_names if c not in ("user_id", "ts")]
        keep = names if columns is None else [c for c in columns if c in names]
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in keep}
        return cls.from_arrays(uid, ts, cols)

    @classmethod
    def from_arrays(
        cls, user_id: np.ndarray, ts_ms: np.ndarray, columns: Mapping[str, np.ndarray]
    ) -> SourceEvents:
        """From per-event arrays already sorted by (user, ts)."""
        uid = np.asarray(user_id, np.int64)
        ts = np.asarray(ts_ms, np.int64)
        if len(uid):
            # comparisons, not differences: np.diff overflows at the int64 limits
            same = uid[1:] == uid[:-1]
            bad = (uid[1:] < uid[:-1]) | (same & (ts[1:] < ts[:-1]))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"events are not sorted by (user_id, ts) at row {i + 1}: "
                    f"({uid[i]}, {ts[i]}) then ({uid[i + 1]}, {ts[i + 1]})"
                )
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(uid) else None
        users = uid[starts] if starts is not None else np.zeros(0, np.int64)
        first = starts if starts is not None else np.zeros(0, np.int64)
        offsets = np.append(first.astype(np.int64), len(uid))
        return cls(users, offsets, ts, {k: np.asarray(v) for k, v in columns.items()})

    @classmethod
    def empty(cls, columns: Mapping[str, Any] | None = None) -> SourceEvents:
        cols = {k: np.zeros(0, dt) for k, dt in (columns or {}).items()}
        return cls(
            np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), cols
        )

    def __len__(self) -> int:
        return len(self.ts_ms)

    @property
    def nbytes(self) -> int:
        arrays = [self.user_id, self.offsets, self.ts_ms, *self.columns.values()]
        return int(sum(a.nbytes for a in arrays))

    def user_slices(self, user_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of each queried user's events; empty for unknown users."""
        q = np.asarray(user_id, np.int64)
        n = len(self.user_id)
        if n == 0:
            z = np.zeros(len(q), np.int64)
            return z, z
        pos = np.minimum(np.searchsorted(self.user_id, q), n - 1)
        known = self.user_id[pos] == q
        lo = np.where(known, self.offsets[pos], 0)
        hi = np.where(known, self.offsets[pos + 1], 0)
        return lo, hi


def history_window(
    events: SourceEvents, user_id: np.ndarray, bound_ms: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """THE history rule: each query's last ``max_len`` events with ``ts < bound``.

    Args:
        events: the source's events of (at least) the queried users.
        user_id, bound_ms: (B,) queries; ``bound_ms`` is exclusive (``t -
            buffer_s`` for a sample or request at ``t``).
        max_len: L, the most events per query.
    Returns:
        ``(start, count)``, (B,) int64 each: the window is
        ``events[start : start + count]``, in time order, ``count <= max_len``
        (0 for unknown users or users without an earlier event).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lo, hi = events.user_slices(user_id)
    end = segmented_searchsorted(
        events.ts_ms, lo, hi, np.asarray(bound_ms, np.int64), "left"
    )
    count = np.minimum(end - lo, max_len)
    return end - count, count


def reference_window(
    events: SourceEvents, user_id: int, bound_ms: int, max_len: int
) -> list[int]:
    """The plain loop :func:`history_window` must equal: positions of the
    user's last ``max_len`` events strictly before ``bound_ms``."""
    found = [
        i
        for u, (a, b) in zip(
            events.user_id.tolist(),
            zip(events.offsets[:-1].tolist(), events.offsets[1:].tolist(), strict=True),
            strict=True,
        )
        if u == user_id
        for i in range(a, b)
        if events.ts_ms[i] < bound_ms
    ]
    return found[len(found) - min(len(found), max_len) :]


def gather(
    events: SourceEvents,
    start: np.ndarray,
    count: np.ndarray,
    attrs: Iterable[str],
    width: int | None = None,
) -> dict[str, np.ndarray]:
    """Windows as right-aligned arrays (newest last), padding zeroed.

    Args:
        events: as given to :func:`history_window`.
        start, count: (B,) its result.
        attrs: attribute columns to gather; ``dwell_ms`` gives
            ``dwell`` = ln(1 + dwell_ms) as float32.
        width: W (default: the largest ``count``, at least 1).
    Returns:
        ``ts_ms`` (B, W) int64, ``mask`` (B, W) bool, and per attribute (B, W):
        ids as int64, ``dwell`` as float32. Only what was asked is read.
    """
    start = np.asarray(start, np.int64)
    count = np.asarray(count, np.int64)
    w = int(width if width is not None else max(1, int(count.max(initial=0))))
    cols = np.arange(w, dtype=np.int64)
    pad = (w - count)[:, None]
    mask = cols[None, :] >= pad  # (B, W)
    idx = np.where(mask, start[:, None] + cols[None, :] - pad, 0)  # (B, W)
    if len(events) == 0:
        idx = np.zeros_like(idx)
        mask = np.zeros_like(mask)
    out: dict[str, np.ndarray] = {"mask": mask}

    def take(values: np.ndarray) -> np.ndarray:
        if len(values) == 0:
            return np.zeros(idx.shape, values.dtype)
        return values[idx]

    out["ts_ms"] = np.where(mask, take(events.ts_ms), 0)
    for a in attrs:
        if a not in events.columns:
            raise KeyError(f"no column {a!r}; the events hold {sorted(events.columns)}")
        raw = take(events.columns[a])
        if a == "dwell_ms":
            vals = np.log1p(raw.astype(np.float32))
            out[DWELL_COLUMN] = np.where(mask, vals, np.float32(0)).astype(np.float32)
        else:
            out[a] = np.where(mask, raw, 0).astype(np.int64, copy=False)
    return out


def gathered_nbytes(parts: Iterable[Mapping[str, np.ndarray]]) -> int:
    """Bytes of gathered arrays (what a batch moves into the model)."""
    return int(sum(np.asarray(v).nbytes for p in parts for v in p.values()))
