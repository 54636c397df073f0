"""Hash shuffle through storage: O(pieces + buckets) files, two ranged reads
per (piece, bucket) (docs/data-path.md, "Bucket once").

A map task writes ONE file per input piece: its rows grouped by destination
bucket (a stable sort), each bucket's rows one Arrow IPC stream, back to back,
and a small index of byte offsets beside it. A reduce task reads its bucket's
byte range of every piece. The event store (``events.py``) and the u2u
candidate job (``alure/candidates.py``) both shuffle this way.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["read_slice", "write_slices"]

_INDEX_HEADER = 128  # bytes before the int64 offsets in a piece's .idx file
_MAGIC = b"dynamix-shuffle-index-v1"


def write_slices(
    fs: Any, data: str, table: pa.Table, bucket: np.ndarray, num_buckets: int
) -> None:
    """``table``'s rows, grouped by ``bucket`` (their destination, stable
    within a bucket), as ``data.arrows`` + ``data.idx``."""
    order = np.argsort(np.asarray(bucket).astype(np.int32), kind="stable")
    table, bucket = table.take(pa.array(order)), np.asarray(bucket)[order]
    bounds = np.searchsorted(bucket, np.arange(num_buckets + 1))
    offsets = np.zeros(num_buckets + 1, np.int64)
    fs.makedirs(posixpath.dirname(data), exist_ok=True)
    with fs.open(f"{data}.arrows", "wb") as fh:
        pos = 0
        for b in range(num_buckets):
            offsets[b] = pos
            part = table.slice(bounds[b], bounds[b + 1] - bounds[b])
            if part.num_rows == 0:
                continue
            sink = pa.BufferOutputStream()
            opts = pa.ipc.IpcWriteOptions(compression="lz4")
            with pa.ipc.new_stream(sink, part.schema, options=opts) as w:
                w.write_table(part)
            buf = sink.getvalue()
            fh.write(buf.to_pybytes())
            pos += buf.size
        offsets[num_buckets] = pos
    with fs.open(f"{data}.idx", "wb") as fh:
        fh.write(_MAGIC.ljust(_INDEX_HEADER, b"\0"))
        fh.write(offsets.tobytes())


def read_slice(fs: Any, data: str, bucket: int) -> pa.Table | None:
    """Bucket ``bucket``'s rows of one piece (two ranged reads); ``None``
    when it has none."""
    with fs.open(f"{data}.idx", "rb") as fh:
        fh.seek(_INDEX_HEADER + 8 * bucket)
        start, end = np.frombuffer(fh.read(16), np.int64)
    if end <= start:
        return None
    with fs.open(f"{data}.arrows", "rb") as fh:
        fh.seek(int(start))
        raw = fh.read(int(end - start))
    return pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
