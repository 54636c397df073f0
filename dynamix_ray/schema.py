"""EBF sources (docs/contract.md §1), validation of rows, and the rejects they produce.

Every reader goes through :func:`validate`: it normalises ``ts`` (Parquet
timestamp of any unit, or int64 epoch ms) to int64 epoch milliseconds in a column
``ts_ms``, casts ``dwell_ms`` to float64, and splits rows into valid ones and
rejects with a ``reason``. Nothing is dropped without being counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

__all__ = [
    "AD_ATTRIBUTES",
    "CANDIDATE_ATTRIBUTES",
    "REJECT_REASONS",
    "REJECT_SCHEMA",
    "SOURCES",
    "SchemaError",
    "Source",
    "TS_MAX_MS",
    "TS_MIN_MS",
    "Validated",
    "check_columns",
    "ts_to_ms",
    "validate",
]

TS_MIN_MS = 946_684_800_000  # 2000-01-01T00:00:00Z, inclusive
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z, exclusive

#: Why a row is rejected, in order of precedence (a row gets the first that
#: applies). Code maps reasons by name; the order only sets the precedence.
REJECT_REASONS = (
    "null_user_id",
    "null_ts",
    "user_id_out_of_range",  # an unsigned id above 2**63 - 1 (does not fit int64)
    "ts_out_of_range",  # outside [TS_MIN_MS, TS_MAX_MS), incl. ts_ms beyond int64
    "dwell_not_finite",
    "dwell_negative",
)

#: What ``<out>/rejects/`` holds: the row's key fields as read, and why.
REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("reason", pa.string()),
        ("user_id", pa.int64()),
        ("ts_ms", pa.int64()),
        ("dwell_ms", pa.float64()),
        ("file", pa.string()),
    ]
)


class SchemaError(ValueError):
    """An input file lacks a required column or holds one of the wrong type."""


@dataclass(frozen=True)
class Source:
    """One EBF source: its folder name, required and attribute columns."""

    name: str
    required: tuple[str, ...]
    attributes: dict[str, pa.DataType] = field(default_factory=dict)
    optional: bool = False

    @property
    def has_dwell(self) -> bool:
        return "dwell_ms" in self.required


_I64 = pa.int64()
SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "ad_impressions",
            ("user_id", "ts", "dwell_ms"),
            {
                "ad_id": _I64,
                "advertiser_id": _I64,
                "campaign_id": _I64,
                "category_id": pa.int32(),
                "sem_id_1": _I64,
                "sem_id_2": _I64,
                "sem_id_3": _I64,
                "media_type": pa.int8(),
                "surface": pa.int8(),
                "position": pa.int16(),
            },
        ),
        Source("conversions", ("user_id", "ts"), {"ad_id": _I64, "kind": pa.string()}),
        Source(
            "organic_impressions",
            ("user_id", "ts", "dwell_ms"),
            {
                "content_id": _I64,
                "media_type": pa.int8(),
                "position": pa.int16(),
                "author_id": _I64,
            },
            optional=True,
        ),
        Source(
            "page_views",
            ("user_id", "ts"),
            {
                "page_id": _I64,
                "sem_id_1": _I64,
                "sem_id_2": _I64,
                "media_type": pa.int8(),
            },
            optional=True,
        ),
    )
}

#: The 11 ad-impression attributes of the paper: dwell time plus 10 ids/enums.
AD_ATTRIBUTES: tuple[str, ...] = ("dwell_ms", *SOURCES["ad_impressions"].attributes)
#: A candidate ad's attributes (a sample's, a request's): the ad-impression ids
#: and enums, not dwell (unknown when the ad is ranked).
CANDIDATE_ATTRIBUTES: tuple[str, ...] = tuple(SOURCES["ad_impressions"].attributes)

_TS_UNIT_TO_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}
_INT64_MIN = int(np.iinfo(np.int64).min)
_INT64_MAX = int(np.iinfo(np.int64).max)


def check_columns(schema: pa.Schema, source: Source, file: str) -> None:
    """Raise :class:`SchemaError` naming ``file`` and the column if one is missing
    or ``ts`` / ``user_id`` / ``dwell_ms`` has an unusable type."""
    names = set(schema.names)
    for col in source.required:
        if col not in names:
            raise SchemaError(
                f"{file}: source '{source.name}' needs column '{col}' "
                f"(required: {', '.join(source.required)}; found: "
                f"{', '.join(schema.names) or 'no columns'})"
            )
    ts_type = schema.field("ts").type
    if not (pa.types.is_timestamp(ts_type) or pa.types.is_integer(ts_type)):
        raise SchemaError(
            f"{file}: column 'ts' of '{source.name}' has type {ts_type}; expected a "
            "Parquet timestamp or int64 epoch milliseconds"
        )
    if not pa.types.is_integer(schema.field("user_id").type):
        raise SchemaError(
            f"{file}: column 'user_id' of '{source.name}' has type "
            f"{schema.field('user_id').type}; expected int64"
        )
    if source.has_dwell:
        dwell_type = schema.field("dwell_ms").type
        if not (pa.types.is_integer(dwell_type) or pa.types.is_floating(dwell_type)):
            raise SchemaError(
                f"{file}: column 'dwell_ms' of '{source.name}' has type {dwell_type}; "
                "expected float64 or an integer type"
            )


def _int64_values(
    col: pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An integer column (or a timestamp's raw ticks) as int64, without wrapping.

    Returns:
        ``(values, null, unfit)``, each of shape ``(n,)``: ``values`` int64 (0 where
        null or unfit), ``null`` the null mask, ``unfit`` where an unsigned value
        exceeds ``2**63 - 1`` and so has no int64 value.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_timestamp(col.type):
        col = col.view(pa.int64())  # ticks since the epoch, UTC whatever the zone
    null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    raw = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False))
    if raw.dtype == np.uint64:
        unfit = raw > np.uint64(_INT64_MAX)
        raw = np.where(unfit, np.uint64(0), raw)
    else:
        unfit = np.zeros(len(raw), dtype=bool)
    return raw.astype(np.int64), null, unfit


def _ts_ms(
    ts: pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``ts`` (timestamp of any unit, or integer epoch ms) to epoch ms, exactly.

    Range and overflow are decided on the raw ticks against bounds converted to
    the unit with Python ints, so nothing wraps: ``ms = floor(raw * mul / div)``
    lies in ``[TS_MIN_MS, TS_MAX_MS)`` iff ``ceil(TS_MIN_MS * div / mul) <= raw <
    ceil(TS_MAX_MS * div / mul)``.

    Returns:
        ``(ts_ms, null, unfit, out_of_range)``, each of shape ``(n,)``: ``ts_ms``
        int64, floor-rounded (0 where null or unfit); ``null``; ``unfit`` where
        the ms value does not fit int64; ``out_of_range`` where it lies outside
        ``[TS_MIN_MS, TS_MAX_MS)`` (unfit values included; nulls excluded).
    """
    mul, div = (
        _TS_UNIT_TO_MS[ts.type.unit] if pa.types.is_timestamp(ts.type) else (1, 1)
    )
    raw, null, unfit = _int64_values(ts)
    if mul != 1:  # a coarser unit: raw * mul must stay within int64
        unfit |= (raw < -(-_INT64_MIN // mul)) | (raw > _INT64_MAX // mul)
    lo, hi = -(-TS_MIN_MS * div // mul), -(-TS_MAX_MS * div // mul)  # ceil
    lo, hi = max(lo, _INT64_MIN), min(hi, _INT64_MAX)
    out_of_range = ~null & (unfit | (raw < lo) | (raw >= hi))
    raw = np.where(unfit, 0, raw)
    ts_ms = raw * mul if mul != 1 else raw // div
    return ts_ms.astype(np.int64, copy=False), null, unfit, out_of_range


def ts_to_ms(ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``ts`` column (timestamp of any unit, naive = UTC, or integer epoch ms) to
    int64 epoch ms, floor-rounded, without wrapping; nulls, and values whose ms
    do not fit int64, become ``INT64_MIN``. :func:`validate` rejects both (as
    ``null_ts`` and ``ts_out_of_range``)."""
    ts_ms, null, unfit, _ = _ts_ms(ts)
    return np.where(null | unfit, _INT64_MIN, ts_ms).astype(np.int64, copy=False)


def _column_error(file: str, source: Source, col: str, exc: Exception) -> SchemaError:
    return SchemaError(
        f"{file}: column '{col}' of '{source.name}' could not be read: {exc}"
    )


@dataclass
class Validated:
    """Valid rows (``ts`` replaced by int64 ``ts_ms``) and the rejects table."""

    valid: pa.Table
    rejects: pa.Table

    def reject_counts(self) -> dict[str, int]:
        if self.rejects.num_rows == 0:
            return {}
        reasons = self.rejects.column("reason").to_numpy(zero_copy_only=False)
        names, counts = np.unique(reasons, return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def validate(
    table: pa.Table, source: Source, file: str = "", columns: list[str] | None = None
) -> Validated:
    """Split ``table`` of ``source`` into valid rows and rejects (docs/contract.md §1).

    Args:
        table: rows as read; must hold the source's required columns.
        source: which EBF source the rows belong to.
        file: the file they came from (named in errors and in rejects).
        columns: attribute columns to keep in ``valid`` (default: all present).

    Returns:
        ``Validated`` whose ``valid`` has ``user_id`` int64, ``ts_ms`` int64,
        ``dwell_ms`` float64 (sources with dwell) and the kept attributes.
    """
    where = file or "<table>"
    check_columns(table.schema, source, where)
    n = table.num_rows
    try:
        user_np, user_null, user_unfit = _int64_values(table.column("user_id"))
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise _column_error(where, source, "user_id", exc) from exc
    try:
        ts_ms, ts_null, ts_unfit, ts_out = _ts_ms(table.column("ts"))
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise _column_error(where, source, "ts", exc) from exc

    reason = np.full(n, -1, dtype=np.int8)

    def mark(mask: np.ndarray, name: str) -> None:
        reason[(reason < 0) & mask] = REJECT_REASONS.index(name)

    mark(user_null, "null_user_id")
    mark(ts_null, "null_ts")
    mark(user_unfit, "user_id_out_of_range")
    mark(ts_out, "ts_out_of_range")
    dwell_np: np.ndarray | None = None
    if source.has_dwell:
        try:  # safe=False: an int dwell above 2**53 rounds to the nearest float
            dwell = table.column("dwell_ms").cast(pa.float64(), safe=False)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise _column_error(where, source, "dwell_ms", exc) from exc
        dwell_np = dwell.fill_null(np.nan).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            mark(~np.isfinite(dwell_np), "dwell_not_finite")
            mark(dwell_np < 0, "dwell_negative")

    ok = reason < 0
    keep_attrs = [
        c
        for c in (columns if columns is not None else list(source.attributes))
        if c in table.column_names and c not in source.required
    ]
    valid_idx = None if ok.all() else np.flatnonzero(ok)
    cols: dict[str, pa.Array | np.ndarray] = {
        "user_id": user_np if valid_idx is None else user_np[valid_idx],
        "ts_ms": ts_ms if valid_idx is None else ts_ms[valid_idx],
    }
    if dwell_np is not None:
        cols["dwell_ms"] = dwell_np if valid_idx is None else dwell_np[valid_idx]
    attr_table = table.select(keep_attrs)
    if valid_idx is not None:
        attr_table = attr_table.take(pa.array(valid_idx))
    valid = pa.table({**cols, **{c: attr_table.column(c) for c in keep_attrs}})

    bad = np.flatnonzero(~ok)
    rejects = pa.table(
        {
            "source": pa.array([source.name] * len(bad), pa.string()),
            "reason": pa.array(np.asarray(REJECT_REASONS, dtype=object)[reason[bad]]),
            # null where the value as read has no int64 value (or was null)
            "user_id": pa.array(user_np[bad], mask=(user_null | user_unfit)[bad]),
            "ts_ms": pa.array(ts_ms[bad], mask=(ts_null | ts_unfit)[bad]),
            "dwell_ms": pa.array(
                dwell_np[bad] if dwell_np is not None else np.full(len(bad), np.nan),
                mask=None if dwell_np is not None else np.ones(len(bad), dtype=bool),
            ),
            "file": pa.array([file] * len(bad), pa.string()),
        },
        schema=REJECT_SCHEMA,
    )
    return Validated(valid=valid, rejects=rejects)
