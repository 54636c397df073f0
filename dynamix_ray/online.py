"""A Redis online store of users' histories: fresh, shared by every replica,
and sharded by user (docs/serving.md, "Online store").

Each (user, source) is one Redis list of fixed-width records (``ts`` and the
source's attributes, packed with numpy), newest appended last and trimmed to
the last ``max_seq_len + margin``. Keys carry the user in a hash tag,
``dx:<ns>:{<user_id>}:<source>``, so a Redis Cluster keeps a user's sources in
one slot. The rankers read a batch's users in one pipelined round trip and cut
them with the training rule (``gather.history_window`` through
:meth:`histories.HistoryStore.rows`), so a request sees exactly what the
batch builder would, for the same cut, as long as fewer than ``margin`` of
the user's events are newer than the cut (the 60 s buffer: ``margin``
defaults to ``max_seq_len``).

Writers (:meth:`RedisHistories.append`) are ``dynamix ingest`` (event files,
or an event store bucket by bucket in Ray tasks) or any stream consumer; an
appended event is visible to the next read (benchmarks/freshness.py measures
the lag). Plain Python around redis-py; no Ray.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np

from dynamix_ray.gather import SourceEvents
from dynamix_ray.histories import HistoryStore
from dynamix_ray.samples import HISTORY_SOURCES, SampleConfig

__all__ = ["RedisHistories", "columns_of", "default_columns", "ingest", "local_redis"]

_BATCH = 5000  # commands per pipeline round trip when writing


def _dtype(columns: Mapping[str, str]) -> np.dtype:
    return np.dtype([("ts_ms", "<i8"), *((c, t) for c, t in columns.items())])


class RedisHistories:
    """Histories in Redis, with :class:`~dynamix_ray.histories.HistoryStore`'s
    reading interface (``max_seq_len``, ``attributes()``, ``rows()``).

    Build with :meth:`connect` (``redis://host:port/db?ns=NAME``).
    """

    def __init__(self, client: Any, namespace: str, meta: dict[str, Any]) -> None:
        self.client, self.ns, self.meta = client, namespace, meta
        self.max_seq_len = int(meta["max_seq_len"])
        self.keep = self.max_seq_len + int(meta["margin"])
        # one field order for every writer and reader (the meta is stored as
        # sorted JSON, so a reader would otherwise see another order)
        self.columns: dict[str, dict[str, str]] = {
            s: dict(sorted(c.items())) for s, c in sorted(meta["columns"].items())
        }
        self.dtypes = {s: _dtype(c) for s, c in self.columns.items()}
        self.version = f"redis:{namespace}"

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _client(url: str) -> tuple[Any, str]:
        import redis

        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        ns = query.pop("ns", ["dynamix"])[0]
        # the other options (db=, ssl_cert_reqs=, ...) are redis-py's
        clean = parsed._replace(query=urlencode(query, doseq=True)).geturl()
        return redis.Redis.from_url(clean, socket_timeout=5), ns

    @classmethod
    def create(
        cls,
        url: str,
        columns: Mapping[str, Mapping[str, str]],
        max_seq_len: int = SampleConfig.max_seq_len,
        margin: int | None = None,
    ) -> RedisHistories:
        """A store at ``url`` for these sources' ``columns`` (attribute ->
        numpy dtype string); an existing one must have the same layout."""
        client, ns = cls._client(url)
        meta = {
            "max_seq_len": int(max_seq_len),
            "margin": int(max_seq_len if margin is None else margin),
            "columns": {s: dict(c) for s, c in columns.items()},
        }
        key = f"dx:{ns}:meta"
        if not client.set(key, json.dumps(meta, sort_keys=True), nx=True):
            have = json.loads(client.get(key))
            if have != meta:
                raise ValueError(
                    f"{redact(url)}: the store holds another layout ({have}); use another "
                    "?ns= or delete it"
                )
        return cls(client, ns, meta)

    @classmethod
    def connect(cls, url: str) -> RedisHistories:
        """The store at ``url``.

        Raises:
            FileNotFoundError: no store there (run ``dynamix ingest``).
        """
        client, ns = cls._client(url)
        raw = client.get(f"dx:{ns}:meta")
        if raw is None:
            raise FileNotFoundError(
                f"{redact(url)}: no DynamiX histories in Redis namespace {ns!r} (run "
                "`dynamix ingest`)"
            )
        return cls(client, ns, json.loads(raw))

    def _key(self, source: str, user_id: int) -> str:
        return f"dx:{self.ns}:{{{user_id}}}:{source}"

    # ------------------------------------------------------------ writing
    def append(
        self,
        source: str,
        user_id: np.ndarray,
        ts_ms: np.ndarray,
        columns: Mapping[str, np.ndarray],
        replace: bool = False,
    ) -> int:
        """Append events (any users, any order: sorted here by user, ts), each
        user's list trimmed to its last ``max_seq_len + margin``. ``replace``:
        these are the users' whole histories (a bootstrap): their lists are
        replaced, so a retried task rewrites instead of appending twice.
        Appends are not idempotent: feed each new event once (the trim keeps
        the last appended, so a late event can push out a newer one).
        Returns the events written."""
        if source not in self.dtypes or len(user_id) == 0:
            return 0
        uid = np.asarray(user_id, np.int64)
        ts = np.asarray(ts_ms, np.int64)
        order = np.lexsort((ts, uid))
        rec = np.zeros(len(uid), self.dtypes[source])
        rec["ts_ms"] = ts[order]
        for c in self.columns[source]:
            rec[c] = np.asarray(columns[c])[order]
        uid = uid[order]
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]][: len(uid)])
        ends = np.r_[starts[1:], len(uid)]
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for first, end in zip(starts.tolist(), ends.tolist(), strict=True):
            # only the last `keep` of this batch can survive the trim
            lo = max(first, end - self.keep)
            key = self._key(source, int(uid[lo]))
            if replace:
                pipe.delete(key)
            pipe.rpush(key, *(r.tobytes() for r in rec[lo:end]))
            pipe.ltrim(key, -self.keep, -1)
            n += 2
            if n >= _BATCH:
                pipe.execute()
                n = 0
        pipe.execute()
        return len(uid)

    # ------------------------------------------------------------ reading
    def attributes(self) -> dict[str, tuple[str, ...]]:
        return {s: tuple(c) for s, c in self.columns.items()}

    def events_of(self, user_ids: np.ndarray, sources: list[str]) -> HistoryStore:
        """The users' stored events (one pipelined round trip) as an
        in-memory :class:`HistoryStore` of just them."""
        users = np.unique(np.asarray(user_ids, np.int64))
        pipe = self.client.pipeline(transaction=False)
        for s in sources:
            for u in users:
                pipe.lrange(self._key(s, int(u)), 0, -1)
        got = pipe.execute()
        events: dict[str, SourceEvents] = {}
        for i, s in enumerate(sources):
            lists = got[i * len(users) : (i + 1) * len(users)]
            counts = np.array([len(x) for x in lists], np.int64)
            rec = np.frombuffer(b"".join(b for x in lists for b in x), self.dtypes[s])
            uid = np.repeat(users, counts)
            order = np.lexsort((rec["ts_ms"], uid))  # a late event, put in place
            rec, uid = rec[order], uid[order]
            events[s] = SourceEvents.from_arrays(
                uid, rec["ts_ms"], {c: rec[c] for c in self.columns[s]}
            )
        return HistoryStore(
            events, int(time.time() * 1000), self.max_seq_len, self.version
        )

    def rows(
        self,
        user_ids: np.ndarray,
        ts_ms: np.ndarray | None = None,
        features: Any = None,
        buffer_ms: int = SampleConfig().buffer_ms,
        max_seq_len: int | Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`HistoryStore.rows` over the users' current events."""
        sources = [
            s for s in self.columns if features is None or list(features.attrs(s))
        ]
        q = np.asarray(user_ids, np.int64)
        # events_of's store is as of now: ts None cuts at now, as the snapshot's rule
        return self.events_of(q, sources).rows(
            q, ts_ms, features, buffer_ms, max_seq_len
        )

    def check(self) -> None:
        """Raises when the server does not answer."""
        self.client.ping()


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    p = urlparse(url)
    if p.password is None:
        return url
    host = p.hostname or ""
    netloc = f"{p.username or ''}:***@{host}" + (f":{p.port}" if p.port else "")
    return p._replace(netloc=netloc).geturl()


