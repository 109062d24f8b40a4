"""NATS credentials and TLS (shared/bus_auth.py, shared/bus.py) against real nats-servers started with a
configuration file; the TLS fixtures in tests/shared/tls/ are throwaway certificates (make.sh wrote them), the
operator, accounts, users and creds files of the JWT tests are made afresh by tests/shared/nats_jwt.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from opentelemetry.sdk.trace import TracerProvider

from shared import schemas as s
from shared.bus import Bus, Message
from shared.bus_auth import ENV_PREFIX, BusAuth, load_bus_auth, redact_url
from shared.errors import BusError, SettingsError
from shared.runner import run_bus_service
from shared.settings import describe_settings
from shared.telemetry import Telemetry
from tests.shared.nats_jwt import NKey, Operator, creds_text, user_jwt, write_creds

TLS = Path(__file__).resolve().parent / "tls"
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Passw0rd"
TOKEN = "t0ken-0f-the-test"
USERS_CONF = f'authorization {{ users = [ {{user: alice, password: "{PASSWORD}"}} ] }}\n'
TOKEN_CONF = f'authorization {{ token: "{TOKEN}" }}\n'
# Each user may read its own reply inbox only, as deploy/compose/nats/users.conf has it.
INBOX_CONF = (
    "authorization { users = [\n"
    f'  {{user: alice, password: "{PASSWORD}", permissions: '
    '{publish: ["auth.echo"], subscribe: ["_INBOX.alice.>"]}}\n'
    f'  {{user: bob, password: "{PASSWORD}", permissions: '
    '{publish: ["bob.own"], subscribe: ["auth.echo", "_INBOX.bob.>"], allow_responses: true}}\n'
    "] }\n"
)
TLS_CONF = f'tls {{ cert_file: "{TLS / "server.pem"}", key_file: "{TLS / "server-key.pem"}" }}\n'
MTLS_CONF = (
    f'tls {{ cert_file: "{TLS / "server.pem"}", key_file: "{TLS / "server-key.pem"}", '
    f'ca_file: "{TLS / "ca.pem"}", verify: true }}\n'
)
FAIL_FAST = 1.0  # connect_timeout_s of a connection that is meant to fail

MakeServer = Callable[[str], Any]
Connect = Callable[..., Awaitable[Bus]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    buses: list[Bus] = []

    async def make(url: str, auth: BusAuth | None = None, **kwargs: Any) -> Bus:
        bus = await Bus.connect(url, name="auth-test", auth=auth, **kwargs)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close(drain=False)


async def _round_trip(bus: Bus) -> None:
    async def echo(msg: Message) -> bytes:
        return b"re:" + msg.data

    sub = await bus.subscribe("auth.echo", echo)
    assert await bus.request("auth.echo", b"hi", timeout_s=2) == b"re:hi"
    await sub.stop()


def _env(**values: str) -> dict[str, str]:
    return {f"{ENV_PREFIX}{k.upper()}": v for k, v in values.items()}


def _url(server: Any, userinfo: str = "", scheme: str = "nats") -> str:
    return f"{scheme}://{userinfo}127.0.0.1:{server.port}"


# ---- settings ----


def test_the_environment_variables_are_the_documented_contract() -> None:
    table = describe_settings(BusAuth, ENV_PREFIX)
    names = [line.split("`")[1] for line in table.splitlines()[2:]]
    assert names == [
        "ONEPOOL_NATS_USER",
        "ONEPOOL_NATS_PASSWORD",
        "ONEPOOL_NATS_PASSWORD_FILE",
        "ONEPOOL_NATS_TOKEN",
        "ONEPOOL_NATS_TOKEN_FILE",
        "ONEPOOL_NATS_CREDS_FILE",
        "ONEPOOL_NATS_TLS_CA_FILE",
        "ONEPOOL_NATS_TLS_CERT_FILE",
        "ONEPOOL_NATS_TLS_KEY_FILE",
    ]
    none = load_bus_auth(env={})
    assert none == BusAuth() and none.method == "none" and none.connect_options() == {}


@pytest.mark.parametrize(
    ("env", "field", "named"),
    [
        (_env(password=PASSWORD), "ONEPOOL_NATS_PASSWORD", "ONEPOOL_NATS_USER"),
        (_env(user="alice"), "ONEPOOL_NATS_USER", "ONEPOOL_NATS_PASSWORD_FILE"),
        (_env(token=TOKEN, token_file="/run/secrets/t"), "ONEPOOL_NATS_TOKEN_FILE", "ONEPOOL_NATS_TOKEN "),
        (_env(user="a", password=PASSWORD, password_file="/x"), "ONEPOOL_NATS_PASSWORD_FILE", "PASSWORD "),
        (_env(user="a", password=PASSWORD, token=TOKEN), "ONEPOOL_NATS_TOKEN", "ONEPOOL_NATS_USER"),
        (_env(token=TOKEN, creds_file=str(TLS / "ca.pem")), "ONEPOOL_NATS_CREDS_FILE", "ONEPOOL_NATS_TOKEN"),
        (
            _env(tls_cert_file=str(TLS / "client.pem")),
            "ONEPOOL_NATS_TLS_CERT_FILE",
            "ONEPOOL_NATS_TLS_KEY_FILE",
        ),
        (_env(tls_key_file=str(TLS / "client-key.pem")), "ONEPOOL_NATS_TLS_KEY_FILE", "TLS_CERT_FILE"),
    ],
)
def test_contradictory_settings_are_refused_by_name(env: dict[str, str], field: str, named: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_bus_auth(env=env)
    assert refused.value.field == field
    assert field in refused.value.message and named in refused.value.message
    assert PASSWORD not in refused.value.message and TOKEN not in refused.value.message


@pytest.mark.parametrize("user", ["alice.smith", "*", ">", "alice>", "al ice", "alice\t", "alice\n", ""])
def test_a_user_name_must_be_one_subject_token(user: str) -> None:
    """The bus's replies come to _INBOX.<user> (shared.schemas.inbox_prefix): a name that would split or
    widen that subject is refused by name."""
    with pytest.raises(SettingsError) as refused:
        BusAuth(user=user, password=PASSWORD)
    assert refused.value.field == "ONEPOOL_NATS_USER"
    assert refused.value.message.startswith("ONEPOOL_NATS_USER: ")
    assert "one NATS subject token" in refused.value.message and PASSWORD not in refused.value.message
    with pytest.raises(SettingsError, match="ONEPOOL_NATS_USER"):
        load_bus_auth(env=_env(user="alice.smith", password=PASSWORD))
    for good in ("gateway", "cachestate", "controller", "worker-0", "leaf-hostb", "Alice_2"):
        assert load_bus_auth(env=_env(user=good, password=PASSWORD)).user == good


def test_secret_files_lose_one_trailing_newline(tmp_path: Path) -> None:
    for text, secret in [(f"{PASSWORD}\n", PASSWORD), (f"{PASSWORD}\r\n", PASSWORD), ("p w\n\n", "p w\n")]:
        (tmp_path / "password").write_text(text, newline="")
        auth = load_bus_auth(env=_env(user="alice", password_file=str(tmp_path / "password")))
        assert auth.connect_options() == {"user": "alice", "password": secret}
        assert secret not in repr(auth)
    (tmp_path / "token").write_text(TOKEN)
    auth = load_bus_auth(env=_env(token_file=str(tmp_path / "token")))
    assert auth.method == "token" and auth.connect_options() == {"token": TOKEN}


def test_unreadable_files_are_named_with_their_path_never_their_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + PASSWORD.encode())
    cases = [
        (_env(user="a", password_file=str(missing)), "ONEPOOL_NATS_PASSWORD_FILE", "No such file"),
        (_env(token_file=str(tmp_path)), "ONEPOOL_NATS_TOKEN_FILE", "Is a directory"),
        (_env(token_file=str(tmp_path / "empty")), "ONEPOOL_NATS_TOKEN_FILE", "is empty"),
        (_env(token_file=str(tmp_path / "binary")), "ONEPOOL_NATS_TOKEN_FILE", "not UTF-8"),
        (_env(creds_file=str(missing)), "ONEPOOL_NATS_CREDS_FILE", "No such file"),
        (_env(creds_file=str(TLS / "ca.pem")), "ONEPOOL_NATS_CREDS_FILE", "not a NATS credentials file"),
        (_env(tls_ca_file=str(missing)), "ONEPOOL_NATS_TLS_CA_FILE", "No such file"),
        (_env(tls_ca_file=str(TLS / "client-key.pem")), "ONEPOOL_NATS_TLS_CA_FILE", "no usable CA"),
        (
            _env(tls_cert_file=str(TLS / "client.pem"), tls_key_file=str(missing)),
            "ONEPOOL_NATS_TLS_KEY_FILE",
            "No such file",
        ),
        (
            _env(tls_cert_file=str(TLS / "client.pem"), tls_key_file=str(TLS / "server-key.pem")),
            "ONEPOOL_NATS_TLS_CERT_FILE",
            "KEY_VALUES_MISMATCH",
        ),
    ]
    for env, field, why in cases:
        with pytest.raises(SettingsError) as refused:
            load_bus_auth(env=env)
        message = refused.value.message
        assert refused.value.field == field and why in message, message
        assert message.startswith(field) and env[field] in message
        assert PASSWORD not in message


def _broken_creds() -> list[tuple[str, str, str]]:
    """(name, creds file text, what the SettingsError says) for files nats-py could not use."""
    operator = Operator.create()
    user, other = NKey.create("user"), NKey.create("user")
    jwt = user_jwt(operator.account, user)
    good = creds_text(jwt, user)
    cut_in_seed = good.index(user.seed) + 20
    return [
        ("truncated in the JWT", good[: good.index(jwt) + 40], "the user JWT section is empty or not closed"),
        ("truncated before the seed", good[: good.index("****")], "no NKey seed section"),
        ("truncated in the seed", good[:cut_in_seed], "the NKey seed section is empty or not closed"),
        ("no JWT", good[good.index("****") :], "no user JWT section"),
        ("CRLF line endings", good.replace("\n", "\r\n"), "CRLF line endings"),
        ("a blank line for the JWT", good.replace(jwt, ""), "the user JWT section is empty"),
        ("not a JWT", good.replace(jwt, "not-a-jwt"), "the user JWT is not a JWT"),
        ("a JWT of bad base64", good.replace(jwt, "a.b.c"), "the user JWT is not a JWT"),
        ("a seed of bad base32", good.replace(user.seed, user.seed[:-3] + "!!!"), "not a valid NKey seed"),
        ("a seed cut short", good.replace(user.seed, user.seed[:40]), "not a valid NKey seed"),
        ("a seed with a space", good.replace(user.seed, user.seed + " "), "not a valid NKey seed"),
        ("an account's seed", good.replace(user.seed, operator.account.seed), "not a user's (SU...)"),
        ("another user's seed", creds_text(jwt, other), f"is for {user.public} but the NKey seed is of"),
    ]


def test_a_broken_creds_file_is_refused_by_name_never_showing_the_seed(tmp_path: Path) -> None:
    for i, (name, text, why) in enumerate(_broken_creds()):
        path = tmp_path / f"{i}.creds"
        path.write_bytes(text.encode())
        with pytest.raises(SettingsError) as refused:
            load_bus_auth(env=_env(creds_file=str(path)))
        message = refused.value.message
        assert refused.value.field == "ONEPOOL_NATS_CREDS_FILE" and why in message, (name, message)
        assert message.startswith(f"ONEPOOL_NATS_CREDS_FILE: {path}"), (name, message)
        seeds = [line for line in text.splitlines() if line.startswith("S")]
        assert all(seed[:8] not in message for seed in seeds), (name, message)


def test_an_encrypted_client_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    key = tmp_path / "encrypted.pem"
    subprocess.run(
        ["openssl", "ec", "-in", TLS / "client-key.pem", "-aes256", "-passout", "pass:x", "-out", key],
        check=True,
        capture_output=True,
    )
    with pytest.raises(SettingsError, match="encrypted key") as refused:
        BusAuth(tls_cert_file=TLS / "client.pem", tls_key_file=key)
    assert refused.value.field == "ONEPOOL_NATS_TLS_KEY_FILE"


def test_a_tls_context_is_built_from_the_files() -> None:
    auth = BusAuth(
        tls_ca_file=TLS / "ca.pem", tls_cert_file=TLS / "client.pem", tls_key_file=TLS / "client-key.pem"
    )
    assert auth.tls is not None and auth.tls.check_hostname
    assert auth.connect_options() == {"tls": auth.tls}
    assert [c["subject"] for c in auth.tls.get_ca_certs()] == [((("commonName", "onepool test ca"),),)]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://alice:pw@nats:4222", "nats://***@nats:4222"),
        ("nats://tok@nats", "nats://***@nats"),
        ("tls://u:p@ss:w/rd@10.0.0.1:4222", "tls://***@10.0.0.1:4222"),
        ("alice:pw@nats:4222", "***@nats:4222"),
        ("nats://nats:4222", "nats://nats:4222"),
        ("nats:4222", "nats:4222"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# ---- against nats-server ----


async def test_user_and_password_from_env_and_from_a_file(
    make_nats_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    server = make_nats_server(USERS_CONF)
    await _round_trip(await connect(server.url, load_bus_auth(env=_env(user="alice", password=PASSWORD))))
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    auth = load_bus_auth(env=_env(user="alice", password_file=str(secret)))
    await _round_trip(await connect(server.url, auth))
    with pytest.raises(BusError, match="Authorization"):
        await connect(server.url, connect_timeout_s=FAIL_FAST)  # no credentials


async def test_with_a_user_name_replies_come_to_that_users_own_inbox(
    make_nats_server: MakeServer, connect: Connect
) -> None:
    """A Bus with a user name requests through _INBOX.<user>.<random>.<counter>, the one inbox a user may read
    under per-user permissions (INBOX_CONF); without one (a token), through _INBOX.<random>.<counter>."""
    replies: list[str] = []

    async def echo(msg: Message) -> bytes:
        assert msg.reply is not None
        replies.append(msg.reply)
        return b"re:" + msg.data

    server = make_nats_server(INBOX_CONF)
    alice = await connect(server.url, BusAuth(user="alice", password=PASSWORD))
    bob = await connect(server.url, BusAuth(user="bob", password=PASSWORD))
    await bob.subscribe("auth.echo", echo)
    assert await alice.request("auth.echo", b"hi", timeout_s=2) == b"re:hi"
    assert await alice.request("auth.echo", b"again", timeout_s=2) == b"re:again"
    first, second = replies
    assert first.startswith("_INBOX.alice.") and len(first.split(".")) == 4, first
    assert first.rsplit(".", 1)[0] == second.rsplit(".", 1)[0] and first != second  # one inbox, a token each

    replies.clear()
    by_token = make_nats_server(TOKEN_CONF)
    client = await connect(by_token.url, BusAuth(token=TOKEN))
    responder = await connect(by_token.url, BusAuth(token=TOKEN))
    await responder.subscribe("auth.echo", echo)
    assert await client.request("auth.echo", b"hi", timeout_s=2) == b"re:hi"
    [reply] = replies
    assert reply.startswith(s.inbox_prefix(None) + ".") and len(reply.split(".")) == 3, reply


async def test_a_wrong_password_fails_and_no_message_or_log_line_shows_a_secret(
    make_nats_server: MakeServer, connect: Connect
) -> None:
    server = make_nats_server(USERS_CONF)
    wrong = "wr0ng-Passw0rd"
    redacted = f"nats://***@127.0.0.1:{server.port}"
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(BusError) as refused:
            await connect(server.url, BusAuth(user="alice", password=wrong), connect_timeout_s=FAIL_FAST)
        assert "Authorization Violation" in refused.value.message
        assert wrong not in refused.value.message
        with pytest.raises(BusError) as refused:
            await connect(_url(server, f"alice:{wrong}@"), connect_timeout_s=FAIL_FAST)
        assert redacted in refused.value.message and wrong not in refused.value.message
        good = await connect(_url(server, f"alice:{PASSWORD}@"))
        await _round_trip(good)
        assert good.url == redacted
        await good.close()
    urls = {line["event"]: line["url"] for line in logs if "url" in line}
    assert urls["bus error"] == urls["bus connected"] == urls["bus connection closed"] == redacted
    assert wrong not in repr(logs) and PASSWORD not in repr(logs)


async def test_token_from_env_a_file_and_the_url(
    make_nats_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    server = make_nats_server(TOKEN_CONF)
    await _round_trip(await connect(server.url, load_bus_auth(env=_env(token=TOKEN))))
    (tmp_path / "token").write_text(TOKEN + "\n")
    await _round_trip(await connect(server.url, load_bus_auth(env=_env(token_file=str(tmp_path / "token")))))
    by_url = await connect(_url(server, f"{TOKEN}@"))
    assert by_url.url == f"nats://***@127.0.0.1:{server.port}"
    with pytest.raises(BusError) as refused:
        await connect(server.url, BusAuth(token="not-" + TOKEN), connect_timeout_s=FAIL_FAST)
    assert "Authorization Violation" in refused.value.message and TOKEN not in refused.value.message


async def test_tls_with_the_ca_file(make_nats_server: MakeServer, connect: Connect) -> None:
    server = make_nats_server(TLS_CONF)
    auth = load_bus_auth(env=_env(tls_ca_file=str(TLS / "ca.pem")))
    await _round_trip(await connect(_url(server, scheme="tls"), auth))
    await _round_trip(await connect(server.url, auth))  # the server requires TLS: a nats:// URL upgrades too
    with pytest.raises(BusError, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(server.url, BusAuth(tls_ca_file=TLS / "other-ca.pem"), connect_timeout_s=FAIL_FAST)


async def test_mutual_tls_needs_the_client_certificate(
    make_nats_server: MakeServer, connect: Connect
) -> None:
    server = make_nats_server(MTLS_CONF)
    env = _env(
        tls_ca_file=str(TLS / "ca.pem"),
        tls_cert_file=str(TLS / "client.pem"),
        tls_key_file=str(TLS / "client-key.pem"),
    )
    await _round_trip(await connect(_url(server, scheme="tls"), load_bus_auth(env=env)))
    with pytest.raises(BusError):
        await connect(server.url, BusAuth(tls_ca_file=TLS / "ca.pem"), connect_timeout_s=FAIL_FAST)


async def test_tls_asked_for_refuses_a_server_without_it(nats_server: Any, connect: Connect) -> None:
    for url, auth in [
        (nats_server.url, BusAuth(tls_ca_file=TLS / "ca.pem")),
        (_url(nats_server, "alice:pw@", scheme="tls"), None),
    ]:
        with pytest.raises(BusError, match="does not require it; not connecting in the clear") as refused:
            await connect(url, auth, connect_timeout_s=FAIL_FAST)
        assert ":pw@" not in refused.value.message


async def test_every_service_takes_its_credentials_from_the_environment(
    make_nats_server: MakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A private provider and no logging setup, as in the controller's test: the real setup_telemetry would
    # install a process-global tracer provider, which other tests rely on being absent.
    def private_telemetry(name: str, **_: Any) -> Telemetry:
        return Telemetry(name, TracerProvider(), owns_provider=True, traces_endpoint=None)

    monkeypatch.setattr("shared.runner.setup_telemetry", private_telemetry)
    server = make_nats_server(USERS_CONF)
    (tmp_path / "password").write_text(PASSWORD + "\n")
    monkeypatch.setenv("ONEPOOL_NATS_USER", "alice")
    monkeypatch.setenv("ONEPOOL_NATS_PASSWORD_FILE", str(tmp_path / "password"))
    stop = asyncio.Event()
    answered: list[bytes] = []

    class Service:
        def __init__(self, bus: Bus) -> None:
            self.bus = bus

        async def start(self) -> None:
            await _round_trip(self.bus)
            answered.append(b"ok")
            stop.set()

        async def stop(self) -> None:
            pass

    async def build(bus: Bus, _tracer: Any) -> Service:
        return Service(bus)

    await run_bus_service("authtest", instance_id="i1", nats_url=server.url, build=build, stop=stop)
    assert answered == [b"ok"]


async def test_a_creds_file_authenticates_against_an_operator_mode_server(
    make_nats_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    operator = Operator.create()
    server = make_nats_server(operator.server_config())
    user = NKey.create("user")
    creds = write_creds(tmp_path / "user.creds", user_jwt(operator.account, user), user)
    auth = load_bus_auth(env=_env(creds_file=str(creds)))
    assert auth.method == "creds" and auth.connect_options() == {"user_credentials": str(creds)}
    assert user.seed not in repr(auth)
    bus = await connect(server.url, auth)
    await _round_trip(bus)
    received: list[bytes] = []
    got = asyncio.Event()

    async def sink(msg: Message) -> None:
        received.append(msg.data)
        got.set()

    sub = await bus.subscribe("auth.creds", sink)
    await bus.publish("auth.creds", b"published")
    await asyncio.wait_for(got.wait(), timeout=2)
    assert received == [b"published"]
    await sub.stop()
    with pytest.raises(BusError, match="Authorization Violation"):
        await connect(server.url, connect_timeout_s=FAIL_FAST)  # no credentials


async def test_users_the_operator_did_not_vouch_for_are_refused_and_no_secret_is_shown(
    make_nats_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    operator, stranger = Operator.create(), Operator.create("stranger")
    server = make_nats_server(operator.server_config())
    user = NKey.create("user")
    # Signed by an account the server does not know; then one naming the trusted account as its issuer but
    # signed by another key (the server checks the signature, not just the issuer's name).
    forger = NKey(seed=stranger.account.seed, public=operator.account.public)
    jwts = {"unknown account": user_jwt(stranger.account, user), "forged": user_jwt(forger, user)}
    with structlog.testing.capture_logs() as logs:
        for name, jwt in jwts.items():
            creds = write_creds(tmp_path / f"{name}.creds", jwt, user)
            auth = load_bus_auth(env=_env(creds_file=str(creds)))
            with pytest.raises(BusError) as refused:
                await connect(server.url, auth, connect_timeout_s=FAIL_FAST)
            message = refused.value.message
            assert "Authorization Violation" in message, (name, message)
            assert user.seed not in message and jwt not in message and str(creds) not in message, name
    assert user.seed not in repr(logs) and stranger.account.seed not in repr(logs)


def test_a_bad_bus_setting_stops_a_service_with_exit_code_2() -> None:
    env = {**os.environ, "ONEPOOL_NATS_PASSWORD": PASSWORD}
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "cachestate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "ONEPOOL_NATS_USER" in out.stderr and PASSWORD not in out.stderr
