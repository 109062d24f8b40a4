"""A thin async wrapper over nats-py: publish, request/reply and subscriptions, traced.

There is no official OpenTelemetry instrumentation for nats-py, so this module follows the
(development-status) OTel messaging semantic conventions itself: W3C trace context
(``traceparent``/``tracestate``) travels in NATS message headers; ``publish``/``request`` make
PRODUCER spans whose context is injected as the message's creation context, and each delivered
message is handled inside a CONSUMER "process" span that is a child of (and links to) that
context. Handlers see our own :class:`Message`, never nats-py types, and run as tasks owned by
their :class:`Subscription`.

Errors on request subjects, written once here for every service: a handler that raises answers the
requester with an *error reply* (header ``Onepool-Error``, body a msgpack ``ErrorBody``: code, kind,
message, field), which ``request()`` raises as :class:`RemoteError`; the requester never waits for its
timeout because the other side could not read its message. A handler of a publish subject that raises an
``OnepoolError`` of a non-bug kind (a bad message: ``DecodeError``) is counted and logged in one warning
line; anything else is logged with its traceback.

Connection state: ``state``; while the client reconnects, ``request()`` fails
at once with :class:`BusDisconnected` (and so do requests waiting for a reply when the connection drops),
``publish()`` still queues (nats-py sends it after the reconnect).

Security: ``connect(auth=...)`` takes a :class:`shared.bus_auth.BusAuth` (credentials, TLS files); with TLS
asked for, a server that does not require it is refused before any credential is sent. With a user name,
replies come to ``_INBOX.<user>.<random>.<counter>`` (``schemas.inbox_prefix``), so that NATS permissions can
let each user read its own replies only. URLs are logged and put in errors through ``redact_url``.

Span names use the subject's template (``schemas.subject_template``: ``send onepool.worker.{worker}.infer``);
a reply inbox is left out of the name (``publish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription as NatsSubscription
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from shared import schemas as s
from shared.bus_auth import BusAuth, redact_url
from shared.errors import (
    BusClosed,
    BusDisconnected,
    BusError,
    BusTimeout,
    ErrorKind,
    NoResponders,
    OnepoolError,
    RemoteError,
)
from shared.telemetry import get_logger, in_unsampled_trace

_log = get_logger("shared.bus")

# How nats-server says that nobody subscribes to a request's subject (a status-only reply).
_STATUS_HEADER = "Status"
_NO_RESPONDERS_STATUS = "503"
# Marks an error reply (its body is a msgpack ErrorBody).
ERROR_HEADER = "Onepool-Error"


class ConnectionState(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost; the client is reconnecting
    CLOSED = "closed"


# Not a registered semconv value (the registry has none for NATS); lowercase like the registered ones.
MESSAGING_SYSTEM = "nats"


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered message, independent of nats-py."""

    subject: str
    data: bytes
    reply: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Message], Awaitable[bytes | None]]


