"""The HTTP contract of docs/contract.md §5 as pydantic models, and how errors read.

Strict validation, so bad input never reaches a model:

* every candidate attribute of docs/contract.md §1 is required, must be a JSON integer
  (``7`` or ``7.0``, as JSON Schema's ``integer``; not ``7.5``, a string or
  a bool) in the range of its column type (ids int64,
  ``category_id`` int32, ``media_type`` / ``surface`` int8, ``position``
  int16): a value outside its type is an unknown value;
* unknown fields (top level or candidate) are errors, not ignored;
* ``ts`` (epoch ms) lies in 2000-01-01..2100-01-01, like the input rows;
* 1..``max_candidates`` candidates: the cap is the app's config, and
  :func:`rank_request_model` puts it in the model, so pydantic refuses a longer
  list before it validates a single candidate (a 1 MiB body of ``{}``
  candidates costs milliseconds, not one error per candidate);
* 4xx bodies are ``{"error": "candidates[3].media_type: ...", "detail":
  [{"loc", "msg", "type"}, ...]}``: the message names the field; both are
  capped at ``ERROR_DETAIL_LIMIT`` errors.

The router parses the raw bytes with ``model_validate_json`` (one pass in
pydantic-core, no intermediate Python objects). :func:`openapi_schemas` are
the components of ``/openapi.json``, with int64 bounds as exact integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import pyarrow as pa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from dynamix_ray.schema import SOURCES, TS_MAX_MS, TS_MIN_MS

__all__ = [
    "Candidate",
    "CandidatesRequest",
    "CandidatesResponse",
    "ErrorBody",
    "RankRequest",
    "RankResponse",
    "error_body",
    "field_name",
    "openapi_schemas",
    "rank_request_model",
]

#: Errors listed in a 4xx body at most (message and ``detail``).
ERROR_DETAIL_LIMIT = 10

_STRICT = ConfigDict(extra="forbid", strict=True)
_MAX = {
    pa.int8(): 2**7 - 1,
    pa.int16(): 2**15 - 1,
    pa.int32(): 2**31 - 1,
    pa.int64(): 2**63 - 1,
}


def _integral(v: Any) -> Any:
    """JSON Schema's ``integer``: ``7`` and ``7.0`` (what generated clients
    may send), never ``7.5``, ``"7"`` or ``true``; exact past 2**53 only as
    integer literals."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def json_int(**constraints: Any) -> Any:
    """A JSON integer (see :func:`_integral`) with ``Field`` constraints,
    which the schema shows as ``minimum`` / ``maximum`` (the constraints sit
    on the ``int`` itself, inside the before-validator)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


UserId = json_int(ge=-(2**63), le=2**63 - 1, description="int64 user id")
Instant = json_int(
    ge=TS_MIN_MS,
    lt=TS_MAX_MS,
    description="epoch milliseconds (default: the server's now)",
)

#: One candidate ad: the ad-impression attributes of docs/contract.md §1, all required.
Candidate: type[BaseModel] = cast(Any, create_model)(
    "Candidate",
    __config__=_STRICT,
    **{
        name: (json_int(ge=-_MAX[dtype] - 1, le=_MAX[dtype]), ...)
        for name, dtype in SOURCES["ad_impressions"].attributes.items()
    },
)


class RankRequest(BaseModel):
    model_config = _STRICT

    user_id: UserId  # type: ignore[valid-type]
    ts: Instant | None = None  # type: ignore[valid-type]
    candidates: Annotated[list[Candidate], Field(min_length=1)]  # type: ignore[valid-type]


def rank_request_model(max_candidates: int) -> type[RankRequest]:
    """:class:`RankRequest` with the app's candidate cap in its schema: the
    list's length is checked before its items are validated."""
    return cast(Any, create_model)(
        "RankRequest",
        __base__=RankRequest,
        candidates=(
            Annotated[
                list[Candidate],  # type: ignore[valid-type]
                Field(min_length=1, max_length=max_candidates),
            ],
            ...,
        ),
    )


class RankResponse(BaseModel):
    user_id: int
    segment: Literal["active", "passive"]
    scores: list[float]
    model_version: str


class CandidatesRequest(BaseModel):
    model_config = _STRICT

    user_id: UserId  # type: ignore[valid-type]
    k: json_int(ge=1, description="ads wanted (at most the app's cap)") = 100  # type: ignore[valid-type]


class CandidatesResponse(BaseModel):
    user_id: int
    ads: list[int]
    scores: list[float]
    as_of_ms: int = Field(description="the precomputed table's instant")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class ErrorBody(BaseModel):
    """Every non-200 answer of the app."""

    error: str = Field(description="one line naming the field or the reason")
    detail: list[ErrorDetail] | None = Field(
        None, description=f"validation errors (at most {ERROR_DETAIL_LIMIT})"
    )


def openapi_schemas(models: Sequence[type[BaseModel]]) -> dict[str, Any]:
    """``components.schemas`` of ``models`` as pydantic writes them (FastAPI's
    own generation turns the int64 bounds into floats: ``9.22e+18``)."""
    _, top = models_json_schema(
        [(m, "validation") for m in models],
        ref_template="#/components/schemas/{model}",
    )
    return cast(dict[str, Any], top.get("$defs", {}))


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "candidates", 3, "ad_id")`` -> ``candidates[3].ad_id``."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    if not parts or all(isinstance(p, int) for p in parts):
        return "body"  # e.g. a JSON decode error at a byte offset
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def error_body(
    errors: Sequence[dict[str, Any]], limit: int = ERROR_DETAIL_LIMIT
) -> dict[str, Any]:
    """The 4xx body: a one-line message naming the fields, and the details of
    the first ``limit`` errors (the input values are never echoed)."""
    head = errors[:limit]
    detail = [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc") or ()],
            "msg": str(e.get("msg")),
            "type": e.get("type"),
        }
        for e in head
    ]
    msgs = [f"{field_name(e.get('loc') or ())}: {e.get('msg')}" for e in head]
    if len(errors) > limit:
        msgs.append(f"... and {len(errors) - limit} more")
    return {"error": "; ".join(msgs), "detail": detail}
