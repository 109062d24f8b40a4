"""The HTTP request body of POST /v1/recommend: decoded, validated, turned into the wire request."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from services.gateway.errors import InvalidInput
from shared.schemas import NonNegInt, PosInt, UserId, field_from_error

HttpUserId = UserId | Annotated[int, Meta(ge=0, le=2**63 - 1)]


class RecommendBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    user_id: HttpUserId
    history: list[NonNegInt]
    timestamps: list[NonNegInt] | None = None
    candidates: list[NonNegInt]
    k: PosInt | None = None


_decoder = msgspec.json.Decoder(RecommendBody)


def parse_body(raw: bytes, *, max_history: int, max_candidates: int) -> RecommendBody:
    """Decode and check the body; raise InvalidInput naming the offending field."""
    if not raw.strip():
        raise InvalidInput("empty body: expected a JSON object", None)
    try:
        body = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc), field_from_error(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}", None) from None
    if len(body.history) > max_history:
        raise InvalidInput(f"history has {len(body.history)} items, the limit is {max_history}", "history")
    if body.timestamps is not None and len(body.timestamps) != len(body.history):
        raise InvalidInput(
            f"timestamps has {len(body.timestamps)} entries but history has {len(body.history)}", "timestamps"
        )
    if not body.candidates:
        raise InvalidInput("candidates must not be empty", "candidates")
    if len(body.candidates) > max_candidates:
        raise InvalidInput(f"{len(body.candidates)} candidates, the limit is {max_candidates}", "candidates")
    return body


def user_key(body: RecommendBody) -> str:
    """Integer and string user ids are one namespace: 42 and "42" are the same user."""
    return str(body.user_id)
