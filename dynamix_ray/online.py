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

Several servers (comma-separated URLs) are shards: a user's keys live on
:func:`shard_of` of its id, so the store grows past one server's memory.
Writers (:meth:`RedisHistories.append`) are ``dynamix ingest`` (event files,
or an event store bucket by bucket in Ray tasks) and :func:`consume_stream`,
which applies a Redis stream's entries each once (its position commits with
the appends, per shard); an appended event is visible to the next read
(benchmarks/freshness.py measures the lag). Plain Python around redis-py; no
Ray.
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
from dynamix_ray.io import user_bucket
from dynamix_ray.samples import HISTORY_SOURCES, SampleConfig

__all__ = [
    "REDIS_SCHEMES",
    "RedisHistories",
    "columns_of",
    "consume_stream",
    "default_columns",
    "ingest",
    "is_redis_url",
    "local_redis",
    "publish_events",
    "shard_of",
    "stream_of",
]

_BATCH = 5000  # commands per pipeline round trip when writing


def _dtype(columns: Mapping[str, str]) -> np.dtype:
    return np.dtype([("ts_ms", "<i8"), *((c, t) for c, t in columns.items())])


class RedisHistories:
    """Histories in Redis, with :class:`~dynamix_ray.histories.HistoryStore`'s
    reading interface (``max_seq_len``, ``attributes()``, ``rows()``).

    Build with :meth:`connect` (``redis://host:port/db?ns=NAME``). Several
    servers, comma-separated (``redis://a:6379/0,redis://b:6379/0?ns=NAME``),
    are shards: a user lives on shard :func:`shard_of` (the project's user
    hash modulo the count), so a store grows past one server's memory by
    adding servers. Each server records its place (``i/n``) at creation, and
    :meth:`connect` refuses a list in another order or of another length.
    """

    def __init__(
        self, clients: list[Any], namespace: str, meta: dict[str, Any]
    ) -> None:
        self.clients, self.ns, self.meta = clients, namespace, meta
        self.max_seq_len = int(meta["max_seq_len"])
        self.keep = self.max_seq_len + int(meta["margin"])
        # one field order for every writer and reader (the meta is stored as
        # sorted JSON, so a reader would otherwise see another order)
        self.columns: dict[str, dict[str, str]] = {
            s: dict(sorted(c.items())) for s, c in sorted(meta["columns"].items())
        }
        self.dtypes = {s: _dtype(c) for s, c in self.columns.items()}
        self.version = f"redis:{namespace}"
        self._pool: Any = None  # threads for reading several shards at once

    @property
    def shards(self) -> int:
        return len(self.clients)

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _clients(url: str) -> tuple[list[Any], str]:
        import redis

        clients: list[Any] = []
        names: set[str] = set()
        for one in url.split(","):
            clean, ours = _our_options(one.strip(), "ns")
            names.update(ours.values())
            clients.append(redis.Redis.from_url(clean, socket_timeout=5))
        if len(names) > 1:
            raise ValueError(f"{redact(url)}: more than one ?ns= ({sorted(names)})")
        return clients, (names.pop() if names else "dynamix")

    def _place_key(self) -> str:
        return f"dx:{self.ns}:shard"

    def _check_places(self, url: str, claim: bool) -> None:
        """Each server holds shard ``i/n`` of this namespace, in URL order
        (``claim``: record it where it is not yet recorded)."""
        n = self.shards
        for i, c in enumerate(self.clients):
            want = f"{i}/{n}"
            if claim:
                c.set(self._place_key(), want, nx=True)
            raw = c.get(self._place_key())
            have = "0/1" if raw is None else raw.decode()
            if have != want:
                raise ValueError(
                    f"{redact(url)}: server {i + 1} holds shard {have} of namespace "
                    f"{self.ns!r}, not {want}: list the servers in the order and "
                    "number they were created with"
                )

    @classmethod
    def create(
        cls,
        url: str,
        columns: Mapping[str, Mapping[str, str]],
        max_seq_len: int = SampleConfig.max_seq_len,
        margin: int | None = None,
    ) -> RedisHistories:
        """A store at ``url`` (one server or comma-separated shards) for these
        sources' ``columns`` (attribute -> numpy dtype string); an existing
        one must have the same layout and shards."""
        clients, ns = cls._clients(url)
        meta = {
            "max_seq_len": int(max_seq_len),
            "margin": int(max_seq_len if margin is None else margin),
            "columns": {s: dict(c) for s, c in columns.items()},
        }
        key = f"dx:{ns}:meta"
        for c in clients:
            if not c.set(key, json.dumps(meta, sort_keys=True), nx=True):
                have = json.loads(c.get(key))
                if have != meta:
                    raise ValueError(
                        f"{redact(url)}: the store holds another layout ({have}); use "
                        "another ?ns= or delete it"
                    )
        out = cls(clients, ns, meta)
        out._check_places(url, claim=True)
        return out

    @classmethod
    def connect(cls, url: str) -> RedisHistories:
        """The store at ``url`` (one server or comma-separated shards).

        Raises:
            FileNotFoundError: no store there (run ``dynamix ingest``).
            ValueError: the shards disagree on the layout, or are listed in
                another order or number than at creation.
        """
        clients, ns = cls._clients(url)
        metas = [c.get(f"dx:{ns}:meta") for c in clients]
        for i, raw in enumerate(metas):
            if raw is None:
                where = "" if len(clients) == 1 else f" on server {i + 1}"
                raise FileNotFoundError(
                    f"{redact(url)}: no DynamiX histories in Redis namespace {ns!r}"
                    f"{where} (run `dynamix ingest`)"
                )
        layout = json.loads(metas[0])
        if any(json.loads(m) != layout for m in metas[1:]):
            raise ValueError(f"{redact(url)}: the shards hold different layouts")
        out = cls(clients, ns, layout)
        out._check_places(url, claim=False)
        return out

    def _key(self, source: str, user_id: int) -> str:
        return f"dx:{self.ns}:{{{user_id}}}:{source}"

    def client_of(self, user_id: int) -> Any:
        """The server that holds ``user_id``'s histories."""
        return self.clients[int(shard_of(np.array([user_id]), self.shards)[0])]

    # ------------------------------------------------------------ writing
    def _writes(
        self,
        source: str,
        user_id: np.ndarray,
        ts_ms: np.ndarray,
        columns: Mapping[str, np.ndarray],
    ) -> Iterator[tuple[int, str, list[bytes], int]]:
        """``(shard, key, records, events)`` per user of these events, sorted
        by (user, ts): only the last ``keep`` of a user's events are sent (the
        rest could not survive the trim)."""
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
        shard = shard_of(uid[starts], self.shards)
        for first, end, sh in zip(
            starts.tolist(), ends.tolist(), shard.tolist(), strict=True
        ):
            lo = max(first, end - self.keep)
            recs = [r.tobytes() for r in rec[lo:end]]
            yield sh, self._key(source, int(uid[lo])), recs, end - first

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
        the last appended, so a late event can push out a newer one;
        :func:`consume_stream` applies each stream entry once).
        Returns the events written."""
        if source not in self.dtypes or len(user_id) == 0:
            return 0
        pipes = [c.pipeline(transaction=False) for c in self.clients]
        queued = [0] * self.shards
        for sh, key, recs, _ in self._writes(source, user_id, ts_ms, columns):
            pipe = pipes[sh]
            if replace:
                pipe.delete(key)
            pipe.rpush(key, *recs)
            pipe.ltrim(key, -self.keep, -1)
            queued[sh] += 2
            if queued[sh] >= _BATCH:
                pipe.execute()
                queued[sh] = 0
        for pipe in pipes:
            pipe.execute()
        return len(user_id)

    def apply_once(
        self,
        events: Mapping[str, tuple[np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
        mark: str,
        position: tuple[int, int],
    ) -> dict[str, int]:
        """Append ``events`` (source -> user ids, ts, columns) so that a
        retry cannot apply them twice: each shard's appends and its ``mark``
        (the stream position they reach) commit in one MULTI/EXEC, and a
        shard whose mark already reaches ``position`` is skipped.
        :func:`consume_stream` calls this once per batch it reads (one
        consumer per mark). Returns the events applied per source."""
        key = f"dx:{self.ns}:applied:{mark}"
        pipes: dict[int, Any] = {}
        counts: dict[int, dict[str, int]] = {}
        for source, (uid, ts, cols) in events.items():
            if source not in self.dtypes or len(uid) == 0:
                continue
            for sh, k, recs, n in self._writes(source, uid, ts, cols):
                if sh not in pipes:
                    pipes[sh] = self.clients[sh].pipeline(transaction=True)
                pipes[sh].rpush(k, *recs)
                pipes[sh].ltrim(k, -self.keep, -1)
                c = counts.setdefault(sh, {})
                c[source] = c.get(source, 0) + n
        out: dict[str, int] = {}
        for sh, pipe in pipes.items():
            raw = self.clients[sh].get(key)
            if raw is not None and _position(raw) >= position:
                continue  # this shard has it: a redelivered batch
            pipe.set(key, f"{position[0]}-{position[1]}")
            pipe.execute()
            for s, n in counts[sh].items():
                out[s] = out.get(s, 0) + n
        return out

    # ------------------------------------------------------------ reading
    def attributes(self) -> dict[str, tuple[str, ...]]:
        return {s: tuple(c) for s, c in self.columns.items()}

    def events_of(self, user_ids: np.ndarray, sources: list[str]) -> HistoryStore:
        """The users' stored events (one pipelined round trip per shard, the
        shards read at once) as an in-memory :class:`HistoryStore` of just
        them."""
        users = np.unique(np.asarray(user_ids, np.int64))
        shard = shard_of(users, self.shards)
        groups = [users[shard == i] for i in range(self.shards)]

        def read(i: int) -> list[list[bytes]]:
            if len(groups[i]) == 0:
                return []
            pipe = self.clients[i].pipeline(transaction=False)
            for s in sources:
                for u in groups[i]:
                    pipe.lrange(self._key(s, int(u)), 0, -1)
            return pipe.execute()

        if self.shards == 1:
            got = [read(0)]
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.shards, "dx-redis")
            got = list(self._pool.map(read, range(self.shards)))
        in_shard_order = np.concatenate(groups)
        events: dict[str, SourceEvents] = {}
        for j, s in enumerate(sources):
            lists = [
                x
                for i, g in enumerate(groups)
                for x in got[i][j * len(g) : (j + 1) * len(g)]
            ]
            counts = np.array([len(x) for x in lists], np.int64)
            rec = np.frombuffer(b"".join(b for x in lists for b in x), self.dtypes[s])
            uid = np.repeat(in_shard_order, counts)
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
        """Raises when a server does not answer."""
        for c in self.clients:
            c.ping()


def shard_of(user_id: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each user: the project's user hash (:func:`io.user_bucket`)
    modulo the number of servers, so an event-store bucket's users share a
    shard whenever the bucket count is a multiple of the shard count."""
    if shards == 1:
        return np.zeros(len(user_id), np.int64)
    return user_bucket(np.asarray(user_id, np.int64), shards)


