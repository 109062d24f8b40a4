"""shared.bus against a real nats-server (see the nats_server fixture in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from shared import schemas as s
from shared.bus import Bus, ConnectionState, Message
from shared.errors import (
    BusClosed,
    BusDisconnected,
    BusError,
    BusTimeout,
    ErrorKind,
    NoResponders,
    RemoteError,
)
from shared.telemetry import in_unsampled_trace
from tests.helpers import eventually, free_port

MakeBus = Callable[..., Awaitable[Bus]]


@pytest.fixture
async def make_bus(nats_server: Any) -> AsyncIterator[MakeBus]:
    buses: list[Bus] = []

    async def make(name: str = "test", **kwargs: Any) -> Bus:
        bus = await Bus.connect(nats_server.url, name=name, **kwargs)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close(drain=False)


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    # A private provider: the tests never depend on (or change) the global one.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent header that names ``span`` as the message's parent."""
    ctx = span.context
    assert ctx.trace_flags.sampled
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _one(finished: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in finished if s.name == name]
    assert len(found) == 1, [s.name for s in finished]
    return found[0]


async def test_request_reply_round_trip(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")
    seen: list[Message] = []

    async def echo(msg: Message) -> bytes:
        seen.append(msg)
        return b"re:" + msg.data

    sub = await server.subscribe("svc.echo", echo)
    assert await client.request("svc.echo", b"hi", timeout_s=2) == b"re:hi"
    assert await client.request("svc.echo", b"", timeout_s=2) == b"re:"
    [first, _] = seen
    assert isinstance(first, Message) and first.subject == "svc.echo" and first.data == b"hi"
    assert first.reply  # a request carries its inbox (trace headers: see the traced tests below)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.data = b"x"  # type: ignore[misc]
    await eventually(lambda: sub.handled == 2)
    assert sub.errors == 0 and server.is_connected and client.client_name == "requester"


async def test_request_timeout_raises_bus_timeout(make_bus: MakeBus) -> None:
    bus = await make_bus()

    async def slow(msg: Message) -> bytes:
        await asyncio.sleep(5)
        return b"late"

    await bus.subscribe("svc.slow", slow)
    started = time.monotonic()
    with pytest.raises(BusTimeout) as info:
        await bus.request("svc.slow", b"x", timeout_s=0.2)
    assert time.monotonic() - started < 2
    err = info.value
    assert err.subject == "svc.slow" and err.timeout_s == 0.2
    assert err.kind is ErrorKind.RETRY and err.code == "bus_timeout" and "svc.slow" in err.message


async def test_no_subscriber_raises_no_responders(make_bus: MakeBus) -> None:
    bus = await make_bus()
    started = time.monotonic()
    with pytest.raises(NoResponders) as info:
        await bus.request("svc.nobody", b"x", timeout_s=5)
    assert time.monotonic() - started < 2  # the server says so at once; we do not wait for the timeout
    assert info.value.subject == "svc.nobody" and info.value.kind is ErrorKind.RETRY


async def test_handler_exception_is_counted_and_subscription_keeps_serving(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")

    async def picky(msg: Message) -> bytes:
        if msg.data == b"bad":
            raise ValueError("cannot handle bad input")
        return b"ok"

    sub = await server.subscribe("svc.picky", picky)
    await client.publish("svc.picky", b"bad")
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as failed:  # a failed handler answers with an error reply, at once
        await client.request("svc.picky", b"bad", timeout_s=30)
    assert time.monotonic() - t0 < 5.0
    assert (failed.value.code, failed.value.kind) == ("internal", ErrorKind.BUG)
    assert await client.request("svc.picky", b"good", timeout_s=2) == b"ok"
    assert sub.handled == 3 and sub.errors == 2 and sub.rejected == 0


async def test_a_bad_message_is_refused_with_an_error_reply_and_one_warning(
    make_bus: MakeBus, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")

    async def strict(msg: Message) -> bytes:
        s.decode(s.decoder(s.SnapshotRequest), msg.data)  # raises DecodeError (the sender's fault)
        return b"ok"

    sub = await server.subscribe("svc.strict", strict)
    not_utf8 = s.encode(s.SnapshotRequest(reason="MARK")).replace(b"MARK", b"\xff\xfe\xfd\xfc")
    for garbage in (b"\x00not msgpack", not_utf8):
        with pytest.raises(RemoteError) as refused:
            await client.request("svc.strict", garbage, timeout_s=30)
        assert (refused.value.code, refused.value.kind) == ("bad_message", ErrorKind.CLIENT)
    await client.publish("svc.strict", b"\x00not msgpack")  # on a publish: counted, no reply to send
    assert await client.request("svc.strict", s.encode(s.SnapshotRequest()), timeout_s=2) == b"ok"
    await eventually(lambda: sub.handled == 4)
    assert (sub.errors, sub.rejected) == (3, 3)
    assert sub.is_active and sub in server.subscriptions


async def test_concurrency_limit_is_honoured(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")
    active = 0
    peak = 0
    gate = asyncio.Event()

    async def busy(msg: Message) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1

    sub = await server.subscribe("svc.busy", busy, concurrency=3)
    for i in range(12):
        await client.publish("svc.busy", str(i).encode())
    await eventually(lambda: active >= 3)  # the first three hold their slots until the gate opens
    gate.set()
    await eventually(lambda: sub.handled == 12)
    assert peak == 3
    await eventually(lambda: sub.in_flight == 0)  # tasks leave the set right after they end


async def test_concurrency_one_keeps_order(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")
    order: list[bytes] = []

    async def record(msg: Message) -> None:
        await asyncio.sleep(0.001)
        order.append(msg.data)

    sub = await server.subscribe("svc.order", record)
    sent = [str(i).encode() for i in range(20)]
    for data in sent:
        await client.publish("svc.order", data)
    await eventually(lambda: sub.handled == 20)
    assert order == sent


async def test_queue_group_gives_each_message_to_exactly_one_member(make_bus: MakeBus) -> None:
    a, b, client = await make_bus("a"), await make_bus("b"), await make_bus("client")
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def member(name: str) -> Callable[[Message], Awaitable[bytes | None]]:
        async def handle(msg: Message) -> bytes | None:
            if msg.data == b"end":
                return name.encode()  # the probe: answered with the member's name
            got[name].append(msg.data)
            return None

        return handle

    sub_a = await a.subscribe("svc.q", member("a"), queue="workers")
    sub_b = await b.subscribe("svc.q", member("b"), queue="workers")
    sent = [b"%d" % i for i in range(40)]
    for data in sent:
        await client.publish("svc.q", data)
    # Nothing more is on its way to a member once it has answered a probe sent after the 40: the server
    # delivers one client's messages in order and a member handles one at a time in arrival order.
    answered: list[str] = []
    for _ in range(100):  # the group picks a member at random for each probe
        answered.append((await client.request("svc.q", b"end", timeout_s=2)).decode())
        if {"a", "b"} <= set(answered):
            break
    assert {"a", "b"} <= set(answered), answered
    assert sorted(got["a"] + got["b"], key=int) == sent  # every message once: none lost, none to both
    assert got["a"] and got["b"]  # shared (all 40 to one member: chance 2**-39)
    assert sub_a.handled == len(got["a"]) + answered.count("a")
    assert sub_b.handled == len(got["b"]) + answered.count("b")
    assert sub_a.errors == sub_b.errors == 0


async def test_stop_with_drain_lets_in_flight_handlers_finish(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")
    finished: list[bytes] = []
    gate = asyncio.Event()

    async def held(msg: Message) -> None:
        await gate.wait()
        finished.append(msg.data)

    sub = await server.subscribe("svc.drain", held, concurrency=2)
    await client.publish("svc.drain", b"1")
    await client.publish("svc.drain", b"2")
    await eventually(lambda: sub.in_flight == 2)
    stopping = asyncio.create_task(sub.stop(drain=True))
    await eventually(lambda: not sub.is_active)  # stop() is under way
    assert not stopping.done() and finished == []  # ... and waits for the handlers
    gate.set()
    await stopping
    assert sorted(finished) == [b"1", b"2"] and sub.in_flight == 0
    assert not sub.is_active and sub not in server.subscriptions
    await sub.stop()  # idempotent
    with pytest.raises(NoResponders):
        await client.request("svc.drain", b"3", timeout_s=1)


async def test_stop_without_drain_cancels_in_flight_handlers(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")
    cancelled = asyncio.Event()

    async def forever(msg: Message) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sub = await server.subscribe("svc.forever", forever)
    await client.publish("svc.forever", b"x")
    await eventually(lambda: sub.in_flight == 1)
    started = time.monotonic()
    await sub.stop(drain=False)
    assert time.monotonic() - started < 2
    assert cancelled.is_set() and sub.in_flight == 0 and sub.errors == 0


async def test_drain_is_bounded_by_its_timeout(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")

    async def forever(msg: Message) -> None:
        await asyncio.sleep(60)

    sub = await server.subscribe("svc.stuck", forever)
    await client.publish("svc.stuck", b"x")
    await eventually(lambda: sub.in_flight == 1)
    started = time.monotonic()
    await sub.stop(drain=True, timeout_s=0.3)
    assert time.monotonic() - started < 2 and sub.in_flight == 0


async def test_close_is_idempotent_and_leaves_no_tasks(nats_server: Any) -> None:
    before = asyncio.all_tasks()
    server = await Bus.connect(nats_server.url, name="responder")
    client = await Bus.connect(nats_server.url, name="requester")

    async def echo(msg: Message) -> bytes:
        return msg.data

    await server.subscribe("svc.echo", echo, concurrency=4)
    await server.subscribe("svc.other.*", echo)
    assert await client.request("svc.echo", b"x", timeout_s=2) == b"x"

    await asyncio.gather(server.close(), server.close())  # concurrent callers share one close
    await server.close()
    await client.close(drain=False)
    await client.close()
    assert not server.is_connected and not client.is_connected
    assert server.subscriptions == frozenset()
    with pytest.raises(BusClosed):
        await server.publish("svc.echo", b"x")
    with pytest.raises(BusClosed):
        await client.request("svc.echo", b"x", timeout_s=1)
    with pytest.raises(BusClosed):
        await server.subscribe("svc.echo", echo)
    await asyncio.sleep(0)
    leftover = asyncio.all_tasks() - before
    assert not leftover, leftover


async def test_connect_failure_raises_bus_error_with_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    before = asyncio.all_tasks()
    started = time.monotonic()
    with pytest.raises(BusError) as info:
        await Bus.connect(url, name="lonely", connect_timeout_s=0.5, reconnect_time_wait_s=0.1)
    assert time.monotonic() - started < 3
    assert url in info.value.message and info.value.kind is ErrorKind.RETRY
    await asyncio.sleep(0)
    assert not (asyncio.all_tasks() - before)


async def test_request_is_traced_and_context_reaches_the_responder(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    server = await make_bus("responder", tracer=tracer)
    client = await make_bus("requester", tracer=tracer)
    inside: list[trace.Span] = []
    delivered: list[Message] = []

    async def handler(msg: Message) -> bytes:
        inside.append(trace.get_current_span())
        delivered.append(msg)
        with tracer.start_as_current_span("handler work"):
            pass
        return b"done"

    await server.subscribe("svc.traced", handler, queue="traced-workers")
    with tracer.start_as_current_span("caller") as caller:
        assert await client.request("svc.traced", b"12345", timeout_s=2) == b"done"
    await eventually(lambda: any(s.name == "process svc.traced" for s in exporter.get_finished_spans()))

    finished = exporter.get_finished_spans()
    send = _one(finished, "send svc.traced")
    process = _one(finished, "process svc.traced")
    work = _one(finished, "handler work")
    caller_ctx = caller.get_span_context()

    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == caller_ctx.span_id
    # The delivered message carries the producer span as its W3C trace context.
    [msg] = delivered
    assert msg.headers.get("traceparent") == _traceparent(send)
    assert process.kind is SpanKind.CONSUMER
    assert process.context.trace_id == caller_ctx.trace_id == send.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert process.parent.is_remote
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    assert work.parent is not None and work.parent.span_id == process.context.span_id
    assert inside[0].get_span_context().span_id == process.context.span_id

    assert send.attributes is not None and process.attributes is not None
    assert dict(send.attributes) | {} == {
        "messaging.system": "nats",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": "svc.traced",
        "messaging.message.body.size": 5,
        "messaging.client.id": "requester",
        "server.address": "127.0.0.1",
        "server.port": send.attributes["server.port"],
        "network.peer.address": "127.0.0.1",
        "network.peer.port": send.attributes["server.port"],
        "onepool.reply.body.size": 4,
    }
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.destination.name"] == "svc.traced"
    assert process.attributes["messaging.consumer.group.name"] == "traced-workers"
    assert process.attributes["messaging.client.id"] == "responder"
    assert process.attributes["messaging.message.body.size"] == 5
    assert send.status.status_code is StatusCode.UNSET and process.status.status_code is StatusCode.UNSET


async def test_an_unsampled_trace_makes_no_producer_span_but_still_propagates(make_bus: MakeBus) -> None:
    # No exporter: spans are not sampled. The caller's context (its ids) is what the message carries.
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    server = await make_bus("responder", tracer=tracer)
    client = await make_bus("requester", tracer=tracer)
    seen: list[Message] = []

    async def handler(msg: Message) -> bytes:
        seen.append(msg)
        return b"ok"

    await server.subscribe("svc.unsampled", handler)
    with tracer.start_as_current_span("caller") as caller:
        assert in_unsampled_trace()
        assert await client.request("svc.unsampled", b"x", timeout_s=2) == b"ok"
        await client.publish("svc.unsampled", b"y")
    await eventually(lambda: len(seen) == 2)
    ctx = caller.get_span_context()
    expected = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert [msg.headers["traceparent"] for msg in seen] == [expected, expected]
    assert not ctx.trace_flags.sampled
    assert exporter.get_finished_spans() == ()
    assert not in_unsampled_trace()  # outside any span: no trace at all


async def test_publish_subscribe_carries_context(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    server = await make_bus("sub", tracer=tracer)
    client = await make_bus("pub", tracer=tracer)

    delivered: list[Message] = []

    async def sink(msg: Message) -> None:
        delivered.append(msg)

    sub = await server.subscribe("events.>", sink)
    with tracer.start_as_current_span("emitter") as emitter:
        await client.publish("events.user.42", b"{}")
    await eventually(lambda: sub.handled == 1)
    await eventually(lambda: any(s.name.startswith("process") for s in exporter.get_finished_spans()))

    finished = exporter.get_finished_spans()
    publish = _one(finished, "publish events.user.42")
    process = _one(finished, "process events.>")  # wildcard subscriptions name spans by their pattern
    assert publish.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert publish.parent is not None and publish.parent.span_id == emitter.get_span_context().span_id
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]
    assert process.context.trace_id == emitter.get_span_context().trace_id
    [msg] = delivered
    assert msg.headers.get("traceparent") == _traceparent(publish)
    assert publish.attributes is not None and process.attributes is not None
    assert publish.attributes["messaging.operation.name"] == "publish"
    assert publish.attributes["messaging.operation.type"] == "send"
    assert process.attributes["messaging.destination.name"] == "events.user.42"
    assert process.attributes["messaging.destination.template"] == "events.>"


async def test_per_worker_subjects_make_templated_span_names(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    # Span names must not grow with the number of workers (or of requests: reply inboxes), per semconv.
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    worker = await make_bus("worker", tracer=tracer)
    client = await make_bus("gateway", tracer=tracer)
    digests: list[Message] = []

    async def infer(msg: Message) -> bytes:
        return b"ranked"

    async def snapshot(msg: Message) -> None:
        assert msg.reply is not None
        await worker.publish(msg.reply, b"ack")  # answered by hand: a publish to a reply inbox

    async def on_digest(msg: Message) -> None:
        digests.append(msg)

    await worker.subscribe(s.infer_subject("w3"), infer)
    await worker.subscribe(s.snapshot_request_subject("w3"), snapshot)
    await client.subscribe(s.DIGEST_WILDCARD, on_digest)
    with tracer.start_as_current_span("caller"):
        assert await client.request(s.infer_subject("w3"), b"q", timeout_s=2) == b"ranked"
        assert await client.request(s.snapshot_request_subject("w3"), b"", timeout_s=2) == b"ack"
        await worker.publish(s.digest_subject("w3"), b"d")
    await eventually(lambda: len(digests) == 1)
    await eventually(lambda: len(exporter.get_finished_spans()) == 8)

    finished = exporter.get_finished_spans()
    assert sorted(sp.name for sp in finished) == [
        "caller",
        "process onepool.digest.{worker}",
        "process onepool.worker.{worker}.infer",
        "process onepool.worker.{worker}.snapshot",
        "publish",
        "publish onepool.digest.{worker}",
        "send onepool.worker.{worker}.infer",
        "send onepool.worker.{worker}.snapshot",
    ]
    for sp in finished:
        if sp.name == "caller":
            continue
        assert sp.attributes is not None
        destination = sp.attributes["messaging.destination.name"]
        if sp.name == "publish":  # the reply: its inbox is temporary, and no template
            assert s.is_reply_subject(str(destination))
            assert sp.attributes["messaging.destination.temporary"] is True
            assert "messaging.destination.template" not in sp.attributes
        else:
            template = str(sp.attributes["messaging.destination.template"])
            assert sp.name.endswith(f" {template}") and "w3" in str(destination)
            assert s.subject_template(str(destination)) == template


async def test_message_without_trace_context_starts_a_new_trace(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = await make_bus("sub", tracer=provider.get_tracer("test"))
    client = await make_bus("pub")  # default tracer: the global provider (a no-op unless set)

    async def sink(msg: Message) -> None:
        return None

    with provider.get_tracer("test").start_as_current_span("setup"):  # ambient when subscribing
        sub = await server.subscribe("plain", sink)
    await client.publish("plain", b"x")
    await eventually(lambda: sub.handled == 1)
    process = _one(exporter.get_finished_spans(), "process plain")
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is None and not process.links  # a new root, not a child of "setup"


async def test_failing_handler_is_recorded_on_its_span(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = await make_bus("sub", tracer=provider.get_tracer("test"))
    client = await make_bus("pub")

    async def broken(msg: Message) -> None:
        raise KeyError("missing")

    sub = await server.subscribe("svc.broken", broken)
    await client.publish("svc.broken", b"x")
    await eventually(lambda: sub.errors == 1)
    await eventually(lambda: len(exporter.get_finished_spans()) == 1)
    [process] = exporter.get_finished_spans()
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes is not None and process.attributes["error.type"] == "KeyError"
    assert [e.name for e in process.events] == ["exception"]


async def test_cancelled_request_is_reraised_and_recorded(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = await make_bus("responder")
    client = await make_bus("requester", tracer=provider.get_tracer("test"))
    arrived = asyncio.Event()

    async def never(msg: Message) -> bytes:
        arrived.set()
        await asyncio.Event().wait()
        return b""

    await server.subscribe("svc.slow", never)
    task = asyncio.create_task(client.request("svc.slow", b"x", timeout_s=10))
    await asyncio.wait_for(arrived.wait(), 5)  # the request is out and waiting for its reply
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [send] = exporter.get_finished_spans()
    assert send.status.status_code is StatusCode.ERROR
    assert send.attributes is not None and send.attributes["error.type"] == "cancelled"


async def test_timeout_is_recorded_with_error_type(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = await make_bus("responder")  # untraced: the requester's span is the only one
    client = await make_bus("requester", tracer=provider.get_tracer("test"))
    arrived = asyncio.Event()

    async def silent(msg: Message) -> None:  # takes the request and never answers it
        arrived.set()

    sub = await server.subscribe("svc.silent", silent)
    with pytest.raises(BusTimeout) as info:
        await client.request("svc.silent", b"x", timeout_s=0.2)
    assert arrived.is_set() and sub.handled == 1  # a subscriber was there: a timeout, not "no responders"
    assert info.value.subject == "svc.silent" and info.value.timeout_s == 0.2
    [send] = exporter.get_finished_spans()
    assert send.name == "send svc.silent" and send.status.status_code is StatusCode.ERROR
    assert send.attributes is not None and send.attributes["error.type"] == "bus_timeout"
    assert [e.name for e in send.events] == ["exception"]


async def test_no_responders_is_recorded_with_error_type(
    make_bus: MakeBus, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    client = await make_bus("requester", tracer=provider.get_tracer("test"))
    with pytest.raises(NoResponders):
        await client.request("svc.none", b"x", timeout_s=5)
    [send] = exporter.get_finished_spans()
    assert send.name == "send svc.none" and send.status.status_code is StatusCode.ERROR
    assert send.attributes is not None and send.attributes["error.type"] == "no_responders"


async def test_reconnects_after_server_restart(make_bus: MakeBus, nats_server: Any) -> None:
    server = await make_bus("responder", reconnect_time_wait_s=0.1)
    client = await make_bus("requester", reconnect_time_wait_s=0.1)

    async def echo(msg: Message) -> bytes:
        return msg.data

    arrived = asyncio.Event()

    async def never(msg: Message) -> bytes:
        arrived.set()
        await asyncio.sleep(60)
        return b"too late"

    await server.subscribe("svc.echo", echo)
    await server.subscribe("svc.never", never)
    assert await client.request("svc.echo", b"before", timeout_s=2) == b"before"
    waiting = asyncio.create_task(client.request("svc.never", b"x", timeout_s=30))
    await arrived.wait()

    t0 = time.monotonic()
    nats_server.stop()
    # a request waiting for a reply fails as soon as the connection is lost: its reply cannot come
    with pytest.raises(BusDisconnected):
        await waiting
    assert time.monotonic() - t0 < 5.0
    await eventually(lambda: not server.is_connected and not client.is_connected)
    assert client.state is ConnectionState.DISCONNECTED
    t0 = time.monotonic()
    with pytest.raises(BusDisconnected):  # while down: at once, not after the timeout
        await client.request("svc.echo", b"down", timeout_s=30)
    assert time.monotonic() - t0 < 1.0

    nats_server.start()
    await eventually(lambda: server.is_connected and client.is_connected, timeout_s=10)
    assert client.state is ConnectionState.CONNECTED
    # The responder re-subscribes on reconnect; retry the RETRY-kind errors until it has.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert await client.request("svc.echo", b"after", timeout_s=0.5) == b"after"
            break
        except (NoResponders, BusTimeout):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_concurrent_requests_each_get_their_own_reply(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")

    async def echo_later(msg: Message) -> bytes:
        await asyncio.sleep(0.002 * (int(msg.data) % 7))  # replies come back out of order
        return b"re:" + msg.data

    await server.subscribe("svc.mux", echo_later, concurrency=64)
    replies = await asyncio.gather(*(client.request("svc.mux", b"%d" % i, timeout_s=5) for i in range(200)))
    assert replies == [b"re:%d" % i for i in range(200)]
    assert client._waiting == {}  # nothing left behind


async def test_a_late_reply_is_dropped_and_the_next_request_gets_its_own(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")

    gates = {b"first": asyncio.Event(), b"second": asyncio.Event()}
    arrived: list[bytes] = []

    async def held(msg: Message) -> bytes:
        arrived.append(msg.data)
        await gates[msg.data].wait()
        return msg.data

    sub = await server.subscribe("svc.late", held, concurrency=4)
    with pytest.raises(BusTimeout):
        await client.request("svc.late", b"first", timeout_s=0.1)
    assert client._waiting == {}
    second = asyncio.create_task(client.request("svc.late", b"second", timeout_s=5))
    await eventually(lambda: arrived == [b"first", b"second"])
    gates[b"first"].set()
    await eventually(lambda: sub.handled == 1)  # the late reply has left the responder ...
    gates[b"second"].set()  # ... before this one, on the same connection: it reaches the requester first
    assert await second == b"second"
    assert client._waiting == {}


async def test_requests_waiting_when_the_bus_closes_fail_at_once(make_bus: MakeBus) -> None:
    server = await make_bus("responder")
    client = await make_bus("requester")

    arrived = asyncio.Event()

    async def never(msg: Message) -> bytes:
        arrived.set()
        await asyncio.Event().wait()
        return b""

    await server.subscribe("svc.never", never)
    waiting = asyncio.create_task(client.request("svc.never", b"x", timeout_s=30))
    await asyncio.wait_for(arrived.wait(), 5)  # the request is out and waiting for its reply
    started = time.monotonic()
    await client.close(drain=False)
    with pytest.raises(BusClosed):
        await waiting
    assert time.monotonic() - started < 2
