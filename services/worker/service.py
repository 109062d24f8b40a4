"""The worker's async shell: NATS in, engine calls, NATS out. Decisions live in the engine and the pool."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import torch
from opentelemetry import trace
from opentelemetry.trace import Tracer

from services.worker.core.pool import RefillMode
from services.worker.engine import Engine, EngineConfig, EngineReport, Job, ServeResult, ewma
from services.worker.errors import Draining, InvalidRequest, Overloaded, WorkerError
from services.worker.hstu import PRESETS
from services.worker.metrics import build_registry
from services.worker.settings import DEFAULT_NUM_ITEMS, WorkerSettings
from services.worker.storage import LinkSpec
from services.worker.validation import prepare
from shared import schemas as s
from shared.bus import Bus, Message, Subscription
from shared.lifecycle import TaskOwner
from shared.metrics import LATENCY_SECONDS_BUCKETS, Buckets, MetricsServer, start_metrics_server
from shared.residency import DEFAULT_PART_BYTES, digest_parts, part_numbers

log = structlog.get_logger("onepool.worker")

EWMA_WEIGHT = 0.2
OVERLOAD_HEADROOM = 32  # weight of the newest latency sample in the load figure the router sees


def engine_config_from(settings: WorkerSettings) -> EngineConfig:
    """Turn operator settings (validated by WorkerSettings itself) into the engine's plain numbers."""
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    num_items = settings.num_items
    if num_items is None and not settings.embedding_table:
        num_items = DEFAULT_NUM_ITEMS
    return EngineConfig(
        model=PRESETS[settings.model],
        num_items=num_items,
        budget_bytes=int(settings.budget_mib * 1024 * 1024),
        chunk_bytes=settings.chunk_kib * 1024,
        page_tokens=settings.page_tokens,
        alpha=settings.alpha,
        max_chunks_per_tick=settings.max_chunks_per_tick,
        tick_s=settings.tick_ms / 1e3,
        tick_defer_s=settings.tick_defer_ms / 1e3,
        refill_mode=RefillMode(settings.refill_mode),
        prefetch_bytes_per_tick=settings.prefetch_kib_per_tick * 1024,
        link=LinkSpec(bandwidth_gbps=settings.link_gbps, latency_us=settings.link_latency_us),
        device=device,
        seed=settings.seed,
        checkpoint=settings.checkpoint or None,
        embedding_table=settings.embedding_table or None,
        max_candidates=settings.max_candidates,
        max_batch=settings.max_batch,
    )


class Window:
    """What was served since the last digest: the raw material of the controller's features."""

    def __init__(self, slo_ms: float) -> None:
        self.slo_ms = slo_ms
        self.started = time.monotonic()
        self.latencies: list[float] = []
        self.kv_hit_requests = 0
        self.history_tokens = 0
        self.max_history_tokens = 0
        self.new_tokens = 0
        self.cached_tokens = 0
        self.emb_hits = 0
        self.emb_misses = 0

    def record(self, history_len: int, result: ServeResult, total_ms: float) -> None:
        self.latencies.append(total_ms)
        self.kv_hit_requests += result.cached_tokens > 0
        self.history_tokens += history_len
        self.max_history_tokens = max(self.max_history_tokens, history_len)
        self.new_tokens += history_len - result.cached_tokens
        self.cached_tokens += result.cached_tokens
        self.emb_hits += result.emb_hits
        self.emb_misses += result.emb_misses

    def close(self) -> s.WindowStats:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

        return s.WindowStats(
            window_ms=(time.monotonic() - self.started) * 1e3,
            requests=len(lat),
            kv_hit_requests=self.kv_hit_requests,
            history_tokens=self.history_tokens,
            max_history_tokens=self.max_history_tokens,
            new_tokens=self.new_tokens,
            cached_tokens=self.cached_tokens,
            emb_hits=self.emb_hits,
            emb_misses=self.emb_misses,
            latency_p50_ms=pct(0.50),
            latency_p99_ms=pct(0.99),
            slo_violations=sum(1 for x in lat if x > self.slo_ms),
            slo_ms=self.slo_ms,
        )


