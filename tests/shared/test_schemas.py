"""The wire codec's edge: decode, the field named in an error, worker ids (shared/schemas.py)."""

from __future__ import annotations

import pytest

from shared import schemas as s
from shared.errors import ErrorKind, OnepoolError


def test_decode_validates_and_names_the_field() -> None:
    dec = s.decoder(s.InferenceRequest)
    good = s.InferenceRequest(request_id="r", user_id="u", history=[1, 2], candidates=[3])
    assert s.decode(dec, s.encode(good)) == good
    bad = s.encode(s.InferenceRequest(request_id="r", user_id="u", history=[1, 2], candidates=[3])).replace(
        b"\xa1u", b"\xa1\xff"
    )
    with pytest.raises(s.DecodeError) as not_utf8:
        s.decode(dec, bad)
    assert "UTF-8" in not_utf8.value.message
    with pytest.raises(s.DecodeError) as garbage:
        s.decode(dec, b"\xc1")  # a byte msgpack never uses
    assert garbage.value.field is None and garbage.value.message.startswith("undecodable message")
    wrong = s.encode(s.KvEntry("x", 1))  # another message type
    with pytest.raises(s.DecodeError):
        s.decode(dec, wrong)
    # a DecodeError is the sender's fault, for every caller that classifies errors
    assert isinstance(not_utf8.value, OnepoolError)
    assert (not_utf8.value.code, not_utf8.value.kind) == ("bad_message", ErrorKind.CLIENT)


def test_an_unknown_schema_version_is_refused_naming_v() -> None:
    future = s.encode(s.SnapshotRequest(v=s.SCHEMA_VERSION + 1))
    with pytest.raises(s.DecodeError) as err:
        s.decode(s.decoder(s.SnapshotRequest), future)
    assert err.value.field == "v" and str(s.SCHEMA_VERSION + 1) in err.value.message


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("Expected `int`, got `str` - at `$.history[3]`", "history[3]"),
        ("Object contains unknown field `surprise`", "surprise"),
        ("Object contains unknown field `x` - at `$.load`", "load.x"),
        ("Object missing required field `user_id`", "user_id"),
        ("Expected `str`, got `int` - at `$.user_id`", "user_id"),
        ("something else entirely", None),
    ],
)
def test_field_from_error(message: str, field: str | None) -> None:
    assert s.field_from_error(message) == field


@pytest.mark.parametrize("worker_id", ["w0", "gpu-node_12", "a" * 64])
def test_worker_ids_that_are_one_subject_token(worker_id: str) -> None:
    assert s.check_worker_id(worker_id) == worker_id
    assert s.infer_subject(worker_id) == f"onepool.worker.{worker_id}.infer"


@pytest.mark.parametrize("worker_id", ["", "a.b", "a*", "w 0", "a" * 65, "w>"])
def test_worker_ids_that_are_not(worker_id: str) -> None:
    with pytest.raises(ValueError, match="NATS subject token"):
        s.check_worker_id(worker_id)


@pytest.mark.parametrize(
    ("subject", "template"),
    [
        (s.infer_subject("w3"), "onepool.worker.{worker}.infer"),
        (s.alpha_subject("gpu-7"), "onepool.worker.{worker}.alpha"),
        (s.snapshot_request_subject("w0"), "onepool.worker.{worker}.snapshot"),
        (s.digest_subject("w12"), "onepool.digest.{worker}"),
        (s.DIGEST_WILDCARD, "onepool.digest.{worker}"),
        ("onepool.worker.*.alpha", "onepool.worker.{worker}.alpha"),
        (s.echo_subject("0f3a"), "onepool.echo.{token}"),
        (s.VIEW_SUBJECT, None),
        (s.VIEW_SNAPSHOT_SUBJECT, None),
        (s.FEATURES_SUBJECT, None),
        ("onepool.worker.w3.other", None),
        ("onepool.worker.w3.infer.more", None),
        ("svc.traced", None),
        ("_INBOX.abc.1", None),
    ],
)
def test_subject_templates_name_per_worker_subjects(subject: str, template: str | None) -> None:
    assert s.subject_template(subject) == template


def test_reply_subjects_are_inboxes() -> None:
    assert s.is_reply_subject("_INBOX.Xy7.1f")
    # a user's inbox (the bus's with a user name): still a temporary subject, out of span names
    assert s.is_reply_subject("_INBOX.gateway.Xy7.1f") and s.is_reply_subject("_INBOX.worker-0.Xy7.1f")
    for user in (None, "gateway", "leaf-hostb"):
        assert s.is_reply_subject(s.inbox_prefix(user) + ".Xy7.1f")
        assert s.subject_template(s.inbox_prefix(user) + ".Xy7.1f") is None
    assert not s.is_reply_subject("_INBOXES.x") and not s.is_reply_subject(s.infer_subject("w0"))
    assert not s.is_reply_subject("_INBOX") and not s.is_reply_subject("x._INBOX.gateway.1")


@pytest.mark.parametrize(
    ("user", "prefix"),
    [
        (None, "_INBOX"),
        ("gateway", "_INBOX.gateway"),
        ("cachestate", "_INBOX.cachestate"),
        ("controller", "_INBOX.controller"),
        ("worker-0", "_INBOX.worker-0"),
        ("leaf-hostb", "_INBOX.leaf-hostb"),
        ("Alice_2", "_INBOX.Alice_2"),
        ("alice@example", "_INBOX.alice@example"),  # NATS allows any token without '.', '*', '>' or spaces
        ("ünïcode", "_INBOX.ünïcode"),
    ],
)
def test_a_users_replies_come_to_its_own_inbox(user: str | None, prefix: str) -> None:
    assert s.inbox_prefix(user) == prefix
    assert s.inbox_prefix(user).startswith(s.INBOX_PREFIX)


@pytest.mark.parametrize(
    "user",
    ["", "a.b", ".", "*", ">", "a*", "a>", "a b", "a\tb", "a\nb", "a\rb", "a\x00b", "a\x7f", "a\u00a0b"],
)
def test_a_user_name_that_is_not_one_subject_token_has_no_inbox(user: str) -> None:
    with pytest.raises(ValueError, match="one NATS subject token") as refused:
        s.inbox_prefix(user)
    assert repr(user) in str(refused.value)
