"""The HTTP contract of SPEC §5 as pydantic models, and how errors read.

Strict validation, so bad input never reaches a model:

* every candidate attribute of SPEC §1 is required, must be a JSON integer
  (not a string, float or bool) in the range of its column type (ids int64,
  ``category_id`` int32, ``media_type`` / ``surface`` int8, ``position``
  int16): a value outside its type is an unknown value;
* unknown fields (top level or candidate) are errors, not ignored;
* ``ts`` (epoch ms) lies in 2000-01-01..2100-01-01, like the input rows;
* 1..``max_candidates`` candidates (the cap is the app's config and is checked
  by the router);
* 4xx bodies are ``{"error": "candidates[3].media_type: ...", "detail":
  [{"loc", "msg", "type"}, ...]}``: the message names the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, create_model

from dynamix_ray.schema import SOURCES, TS_MAX_MS, TS_MIN_MS

__all__ = [
    "Candidate",
    "CandidatesRequest",
    "CandidatesResponse",
    "RankRequest",
    "RankResponse",
    "error_body",
    "field_name",
]

_STRICT = ConfigDict(extra="forbid", strict=True)
_MAX = {
    pa.int8(): 2**7 - 1,
    pa.int16(): 2**15 - 1,
    pa.int32(): 2**31 - 1,
    pa.int64(): 2**63 - 1,
}

UserId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1, description="int64 user id")]
Instant = Annotated[
    int,
    Field(
        ge=TS_MIN_MS,
        lt=TS_MAX_MS,
        description="epoch milliseconds (default: the server's now)",
    ),
]

#: One candidate ad: the ad-impression attributes of SPEC §1, all required.
Candidate: type[BaseModel] = cast(Any, create_model)(
    "Candidate",
    __config__=_STRICT,
    **{
        name: (Annotated[int, Field(ge=-_MAX[dtype] - 1, le=_MAX[dtype])], ...)
        for name, dtype in SOURCES["ad_impressions"].attributes.items()
    },
)


class RankRequest(BaseModel):
    model_config = _STRICT

    user_id: UserId
    ts: Instant | None = None
    candidates: Annotated[list[Candidate], Field(min_length=1)]  # type: ignore[valid-type]


class RankResponse(BaseModel):
    user_id: int
    segment: Literal["active", "passive"]
    scores: list[float]
    model_version: str


class CandidatesRequest(BaseModel):
    model_config = _STRICT

    user_id: UserId
    k: Annotated[int, Field(ge=1, description="ads wanted (at most the app's cap)")] = (
        100
    )
    ts: Instant | None = None


class CandidatesResponse(BaseModel):
    user_id: int
    ads: list[int]
    scores: list[float]


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "candidates", 3, "ad_id")`` -> ``candidates[3].ad_id``."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    if not parts or all(isinstance(p, int) for p in parts):
        return "body"  # e.g. a JSON decode error at a byte offset
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def error_body(errors: Sequence[dict[str, Any]], limit: int = 10) -> dict[str, Any]:
    """The 4xx body: a one-line message naming the fields, and the details."""
    detail = [
        {
            "loc": list(e.get("loc") or ()),
            "msg": str(e.get("msg")),
            "type": e.get("type"),
        }
        for e in errors
    ]
    msgs = [f"{field_name(e.get('loc') or ())}: {e.get('msg')}" for e in errors[:limit]]
    if len(detail) > limit:
        msgs.append(f"... and {len(detail) - limit} more")
    return {"error": "; ".join(msgs), "detail": detail}
