"""Segment-conditional batches at batch time (docs/data-path.md, "Batch-time
gather").

Ray Data streams *compact* samples (``samples.SAMPLE_SCHEMA``, ~90 bytes a row)
to the training workers; :class:`SegmentBatcher` turns each batch of them into
the model's columns there, in the worker:

1. split the rows by segment (0 passive, 1 active);
2. per segment, the ``FeatureSet`` its policy gives it (``features.py``);
3. per enabled source, each row's history window (``gather.history_window``,
   the one rule) in its bucket's events, gathered for exactly the attributes
   that feature set uses, ``W`` wide where ``W`` is the longest window of the
   part (at most ``L``).

So ``remove-*`` and ``boost-selective`` move fewer bytes and hold less memory,
not only fewer FLOPs (:func:`gather.gathered_nbytes`). A bucket's events are
read from the event store once and kept in a small LRU cache
(:class:`EventCache`): rows arrive bucket by bucket (one Parquet file of
samples per bucket, a local shuffle buffer mixing neighbours), so a few
buckets in memory serve every row.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynamix_ray.events import EventStore
from dynamix_ray.features import SEGMENTS, policy_features, split_by_segment
from dynamix_ray.gather import SourceEvents, gather, gathered_nbytes, history_window
from dynamix_ray.model.config import (
    CANDIDATE_ATTRIBUTES,
    DWELL,
    SOURCE_ATTRIBUTES,
    FeatureSet,
)
from dynamix_ray.samples import HISTORY_SOURCES, seq_len_of

__all__ = [
    "EventCache",
    "LoaderSpec",
    "SegmentBatcher",
    "features_of",
    "store_features",
]

#: Compact sample columns a batch passes on to the model's columns.
_PASS = ("user_id", "t_ms", "label", "segment", "sample_id", "alure")


def features_of(columns: Mapping[str, Iterable[str]]) -> FeatureSet:
    """What events with these columns per source (and candidates with every
    ad attribute) can give the model: per source, its model attributes that
    have a column (``dwell_ms`` included; strings such as ``kind`` are not
    model inputs)."""
    spec: dict[str, tuple[str, ...]] = {}
    for src, attrs in SOURCE_ATTRIBUTES.items():
        usable = set(columns.get(src, ())) & set(HISTORY_SOURCES[src])
        spec[src] = tuple(a for a in attrs if a in usable)
    return FeatureSet.of({**spec, "candidate": CANDIDATE_ATTRIBUTES})


def store_features(store: EventStore) -> FeatureSet:
    """:func:`features_of` the event store's columns."""
    return features_of({s: store.columns(s) for s in store.sources})


class EventCache:
    """The last buckets' events, per source, read once from the store.

    Args:
        store: the event store the samples were built from.
        columns: per source, the columns to read (``dwell_ms`` and attributes).
        max_bytes: the cache's budget; the least recently used bucket goes
            first (the newest always stays, whatever its size).
    """

    def __init__(
        self,
        store: EventStore,
        columns: Mapping[str, tuple[str, ...]],
        max_bytes: int = 1 << 30,
    ) -> None:
        self.store = store
        self.columns = {s: tuple(c) for s, c in columns.items() if c is not None}
        self.max_bytes = max_bytes
        self._cache: OrderedDict[int, dict[str, SourceEvents]] = OrderedDict()
        self.loads = 0

    def get(self, bucket: int) -> dict[str, SourceEvents]:
        hit = self._cache.get(bucket)
        if hit is not None:
            self._cache.move_to_end(bucket)
            return hit
        tables = self.store.read_bucket(
            bucket, {s: ["user_id", "ts", *c] for s, c in self.columns.items()}
        )
        events = {
            s: SourceEvents.from_table(t, self.columns[s]) for s, t in tables.items()
        }
        self.loads += 1
        self._cache[bucket] = events
        while len(self._cache) > 1 and self.nbytes > self.max_bytes:
            self._cache.popitem(last=False)
        return events

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for ev in self._cache.values() for e in ev.values())