class Subscription:
    """One subject (optionally in a queue group) whose messages run ``handler`` as owned tasks.

    ``handled`` counts deliveries whose handler finished (successfully or not), ``errors`` those
    that raised, ``rejected`` those refused as bad input (an ``OnepoolError`` of kind client, e.g. a
    ``DecodeError``). At most ``concurrency`` handlers run at once; delivery waits for a free slot.
    """

    def __init__(
        self,
        bus: Bus,
        subject: str,
        handler: Handler,
        *,
        queue: str | None,
        concurrency: int,
        traced: bool = True,
    ) -> None:
        self.subject = subject
        self.traced = traced
        self.queue = queue
        self.concurrency = concurrency
        self.handled = 0
        self.errors = 0
        self.rejected = 0
        self._bus = bus
        self._handler = handler
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop only keeps weak ones
        self._nsub: NatsSubscription | None = None
        self._accepting = True
        self._stopped = False
        # A wildcard subscription names spans by its pattern when the subject has no template of its own.
        self._pattern = subject if any(tok in ("*", ">") for tok in subject.split(".")) else None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def is_active(self) -> bool:
        return not self._stopped

    async def _on_msg(self, nmsg: NatsMsg) -> None:
        # Called by nats-py's per-subscription delivery task, one message at a time: waiting for a
        # slot here is the backpressure (undelivered messages queue up inside nats-py).
        if not self._is_accepting():
            return
        await self._slots.acquire()
        if not self._is_accepting():  # stop() began while we waited for a slot
            self._slots.release()
            return
        msg = Message(
            subject=nmsg.subject, data=nmsg.data, reply=nmsg.reply or None, headers=dict(nmsg.headers or {})
        )
        task = asyncio.get_running_loop().create_task(self._process(msg), name=f"bus-handler:{self.subject}")
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _is_accepting(self) -> bool:
        return self._accepting

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _process(self, msg: Message) -> None:
        # From an empty Context: without headers the span is a new root, never a child of whatever was
        # current when subscribe() ran (the delivery task inherited that context).
        parent = propagate.extract({k.lower(): v for k, v in msg.headers.items()}, context=Context())
        creation = trace.get_current_span(parent).get_span_context()
        name, attrs = self._bus._span_head("process", "process", msg.subject, len(msg.data), self._pattern)
        if self.queue:
            attrs["messaging.consumer.group.name"] = self.queue
        try:
            # Single-message push delivery: semconv allows the creation context as parent; we also link it.
            links = [Link(creation)] if creation.is_valid else None
            span_cm = (
                self._bus._span(name, SpanKind.CONSUMER, attrs, context=parent, links=links)
                if self.traced
                else contextlib.nullcontext()
            )
            with span_cm:
                try:
                    reply = await self._handler(msg)
                except Exception as exc:
                    self.handled += 1
                    self.errors += 1
                    # Logged inside the span so the line carries its trace id; _span records it too.
                    if isinstance(exc, OnepoolError) and exc.kind is not ErrorKind.BUG:
                        self.rejected += exc.kind is ErrorKind.CLIENT
                        _log.warning(
                            "bus message refused",
                            subject=msg.subject,
                            code=exc.code,
                            error=exc.message,
                            field=exc.field,
                            answered=msg.reply is not None,
                        )
                    else:
                        _log.exception("bus handler failed", subject=msg.subject, subscription=self.subject)
                    if msg.reply is not None:
                        await self._send_reply(msg.reply, _error_body(exc), error=True)
                    raise
                if msg.reply is not None and reply is not None:
                    await self._send_reply(msg.reply, bytes(reply), error=False)
                self.handled += 1
        except Exception:
            pass  # already counted, logged and recorded: a failing handler must not end the subscription

    async def _send_reply(self, subject: str, payload: bytes, *, error: bool) -> None:
        headers: dict[str, str] = {}
        propagate.inject(headers)  # the process span, for the requester's side
        if error:
            headers[ERROR_HEADER] = "1"
        try:
            await self._bus._nc.publish(subject, payload, headers=headers)
        except nats.errors.Error as e:  # the requester times out; nothing else to do here
            _log.warning("reply not sent", subject=self.subject, error=repr(e))

    async def stop(self, drain: bool = True, timeout_s: float = 5.0) -> None:
        """Unsubscribe. ``drain``: first let delivered messages and running handlers finish, for at
        most ``timeout_s``; then cancel and await whatever is left. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._bus._subs.discard(self)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        nc = self._bus._nc
        nsub = self._nsub
        if drain and nsub is not None and nc.is_connected and not nc.is_draining:
            try:
                # UNSUB, a server round trip, then every already-delivered message through _on_msg.
                await asyncio.wait_for(nsub.drain(), timeout_s)  # type: ignore[no-untyped-call]
                nsub = None
                # nats-py's round trip can overtake the queued UNSUB (see subscribe): one more, so that
                # when stop() returns the server knows, and a requester gets no-responders, not silence.
                await nc.flush(timeout=max(0.1, deadline - loop.time()))  # type: ignore[arg-type]
            except (TimeoutError, nats.errors.Error) as e:
                _log.warning("subscription drain incomplete", subject=self.subject, error=repr(e))
        if drain and self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
        self._accepting = False
        if nsub is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await nsub.unsubscribe()
        leftovers = set(self._tasks)
        for task in leftovers:
            task.cancel()
        if leftovers:
            _log.warning("cancelled in-flight bus handlers", subject=self.subject, count=len(leftovers))
            await asyncio.gather(*leftovers, return_exceptions=True)


class _Client(NatsClient):
    """nats-py's client, refusing to send its CONNECT (credentials included) over plain TCP when TLS was
    asked for: nats-py upgrades to TLS only when the server's INFO requires it, whatever the URL says."""

    require_tls = False

    def _connect_command(self) -> bytes:
        if self.require_tls and not self._server_info.get("tls_required"):
            raise nats.errors.Error(
                "nats: TLS was asked for (tls:// URL or TLS files) but the server does not require it; "
                "not connecting in the clear"
            )
        return super()._connect_command()


