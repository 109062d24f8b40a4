"""The HTTP request body of POST /v1/recommend: its media type checked, decoded, validated.

The API takes JSON in UTF-8 (RFC 8259): ``Content-Type: application/json`` or any ``application/*+json``,
with ``charset=utf-8`` if a charset is named; a request without a Content-Type is read as JSON (what a
bare ``curl --data-binary`` client sends is accepted); any other type is a 415."""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from services.gateway.errors import InvalidInput, UnsupportedMediaType
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
    except UnicodeDecodeError:  # msgspec lets it through for a string that is not UTF-8
        field = _field_with_bad_utf8(raw)
        raise InvalidInput(f"{field or 'the body'}: a string is not valid UTF-8", field) from None
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


def check_media_type(content_type: str | None, charset: str | None) -> None:
    """Raise UnsupportedMediaType unless the body is declared as JSON in UTF-8 (or not declared at all).
    `content_type` is the media type without parameters (None: no header), `charset` its charset, if any."""
    if content_type is None:
        return
    kind = content_type.strip().lower()
    if not (kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))):
        raise UnsupportedMediaType(f"Content-Type {content_type!r} is not supported: send application/json")
    if charset is not None and charset.strip().lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset!r} is not supported: JSON bodies are UTF-8")


def _field_with_bad_utf8(raw: bytes) -> str | None:
    """The path of the first key or string holding bytes that are not UTF-8 (None if it cannot be told).

    Bad bytes decode to lone surrogates U+DC80..U+DCFF under `surrogateescape`; the standard json module
    parses such a string, and the first key or value that holds one names the field."""
    try:
        doc = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return None
    return _find_bad_string(doc, "")


_MAX_DEPTH = 64


def _is_bad(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _find_bad_string(node: Any, path: str, depth: int = 0) -> str | None:
    if isinstance(node, str):
        return path if _is_bad(node) else None
    if depth > _MAX_DEPTH:  # a body this deep names no field a client could act on
        return None
    if isinstance(node, list):
        for i, child in enumerate(node):
            if (found := _find_bad_string(child, f"{path}[{i}]", depth + 1)) is not None:
                return found
    elif isinstance(node, dict):
        for key, child in node.items():
            # a key with bad bytes is named with them escaped (\xff): the error body must be valid UTF-8
            name = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            child_path = f"{path}.{name}" if path else name
            if _is_bad(key):
                return child_path
            if (found := _find_bad_string(child, child_path, depth + 1)) is not None:
                return found
    return None
