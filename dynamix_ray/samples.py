"""Training samples (docs/contract.md §6; docs/data-path.md, "Compact samples").

One sample per valid ad impression at time ``t`` of user ``u``:

* ``label``: ``u`` has a conversion on the *same* ``ad_id`` in
  ``[t - buffer_s, t + horizon_s]``;
* the candidate: the impression's own ad attributes;
* ``segment``: that of the user's last window that *ended* at or before ``t``
  (no look-ahead); users with none are passive (0);
* per history source, the user's last ``max_seq_len`` events with
  ``ts < t - buffer_s`` (strictly), newest last.

A stored sample is *compact*: ``(sample_id, user_id, t_ms, bucket, label,
segment, cand.<attr>)``, about 90 bytes. Its histories are not stored: they are
cut out of the bucket's events at batch time (``loader.py``) by the one rule of
``gather.py``, so every policy, sequence length and epoch reads the same rows.

Plain numpy core (:func:`compact_samples`, :func:`attach_histories`,
:func:`build_samples`, :func:`reference_samples`), then the Ray shell
(:func:`run_samples`): one task per bucket of the event store, joining that
bucket's segments, writing ``OUT/samples/{train,eval}/bucket=K/part-0.parquet``
(rows permuted by a seeded shuffle inside each bucket) and
``OUT/samples/_meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dynamix_ray.events import EventStore, ensure_store
from dynamix_ray.gather import (
    SourceEvents,
    gather,
    history_window,
    last_at_or_before,
)
from dynamix_ray.io import (
    absolute_url,
    atomic_output,
    is_process_local,
    read_json,
    resolve,
    url_of,
    write_json,
    write_parquet,
)
from dynamix_ray.runtime import map_items
from dynamix_ray.schema import CANDIDATE_ATTRIBUTES, SOURCES, SchemaError
from dynamix_ray.segments.pipeline import read_segment_bucket, read_segments_meta
from dynamix_ray.segments.stats import near_mask

__all__ = [
    "CANDIDATE_ATTRIBUTES",
    "HISTORY_SOURCES",
    "SAMPLE_SCHEMA",
    "SampleConfig",
    "SampleTable",
    "attach_histories",
    "build_samples",
    "compact_samples",
    "eval_boundary_from_days",
    "events_of",
    "read_sample_table",
    "reference_samples",
    "run_samples",
    "segment_at",
    "segment_rows",
    "seq_len_of",
]

#: History sources and the attributes a sample carries for each: the integer
#: attributes of the schema (``dwell_ms`` becomes ``ln(1 + dwell_ms)``; the
#: conversions' string ``kind`` is not carried).
HISTORY_SOURCES: dict[str, tuple[str, ...]] = {
    name: (("dwell_ms",) if src.has_dwell else ())
    + tuple(a for a, t in src.attributes.items() if pa.types.is_integer(t))
    for name, src in SOURCES.items()
}

#: A stored (compact) sample.
SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("user_id", pa.int64()),
        ("t_ms", pa.int64()),
        ("bucket", pa.int32()),
        ("label", pa.float32()),
        ("segment", pa.int8()),
        *[(f"cand.{a}", t) for a, t in SOURCES["ad_impressions"].attributes.items()],
    ]
)
_ID_BITS = 40  # sample_id = bucket << 40 | position in the bucket

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class SampleConfig:
    """The sample settings, one owner for all of them (a checkpoint records
    them; serving and ALURE read them from there).

    Args:
        max_seq_len: L, events per history source: the longest history any
            source keeps (snapshots and online stores hold this many).
        seq_lens: per-source lengths below ``max_seq_len``, e.g.
            ``{"page_views": 64}`` (a mapping or pairs; kept as sorted
            pairs): :meth:`seq_len` is the one rule every gather reads.
        buffer_s / horizon_s: the label's interval and the history bound, as
            in the statistic (docs/contract.md §2, §6).
        eval_days: last full days held out for evaluation.
    """

    max_seq_len: int = 64
    buffer_s: int = 60
    horizon_s: int = 300
    eval_days: int = 1
    seq_lens: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.buffer_s < 0 or self.horizon_s < 0:
            raise ValueError(
                f"buffer_s and horizon_s must be >= 0, got {self.buffer_s}, "
                f"{self.horizon_s}"
            )
        if self.eval_days < 1:
            raise ValueError(f"eval_days must be >= 1, got {self.eval_days}")
        lens = dict(self.seq_lens)  # a mapping, pairs, or JSON's lists
        unknown = sorted(set(lens) - set(HISTORY_SOURCES))
        if unknown:
            raise ValueError(
                f"seq_lens: unknown sources {unknown}; expected some of "
                f"{list(HISTORY_SOURCES)}"
            )
        bad = {s: n for s, n in lens.items() if not 1 <= int(n) <= self.max_seq_len}
        if bad:
            raise ValueError(
                f"seq_lens {bad}: each must be in 1..max_seq_len={self.max_seq_len}"
            )
        pairs = tuple(sorted((str(s), int(n)) for s, n in lens.items()))
        object.__setattr__(self, "seq_lens", pairs)

    def seq_len(self, source: str) -> int:
        """L of ``source``: its entry of ``seq_lens``, else ``max_seq_len``."""
        return seq_len_of(dict(self.seq_lens), source, self.max_seq_len)

    def lengths(self) -> dict[str, int]:
        """L of every history source."""
        return {s: self.seq_len(s) for s in HISTORY_SOURCES}

    @property
    def buffer_ms(self) -> int:
        return int(self.buffer_s * 1000)


def seq_len_of(lengths: int | Mapping[str, int], source: str, default: int) -> int:
    """One source's history length from one length for all sources or a
    per-source mapping (a source it lacks gets ``default``)."""
    if isinstance(lengths, Mapping):
        return int(lengths.get(source, default))
    return int(lengths)


# ------------------------------------------------------------------ plain core


def segment_at(
    user_id: np.ndarray,
    t_ms: np.ndarray,
    seg_user_id: np.ndarray,
    seg_window_end_ms: np.ndarray,
    seg_value: np.ndarray,
    fill: float = 0,
) -> np.ndarray:
    """The value of each user's last window that ended at or before ``t``.

    Args:
        user_id, t_ms: (N,) queries.
        seg_user_id, seg_window_end_ms, seg_value: (S,) segment rows, any order;
            ``seg_value`` may be any per-window column (``segment``, ``corr``).
        fill: the value where the user has no ended window (0: passive).
    Returns:
        (N,) of ``seg_value``'s dtype. Exact for any ids and times (a search
        inside each user's rows, no composite key).
    """
    su = np.asarray(seg_user_id, np.int64)
    se = np.asarray(seg_window_end_ms, np.int64)
    order = np.lexsort((se, su))
    return last_at_or_before(
        su[order], se[order], np.asarray(seg_value)[order], user_id, t_ms, fill
    )


def compact_samples(
    impressions: Arrays, conversions: Arrays, segments: Arrays, cfg: SampleConfig
) -> Arrays:
    """Compact samples of a set of complete users (arrays of valid rows).

    Args:
        impressions: ``user_id``, ``ts_ms`` and the candidate attributes.
        conversions: ``user_id``, ``ts_ms``, ``ad_id``.
        segments: ``user_id``, ``window_end_ms``, ``segment``.
    Returns:
        ``user_id``, ``t_ms``, ``label`` (float32), ``segment`` (int8) and
        ``cand.<attr>``, (N,) each, sorted by (user, t) (stable).
    """
    imp_user = np.asarray(impressions["user_id"], dtype=np.int64)
    t_ms = np.asarray(impressions["ts_ms"], dtype=np.int64)
    order = np.lexsort((t_ms, imp_user))
    imp_user, t_ms = imp_user[order], t_ms[order]
    out: Arrays = {"user_id": imp_user, "t_ms": t_ms}

    # label: a conversion of the user on the same ad in [t - buffer, t + horizon]
    uniques = pd.Index(pd.unique(imp_user))
    code = uniques.get_indexer(imp_user).astype(np.int64)
    ad = np.asarray(impressions["ad_id"], dtype=np.int64)[order]
    conv_code = uniques.get_indexer(np.asarray(conversions["user_id"], np.int64))
    conv_ad = np.asarray(conversions["ad_id"], dtype=np.int64)
    has = conv_code >= 0
    pair_imp, pair_uniques = pd.factorize(
        pd.MultiIndex.from_arrays([code, ad]), sort=False
    )
    pair_conv = pd.MultiIndex.from_arrays([conv_code[has], conv_ad[has]])
    pair_conv_code = pd.Index(pair_uniques).get_indexer(pair_conv).astype(np.int64)
    hit = pair_conv_code >= 0
    out["label"] = near_mask(
        pair_imp.astype(np.int64),
        t_ms,
        pair_conv_code[hit],
        np.asarray(conversions["ts_ms"], dtype=np.int64)[has][hit],
        cfg.buffer_ms,
        int(cfg.horizon_s * 1000),
    ).astype(np.float32)
    out["segment"] = segment_at(
        imp_user,
        t_ms,
        segments["user_id"],
        segments["window_end_ms"],
        np.asarray(segments["segment"], np.int8),
    )
    for attr in CANDIDATE_ATTRIBUTES:
        if attr in impressions:
            out[f"cand.{attr}"] = np.asarray(impressions[attr])[order]
    return out


def events_of(rows: Mapping[str, np.ndarray]) -> SourceEvents:
    """A :class:`SourceEvents` of raw rows in any order (``user_id``,
    ``ts_ms`` and attribute columns)."""
    uid = np.asarray(rows["user_id"], np.int64)
    ts = np.asarray(rows["ts_ms"], np.int64)
    order = np.lexsort((ts, uid))
    cols = {
        k: np.asarray(v)[order]
        for k, v in rows.items()
        if k not in ("user_id", "ts_ms")
    }
    return SourceEvents.from_arrays(uid[order], ts[order], cols)


def attach_histories(
    samples: Arrays,
    history: Mapping[str, SourceEvents],
    cfg: SampleConfig,
    width: int | None = None,
) -> Arrays:
    """``samples`` plus, per source of ``history``, ``<src>.<attr>`` /
    ``<src>.dwell`` / ``<src>.ts_ms`` / ``<src>.mask`` (N, W): the rule of
    ``gather.history_window`` with bound ``t - buffer``. ``width`` defaults to
    ``max_seq_len`` (a fixed shape)."""
    out = dict(samples)
    bound = np.asarray(samples["t_ms"], np.int64) - cfg.buffer_ms
    for src, ev in history.items():
        attrs = [a for a in HISTORY_SOURCES[src] if a in ev.columns]
        seq = cfg.seq_len(src)
        start, count = history_window(ev, samples["user_id"], bound, seq)
        g = gather(ev, start, count, attrs, width or seq)
        out.update({f"{src}.{k}": v for k, v in g.items()})
    return out


def build_samples(
    impressions: Arrays,
    conversions: Arrays,
    history: dict[str, Arrays],
    segments: Arrays,
    cfg: SampleConfig,
) -> Arrays:
    """Full samples (compact columns plus (N, L) histories) of a set of
    complete users: what the loader hands the model, in one call.

    Args:
        history: per source, raw rows ``user_id``, ``ts_ms`` and attributes.
    Returns:
        :func:`compact_samples`'s columns and :func:`attach_histories`'s.
    """
    compact = compact_samples(impressions, conversions, segments, cfg)
    return attach_histories(
        compact, {s: events_of(ev) for s, ev in history.items()}, cfg
    )


def eval_boundary_from_days(days: Mapping[int, int], eval_days: int) -> int:
    """UTC midnight starting the last ``eval_days`` *full* days, from rows per
    day (day = epoch ms // 86,400,000). A last day holding under half the
    median rows per day (events spilling past midnight after the data's last
    day) is not a day to evaluate on."""
    if not days:
        raise ValueError("no rows: no day to evaluate on")
    counts = np.array([days[d] for d in sorted(days)], np.float64)
    keys = np.array(sorted(days), np.int64)
    full = keys[counts >= 0.5 * np.median(counts[counts > 0])]
    return int((int(full.max()) - eval_days + 1) * 86_400_000)


def reference_samples(
    impressions: Arrays,
    conversions: Arrays,
    history: dict[str, Arrays],
    segments: Arrays,
    cfg: SampleConfig,
) -> list[dict]:
    """The per-sample loop :func:`build_samples` must equal (rows sorted by
    (user, t), as the kernel returns them): label, segment, candidate, and per
    source the history events' timestamps and attribute values."""
    buffer_ms, horizon_ms = cfg.buffer_ms, cfg.horizon_s * 1000
    n = len(impressions["user_id"])
    rows = sorted(
        range(n),
        key=lambda i: (int(impressions["user_id"][i]), int(impressions["ts_ms"][i])),
    )
    convs = list(
        zip(
            conversions["user_id"].tolist(),
            conversions["ts_ms"].tolist(),
            conversions["ad_id"].tolist(),
            strict=True,
        )
    )
    segs = list(
        zip(
            segments["user_id"].tolist(),
            segments["window_end_ms"].tolist(),
            segments["segment"].tolist(),
            strict=True,
        )
    )
    out = []
    for i in rows:
        u, t = int(impressions["user_id"][i]), int(impressions["ts_ms"][i])
        ad = int(impressions["ad_id"][i])
        label = any(
            cu == u and ca == ad and t - buffer_ms <= ct <= t + horizon_ms
            for cu, ct, ca in convs
        )
        ended = [(we, s) for su, we, s in segs if su == u and we <= t]
        hist: dict[str, dict[str, list]] = {}
        for src, ev in history.items():
            mine = sorted(
                (
                    (int(ev["ts_ms"][j]), j)
                    for j in range(len(ev["user_id"]))
                    if int(ev["user_id"][j]) == u
                    and int(ev["ts_ms"][j]) < t - buffer_ms
                ),
            )[-cfg.seq_len(src) :]
            hist[src] = {"ts_ms": [ts for ts, _ in mine]}
            for a in ev:
                if a not in ("user_id", "ts_ms"):
                    hist[src][a] = [ev[a][j].item() for _, j in mine]
        out.append(
            {
                "user_id": u,
                "t_ms": t,
                "label": float(label),
                "segment": max(ended)[1] if ended else 0,
                "cand": {
                    a: impressions[a][i].item()
                    for a in CANDIDATE_ATTRIBUTES
                    if a in impressions
                },
                "hist": hist,
            }
        )
    return out


def segment_rows(t: pa.Table) -> dict[str, np.ndarray]:
    """``user_id``, ``window_end_ms``, ``segment`` of a segment table."""
    return {
        "user_id": t.column("user_id").to_numpy(),
        "window_end_ms": t.column("window_end").cast(pa.int64()).to_numpy(),
        "segment": t.column("segment").to_numpy(),
    }


# ---------------------------------------------------------------- Ray shell


@dataclass(frozen=True)
class SampleTable:
    """A written sample table (``OUT/samples/``): its meta and files."""

    url: str
    meta: dict[str, Any]

    def files(self, split: str) -> list[str]:
        """The split's Parquet files (``train`` or ``eval``), one per bucket."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        fs, root = resolve(self.url)
        return [
            f"{root}/{split}/bucket={b:05d}/part-0.parquet"
            for b in self.meta["buckets"][split]
        ]

    @property
    def boundary_ms(self) -> int:
        return int(self.meta["eval_boundary_ms"])

    @property
    def store_url(self) -> str:
        return str(self.meta["store"])

    def rows(self, split: str) -> int:
        return int(self.meta["rows"][split])


def _bucket_arrays(table: pa.Table | None, cols: list[str]) -> Arrays:
    if table is None:
        return {c: np.zeros(0, np.int64) for c in cols}
    out = {
        c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names
    }
    out["ts_ms"] = out.pop("ts")
    return out


def _samples_task(
    item: dict[str, Any],
    store: EventStore,
    segments: tuple[str, str],
    tmp: str,
    cfg: SampleConfig,
    boundary_ms: int,
    seed: int,
) -> dict[str, Any]:
    """One bucket: its compact samples, split by time, permuted, written."""
    b = item["bucket"]
    ev = store.read_bucket(
        b,
        {
            "ad_impressions": ["user_id", "ts", *CANDIDATE_ATTRIBUTES],
            "conversions": ["user_id", "ts", "ad_id"],
        },
    )
    imps = _bucket_arrays(ev.get("ad_impressions"), ["user_id", "ts", "ad_id"])
    conv = _bucket_arrays(ev.get("conversions"), ["user_id", "ts", "ad_id"])
    for name, rows in (("ad_impressions", imps), ("conversions", conv)):
        if "ad_id" not in rows:
            raise SchemaError(
                f"{store.url}: '{name}' has no 'ad_id' column; a sample's label "
                "(a conversion on the same ad, docs/contract.md §6) needs it in both sources"
            )
    url, version = segments
    seg = segment_rows(read_segment_bucket(url, b, version))
    s = compact_samples(imps, conv, seg, cfg)
    n = len(s["t_ms"])
    s["sample_id"] = (np.int64(b) << _ID_BITS) + np.arange(n, dtype=np.int64)
    s["bucket"] = np.full(n, b, np.int32)
    perm = np.random.default_rng([seed, b]).permutation(n)
    fs, _ = resolve(tmp)
    out: dict[str, Any] = {"bucket": b, "rows": {}, "positives": {}, "active": {}}
    is_eval = s["t_ms"] >= boundary_ms
    for split, sel in (("train", ~is_eval[perm]), ("eval", is_eval[perm])):
        idx = perm[sel]
        table = pa.table(
            {f.name: pa.array(s[f.name][idx], f.type) for f in SAMPLE_SCHEMA},
            schema=SAMPLE_SCHEMA,
        )
        if table.num_rows:
            write_parquet(fs, f"{tmp}/{split}/bucket={b:05d}/part-0.parquet", table)
        out["rows"][split] = table.num_rows
        out["positives"][split] = int(s["label"][idx].sum())
        out["active"][split] = int(s["segment"][idx].sum())
    return out


def _sample_key(
    store: EventStore, segments_meta: dict[str, Any], cfg: SampleConfig, seed: int
) -> str:
    """What identifies a sample table: the events, the segments, the label's
    interval, the split and the shuffle seed (not ``max_seq_len``: histories
    are gathered at batch time)."""
    key = {
        "store": store.fingerprint,
        "segments": {
            k: segments_meta.get(k)
            for k in ("input_fingerprint", "epsilon", "params", "store_fingerprint")
        },
        "buffer_s": cfg.buffer_s,
        "horizon_s": cfg.horizon_s,
        "eval_days": cfg.eval_days,
        "seed": seed,
    }
    return hashlib.sha1(
        json.dumps(key, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def read_sample_table(url: str) -> SampleTable:
    """The :class:`SampleTable` of ``URL/samples/``.

    Raises:
        FileNotFoundError: none is committed there.
    """
    fs, root = resolve(url)
    path = f"{root}/samples/_meta.json"
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no samples/_meta.json")
    return SampleTable(absolute_url(f"{url.rstrip('/')}/samples"), read_json(fs, path))


def run_samples(
    events_url: str,
    segments_url: str,
    out_url: str,
    cfg: SampleConfig | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
) -> SampleTable:
    """Build (or reuse) the compact sample table at ``OUT/samples/``.

    The events are the segment run's event store when it was built from the
    same input (else a store is built at ``OUT/events``); the segments must be
    bucketed like it. A table made from the same inputs and settings is
    reused.

    Raises:
        ValueError: the segment table was made on another bucketing.
    """
    cfg = cfg or SampleConfig()
    t0 = time.perf_counter()
    # absolute: tasks and training workers run in other folders
    segments_url, out_url = absolute_url(segments_url), absolute_url(out_url)
    seg_meta = read_segments_meta(segments_url)
    store = ensure_store(
        events_url,
        reuse=[str(seg_meta.get("store", "")), f"{out_url.rstrip('/')}/events"],
        default_out=f"{out_url.rstrip('/')}/events",
        progress=progress,
    )
    if seg_meta.get("store_fingerprint") not in (None, store.fingerprint):
        raise ValueError(
            f"{segments_url}: its segment table was made from another event store "
            f"({seg_meta.get('store')}, {seg_meta.get('num_buckets')} buckets) than "
            f"{store.url} ({store.num_buckets} buckets): re-run `dynamix segment` on "
            "these events"
        )
    key = _sample_key(store, seg_meta, cfg, seed)
    fs, root = resolve(out_url)
    try:
        old = read_sample_table(out_url)
        if old.meta.get("key") == key:
            return old
    except FileNotFoundError:
        pass
    days = {
        int(k): int(v)
        for k, v in store.meta["sources"]["ad_impressions"]["days"].items()
    }
    boundary = eval_boundary_from_days(days, cfg.eval_days)
    items = store.bucket_items()
    local = is_process_local(fs) or is_process_local(resolve(store.url)[0])
    rows = {"train": 0, "eval": 0}
    pos = {"train": 0, "eval": 0}
    active = {"train": 0, "eval": 0}
    buckets: dict[str, list[int]] = {"train": [], "eval": []}
    with atomic_output(fs, root, ["samples"]) as tmp_path:
        tmp = url_of(fs, tmp_path)
        for r in map_items(
            _samples_task,
            items,
            (
                store,
                (segments_url, seg_meta["table_version"]),
                f"{tmp}/samples",
                cfg,
                boundary,
                seed,
            ),
            local=local,
            name="samples",
            progress=progress,
        ):
            for split in rows:
                rows[split] += r["rows"][split]
                pos[split] += r["positives"][split]
                active[split] += r["active"][split]
                if r["rows"][split]:
                    buckets[split].append(r["bucket"])
        on_disk = sum(
            fs.size(p) for p in fs.find(f"{tmp_path}/samples") if p.endswith(".parquet")
        )
        meta = {
            "key": key,
            "store": store.url,
            "segments": segments_url,
            "config": asdict(cfg),
            "seed": seed,
            "eval_boundary_ms": boundary,
            "rows": rows,
            "positives": pos,
            "active": active,
            "buckets": buckets,
            "bytes_on_disk": int(on_disk),
            "bytes_per_sample_on_disk": on_disk / max(1, sum(rows.values())),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        write_json(fs, f"{tmp_path}/samples/_meta.json", meta)
    return SampleTable(f"{out_url.rstrip('/')}/samples", meta)