class Bus:
    """A named NATS connection. Create with ``await Bus.connect(...)``; end with ``await close()``."""

    def __init__(self, nc: NatsClient, *, url: str, name: str, tracer: Tracer | None) -> None:
        self._nc = nc
        self._url = redact_url(url)  # what logs and errors show; the real one went to nats-py only
        self._name = name
        self._tracer = tracer if tracer is not None else trace.get_tracer("shared.bus")
        self._subs: set[Subscription] = set()
        self._peer: dict[str, AttributeValue] = {}
        self._close_task: asyncio.Task[None] | None = None
        self._connected_once = False  # no disconnect/close chatter for a connection that never came up
        # Requests: one wildcard inbox subscription, a counter token per request, a timer per wait.
        # (nats-py's request() costs ~40% more per call: a NUID and random bytes per token, a second
        # future, asyncio.wait_for.) Filled in by connect().
        self._inbox_prefix = ""
        self._request_seq = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[NatsMsg]] = {}

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        tracer: Tracer | None = None,
        auth: BusAuth | None = None,
        connect_timeout_s: float = 2.0,
        max_reconnect_attempts: int = -1,
        reconnect_time_wait_s: float = 0.5,
        ping_interval_s: float = 2.0,
        max_outstanding_pings: int = 3,
    ) -> Bus:
        """Connect to ``url``. ``connect_timeout_s`` bounds the whole initial connection (nats-py would
        otherwise retry it forever when ``max_reconnect_attempts`` is -1); after that the client
        reconnects on its own, ``max_reconnect_attempts`` times (-1: forever). A connection that answers
        no PING for ``max_outstanding_pings`` x ``ping_interval_s`` is declared lost (nats-py's default,
        2 x 120 s, would leave a silent partition unnoticed for minutes). ``auth``: credentials and TLS
        files (default none; credentials in the URL work too); with TLS files or a ``tls://`` URL, a server
        that does not require TLS is refused."""
        auth = BusAuth() if auth is None else auth
        nc = _Client()
        nc.require_tls = auth.tls is not None or url.lower().startswith("tls://")
        bus = cls(nc, url=url, name=name, tracer=tracer)
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[url],
                    name=name,
                    # _INBOX.<user> with a user name: the one inbox its NATS permissions let it read
                    inbox_prefix=s.inbox_prefix(auth.user),
                    # nats-py annotates these as int but uses them as float seconds.
                    connect_timeout=connect_timeout_s,  # type: ignore[arg-type]
                    reconnect_time_wait=reconnect_time_wait_s,  # type: ignore[arg-type]
                    max_reconnect_attempts=max_reconnect_attempts,
                    ping_interval=ping_interval_s,  # type: ignore[arg-type]
                    max_outstanding_pings=max_outstanding_pings,
                    error_cb=bus._on_error,
                    disconnected_cb=bus._on_disconnected,
                    reconnected_cb=bus._on_reconnected,
                    closed_cb=bus._on_closed,
                    **auth.connect_options(),
                ),
                timeout=connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as e:
            last = nc.last_error  # why the attempts failed (e.g. an authorization violation), not "timeout"
            with contextlib.suppress(Exception):
                await nc.close()
            why = f"{type(e).__name__} {e}".strip()
            if last is not None and last is not e:
                why += f" (last error: {type(last).__name__} {last})"
            raise BusError(f"could not connect to NATS at {bus._url} as {name!r}: {why}") from e
        bus._inbox_prefix = nc.new_inbox() + "."
        try:
            # nats-py resubscribes it after a reconnect; the SUB precedes any request's PUB on the wire.
            await nc.subscribe(bus._inbox_prefix + "*", cb=bus._on_reply)
        except nats.errors.Error as e:
            with contextlib.suppress(Exception):
                await nc.close()
            raise BusError(f"could not subscribe to the reply inbox at {bus._url}: {e!r}") from e
        bus._peer = bus._peer_attributes()
        bus._connected_once = True
        _log.info("bus connected", url=bus._url, client=name, auth=auth.method, tls=nc.require_tls)
        return bus

    @property
    def client_name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        """The server URL, its credentials redacted (``redact_url``)."""
        return self._url

    @property
    def is_connected(self) -> bool:
        return self._close_task is None and self._nc.is_connected

    @property
    def state(self) -> ConnectionState:
        if self._close_task is not None or self._nc.is_closed:
            return ConnectionState.CLOSED
        return ConnectionState.CONNECTED if self._nc.is_connected else ConnectionState.DISCONNECTED

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        return frozenset(self._subs)

    async def publish(self, subject: str, payload: bytes, *, traced: bool = True) -> None:
        """Fire and forget; raises BusClosed/BusError if the message cannot even be queued. `traced=False`:
        no span and no trace context (housekeeping that would only clutter the traces, like an echo)."""
        self._check_open()
        if not traced:
            try:
                await self._nc.publish(subject, payload)
            except nats.errors.Error as e:
                raise _map_error(e, subject) from e
            return
        with self._send_span("publish", subject, len(payload)):
            headers: dict[str, str] = {}
            propagate.inject(headers)  # the publish span is the message's creation context
            try:
                await self._nc.publish(subject, payload, headers=headers)
            except nats.errors.Error as e:
                raise _map_error(e, subject) from e

    async def request(self, subject: str, payload: bytes, *, timeout_s: float) -> bytes:
        """Send and wait for one reply. Raises BusTimeout, NoResponders, RemoteError (the responder's error
        reply), BusDisconnected (at once, while reconnecting), BusClosed or BusError."""
        self._check_open()
        if not self._nc.is_connected:
            raise BusDisconnected(subject)
        with self._send_span("send", subject, len(payload)) as span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            token = format(next(self._request_seq), "x")
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[NatsMsg] = loop.create_future()
            self._waiting[token] = waiter
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                await self._nc.publish(subject, payload, reply=self._inbox_prefix + token, headers=headers)
                reply = await waiter
            except TimeoutError as e:
                raise BusTimeout(subject, timeout_s) from e
            except _Disconnected as e:
                raise BusDisconnected(subject) from e
            except nats.errors.Error as e:
                raise _map_error(e, subject) from e
            finally:
                timer.cancel()
                self._waiting.pop(token, None)
            if reply.headers:
                if reply.headers.get(_STATUS_HEADER) == _NO_RESPONDERS_STATUS:
                    raise NoResponders(subject)
                if ERROR_HEADER in reply.headers:
                    raise _remote_error(subject, reply.data)
            span.set_attribute("onepool.reply.body.size", len(reply.data))
            return reply.data

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str | None = None,
        concurrency: int = 1,
        traced: bool = True,
    ) -> Subscription:
        """Run ``handler`` for each message on ``subject``; a returned ``bytes`` is sent as the reply
        when the message has a reply subject. Returns once the server has registered the interest.
        ``traced=False``: no CONSUMER span per message."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._check_open()
        sub = Subscription(self, subject, handler, queue=queue, concurrency=concurrency, traced=traced)
        try:
            sub._nsub = await self._nc.subscribe(subject, queue=queue or "", cb=sub._on_msg)
        except nats.errors.Error as e:
            raise _map_error(e, subject) from e
        self._subs.add(sub)
        if self._nc.is_connected:
            try:
                # A PING/PONG round trip so the server has the SUB before we return. nats-py 2.16 writes
                # PING straight to the socket, ahead of commands still queued for its flusher task, so
                # one flush is no barrier: the first lets the flusher write the SUB, the second follows it.
                for _ in range(2):
                    await self._nc.flush(timeout=2)
            except nats.errors.Error as e:
                _log.warning("subscription not confirmed by the server yet", subject=subject, error=repr(e))
        return sub

    async def close(self, drain: bool = True) -> None:
        """Stop every subscription (draining them if ``drain``), then drain or close the connection.
        Idempotent; concurrent callers all wait for the same close."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close(drain), name="bus-close")
        await asyncio.shield(self._close_task)

    async def _close(self, drain: bool) -> None:
        await asyncio.gather(*(sub.stop(drain=drain) for sub in list(self._subs)))
        for waiter in self._waiting.values():  # requests still waiting get no answer from a closed bus
            if not waiter.done():
                waiter.set_exception(nats.errors.ConnectionClosedError())
        self._waiting.clear()
        try:
            if drain and self._nc.is_connected and not self._nc.is_draining:
                await self._nc.drain()  # flushes what we published, then closes
            else:
                await self._nc.close()
        except nats.errors.Error as e:
            _log.warning("bus drain failed; closing", error=repr(e))
            await self._nc.close()
        await asyncio.sleep(0)  # let the client's cancelled internal tasks finish unwinding

    # ---- internals ----

    def _check_open(self) -> None:
        if self._close_task is not None or self._nc.is_closed:
            raise BusClosed(f"bus {self._name!r} is closed")

    def _span_head(
        self, op_name: str, op_type: str, subject: str, size: int, pattern: str | None = None
    ) -> tuple[str, dict[str, AttributeValue]]:
        """A messaging span's name and attributes (semconv): the name is ``{operation} {destination}``, the
        destination the subject's template (``schemas.subject_template``, else a wildcard subscription's
        ``pattern``), else the subject itself; a reply inbox is temporary and left out of the name."""
        attrs: dict[str, AttributeValue] = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.name": op_name,
            "messaging.operation.type": op_type,
            "messaging.destination.name": subject,
            "messaging.message.body.size": size,
            "messaging.client.id": self._name,
            **self._peer,
        }
        if s.is_reply_subject(subject):
            attrs["messaging.destination.temporary"] = True
            return op_name, attrs
        template = s.subject_template(subject) or pattern
        if template is None:
            return f"{op_name} {subject}", attrs
        attrs["messaging.destination.template"] = template
        return f"{op_name} {template}", attrs

    def _peer_attributes(self) -> dict[str, AttributeValue]:
        url = self._nc.connected_url
        if url is None or not url.hostname:
            return {}
        port = url.port or 4222
        out: dict[str, AttributeValue] = {"server.address": url.hostname, "server.port": port}
        with contextlib.suppress(ValueError):  # network.peer.* only when the URL names an IP, not a host
            ipaddress.ip_address(url.hostname)
            out["network.peer.address"] = url.hostname
            out["network.peer.port"] = port
        return out

    def _send_span(self, op_name: str, subject: str, size: int) -> contextlib.AbstractContextManager[Span]:
        """The PRODUCER span of a publish or request; in an unsampled trace, none: the current context
        (valid ids, nothing recorded) is what the message carries, at no cost per message."""
        if in_unsampled_trace():
            return contextlib.nullcontext(trace.get_current_span())
        name, attrs = self._span_head(op_name, "send", subject, size)
        return self._span(name, SpanKind.PRODUCER, attrs)

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        *,
        context: Context | None = None,
        links: list[Link] | None = None,
    ) -> Iterator[Span]:
        """A current span that records failures with ``error.type`` (semconv), cancellation included."""
        with self._tracer.start_as_current_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except asyncio.CancelledError as e:
                span.record_exception(e)
                span.set_attribute("error.type", "cancelled")
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                raise
            except Exception as e:
                span.record_exception(e)
                error_type = e.code if isinstance(e, OnepoolError) else type(e).__qualname__
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
                raise

    async def _on_reply(self, msg: NatsMsg) -> None:
        # A reply nobody waits for any more (timed out, cancelled) is dropped here.
        waiter = self._waiting.pop(msg.subject[len(self._inbox_prefix) :], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def _on_error(self, e: Exception) -> None:
        _log.warning("bus error", client=self._name, url=self._url, error=repr(e))

    async def _on_disconnected(self) -> None:
        if self._close_task is not None or self._nc.is_closed:
            return  # nats-py calls this on a close too: not a lost connection
        if self._connected_once:
            _log.warning("bus disconnected", client=self._name, url=self._url)
        # Replies cannot reach us while the connection is down: those waiting fail now, not at their timeout.
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(_Disconnected())

    async def _on_reconnected(self) -> None:
        self._peer = self._peer_attributes()
        _log.info("bus reconnected", client=self._name, url=self._url)

    async def _on_closed(self) -> None:
        if self._connected_once:
            _log.info("bus connection closed", client=self._name, url=self._url)


class _Disconnected(Exception):
    """Set on a waiting request when the connection drops (turned into BusDisconnected)."""


def _error_body(exc: Exception) -> bytes:
    """The error reply for a handler's exception: an OnepoolError says what it is; anything else is a bug."""
    if isinstance(exc, OnepoolError):
        body = s.ErrorBody(code=exc.code, message=exc.message, field=exc.field, kind=exc.kind.value)
    else:
        body = s.ErrorBody(code="internal", message=f"the handler failed ({type(exc).__name__})", kind="bug")
    return s.encode(body)


def _remote_error(subject: str, data: bytes) -> RemoteError:
    try:
        body = s.decode(_ERROR_DECODER, data)
    except s.DecodeError as exc:
        return RemoteError(
            subject, code="bad_error_reply", kind=ErrorKind.BUG, message=exc.message, field=None
        )
    return RemoteError(
        subject, code=body.code, kind=ErrorKind(body.kind), message=body.message, field=body.field
    )


_ERROR_DECODER = s.decoder(s.ErrorBody)


def _expire(waiter: asyncio.Future[NatsMsg]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _map_error(e: Exception, subject: str) -> OnepoolError:
    if isinstance(e, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
        return BusClosed(f"connection closed while using {subject!r}")
    return BusError(f"{type(e).__name__} on {subject!r}: {e}", subject=subject)


__all__ = ["ERROR_HEADER", "Bus", "ConnectionState", "Handler", "Message", "Subscription"]
