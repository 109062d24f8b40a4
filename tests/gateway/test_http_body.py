"""The recommend body's media type and its decoding (pure: services/gateway/http_body.py)."""

from __future__ import annotations

import pytest

from services.gateway.errors import InvalidInput, UnsupportedMediaType
from services.gateway.http_body import check_media_type, parse_body


def bad(raw: bytes) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        parse_body(raw, max_history=10, max_candidates=10)
    return err.value


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"user_id": "\xff\xfe", "history": [], "candidates": [1]}', "user_id"),
        (b'{"user_id": "u", "history": [], "candidates": [1], "a\xffb": 1}', "a\\xffb"),
    ],
)
def test_bytes_that_are_not_utf8_are_a_400_naming_the_field(raw: bytes, field: str) -> None:
    err = bad(raw)
    assert err.field == field and err.status == 400
    err.message.encode()  # the message is valid UTF-8 (the error body must be)


def test_a_deep_body_with_bad_bytes_is_still_a_400() -> None:
    raw = b'{"user_id": "\xff", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = bad(raw)
    assert err.field is None and "UTF-8" in err.message


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [(None, None), ("application/json", None), ("application/json", "utf-8"), ("Application/JSON", "UTF8")]
    + [("application/vnd.onepool+json", None), ("application/json", "utf_8")],
)
def test_json_in_utf8_is_accepted(content_type: str | None, charset: str | None) -> None:
    check_media_type(content_type, charset)


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [("text/plain", None), ("application/x-www-form-urlencoded", None), ("application/octet-stream", None)]
    + [("application/json", "latin-1"), ("text/json", None)],
)
def test_anything_else_is_a_415(content_type: str, charset: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as err:
        check_media_type(content_type, charset)
    assert err.value.status == 415 and err.value.code == "unsupported_media_type"