def _position(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ``ms-seq`` as a comparable pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


#: URL schemes of a Redis server (redis-py's): the one test of "is this Redis".
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(url: str) -> bool:
    """``url`` names a Redis server (or comma-separated shards)."""
    return url.startswith(REDIS_SCHEMES)


def _our_options(url: str, *names: str) -> tuple[str, dict[str, str]]:
    """``url`` without the query options ``names`` (this module's: ``ns``,
    ``stream``, ...), and their values; the other options (``db=``,
    ``ssl_cert_reqs=``, ...) stay for redis-py."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    ours = {n: query.pop(n)[0] for n in names if n in query}
    return parsed._replace(query=urlencode(query, doseq=True)).geturl(), ours


def redact(url: str) -> str:
    """``url`` without its passwords (for messages and logs); each of a
    comma-separated list of shards."""
    if "," in url:
        return ",".join(redact(one) for one in url.split(","))
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
        stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End a process this code started, by its PID: SIGTERM, then SIGKILL
    after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


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


# ---------------------------------------------------------------- streams
#: What a stream entry's fields are: ``source``, ``user_id``, ``ts`` (epoch
#: milliseconds) and that source's attributes (docs/serving.md, "A stream").
STREAM_FIELDS = ("source", "user_id", "ts")


def stream_of(url: str) -> tuple[str, str, str, str] | None:
    """``(server URL, key, group, consumer)`` of a stream URL,
    ``redis://HOST:PORT/DB?stream=KEY[&group=G][&consumer=C]``, else None."""
    if not is_redis_url(url):
        return None
    clean, ours = _our_options(url, "stream", "group", "consumer")
    if "stream" not in ours:
        return None
    group = ours.get("group", "dynamix-ingest")
    return clean, ours["stream"], group, ours.get("consumer", "ingest-1")


def publish_events(
    client: Any,
    key: str,
    source: str,
    user_id: np.ndarray,
    ts_ms: np.ndarray,
    columns: Mapping[str, np.ndarray],
    maxlen: int | None = None,
) -> list[bytes]:
    """XADD one stream entry per event (what a producer does; tests and
    benchmarks use it). Returns the entry ids."""
    pipe = client.pipeline(transaction=False)
    names = list(columns)
    values = [np.asarray(columns[c]).tolist() for c in names]
    for i, (u, t) in enumerate(
        zip(np.asarray(user_id).tolist(), np.asarray(ts_ms).tolist(), strict=True)
    ):
        fields = {"source": source, "user_id": int(u), "ts": int(t)}
        fields.update({c: v[i] for c, v in zip(names, values, strict=True)})
        pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
    return pipe.execute()


def _parse_entries(
    hist: RedisHistories, entries: list[tuple[bytes, dict[bytes, bytes]]]
) -> tuple[
    dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]],
    list[tuple[bytes, str]],
]:
    """Stream entries as per-source arrays, and the entries that are not
    events of a known source, with the reason (for the dead-letter stream)."""
    rows: dict[str, list[tuple[np.int64, np.int64, list[Any]]]] = {}
    bad: list[tuple[bytes, str]] = []
    # each value in its column's dtype, so one out of range is this entry's
    # fault (a dead letter), not the batch's
    convert = {
        src: [
            (c, np.dtype(t).type, float if np.dtype(t).kind == "f" else int)
            for c, t in cols.items()
        ]
        for src, cols in hist.columns.items()
    }
    for eid, fields in entries:
        if fields is None:  # trimmed away while pending
            bad.append((eid, "deleted from the stream before it was applied"))
            continue
        f = {k.decode(): v.decode() for k, v in fields.items()}
        src = f.get("source")
        if src not in hist.columns:
            bad.append((eid, f"unknown source {src!r}"))
            continue
        cols = hist.columns[src]
        missing = [c for c in (*STREAM_FIELDS, *cols) if c not in f]
        if missing:
            bad.append((eid, f"missing {', '.join(missing)}"))
            continue
        try:
            vals = [typed(parse(f[c])) for c, typed, parse in convert[src]]
            uid, ts = np.int64(int(f["user_id"])), np.int64(int(f["ts"]))
            rows.setdefault(src, []).append((uid, ts, vals))
        except (ValueError, OverflowError) as e:
            bad.append((eid, f"not a number of its type: {e}"))
    out = {}
    for src, r in rows.items():
        cols = hist.columns[src]
        by_column = list(zip(*(v for _, _, v in r), strict=True)) or [()] * len(cols)
        out[src] = (
            np.array([u for u, _, _ in r], np.int64),
            np.array([t for _, t, _ in r], np.int64),
            # column by column, in its own dtype (an int64 id exact past 2**53)
            {
                c: np.array(v, t)
                for (c, t), v in zip(cols.items(), by_column, strict=True)
            },
        )
    return out, bad