@dataclass
class WorkerCounters:
    requests_total: int = 0  # inference requests received
    replies: dict[str, int] = field(default_factory=dict)  # answered, by outcome: "ok" or the error code
    bad_messages: int = 0  # undecodable/invalid bus messages, counted and dropped (or answered)
    alpha_rejected: int = 0
    ewma_latency_ms: float = 0.0

    @property
    def errors_total(self) -> int:
        return sum(n for outcome, n in self.replies.items() if outcome != "ok")

    def count_reply(self, outcome: str) -> None:
        self.replies[outcome] = self.replies.get(outcome, 0) + 1


class WorkerService:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        bus: Bus,
        *,
        tracer: Tracer | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
    ):
        self.settings = settings
        self.worker_id = s.check_worker_id(settings.id)
        self.incarnation = uuid.uuid4().hex[:16]
        self.engine = engine
        self.bus = bus
        self.counters = WorkerCounters()
        # Receipt to reply of the requests answered ok: the gateway's bounds, this worker's SLO among them.
        self.request_seconds = Buckets({*LATENCY_SECONDS_BUCKETS, settings.slo_ms / 1e3})
        self.registry = build_registry(self)
        self.metrics_server: MetricsServer | None = None
        self._tracer = tracer or trace.get_tracer("onepool.worker")
        self._part_bytes = part_bytes  # a digest too large for one message goes in parts of this size
        self._seq = 0
        self._digest_lock = asyncio.Lock()
        self._in_flight = 0
        self._idle = asyncio.Event()  # set whenever nothing is in flight: what a drain waits for
        self._idle.set()
        self._applied_decision: str | None = None
        self._window = Window(settings.slo_ms)
        self._draining = False
        self._subs: list[Subscription] = []
        self._tasks = TaskOwner()
        self._dec_request = s.decoder(s.InferenceRequest)
        self._dec_alpha = s.decoder(s.AlphaDecision)
        self._dec_snapshot = s.decoder(s.SnapshotRequest)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    # ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        wid = self.worker_id
        self.metrics_server = await start_metrics_server(
            self.registry,
            host=self.settings.metrics_host,
            port=self.settings.metrics_port,
            health=lambda: {
                "worker_id": wid,
                "incarnation": self.incarnation,
                "draining": self._draining,
                "in_flight": self._in_flight,
            },
        )
        # A few more handlers than queue places: up to OVERLOAD_HEADROOM requests beyond the limit are
        # refused at once ("overloaded", retry elsewhere) rather than waiting unseen in the client buffer.
        handlers = self.settings.max_queue + OVERLOAD_HEADROOM
        self._subs.append(
            await self.bus.subscribe(s.infer_subject(wid), self._handle_infer, concurrency=handlers)
        )
        self._subs.append(await self.bus.subscribe(s.alpha_subject(wid), self._handle_alpha))
        self._subs.append(await self.bus.subscribe(s.snapshot_request_subject(wid), self._handle_snapshot))
        # A joining worker announces its whole residency (empty at start) under its new incarnation.
        await self.publish_digest("snapshot")
        split = await asyncio.wrap_future(self.engine.split_state())
        self._tasks.spawn(self._digest_loop(), name="digest-loop")
        log.info(
            "worker ready",
            worker_id=wid,
            incarnation=self.incarnation,
            subject=s.infer_subject(wid),
            device=str(self.engine.device),
            link=self.engine.link.describe(),
            model=self.engine.model_source,
            total_chunks=self.engine.geometry.total_chunks,
            alpha=split.alpha,
            max_batch=self.engine.cfg.max_batch,
            metrics=self.metrics_server.url if self.metrics_server is not None else None,
        )

    async def stop(self) -> None:
        """Drain: refuse new work, let in-flight requests finish, say goodbye in a last digest."""
        if self._draining:
            return
        self._draining = True
        if not self._subs:  # start() never subscribed: nothing to drain
            await self._tasks.close(timeout_s=2.0)
            await asyncio.to_thread(self.engine.stop)
            await self._stop_metrics()
            return
        infer_sub, *others = self._subs
        await infer_sub.stop(drain=True, timeout_s=self.settings.drain_s)
        if self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_s)
            except TimeoutError:
                log.warning("drain timed out", in_flight=self._in_flight, drain_s=self.settings.drain_s)
        await self._tasks.close(timeout_s=2.0)
        try:
            await self.publish_digest("delta")
        except Exception:
            log.warning("could not publish the final digest", exc_info=True)
        for sub in others:
            await sub.stop(drain=False)
        self._subs.clear()
        await asyncio.to_thread(self.engine.stop)
        await self._stop_metrics()

    async def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()

    # ---------------------------------------------------------------------------------------------------
    def _reply(
        self, request_id: str, *, ok: s.InferenceResult | None = None, error: WorkerError | None = None
    ) -> bytes:
        self.counters.count_reply("ok" if error is None else error.code)
        return s.encode(
            s.InferenceReply(
                request_id=request_id,
                worker_id=self.worker_id,
                ok=ok,
                error=error.to_body() if error is not None else None,
            )
        )

    async def _handle_infer(self, msg: Message) -> bytes:
        received = time.perf_counter()
        self.counters.requests_total += 1
        try:
            req = s.decode(self._dec_request, msg.data)
        except s.DecodeError as exc:
            self.counters.bad_messages += 1
            log.warning("bad inference request", subject=msg.subject, error=exc.message, field=exc.field)
            return self._reply("", error=InvalidRequest(exc.message, exc.field))
        try:
            prepared = prepare(req, self.engine.limits)
            if self._draining:
                raise Draining()
            if self._in_flight >= self.settings.max_queue:
                raise Overloaded(self._in_flight, self.settings.max_queue)
        except WorkerError as exc:
            if isinstance(exc, InvalidRequest):
                log.info(
                    "invalid inference request", request_id=req.request_id, error=exc.message, field=exc.field
                )
            return self._reply(req.request_id, error=exc)

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServeResult | WorkerError] = loop.create_future()

        def done(result: ServeResult | WorkerError) -> None:
            loop.call_soon_threadsafe(_resolve, fut, result)

        job = Job(request=prepared, deadline=received + req.deadline_ms / 1e3, done=done, enqueued=received)
        self._in_flight += 1
        self._idle.clear()
        with self._tracer.start_as_current_span("worker.infer") as span:
            span.set_attribute("onepool.worker.id", self.worker_id)
            span.set_attribute("onepool.history_len", len(req.history))
            span.set_attribute("onepool.candidates", len(req.candidates))
            try:
                self.engine.submit(job)
                result = await fut
            except asyncio.CancelledError:
                job.cancelled = True  # the model thread skips it if it has not started
                raise
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
            if isinstance(result, WorkerError):
                span.set_attribute("onepool.error.code", result.code)
                return self._reply(req.request_id, error=result)
            total_ms = (time.perf_counter() - received) * 1e3
            for key in ("cached_tokens", "computed_tokens", "emb_hits", "emb_misses"):
                span.set_attribute(f"onepool.{key}", getattr(result, key))
            span.set_attribute("onepool.queue_ms", result.queue_ms)
            span.set_attribute("onepool.compute_ms", result.compute_ms)
            span.set_attribute("onepool.batch_size", result.batch_size)
        self._window.record(len(req.history), result, total_ms)
        self.request_seconds.observe(total_ms / 1e3)
        c = self.counters
        c.ewma_latency_ms = ewma(c.ewma_latency_ms, total_ms, EWMA_WEIGHT)
        ok = s.InferenceResult(
            items=result.items,
            scores=result.scores,
            cached_tokens=result.cached_tokens,
            computed_tokens=result.computed_tokens,
            emb_hits=result.emb_hits,
            emb_misses=result.emb_misses,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
            total_ms=total_ms,
            batch_size=result.batch_size,
        )
        return self._reply(req.request_id, ok=ok)

    async def _handle_alpha(self, msg: Message) -> None:
        try:
            decision = s.decode(self._dec_alpha, msg.data)
        except s.DecodeError as exc:
            self.counters.bad_messages += 1
            log.warning("bad alpha decision dropped", error=exc.message, field=exc.field)
            return
        lo, hi = self.settings.alpha_min, self.settings.alpha_max
        target = decision.target_alpha
        if decision.worker_id != self.worker_id or not math.isfinite(target) or not lo <= target <= hi:
            self.counters.alpha_rejected += 1
            log.warning(
                "alpha decision rejected",
                decision_id=decision.decision_id,
                addressed_to=decision.worker_id,
                target_alpha=target,
                allowed=[lo, hi],
            )
            return
        await asyncio.wrap_future(self.engine.set_alpha_target(target))
        self._applied_decision = decision.decision_id
        log.info("alpha target set", decision_id=decision.decision_id, target_alpha=target)

    async def _handle_snapshot(self, msg: Message) -> bytes:
        try:
            request = s.decode(self._dec_snapshot, msg.data)
        except s.DecodeError:
            self.counters.bad_messages += 1
            raise  # the bus answers the requester with an error reply and logs it
        seq = await self.publish_digest("snapshot")
        log.info("snapshot sent on request", reason=request.reason, seq=seq)
        return s.encode(s.SnapshotAck(worker_id=self.worker_id, incarnation=self.incarnation, seq=seq))

    async def _digest_loop(self) -> None:
        period = self.settings.digest_ms / 1e3
        while True:
            await asyncio.sleep(period)
            try:
                await self.publish_digest("delta")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("digest publish failed", exc_info=True)

    @staticmethod
    def _digest_fields(report: EngineReport) -> dict[str, Any]:
        """The wire form of one engine report but its residency: counters, split and cost fit."""
        c = report.counters
        stats = s.PoolStats(
            emb_hits=c.emb_hits,
            emb_misses=c.emb_misses,
            kv_hits=c.kv_hits,
            kv_misses=c.kv_misses,
            emb_evictions=c.emb_evictions,
            kv_evictions=c.kv_evictions,
            chunks_moved=c.chunks_moved,
            emb_miss_bytes=c.emb_miss_bytes,
            prefetch_bytes=c.prefetch_bytes,
            critical_refill_bytes=c.critical_refill_bytes,
            emb_capacity=report.emb_capacity,
            emb_size=report.emb_size,
            kv_users=report.kv_users,
        )
        cost = report.cost
        return {
            "alpha": report.alpha,
            "alpha_target": report.alpha_target,
            "stats": stats,
            "cost": s.CostCoefficients(
                fixed_ms=cost.fixed_ms,
                ms_per_new_token=cost.ms_per_new_token,
                ms_per_cached_token=cost.ms_per_cached_token,
                ms_per_candidate=cost.ms_per_candidate,
                ms_per_emb_miss=cost.ms_per_emb_miss,
                samples=cost.samples,
            ),
        }

    async def publish_digest(self, kind: Literal["delta", "snapshot"]) -> int:
        """Build and publish one digest (in several parts if it is large); returns the first sequence
        number. Sequence numbers are consecutive per incarnation."""
        async with self._digest_lock:
            # Numbers are spent before anything can fail or be cancelled: once the engine has drained the
            # deltas, a digest that never leaves must show up as a gap (the receiver then asks for a
            # snapshot) rather than vanish.
            seq = self._seq
            self._seq += 1
            report = await asyncio.wrap_future(self.engine.report(kind))
            fields = self._digest_fields(report)
            parts = digest_parts(report.residency, part_bytes=self._part_bytes)
            self._seq += len(parts) - 1
            window, self._window = self._window.close(), Window(self.settings.slo_ms)
            c = self.counters
            load = s.LoadInfo(
                in_flight=self._in_flight,
                queue_depth=self.engine.queue_depth,
                ewma_latency_ms=c.ewma_latency_ms,
                ewma_service_ms=self.engine.service_ms,
                mean_batch_size=self.engine.mean_batch_size,
                requests_total=c.requests_total,
                errors_total=c.errors_total,
                max_queue=self.settings.max_queue,
            )
            for number, residency in zip(part_numbers(seq, len(parts)), parts, strict=True):
                digest = s.WorkerDigest(
                    worker_id=self.worker_id,
                    incarnation=self.incarnation,
                    seq=number.seq,
                    kind=kind,
                    part=number.part,
                    parts=number.parts,
                    sent_at_ms=time.time() * 1e3,
                    period_ms=self.settings.digest_ms,
                    load=load,
                    applied_decision_id=self._applied_decision,
                    draining=self._draining,
                    # The window's figures travel once, with the first part.
                    window=window if number.part == 0 else s.WindowStats(),
                    **residency,
                    **fields,
                )
                await self.bus.publish(s.digest_subject(self.worker_id), s.encode(digest))
            return seq


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)
