"""The REAL gateway's admission control, demotion of silent workers and readiness, in-process.

Real nats-server, real aiohttp server; requests from aiohttp's client or, where a client would add or
finish something on its own (a Content-Type, the rest of a body, the end of the headers), written by hand
on a raw connection. Each test asserts the documented contract (services/gateway/service.py,
services/gateway/settings.py, docs/architecture.md "HTTP API"): the status, the JSON error body
``{"error": {"code", "message", "field"}}``, ``Retry-After`` on every 503, and which workers were tried.
Waits are on conditions; the only sleep stands for a back-off that must pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from shared import schemas as s
from tests.gateway.scripted import (
    DEFAULT_BODY,
    HOST,
    Answer,
    Harness,
    HasUrl,
    ScriptedWorker,
    assert_error,
    assert_served_by,
    scripted_gateway,
)
from tests.helpers import eventually

BODY = json.dumps(DEFAULT_BODY).encode()


class RestartableNats(HasUrl, Protocol):
    """The ``nats_server`` fixture, stopped and started again on the same port."""

    def stop(self) -> None: ...

    def start(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# assertions


async def poll(
    call: Callable[[], Awaitable[Answer]], accept: Callable[[Answer], bool], *, timeout_s: float = 3.0
) -> Answer:
    """Call until an answer is accepted (returned); fail with the last answer after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await call()
        if accept(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing accepted within {timeout_s}s; last: {answer.status} {answer.body}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------
# raw HTTP/1.1, written by hand


def post_bytes(
    body: bytes, *, content_type: str | None = "application/json", content_length: int | None = None
) -> bytes:
    """A POST /v1/recommend; no Content-Type header at all when `content_type` is None; `content_length`
    may announce more than `body` (a body that stops arriving)."""
    head = f"POST /v1/recommend HTTP/1.1\r\nHost: {HOST}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body) if content_length is None else content_length}\r\n\r\n"
    return head.encode("ascii") + body


def get_bytes(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode("ascii")


def parse_head(head: bytes) -> tuple[int, CIMultiDictProxy[str]]:
    """The status and headers of an answer's head (status line and headers)."""
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return int(status_line.split()[1]), CIMultiDictProxy(headers)


def parse_answer(head: bytes, body: bytes, elapsed_s: float) -> Answer:
    status, headers = parse_head(head)
    is_json = headers.get("Content-Type", "").startswith("application/json")
    decoded: Any = json.loads(body) if is_json else body
    return Answer(status, decoded, headers, elapsed_s)


class RawConnection:
    """One TCP connection to the gateway, driven byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent_at = time.perf_counter()

    @classmethod
    async def open(cls, h: Harness) -> RawConnection:
        reader, writer = await asyncio.open_connection(HOST, h.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent_at = time.perf_counter()

    async def answer(self, timeout_s: float = 5.0) -> Answer:
        """The next answer (its elapsed time counted from the last send)."""
        async with asyncio.timeout(timeout_s):
            head = await self.reader.readuntil(b"\r\n\r\n")
            body = await self.reader.readexactly(int(parse_head(head)[1].get("Content-Length", "0")))
        return parse_answer(head, body, time.perf_counter() - self.sent_at)

    async def until_closed(self, timeout_s: float = 3.0) -> bytes:
        """Everything the server still sends until it closes its side (fails after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# ---------------------------------------------------------------------------------------------------------
# 1. media type


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/json; charset=latin-1", "application/x-www-form-urlencoded"]
)
async def test_a_body_not_declared_as_json_in_utf8_is_415(nats_server: HasUrl, content_type: str) -> None:
    worker = ScriptedWorker("w1")
    async with scripted_gateway(nats_server, [worker]) as h:
        answer = await h.recommend(data=BODY, headers={"Content-Type": content_type})
        assert_error(answer, 415, "unsupported_media_type")
        assert worker.requests == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/vnd.x+json", "application/json; charset=UTF-8"]
)
async def test_json_media_types_are_accepted(nats_server: HasUrl, content_type: str) -> None:
    async with scripted_gateway(nats_server, [ScriptedWorker("w1")]) as h:
        assert_served_by(await h.recommend(data=BODY, headers={"Content-Type": content_type}), "w1")


async def test_a_body_without_content_type_is_read_as_json(nats_server: HasUrl) -> None:
    async with scripted_gateway(nats_server, [ScriptedWorker("w1")]) as h:
        conn = await RawConnection.open(h)
        try:
            request = post_bytes(BODY, content_type=None)
            assert b"content-type" not in request.lower()
            await conn.send(request)
            assert_served_by(await conn.answer(), "w1")
        finally:
            await conn.close()


# ---------------------------------------------------------------------------------------------------------
# 2. invalid UTF-8


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"user_id": "\xff\xfe", "history": [1, 2], "candidates": [3, 4], "k": 1}', "user_id"),
        # a key is named with its bad bytes escaped: the error body itself stays valid UTF-8
        (b'{"user_id": "u-1", "history": [1, 2], "candidates": [3, 4], "\xffk": 1}', "\\xffk"),
    ],
    ids=["in-a-value", "in-a-key"],
)
async def test_invalid_utf8_in_the_body_is_400_naming_the_field(
    nats_server: HasUrl, raw: bytes, field: str
) -> None:
    worker = ScriptedWorker("w1")
    async with scripted_gateway(nats_server, [worker]) as h:
        # the harness decodes the answer as strict UTF-8 JSON: a body echoing raw bytes would fail here
        answer = await h.recommend(data=raw, headers={"Content-Type": "application/json"})
        assert_error(answer, 400, "invalid_request", field=field)
        assert worker.requests == []