def consume_stream(
    stream_url: str,
    redis_url: str,
    max_seq_len: int = SampleConfig.max_seq_len,
    margin: int | None = None,
    follow: bool = False,
    batch: int = 1000,
    block_ms: int = 1000,
    stop: Any = None,
) -> dict[str, Any]:
    """Apply a Redis stream's events to the histories at ``redis_url``, as
    consumer ``consumer`` of group ``group`` (both from the stream URL).

    Each batch of entries (XREADGROUP, ``batch`` at a time) is appended with
    :meth:`RedisHistories.apply_once`, then acknowledged (XACK): a consumer
    that dies between the two gets its pending entries again when it
    restarts under the same name, and applies nothing twice. Entries that are
    not events of a known source go, with the reason, to the dead-letter
    stream ``KEY:dead`` (and are counted), not dropped.

    ``follow``: keep reading until ``stop`` (a ``threading.Event``) is set or
    the process is interrupted; else return when the stream has nothing new.
    Returns the events applied per source (a redelivered batch's are not
    counted again), the dead letters and seconds."""
    import redis

    parsed = stream_of(stream_url)
    if parsed is None:
        raise ValueError(
            f"{redact(stream_url)}: not a stream URL (redis://...?stream=KEY)"
        )
    server, key, group, consumer = parsed
    client: Any = redis.Redis.from_url(server, socket_timeout=30)  # untyped replies
    hist = RedisHistories.create(redis_url, default_columns(), max_seq_len, margin)
    try:
        client.xgroup_create(key, group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    mark = f"{key}:{group}:{consumer}"
    counts: dict[str, int] = {}
    dead = 0
    t0 = time.perf_counter()
    cursor = "0"  # first our own pending entries (a restart), then new ones
    while stop is None or not stop.is_set():
        got = client.xreadgroup(
            group,
            consumer,
            {key: cursor},
            count=batch,
            block=None if cursor == "0" else block_ms,
        )
        entries = got[0][1] if got else []
        if not entries:
            if cursor == "0":
                cursor = ">"
                continue
            if not follow:
                break
            continue
        events, bad = _parse_entries(hist, entries)
        applied = hist.apply_once(events, mark, _position(entries[-1][0]))
        pipe = client.pipeline(transaction=True)
        for eid, why in bad:
            pipe.xadd(f"{key}:dead", {"id": eid, "reason": why})
        pipe.xack(key, group, *(eid for eid, _ in entries))
        pipe.execute()
        dead += len(bad)
        for s, n in applied.items():
            counts[s] = counts.get(s, 0) + n
    return {
        "events": counts,
        "dead_letters": dead,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
