"""The gateway's async shell: HTTP in, a routing decision, NATS to a worker (retrying elsewhere), HTTP out.

State: a replica of cachestate's routing view (kept in sync from VIEW_SUBJECT, resynced from a snapshot on
a gap) and the router's own in-flight counts, demotions and recent decisions. Several replicas run side by
side: they share nothing but the bus.

At the door, cheapest first, each answered at once: over `max_concurrent` requests 503 `overloaded`; no bus
connection 503 `bus_unavailable`; a media type other than JSON 415; a body slower than `body_timeout_ms`
408. Then, once the body is read and parsed, routing sheds with 503 `overloaded` when every worker is at its
reported queue limit or the best estimate exceeds `max_queue_wait_ms`. Connections beyond
`max_connections` get a canned 503 from the listening socket itself (`BoundedTCPSite`). Every refusal is
counted in `onepool_gateway_shed_total{reason}`; every routing decision in
`onepool_gateway_route_decisions_total{policy,reason}`, by why its first worker came first (`route_reason`
in core/router.py, also the `onepool.route.reason` attribute of the `gateway.route` span); every answer's
latency in `onepool_gateway_request_seconds{outcome}`, `ok` (2xx) apart from `error` (the rest), so that
fast refusals do not pass for fast answers. The deadline of a request runs from the moment its
handler starts (right after its headers), the body read included. When cachestate is silent the
gateway keeps routing on its last view (and says so on /readyz); a worker that does not answer is demoted
by the router at once (see core/router.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Literal, get_args

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from services.gateway.core.router import (
    NoWorkers,
    Policy,
    RouteDecision,
    Router,
    RouteReason,
    RouteRequest,
    Saturated,
    ScoreBreakdown,
)
from services.gateway.core.routing_view import IndexView
from services.gateway.core.view_replica import ViewReplica
from services.gateway.errors import (
    BodyTimeout,
    BodyTooLarge,
    BusUnavailable,
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    NoWorkerAvailable,
    Overloaded,
    UpstreamFailed,
)
from services.gateway.http_body import RecommendBody, check_media_type, parse_body, user_key
from services.gateway.openapi import openapi_document
from services.gateway.settings import GatewaySettings
from shared import schemas as s
from shared.bus import Bus, Message, Subscription
from shared.errors import BusDisconnected, BusError, BusTimeout, NoResponders, OnepoolError
from shared.lifecycle import TaskOwner
from shared.metrics import LATENCY_SECONDS_BUCKETS, add_process_collectors, metrics_response
from shared.residency import DEFAULT_MAX_ENTRIES, ResidencyIndex
from shared.telemetry import in_unsampled_trace

log = structlog.get_logger("onepool.gateway")


_json_encode = msgspec.json.Encoder().encode

# The reasons of onepool_gateway_shed_total (docs/metrics.md).
ShedReason = Literal["concurrency", "saturated", "bus", "connections"]
SHED_REASONS: tuple[ShedReason, ...] = get_args(ShedReason)


class GatewayMetrics:
    """Prometheus metrics in the gateway's own registry (no process globals).

    The series of a labelled metric whose label values are known in advance (latency by outcome, shed
    reasons, routing decisions of this gateway's policy by reason) exist from the start at 0, so that a
    scrape lists them and a dashboard's rate() reads 0 rather than no data before the first one.
    """

    def __init__(self, policy: Policy) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        add_process_collectors(r)
        self.requests = Counter(
            "onepool_gateway_requests", "HTTP recommend requests by status", ["status"], registry=r
        )
        self.latency = Histogram(
            "onepool_gateway_request_seconds",
            "recommend latency at the gateway, receipt to answer, by outcome: ok (2xx) or error (any other "
            "status)",
            ["outcome"],
            buckets=LATENCY_SECONDS_BUCKETS,
            registry=r,
        )
        # a 2xx answer and any other: errors (fast sheds, 400s) must not count as fast successes
        self._latency_ok = self.latency.labels("ok")
        self._latency_error = self.latency.labels("error")
        self.attempts = Counter(
            "onepool_gateway_attempts", "worker attempts by outcome", ["outcome"], registry=r
        )
        self.route_seconds = Histogram(
            "onepool_gateway_route_seconds",
            "routing decision time",
            buckets=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3),
            registry=r,
        )
        self.view_updates = Counter("onepool_gateway_view_updates", "view updates applied", registry=r)
        self.view_resyncs = Counter(
            "onepool_gateway_view_resyncs", "view snapshot requests answered by cachestate", registry=r
        )
        self.bad_messages = Counter("onepool_gateway_bad_messages", "undecodable bus messages", registry=r)
        self.routable = Gauge("onepool_gateway_routable_workers", "workers the router may choose", registry=r)
        self.shed = Counter(
            "onepool_gateway_shed",
            "requests and connections refused at once, by reason: concurrency (max_concurrent), saturated "
            "(every worker full, or over max_queue_wait_ms), bus (no bus connection), connections "
            "(max_connections)",
            ["reason"],
            registry=r,
        )
        for reason in SHED_REASONS:
            self.shed.labels(reason)
        self.route_decisions = Counter(
            "onepool_gateway_route_decisions",
            "routing decisions by policy and by why the first-ranked worker came first (core/router.py "
            "route_reason): single, tie, kv, compute, emb, load, override",
            ["policy", "reason"],
            registry=r,
        )
        # labelled children, looked up once per label value (labels() takes a lock and builds a tuple)
        self._by_status: dict[int, Counter] = {}
        self._by_outcome: dict[str, Counter] = {}
        self._by_reason: dict[RouteReason, Counter] = {
            reason: self.route_decisions.labels(str(policy), str(reason)) for reason in RouteReason
        }

    def count_request(self, status: int) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(str(status))
        child.inc()

    def observe_latency(self, status: int, seconds: float) -> None:
        """One answered recommend request: `seconds` from receipt to answer, filed by its status."""
        (self._latency_ok if 200 <= status < 300 else self._latency_error).observe(seconds)

    def count_shed(self, reason: ShedReason) -> None:
        self.shed.labels(reason).inc()

    def count_route(self, reason: RouteReason) -> None:
        self._by_reason[reason].inc()

    def count_attempt(self, outcome: str) -> None:
        child = self._by_outcome.get(outcome)
        if child is None:
            child = self._by_outcome[outcome] = self.attempts.labels(outcome)
        child.inc()


class ReplicaView(IndexView):
    """The RoutingView the router reads, backed by the gateway's replica of the cluster view."""

    def __init__(self, replica: ViewReplica, index: ResidencyIndex) -> None:
        super().__init__(index)
        self._replica = replica
        # Bumped when an update changes worker records: the router rebuilds its per-worker arrays only then.
        self.version: int = 0

    def routable_workers(self) -> Sequence[s.WorkerState]:
        return [w for w in self._replica.workers.values() if not w.draining]


class Gateway:
    def __init__(self, settings: GatewaySettings, bus: Bus, *, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.router = Router(Policy(settings.routing), predict_ttl_s=settings.predict_ttl_s)
        self.metrics = GatewayMetrics(self.router.policy)
        self.index = ResidencyIndex(max_entries=DEFAULT_MAX_ENTRIES)
        self.replica = ViewReplica(self.index)
        self.view = ReplicaView(self.replica, self.index)
        self._tracer = tracer or trace.get_tracer("onepool.gateway")
        self._tasks = TaskOwner()
        self._subs: list[Subscription] = []
        self._resync = asyncio.Event()
        self._dec_view = s.decoder(s.ViewUpdate)
        self._dec_reply = s.decoder(s.InferenceReply)
        # Request ids: a random prefix per gateway process and a counter (unique, and ~5x cheaper than uuid4).
        self._request_id_prefix = uuid.uuid4().hex[:16] + "-"
        self._request_seq = itertools.count(1)
        self._active = 0  # recommend requests admitted and not yet answered
        self._view_heard: float | None = None  # time.monotonic() of the last view message from cachestate
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}

    # ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._subs.append(await self.bus.subscribe(s.VIEW_SUBJECT, self._on_view))
        self._resync.set()  # a new replica knows nothing: ask for the whole view
        self._tasks.spawn(self._resync_loop(), name="view-resync")

    async def stop(self) -> None:
        await self._tasks.close(timeout_s=2.0)
        for sub in self._subs:
            await sub.stop(drain=False)
        self._subs.clear()

    def view_age_s(self, now: float) -> float | None:
        """Seconds since the last view message from cachestate (None: never heard from it)."""
        return None if self._view_heard is None else max(0.0, now - self._view_heard)

    def not_ready_reasons(self, now: float) -> list[str]:
        """Why /readyz says 503 (empty: ready)."""
        reasons = []
        if not self.bus.is_connected:
            reasons.append("no connection to the message bus")
        if self.replica.snapshots_applied == 0:
            reasons.append("no routing view yet (waiting for cachestate)")
        elif not self.view.routable_workers():
            reasons.append("no routable worker in the routing view")
        age = self.view_age_s(now)
        if age is not None and age * 1e3 > self.settings.view_max_age_ms:
            reasons.append(
                f"routing view is {age:.1f} s old: cachestate is silent (routing on the last view)"
            )
        return reasons

    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons(time.monotonic())

    async def _on_view(self, msg: Message) -> None:
        try:
            update = s.decode(self._dec_view, msg.data)
        except s.DecodeError as exc:
            self.metrics.bad_messages.inc()
            log.warning("bad view update dropped", error=exc.message, field=exc.field)
            return
        self._view_heard = time.monotonic()
        before = {
            w: self.replica.workers[w].incarnation
            for w in update.workers_removed
            if w in self.replica.workers
        }
        outcome = self.replica.apply(update)
        if outcome.workers_changed:
            self.view.version += 1  # what the router keeps per worker may have changed
        self.metrics.view_updates.inc()
        # A removal that the same update undoes (cachestate repairing a worker's residency) is no goodbye:
        # the worker still serves our in-flight requests, and our recent choices for it still hold. Unless
        # it comes back as another incarnation: a new process holds none of what we predicted for it.
        readded = {w.worker_id: w.incarnation for w in update.workers}
        for worker_id in update.workers_removed:
            if worker_id not in readded or readded[worker_id] != before.get(worker_id, readded[worker_id]):
                self.router.forget_worker(worker_id)
        if outcome.need_snapshot:
            log.info("routing view out of sync; asking for a snapshot", reason=outcome.reason)
            self._resync.set()
        self.metrics.routable.set(len(self.view.routable_workers()))

    async def _resync_loop(self) -> None:
        pause = self.settings.snapshot_retry_ms / 1e3
        first = True
        while True:
            await self._resync.wait()
            self._resync.clear()
            if self.replica.in_sync and not first:
                continue  # a snapshot asked for by another replica (or already applied) did the job
            first = False
            request = s.ViewSnapshotRequest(requester=self.settings.instance)
            try:
                await self.bus.request(s.VIEW_SNAPSHOT_SUBJECT, s.encode(request), timeout_s=2.0)
                self.metrics.view_resyncs.inc()
            except OnepoolError as exc:
                log.info("view snapshot not available yet", error=exc.message)
            except Exception:  # the loop must survive anything: a gateway that stops resyncing goes stale
                log.exception("view snapshot request failed")
            # Give the snapshot (or cachestate) time to arrive, then ask again only if still out of sync:
            # deltas that arrived meanwhile flagged a resync that the snapshot has since made moot.
            await asyncio.sleep(pause)
            if self.replica.in_sync:
                self._resync.clear()
            else:
                self._resync.set()

    # ---------------------------------------------------------------------------------------------------
    async def recommend(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        status = 500
        admitted = False
        try:
            # Shedding first, and cheap: nothing is read or parsed for a request that cannot be served.
            if self._active >= self.settings.max_concurrent:
                self.metrics.count_shed("concurrency")
                raise Overloaded(f"the gateway is serving {self._active} requests, its limit")
            if not self.bus.is_connected:
                self.metrics.count_shed("bus")
                raise BusUnavailable()
            self._active += 1
            admitted = True
            has_type = "Content-Type" in request.headers
            check_media_type(request.content_type if has_type else None, request.charset)
            body = await self._read_body(request)
            response = await self._serve(body, started)
            status = response.status
            return response
        except GatewayError as exc:
            status = exc.status
            return web.Response(
                body=_json_encode(exc.body()),
                status=exc.status,
                content_type="application/json",
                headers=self._retry_after if exc.status == 503 else None,
            )
        finally:
            if admitted:
                self._active -= 1
            self.metrics.count_request(status)
            self.metrics.observe_latency(status, time.perf_counter() - started)

    async def _read_body(self, request: web.Request) -> RecommendBody:
        limit = self.settings.max_body_kib * 1024
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(limit)
        try:
            async with asyncio.timeout(self.settings.body_timeout_ms / 1e3):
                if request.content_length is not None:  # the usual case: one read of a known, allowed size
                    raw = await request.read()
                else:
                    buf = bytearray()  # chunked: count while reading, and stop at the limit
                    async for chunk in request.content.iter_chunked(64 * 1024):
                        buf += chunk
                        if len(buf) > limit:
                            raise BodyTooLarge(limit)
                    raw = bytes(buf)
        except TimeoutError:
            raise BodyTimeout(self.settings.body_timeout_ms) from None
        return parse_body(
            raw, max_history=self.settings.max_history, max_candidates=self.settings.max_candidates
        )

    async def _serve(self, body: RecommendBody, started: float) -> web.Response:
        deadline = started + self.settings.request_timeout_ms / 1e3
        route_req = RouteRequest(user_id=user_key(body), history=body.history, candidates=body.candidates)
        decision = self._route(route_req, budget_ms=self.settings.max_queue_wait_ms)
        wire = s.InferenceRequest(
            request_id=f"{self._request_id_prefix}{next(self._request_seq):x}",
            user_id=route_req.user_id,
            history=body.history,
            timestamps=body.timestamps,
            candidates=body.candidates,
            k=body.k,
        )
        failures: list[str] = []
        for choice in decision.ranked[: self.settings.max_attempts]:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            timeout_s = min(remaining, self.settings.attempt_timeout_ms / 1e3)
            reply = await self._attempt(choice.worker_id, route_req, wire, timeout_s, failures)
            if reply is None:
                continue
            if reply.ok is not None:
                ok = reply.ok
                payload = {
                    "items": ok.items,
                    "scores": ok.scores,
                    "worker": reply.worker_id,
                    "cached_tokens": ok.cached_tokens,
                    "computed_tokens": ok.computed_tokens,
                    "emb_hits": ok.emb_hits,
                    "emb_misses": ok.emb_misses,
                    # the worker's own split of the time: waiting for its model thread, then the batch
                    "worker_queue_ms": ok.queue_ms,
                    "worker_compute_ms": ok.compute_ms,
                    "batch_size": ok.batch_size,
                    "latency_ms": (time.perf_counter() - started) * 1e3,
                }
                # msgspec: several times faster than json.dumps on the per-request path.
                return web.Response(body=_json_encode(payload), content_type="application/json")
            assert reply.error is not None
            if reply.error.kind == "client":
                raise InvalidInput(reply.error.message, reply.error.field)
            failures.append(f"{choice.worker_id}: {reply.error.code}")
        if time.perf_counter() >= deadline:
            raise DeadlineExceeded(
                f"no answer within {self.settings.request_timeout_ms:.0f} ms "
                f"({'; '.join(failures) or 'no attempt finished'})"
            )
        raise UpstreamFailed(f"every worker tried failed: {'; '.join(failures)}")

    def _route(self, req: RouteRequest, *, budget_ms: float) -> RouteDecision:
        # In an unsampled trace (no exporter) a routing span would record nothing: skip making it.
        span_cm = (
            contextlib.nullcontext(trace.get_current_span())
            if in_unsampled_trace()
            else self._tracer.start_as_current_span("gateway.route")
        )
        with span_cm as span:
            t0 = time.perf_counter()
            try:
                decision = self.router.route(self.view, req, time.monotonic(), budget_ms=budget_ms)
            except Saturated as exc:
                span.set_attribute("onepool.route.saturated", True)
                self.metrics.count_shed("saturated")
                raise Overloaded(exc.message) from None
            except NoWorkers:
                span.set_attribute("onepool.route.workers", 0)
                raise NoWorkerAvailable("no live worker in the routing view") from None
            finally:
                self.metrics.route_seconds.observe(time.perf_counter() - t0)
            reason = decision.reason
            self.metrics.count_route(reason)
            if span.is_recording():  # the breakdown costs ~10 us to build: only when it is recorded
                span.set_attribute("onepool.route.policy", str(decision.policy))
                span.set_attribute("onepool.route.reason", str(reason))
                span.set_attribute("onepool.route.workers", len(decision.ranked))
                for role, choice in zip(("chosen", "runner_up"), decision.ranked[:2], strict=False):
                    _breakdown_attributes(span, role, choice)
            return decision

    async def _attempt(
        self,
        worker_id: str,
        route_req: RouteRequest,
        wire: s.InferenceRequest,
        timeout_s: float,
        failures: list[str],
    ) -> s.InferenceReply | None:
        """One try on one worker: its reply, or None (noted in `failures`) when it did not answer. A worker
        that does not answer, answers garbage or says it is draining is demoted in the router."""
        request = msgspec.structs.replace(wire, deadline_ms=timeout_s * 1e3)
        router = self.router
        router.on_dispatch(worker_id, route_req, time.monotonic())
        answered = False
        try:
            raw = await self.bus.request(s.infer_subject(worker_id), s.encode(request), timeout_s=timeout_s)
            answered = True
            reply = s.decode(self._dec_reply, raw)
        except BusDisconnected:
            raise BusUnavailable() from None  # no other worker can be reached either
        except s.DecodeError as exc:
            self.metrics.count_attempt("bad_reply")
            failures.append(f"{worker_id}: bad reply")
            router.on_failure(worker_id, time.monotonic())
            log.warning("undecodable worker reply", worker=worker_id, error=exc.message)
            return None
        except OnepoolError as exc:
            self.metrics.count_attempt(exc.code)
            failures.append(f"{worker_id}: {exc.code}")
            if isinstance(exc, NoResponders | BusTimeout | BusError):
                backoff = router.on_failure(worker_id, time.monotonic())
                log.info(
                    "worker did not answer; demoted", worker=worker_id, error=exc.code, backoff_s=backoff
                )
            else:
                log.info("worker attempt failed; trying the next", worker=worker_id, error=exc.code)
            return None
        finally:
            router.on_done(worker_id, answered=answered)
        if reply.ok is not None:
            router.on_success(worker_id)
            self.metrics.count_attempt("ok")
        else:
            code = reply.error.code if reply.error is not None else "?"
            if code == s.DRAINING:
                router.on_failure(worker_id, time.monotonic())
            else:
                router.on_success(worker_id)  # it answered: alive, whatever it said
            self.metrics.count_attempt(code)
        return reply

    # ---------------------------------------------------------------------------------------------------
    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        now = time.monotonic()
        reasons = self.not_ready_reasons(now)
        age = self.view_age_s(now)
        body = {
            "ready": not reasons,
            "reasons": reasons,
            "routable_workers": len(self.view.routable_workers()),
            "view_in_sync": self.replica.in_sync,
            "view_age_s": None if age is None else round(age, 3),
            "bus_connected": self.bus.is_connected,
            "active_requests": self._active,
        }
        return web.json_response(body, status=503 if reasons else 200)

    async def metrics_handler(self, _: web.Request) -> web.Response:
        self.metrics.routable.set(len(self.view.routable_workers()))
        return metrics_response(self.metrics.registry)

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document(self.settings.max_history, self.settings.max_candidates))


def _breakdown_attributes(span: trace.Span, role: str, b: ScoreBreakdown) -> None:
    prefix = f"onepool.route.{role}"
    span.set_attribute(f"{prefix}.worker", b.worker_id)
    for key in ("total_ms", "queue_ms", "compute_ms", "emb_ms"):
        span.set_attribute(f"{prefix}.{key}", float(getattr(b, key)))
    for key in ("cached_tokens", "new_tokens", "emb_misses", "in_flight"):
        span.set_attribute(f"{prefix}.{key}", int(getattr(b, key)))
    span.set_attribute(f"{prefix}.predicted", bool(b.predicted))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# The HTTP methods the semantic conventions know; any other is reported as "_OTHER" (bounded cardinality).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def tracing_middleware(tracer: Tracer) -> Middleware:
    """A SERVER span per HTTP request, child of the caller's traceparent if any; its trace id goes back in
    the x-trace-id header so a client can find the request in Jaeger.

    Names and attributes follow the stable HTTP server conventions: the span is named `{method} {route}`, or
    only `{method}` when no route matched (a scanned path must not make a span name of its own); an unknown
    method is `_OTHER`; a 5xx answer sets `error.type` to its status code."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # case-insensitive headers: "Traceparent" counts too; no header (the usual case): a new trace
        ctx = propagate.extract(request.headers) if "traceparent" in request.headers else None
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        method = request.method if request.method in _KNOWN_METHODS else "_OTHER"
        name = f"{'HTTP' if method == '_OTHER' else method}{f' {route}' if route else ''}"
        with tracer.start_as_current_span(name, context=ctx, kind=SpanKind.SERVER) as span:
            recording = span.is_recording()
            if recording:
                span.set_attributes(_server_attributes(request, method, route))
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            if recording:
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_attribute("error.type", str(response.status))
                    span.set_status(Status(StatusCode.ERROR))
            response.headers["x-trace-id"] = format(span.get_span_context().trace_id, "032x")
            return response

    return middleware


def _server_attributes(request: web.Request, method: str, route: str | None) -> dict[str, AttributeValue]:
    """The request's attributes required (or recommended, when cheap) by the HTTP server conventions."""
    attrs: dict[str, AttributeValue] = {
        "http.request.method": method,
        "url.scheme": request.scheme,
        "url.path": request.path,
        "network.protocol.version": f"{request.version.major}.{request.version.minor}",
    }
    if method == "_OTHER":
        attrs["http.request.method_original"] = request.method
    if route:
        attrs["http.route"] = route
    try:
        url = request.url  # built from the Host header: server.address/port are what the client asked for
    except ValueError:  # a Host header that is no host[:port] (the client's to get wrong): no server.*
        return attrs
    if url.host:
        attrs["server.address"] = url.host
    if url.port is not None:
        attrs["server.port"] = url.port
    return attrs


def json_errors_middleware() -> Middleware:
    """aiohttp's own errors (404, 405, ...) and unexpected failures as JSON bodies like ours."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {
                "error": {"code": exc.reason.lower().replace(" ", "_"), "message": exc.reason, "field": None}
            }
            return web.json_response(
                body,
                status=exc.status,
                headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
            )
        except Exception:
            # A bug must still answer in the documented shape (and is logged with its traceback).
            log.exception("unhandled error", path=request.path)
            body = {"error": {"code": "internal", "message": "internal error", "field": None}}
            return web.json_response(body, status=500)

    return middleware


def build_app(gateway: Gateway, tracer: Tracer | None = None) -> web.Application:
    app = web.Application(
        # Tracing outermost, so that every answer (JSON errors included) carries x-trace-id.
        middlewares=[
            tracing_middleware(tracer or trace.get_tracer("onepool.gateway")),
            json_errors_middleware(),
        ],
        # Our own limit is enforced while reading (413 JSON); this one only stops aiohttp reading past it.
        client_max_size=gateway.settings.max_body_kib * 1024 + 1,
    )
    app.router.add_post("/v1/recommend", gateway.recommend)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/readyz", gateway.readyz)
    app.router.add_get("/metrics", gateway.metrics_handler)
    app.router.add_get("/openapi.json", gateway.openapi)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


class BoundedTCPSite(web.BaseSite):
    """A TCP listener that holds at most `max_connections` HTTP connections (aiohttp has no such limit): one
    more is answered by the socket itself with a canned 503 `overloaded` JSON body and closed, at the cost of
    a write, without an HTTP parser, a request object or a task."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        retry_after_s: int,
        on_refuse: Callable[[], None] | None = None,
    ) -> None:
        # A listen backlog as deep as the connection limit: a burst of new connections waits in the kernel
        # for an accept() instead of having its SYNs dropped (a client retries a SYN after 1 s, 3 s, 7 s).
        super().__init__(runner, backlog=max_connections)
        self._host = host
        self._port = port
        self._max_connections = max_connections
        body = _json_encode(
            {"error": {"code": "overloaded", "message": "too many open connections", "field": None}}
        )
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Retry-After: {retry_after_s}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._refusal = head.encode() + body
        self._on_refuse = on_refuse
        self.refused = 0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limit = self._max_connections

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= limit:
                self.refused += 1
                if self._on_refuse is not None:
                    self._on_refuse()
                return _Refusal(self._refusal)
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