def columns_of(store: HistoryStore) -> dict[str, dict[str, str]]:
    """Each source's attribute dtypes, as a Redis store's layout."""
    return {
        s: {c: np.asarray(v).dtype.str for c, v in ev.columns.items()}
        for s, ev in store.events.items()
    }


def default_columns() -> dict[str, dict[str, str]]:
    """The layout of every docs/contract.md §1 history source: the event store's column
    types (``events.store_schema``), as the snapshot holds them."""
    from dynamix_ray.events import store_schema

    out: dict[str, dict[str, str]] = {}
    for s, attrs in HISTORY_SOURCES.items():
        schema = store_schema(s, attrs)
        out[s] = {
            a: np.dtype(schema.field(a).type.to_pandas_dtype()).str for a in attrs
        }
    return out


@contextmanager
def local_redis(port: int, binary: str = "redis-server") -> Iterator[str]:
    """A throw-away ``redis-server`` on 127.0.0.1:``port`` (no persistence),
    for tests, benchmarks and one-laptop runs; yields its URL and stops it
    (by its PID) on exit.

    Raises:
        FileNotFoundError: no ``redis-server`` binary (``make test`` installs
            Debian's).
    """
    import redis

    exe = shutil.which(binary)
    if exe is None:
        raise FileNotFoundError(
            f"{binary}: not found (apt-get install redis-server; `make test` does)"
        )
    work = tempfile.mkdtemp(prefix="dx-redis-")
    proc = subprocess.Popen(
        [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            work,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                # ours, not another server already on that port
                if (
                    proc.poll() is not None
                    or client.info("server")["process_id"] != proc.pid
                ):
                    raise RuntimeError(f"port {port}: another Redis answers there")
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {port} did not start"
                    ) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def _ingest_bucket(item: dict[str, Any], store: Any, redis_url: str) -> dict[str, int]:
    """One event-store bucket's events into Redis (a Ray task)."""
    hist = RedisHistories.connect(redis_url)
    cols = {s: ["user_id", "ts", *a] for s, a in HISTORY_SOURCES.items()}
    out: dict[str, int] = {}
    for src, t in store.read_bucket(item["bucket"], cols).items():
        out[src] = hist.append(
            src,
            t.column("user_id").to_numpy(),
            t.column("ts").to_numpy(),
            {
                c: t.column(c).to_numpy()
                for c in hist.columns[src]
                if c in t.column_names
            },
            replace=True,  # a bucket holds its users' whole histories
        )
    return out


def ingest(
    events_url: str,
    redis_url: str,
    max_seq_len: int = SampleConfig.max_seq_len,
    margin: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Append every event of ``events_url`` to the Redis histories at
    ``redis_url`` (created on first use). An event store is ingested bucket by
    bucket in Ray tasks (a bootstrap at scale); event files (docs/contract.md §1, e.g. the
    last minutes' new files) are validated and appended in this process.
    Returns the events written per source and the seconds taken."""
    from dynamix_ray.alure.evaluate import read_events_frame
    from dynamix_ray.events import open_store
    from dynamix_ray.runtime import map_items

    t0 = time.perf_counter()
    hist = RedisHistories.create(redis_url, default_columns(), max_seq_len, margin)
    counts: dict[str, int] = {}
    store = open_store(events_url)
    if store is not None:
        for r in map_items(
            _ingest_bucket,
            store.bucket_items(),
            (store, redis_url),
            name="ingest",
            progress=progress,
        ):
            for s, n in r.items():
                counts[s] = counts.get(s, 0) + n
    else:
        for src in HISTORY_SOURCES:
            try:
                f = read_events_frame(events_url, src)
            except FileNotFoundError:
                continue
            counts[src] = hist.append(
                src,
                f["user_id"].to_numpy(),
                f["ts_ms"].to_numpy(),
                {c: f[c].to_numpy() for c in hist.columns[src] if c in f.columns},
            )
    return {"events": counts, "wall_s": round(time.perf_counter() - t0, 3)}