# ---------------------------------------------------------------------------------------------------------
# 3. body timeout


async def test_a_body_that_stops_arriving_is_408_after_body_timeout(nats_server: HasUrl) -> None:
    worker = ScriptedWorker("w1")
    # the request deadline (3 s) far beyond the body timeout: only the latter can end it early
    async with scripted_gateway(nats_server, [worker], body_timeout_ms=200.0, request_timeout_ms=3000.0) as h:
        conn = await RawConnection.open(h)
        try:
            await conn.send(post_bytes(b'{"user_id": "u-1", "history": [', content_length=200))
            answer = await conn.answer()
        finally:
            await conn.close()
        assert_error(answer, 408, "body_timeout")
        assert 0.18 <= answer.elapsed_s < 1.0, answer.elapsed_s
        assert worker.requests == []


# ---------------------------------------------------------------------------------------------------------
# 4. the gateway's own concurrency limit


async def test_beyond_max_concurrent_a_request_is_503_overloaded_at_once(nats_server: HasUrl) -> None:
    # Two sleeping workers, each reporting a 10 ms service time: the second request goes to the other
    # worker (our own in-flight count makes the busy one 10 ms worse), so each holds one.
    load = s.LoadInfo(ewma_service_ms=10.0)
    workers = [ScriptedWorker(f"w{i}", "sleep", sleep_s=5.0, load=load) for i in (1, 2)]
    async with scripted_gateway(
        nats_server,
        workers,
        max_concurrent=2,
        request_timeout_ms=5000.0,
        attempt_timeout_ms=5000.0,
        max_attempts=1,
    ) as h:
        held = [asyncio.create_task(h.recommend()) for _ in range(2)]
        try:
            await eventually(lambda: all(len(w.requests) == 1 for w in workers))
            async with asyncio.timeout(1.0):  # far under the workers' 5 s sleep
                shed = await h.recommend()
                health = await h.get("/healthz")
            assert_error(shed, 503, "overloaded")
            assert health.status == 200
            assert sorted(h.tried) == ["w1", "w2"]  # the third request reached no worker
        finally:
            for worker in workers:
                worker.release()
            answers = await asyncio.gather(*held, return_exceptions=True)
        for answer in answers:
            assert isinstance(answer, Answer) and answer.status == 200, answer
        # the slots are free again
        assert (await h.recommend()).status == 200