class _Refusal(asyncio.Protocol):
    """Writes the canned answer, half-closes, discards what the client still sends, closes within 1 s."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        if transport.can_write_eof():
            transport.write_eof()
        # Closing at once with unread request bytes would reset the connection and could lose the answer.
        self._timer = asyncio.get_running_loop().call_later(1.0, transport.close)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


@contextlib.asynccontextmanager
async def serve_http(
    app: web.Application,
    settings: GatewaySettings,
    *,
    port: int | None = None,
    on_refuse: Callable[[], None] | None = None,
) -> AsyncIterator[web.AppRunner]:
    """Run `app` on the settings' host and port (`port` overrides it: 0 for any free one) until the block
    exits; then stop accepting and close cleanly. Connections idle (or sending their headers) for
    `IDLE_TIMEOUT_MS` are closed; beyond `MAX_CONNECTIONS` they are refused with a 503 (and `on_refuse`
    is called)."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=settings.idle_timeout_ms / 1e3
    )
    await runner.setup()
    try:
        site = BoundedTCPSite(
            runner,
            settings.host,
            settings.port if port is None else port,
            max_connections=settings.max_connections,
            retry_after_s=settings.retry_after_s,
            on_refuse=on_refuse,
        )
        await site.start()
        yield runner
    finally:
        await runner.cleanup()