@dataclass(frozen=True)
class LoaderSpec:
    """How batches are made: which store, which policy, how long histories.

    Args:
        store_url / num_buckets / store_meta: the event store (picklable).
        policy, removed: the feature policy (``features.POLICIES``).
        max_seq_len: L per source, unless ``seq_lens`` gives the source its
            own (``SampleConfig.seq_lens``).
        buffer_ms: the history bound is ``t - buffer`` (docs/contract.md §6).
        cache_bytes: the :class:`EventCache` budget per worker.
        available: what the store can give (:func:`store_features`).
        alure: a ``dynamix embed --daily`` OUT: each row also gets its user's
            ALURE embedding as of the last midnight before ``t - buffer``.
    """

    store_url: str
    num_buckets: int
    store_meta: dict[str, Any]
    policy: str = "baseline"
    removed: tuple[str, ...] = ()
    max_seq_len: int = 64
    seq_lens: tuple[tuple[str, int], ...] = ()
    buffer_ms: int = 60_000
    cache_bytes: int = 1 << 30
    available: FeatureSet = field(default_factory=FeatureSet)
    alure: str | None = None

    @classmethod
    def of(cls, store: EventStore, **kw: Any) -> LoaderSpec:
        return cls(
            store.url,
            store.num_buckets,
            store.meta,
            available=store_features(store),
            **kw,
        )

    @property
    def store(self) -> EventStore:
        return EventStore(self.store_url, self.num_buckets, self.store_meta)

    def seq_len(self, source: str) -> int:
        """L of ``source``, by ``SampleConfig.seq_len``'s rule."""
        return seq_len_of(dict(self.seq_lens), source, self.max_seq_len)

    def features(self, segment: int) -> FeatureSet:
        return policy_features(self.policy, segment, self.removed, self.available)


class SegmentBatcher:
    """Compact sample rows -> the model's columns, per segment (see module doc).

    Call it with a batch of compact sample columns (numpy, as Ray Data hands
    them); it returns ``{segment: columns}`` for the segments present, each in
    ``features.to_model_batch``'s contract and holding only what that
    segment's feature set uses. ``last_nbytes`` is the size of the last
    result.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.feature_sets = {s: spec.features(s) for s in SEGMENTS}
        needed: dict[str, set[str]] = {}
        for fs in self.feature_sets.values():
            for src in fs.enabled_sources:
                needed.setdefault(src, set()).update(fs.attrs(src))
        self.cache = EventCache(
            spec.store,
            {s: tuple(sorted(a)) for s, a in needed.items()},
            spec.cache_bytes,
        )
        self.last_nbytes = 0
        self._daily: Any = None

    def _alure(self, users: np.ndarray, bound_ms: np.ndarray) -> np.ndarray:
        from dynamix_ray.alure.feature import attach_daily, read_daily

        if self._daily is None:
            self._daily = read_daily(str(self.spec.alure))
        d = self._daily
        return attach_daily(d.user_id, d.days_ms, d.emb, users, bound_ms)

    def part(
        self,
        rows: Mapping[str, np.ndarray],
        fs: FeatureSet,
        width: int | Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """The model columns of rows under feature set ``fs`` (``width``: the
        histories' W, one for all sources or one per source; default the
        part's longest window, at most L)."""
        out = {k: np.asarray(rows[k]) for k in _PASS if k in rows}
        for a in fs.candidate:
            out[f"cand.{a}"] = np.asarray(rows[f"cand.{a}"])
        bucket = np.asarray(rows["bucket"])
        users = np.asarray(rows["user_id"], np.int64)
        bound = np.asarray(rows["t_ms"], np.int64) - self.spec.buffer_ms
        n = len(users)
        if self.spec.alure:
            out["alure"] = self._alure(users, bound)
        groups = [(int(b), np.flatnonzero(bucket == b)) for b in np.unique(bucket)]
        for src in fs.enabled_sources:
            attrs = list(fs.attrs(src))
            windows = []
            for b, idx in groups:
                ev = self.cache.get(b).get(src)
                if ev is None:  # no event of this source in the bucket
                    ev = SourceEvents.empty(
                        {a: np.float64 if a == DWELL else np.int64 for a in attrs}
                    )
                start, count = history_window(
                    ev, users[idx], bound[idx], self.spec.seq_len(src)
                )
                windows.append((ev, idx, start, count))
            w_src = (
                seq_len_of(width, src, self.spec.seq_len(src))
                if width
                else max(1, max(int(w[3].max(initial=0)) for w in windows))
            )
            cols: dict[str, np.ndarray] = {}
            for ev, idx, start, count in windows:
                for k, v in gather(ev, start, count, attrs, w_src).items():
                    if k not in cols:
                        cols[k] = np.zeros((n, w_src), v.dtype)
                    cols[k][idx] = v
            out.update({f"{src}.{k}": v for k, v in cols.items()})
        return out

    def __call__(
        self, rows: Mapping[str, np.ndarray]
    ) -> dict[int, dict[str, np.ndarray]]:
        parts = {
            s: self.part(sub, self.feature_sets[s])
            for s, sub in split_by_segment(rows).items()
        }
        self.last_nbytes = gathered_nbytes(parts.values())
        return parts