# ---------------------------------------------------------------------------------------------------------
# 5. shedding by the workers' own limits


async def test_a_worker_at_its_reported_queue_limit_is_not_sent_more(nats_server: HasUrl) -> None:
    worker = ScriptedWorker("w1", "sleep", sleep_s=5.0, load=s.LoadInfo(max_queue=1))
    async with scripted_gateway(
        nats_server, [worker], request_timeout_ms=5000.0, attempt_timeout_ms=5000.0
    ) as h:
        held = asyncio.create_task(h.recommend())
        try:
            await eventually(lambda: len(worker.requests) == 1)  # one of ours in flight: at its limit
            async with asyncio.timeout(1.0):
                shed = await h.recommend()
            assert_error(shed, 503, "overloaded")
            assert h.tried == ["w1"]  # only the held request
        finally:
            worker.release()
            first = await held
        assert_served_by(first, "w1")
        assert_served_by(await h.recommend(), "w1")  # below its limit again


@pytest.mark.parametrize(
    ("depths", "budget_ms", "served_by"),
    [
        ((4, 5), 300.0, None),  # 400 and 500 ms queued: both over the 300 ms budget
        ((4, 2), 300.0, "w2"),  # w2: 200 ms, within it
        ((4, 5), 450.0, "w1"),  # w1: 400 ms, within a larger budget
    ],
    ids=["both-over-budget", "one-within-budget", "within-a-larger-budget"],
)
async def test_the_queue_wait_budget_sheds_when_even_the_best_worker_is_too_late(
    nats_server: HasUrl, depths: tuple[int, int], budget_ms: float, served_by: str | None
) -> None:
    # queue_ms = queue_depth * ewma_service_ms (100 ms each); the scripted workers report no cost model
    workers = [
        ScriptedWorker(f"w{i}", load=s.LoadInfo(queue_depth=depth, ewma_service_ms=100.0))
        for i, depth in enumerate(depths, start=1)
    ]
    async with scripted_gateway(nats_server, workers, max_queue_wait_ms=budget_ms) as h:
        answer = await h.recommend()
        if served_by is None:
            assert_error(answer, 503, "overloaded")
            assert h.tried == []
        else:
            assert_served_by(answer, served_by)
            assert h.tried == [served_by]


# ---------------------------------------------------------------------------------------------------------
# 6. demotion of a worker that does not answer

# w2's scripted load puts ~1000 ms in its queue (rank 1): a budget above it, so that only ranking counts
NO_BUDGET_MS = 10_000.0
# The demotion back-off in these tests: long enough that a few HTTP round trips on a loaded 2-core machine
# fit well inside it (the router reads its module constant at each failure).
BACK_OFF_S = 1.5


