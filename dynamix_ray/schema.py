"""EBF sources (SPEC §1), validation of rows, and the rejects they produce.

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

REJECT_REASONS = (
    "null_user_id",
    "null_ts",
    "ts_out_of_range",
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

_TS_UNIT_TO_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


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


def ts_to_ms(ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``ts`` column (timestamp of any unit, naive = UTC, or integer epoch ms) to
    int64 epoch ms, floor-rounded; nulls become ``INT64_MIN`` (see :func:`validate`)."""
    if isinstance(ts, pa.ChunkedArray):
        ts = ts.combine_chunks()
    if pa.types.is_timestamp(ts.type):
        mul, div = _TS_UNIT_TO_MS[ts.type.unit]
        raw = ts.view(pa.int64()) if ts.type.tz is None else ts.cast(pa.int64())
        values = raw.fill_null(np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)
        nulls = np.asarray(ts.is_null().to_numpy(zero_copy_only=False))
        out = values * mul if mul != 1 else values // div
        out = np.where(nulls, np.iinfo(np.int64).min, out)
        return out.astype(np.int64, copy=False)
    return (
        ts.cast(pa.int64())
        .fill_null(np.iinfo(np.int64).min)
        .to_numpy(zero_copy_only=False)
        .astype(np.int64, copy=False)
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
    """Split ``table`` of ``source`` into valid rows and rejects (SPEC §1).

    Args:
        table: rows as read; must hold the source's required columns.
        source: which EBF source the rows belong to.
        file: the file they came from (named in errors and in rejects).
        columns: attribute columns to keep in ``valid`` (default: all present).

    Returns:
        ``Validated`` whose ``valid`` has ``user_id`` int64, ``ts_ms`` int64,
        ``dwell_ms`` float64 (sources with dwell) and the kept attributes.
    """
    check_columns(table.schema, source, file or "<table>")
    n = table.num_rows
    user = table.column("user_id")
    user_null = np.asarray(user.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    user_np = (
        user.cast(pa.int64())
        .fill_null(0)
        .to_numpy(zero_copy_only=False)
        .astype(np.int64)
    )
    ts_ms = ts_to_ms(table.column("ts"))
    ts_null = ts_ms == np.iinfo(np.int64).min

    reason = np.full(n, -1, dtype=np.int8)

    def mark(mask: np.ndarray, code: int) -> None:
        reason[(reason < 0) & mask] = code

    mark(user_null, 0)
    mark(ts_null, 1)
    mark((ts_ms < TS_MIN_MS) | (ts_ms >= TS_MAX_MS), 2)
    dwell_np: np.ndarray | None = None
    if source.has_dwell:
        dwell = table.column("dwell_ms").cast(pa.float64())
        dwell_np = dwell.fill_null(np.nan).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            mark(~np.isfinite(dwell_np), 3)
            mark(dwell_np < 0, 4)

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
            "user_id": pa.array(user_np[bad], mask=user_null[bad]),
            "ts_ms": pa.array(ts_ms[bad], mask=ts_null[bad]),
            "dwell_ms": pa.array(
                dwell_np[bad] if dwell_np is not None else np.full(len(bad), np.nan),
                mask=None if dwell_np is not None else np.ones(len(bad), dtype=bool),
            ),
            "file": pa.array([file] * len(bad), pa.string()),
        },
        schema=REJECT_SCHEMA,
    )
    return Validated(valid=valid, rejects=rejects)
