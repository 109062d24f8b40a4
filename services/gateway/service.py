"""The gateway's async shell: HTTP in, a routing decision, NATS to a worker (retrying elsewhere), HTTP out.

State: a replica of cachestate's routing view (kept in sync from VIEW_SUBJECT, resynced from a snapshot on
a gap) and the router's own in-flight counts and recent decisions. Several replicas run side by side: they
share nothing but the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import msgspec
import numpy as np
import numpy.typing as npt
import structlog
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from services.cachestate.core.residency import ResidencyIndex
from services.gateway.core.router import (
    NoWorkers,
    Policy,
    RouteDecision,
    Router,
    RouteRequest,
    ScoreBreakdown,
)
from services.gateway.core.view_replica import ViewReplica
from services.gateway.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidInput,
    NoWorkerAvailable,
    UpstreamFailed,
)
from services.gateway.http_body import RecommendBody, parse_body, user_key
from services.gateway.openapi import openapi_document
from services.gateway.settings import GatewaySettings
from shared import schemas as s
from shared.bus import Bus, Message, Subscription
from shared.errors import OnepoolError
from shared.lifecycle import TaskOwner
from shared.telemetry import in_unsampled_trace

log = structlog.get_logger("onepool.gateway")

# The replica's memory cap: the same order as cachestate's default (one entry per KV placement/EMB item).
REPLICA_MAX_ENTRIES = 2_000_000


_json_encode = msgspec.json.Encoder().encode


class GatewayMetrics:
    """Prometheus metrics in the gateway's own registry (no process globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "onepool_gateway_requests", "HTTP recommend requests by status", ["status"], registry=r
        )
        self.latency = Histogram(
            "onepool_gateway_request_seconds",
            "recommend latency at the gateway",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
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
        # labelled children, looked up once per label value (labels() takes a lock and builds a tuple)
        self._by_status: dict[int, Counter] = {}
        self._by_outcome: dict[str, Counter] = {}

    def count_request(self, status: int) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(str(status))
        child.inc()

    def count_attempt(self, outcome: str) -> None:
        child = self._by_outcome.get(outcome)
        if child is None:
            child = self._by_outcome[outcome] = self.attempts.labels(outcome)
        child.inc()


class ReplicaView:
    """The RoutingView the router reads, backed by the gateway's replica of the cluster view."""

    def __init__(self, replica: ViewReplica, index: ResidencyIndex) -> None:
        self._replica = replica
        self._index = index
        # Bumped on every applied view update: the router rebuilds its per-worker arrays only then.
        self.version = 0

    def routable_workers(self) -> Sequence[s.WorkerState]:
        return [w for w in self._replica.workers.values() if not w.draining]

    def kv_workers(self, user_id: str) -> Mapping[str, int]:
        return self._index.kv_workers(user_id)

    def worker_bit(self, worker_id: str) -> int | None:
        return self._index.worker_bit(worker_id)

    def emb_masks(self, items: Sequence[int]) -> list[int]:
        return self._index.emb_masks(items)

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        """The router's fast path (it calls this only while every routable worker's bit is < 64)."""
        return self._index.emb_masks_array(items)


class Gateway:
    def __init__(self, settings: GatewaySettings, bus: Bus, *, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = GatewayMetrics()
        self.index = ResidencyIndex(max_entries=REPLICA_MAX_ENTRIES)
        self.replica = ViewReplica(self.index)
        self.view = ReplicaView(self.replica, self.index)
        self.router = Router(Policy(settings.routing), predict_ttl_s=settings.predict_ttl_s)
        self._tracer = tracer or trace.get_tracer("onepool.gateway")
        self._tasks = TaskOwner()
        self._subs: list[Subscription] = []
        self._resync = asyncio.Event()
        self._dec_view = s.decoder(s.ViewUpdate)
        self._dec_reply = s.decoder(s.InferenceReply)
        # Request ids: a random prefix per gateway process and a counter (unique, and ~5x cheaper than uuid4).
        self._request_id_prefix = uuid.uuid4().hex[:16] + "-"
        self._request_seq = itertools.count(1)

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

    @property
    def ready(self) -> bool:
        return self.replica.ready and bool(self.view.routable_workers())

    async def _on_view(self, msg: Message) -> None:
        try:
            update = s.decode(self._dec_view, msg.data)
        except s.DecodeError as exc:
            self.metrics.bad_messages.inc()
            log.warning("bad view update dropped", error=exc.message, field=exc.field)
            return
        outcome = self.replica.apply(update)
        self.view.version += 1
        self.metrics.view_updates.inc()
        # A removal that the same update undoes (cachestate repairing a worker's residency) is no goodbye:
        # the worker still serves our in-flight requests, and our recent choices for it still hold.
        readded = {w.worker_id for w in update.workers}
        for worker_id in update.workers_removed:
            if worker_id not in readded:
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
        try:
            body = await self._read_body(request)
            response = await self._serve(body, started)
            status = response.status
            return response
        except GatewayError as exc:
            status = exc.status
            headers = {"Retry-After": str(self.settings.retry_after_s)} if exc.status == 503 else None
            return web.json_response(exc.body(), status=exc.status, headers=headers)
        finally:
            self.metrics.count_request(status)
            self.metrics.latency.observe(time.perf_counter() - started)

    async def _read_body(self, request: web.Request) -> RecommendBody:
        limit = self.settings.max_body_kib * 1024
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(limit)
        if request.content_length is not None:  # the usual case: one read of a known, allowed size
            return parse_body(
                await request.read(),
                max_history=self.settings.max_history,
                max_candidates=self.settings.max_candidates,
            )
        raw = bytearray()  # chunked: count while reading, and stop at the limit
        async for chunk in request.content.iter_chunked(64 * 1024):
            raw += chunk
            if len(raw) > limit:
                raise BodyTooLarge(limit)
        return parse_body(
            bytes(raw), max_history=self.settings.max_history, max_candidates=self.settings.max_candidates
        )

    async def _serve(self, body: RecommendBody, started: float) -> web.Response:
        deadline = started + self.settings.request_timeout_ms / 1e3
        route_req = RouteRequest(user_id=user_key(body), history=body.history, candidates=body.candidates)
        decision = self._route(route_req)
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
                    "latency_ms": (time.perf_counter() - started) * 1e3,
                }
                # msgspec: several times faster than json.dumps on the per-request path.
                return web.Response(body=_json_encode(payload), content_type="application/json")
            assert reply.error is not None
            if reply.error.kind == "client":
                raise InvalidInput(reply.error.message, reply.error.field)
            failures.append(f"{choice.worker_id}: {reply.error.code}")
        if time.perf_counter() >= deadline:
            return web.json_response(
                {
                    "error": {
                        "code": "deadline_exceeded",
                        "message": f"no answer within {self.settings.request_timeout_ms:.0f} ms "
                        f"({'; '.join(failures) or 'no attempt finished'})",
                        "field": None,
                    }
                },
                status=504,
            )
        raise UpstreamFailed(f"every worker tried failed: {'; '.join(failures)}")

    def _route(self, req: RouteRequest) -> RouteDecision:
        # In an unsampled trace (no exporter) a routing span would record nothing: skip making it.
        span_cm = (
            contextlib.nullcontext(trace.get_current_span())
            if in_unsampled_trace()
            else self._tracer.start_as_current_span("gateway.route")
        )
        with span_cm as span:
            t0 = time.perf_counter()
            try:
                decision = self.router.route(self.view, req, time.monotonic())
            except NoWorkers:
                span.set_attribute("onepool.route.workers", 0)
                raise NoWorkerAvailable("no live worker in the routing view") from None
            finally:
                self.metrics.route_seconds.observe(time.perf_counter() - t0)
            if span.is_recording():  # the breakdown costs ~10 us to build: only when it is recorded
                span.set_attribute("onepool.route.policy", str(decision.policy))
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
        """One try on one worker: its reply, or None (noted in `failures`) when it did not answer."""
        request = msgspec.structs.replace(wire, deadline_ms=timeout_s * 1e3)
        self.router.on_dispatch(worker_id, route_req, time.monotonic())
        try:
            raw = await self.bus.request(s.infer_subject(worker_id), s.encode(request), timeout_s=timeout_s)
            reply = s.decode(self._dec_reply, raw)
        except OnepoolError as exc:
            self.metrics.count_attempt(exc.code)
            failures.append(f"{worker_id}: {exc.code}")
            log.info("worker attempt failed; trying the next", worker=worker_id, error=exc.code)
            return None
        except s.DecodeError as exc:
            self.metrics.count_attempt("bad_reply")
            failures.append(f"{worker_id}: bad reply")
            log.warning("undecodable worker reply", worker=worker_id, error=exc.message)
            return None
        finally:
            self.router.on_done(worker_id)
        self.metrics.count_attempt("ok" if reply.ok is not None else reply.error.code if reply.error else "?")
        return reply

    # ---------------------------------------------------------------------------------------------------
    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        workers = len(self.view.routable_workers())
        ready = self.ready
        body = {"ready": ready, "routable_workers": workers, "view_in_sync": self.replica.in_sync}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_handler(self, _: web.Request) -> web.Response:
        self.metrics.routable.set(len(self.view.routable_workers()))
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

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


def tracing_middleware(tracer: Tracer) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """A SERVER span per HTTP request, child of the caller's traceparent if any; its trace id goes back in
    the x-trace-id header so a client can find the request in Jaeger."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # case-insensitive headers: "Traceparent" counts too; no header (the usual case): a new trace
        ctx = propagate.extract(request.headers) if "traceparent" in request.headers else None
        route = (
            request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
        )
        with tracer.start_as_current_span(
            f"{request.method} {route}", context=ctx, kind=SpanKind.SERVER
        ) as span:
            recording = span.is_recording()
            if recording:
                span.set_attribute("http.request.method", request.method)
                span.set_attribute("url.path", request.path)
                span.set_attribute("http.route", route)
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            if recording:
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            response.headers["x-trace-id"] = format(span.get_span_context().trace_id, "032x")
            return response

    return middleware


def json_errors_middleware() -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
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


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, host: str, port: int) -> AsyncIterator[web.AppRunner]:
    """Run `app` on host:port until the block exits; then stop accepting and close cleanly."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()