@pytest.fixture
def slow_back_off(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr("services.gateway.core.router.DEMOTE_BASE_S", BACK_OFF_S)
    monkeypatch.setattr("services.gateway.core.router.DEMOTE_MAX_S", 8 * BACK_OFF_S)
    return BACK_OFF_S


async def test_a_worker_with_no_responders_is_demoted_for_the_back_off_then_tried_first_again(
    nats_server: HasUrl, slow_back_off: float
) -> None:
    absent = ScriptedWorker("w1", "absent", rank=0)
    healthy = ScriptedWorker("w2", "ok", rank=1)
    async with scripted_gateway(nats_server, [absent, healthy], max_queue_wait_ms=NO_BUDGET_MS) as h:
        # absent workers record nothing: each try of w1 shows as one "no_responders" attempt
        start = time.monotonic()
        assert_served_by(await h.recommend(), "w2")
        failed_by = time.monotonic()  # w1's demotion ends by failed_by + slow_back_off
        assert await h.attempts("no_responders") == 1  # tried [w1, w2]
        assert_served_by(await h.recommend(), "w2")
        assert time.monotonic() - start < slow_back_off, "too slow: the back-off ended before request 2"
        assert await h.attempts("no_responders") == 1  # request 2: w2 first, w1 not tried (demoted)

        await asyncio.sleep(failed_by + slow_back_off + 0.02 - time.monotonic())  # the back-off passes
        start = time.monotonic()
        assert_served_by(await h.recommend(), "w2")
        assert await h.attempts("no_responders") == 2  # w1 first again, then w2
        # failed again: demoted again, for a back-off twice as long
        assert_served_by(await h.recommend(), "w2")
        assert time.monotonic() - start < 2 * slow_back_off, "too slow: the back-off ended"
        assert await h.attempts("no_responders") == 2
        assert h.tried == ["w2"] * 4


async def test_a_demoted_worker_that_answers_is_no_longer_demoted(
    nats_server: HasUrl, slow_back_off: float
) -> None:
    w1 = ScriptedWorker("w1", "absent", rank=0)
    w2 = ScriptedWorker("w2", "ok", rank=1)
    async with scripted_gateway(nats_server, [w1, w2], max_queue_wait_ms=NO_BUDGET_MS) as h:
        start = time.monotonic()
        assert_served_by(await h.recommend(), "w2")  # w1: no responders, demoted
        w1.behaviour = "ok"
        await h.attach(w1)  # w1 comes up
        w2.behaviour = "retry_error"
        # w1 is still demoted: w2 first (refuses), then w1, tried last, answers
        assert_served_by(await h.recommend(), "w1")
        assert h.tried == ["w2", "w2", "w1"]
        w2.behaviour = "ok"
        # w1 answered: no longer demoted, first by rank again (still within the first back-off)
        assert_served_by(await h.recommend(), "w1")
        assert time.monotonic() - start < slow_back_off, "too slow: the back-off ended anyway"
        assert h.tried == ["w2", "w2", "w1", "w1"]
        assert await h.attempts("no_responders") == 1


# ---------------------------------------------------------------------------------------------------------
# 7. bus down


async def test_without_the_bus_requests_are_503_bus_unavailable_at_once_and_readyz_says_why(
    nats_server: RestartableNats,
) -> None:
    worker = ScriptedWorker("w1")
    async with scripted_gateway(
        nats_server, [worker], request_timeout_ms=3000.0, attempt_timeout_ms=3000.0, body_timeout_ms=2000.0
    ) as h:
        assert_served_by(await h.recommend(), "w1")
        await asyncio.to_thread(nats_server.stop)
        try:
            await eventually(lambda: not h.gateway.bus.is_connected)
            answer = await h.recommend()
            assert_error(answer, 503, "bus_unavailable")
            assert answer.elapsed_s < 0.5, answer.elapsed_s  # not after the 3 s request timeout

            # refused at the door: a body that never arrives is not waited for (2 s body timeout)
            conn = await RawConnection.open(h)
            try:
                await conn.send(post_bytes(b'{"user_id": ', content_length=200))
                stalled = await conn.answer()
            finally:
                await conn.close()
            assert_error(stalled, 503, "bus_unavailable")
            assert stalled.elapsed_s < 0.5, stalled.elapsed_s

            ready = await h.get("/readyz")
            assert ready.status == 503
            assert ready.body["ready"] is False
            assert ready.body["bus_connected"] is False
            assert any("no connection to the message bus" in r for r in ready.body["reasons"]), ready.body
            assert (await h.get("/healthz")).status == 200  # alive all the same
            assert len(worker.requests) == 1
        finally:
            await asyncio.to_thread(nats_server.start)

        await eventually(lambda: h.gateway.ready)
        ready = await h.get("/readyz")
        assert ready.status == 200, ready.body
        assert ready.body["reasons"] == []
        # the scripted worker's own connection comes back on its own schedule
        assert_served_by(await poll(h.recommend, lambda a: a.status == 200), "w1")


# ---------------------------------------------------------------------------------------------------------
# 8. silent cachestate


async def test_a_silent_cachestate_makes_readyz_503_while_requests_route_on_the_last_view(
    nats_server: HasUrl,
) -> None:
    async with scripted_gateway(nats_server, [ScriptedWorker("w1")], view_max_age_ms=300.0) as h:
        # heartbeats for longer than view_max_age: ready throughout
        h.cachestate.start_heartbeats(0.05)
        await eventually(lambda: h.cachestate.heartbeats_published >= 10)
        ready = await h.get("/readyz")
        assert ready.status == 200, ready.body
        assert ready.body["view_age_s"] <= 0.3  # rounded to 1 ms

        await h.cachestate.stop_heartbeats()
        silent = await poll(lambda: h.get("/readyz"), lambda a: a.status == 503)
        assert silent.body["ready"] is False
        assert silent.body["view_age_s"] >= 0.3  # rounded to 1 ms: 0.3004 s reads 0.3
        assert any("cachestate is silent" in r for r in silent.body["reasons"]), silent.body
        age = silent.body["view_age_s"]
        older = await poll(lambda: h.get("/readyz"), lambda a: a.body["view_age_s"] > age)
        assert older.status == 503
        # still routed on the last view
        assert_served_by(await h.recommend(), "w1")

        await h.wait_for_update(await h.cachestate.heartbeat())
        ready = await h.get("/readyz")
        assert ready.status == 200, ready.body
        assert ready.body["view_age_s"] <= 0.3


# ---------------------------------------------------------------------------------------------------------
# 9. connection limit


async def test_a_connection_beyond_max_connections_is_answered_503_and_closed(nats_server: HasUrl) -> None:
    # only raw connections here: the harness's pooled client would hold connections of its own
    async with scripted_gateway(nats_server, [ScriptedWorker("w1")], max_connections=2) as h:
        first, second = await RawConnection.open(h), await RawConnection.open(h)
        try:
            for conn in (first, second):  # two idle keep-alive connections
                await conn.send(get_bytes("/healthz"))
                assert (await conn.answer()).status == 200

            third = await RawConnection.open(h)
            try:
                await third.send(get_bytes("/healthz"))
                refusal = await third.until_closed()  # the answer, then the server's end of the stream
            finally:
                await third.close()
            assert refusal.startswith(b"HTTP/1.1 503 "), refusal
            head, _, body = refusal.partition(b"\r\n\r\n")
            assert_error(parse_answer(head, body, 0.0), 503, "overloaded")

            await first.send(get_bytes("/healthz"))  # the two held connections are still served
            assert (await first.answer()).status == 200

            await second.close()

            async def on_a_new_connection() -> Answer:
                conn = await RawConnection.open(h)
                try:
                    await conn.send(post_bytes(BODY))
                    return await conn.answer()  # a refusal is a whole answer too
                finally:
                    await conn.close()

            # served once the server has seen the second connection go (refused until then)
            assert_served_by(await poll(on_a_new_connection, lambda a: a.status != 503, timeout_s=2.0), "w1")
        finally:
            await first.close()
            await second.close()


# ---------------------------------------------------------------------------------------------------------
# 10. idle timeout


@pytest.mark.parametrize("state", ["idle-after-a-request", "partial-headers", "nothing-sent"])
async def test_an_idle_connection_is_closed_after_idle_timeout(nats_server: HasUrl, state: str) -> None:
    async with scripted_gateway(nats_server, [ScriptedWorker("w1")], idle_timeout_ms=300.0) as h:
        conn = await RawConnection.open(h)
        try:
            if state == "idle-after-a-request":
                await conn.send(get_bytes("/healthz"))
                assert (await conn.answer()).status == 200
            elif state == "partial-headers":
                await conn.send(get_bytes("/healthz")[:-2])  # no blank line: the headers never end
            else:
                conn.sent_at = time.perf_counter()
            rest = await conn.until_closed(timeout_s=3.0)
            elapsed = time.perf_counter() - conn.sent_at
        finally:
            await conn.close()
        assert rest == b"", rest
        assert 0.25 <= elapsed < 1.5, elapsed
