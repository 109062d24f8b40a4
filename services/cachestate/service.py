"""cachestate's async shell: digests in, tracker/index/features in the core, view and features out.

Background tasks (all owned by one TaskOwner): the view delta batcher (with a heartbeat when there is
nothing to say), the expiry loop, the feature window and at most one snapshot-request task per worker that
is out of sync or not yet verified (the ack of that request is what makes a worker routable).

While cachestate cannot hear itself (its own bus connection is down, or its echo does not come back) it
judges no worker: expiry is suspended, and when it hears again every worker gets a fresh period plus a
grace (the silence was cachestate's).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import structlog
from opentelemetry import trace
from opentelemetry.trace import Tracer

from services.cachestate.core.changes import ViewChanges
from services.cachestate.core.features import FeatureWindow
from services.cachestate.core.tracker import DigestTracker
from services.cachestate.metrics import ServiceCounters, build_registry
from services.cachestate.settings import CacheStateSettings
from shared import schemas as s
from shared.bus import Bus, Message, Subscription
from shared.errors import OnepoolError
from shared.lifecycle import TaskOwner
from shared.metrics import MetricsServer, start_metrics_server
from shared.residency import DEFAULT_PART_BYTES, ResidencyIndex, pack_updates

log = structlog.get_logger("onepool.cachestate")

# cachestate judges others' silence only while it hears itself: its echo (sent every expire check) must
# have come back within this many checks (0.5 s by default: less than any worker's 3 x 500 ms).
DEAF_AFTER_CHECKS = 5


class CacheStateService:
    def __init__(
        self,
        settings: CacheStateSettings,
        bus: Bus,
        *,
        tracer: Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
        part_bytes: int = DEFAULT_PART_BYTES,
    ) -> None:
        self.settings = settings
        self.bus = bus
        # The view's source changes on every start: gateways that see a new one resync from a snapshot.
        self.source = f"{settings.id}-{uuid.uuid4().hex[:8]}"
        # Liveness, staleness and feature windows run on a monotonic clock: a wall-clock step (NTP) must
        # neither fence every worker at once nor keep a dead one alive. Messages carry wall time.
        self._clock = clock
        self.index = ResidencyIndex(settings.max_entries, track_evictions=True)
        self.tracker = DigestTracker(
            self.index,
            dead_after_periods=settings.dead_after_periods,
            max_period_s=settings.max_period_ms / 1e3,
        )
        self.features = FeatureWindow(settings.features_window_ms / 1e3, start=clock())
        self.counters = ServiceCounters()
        self.last_features: dict[str, s.WorkerFeatures] = {}  # the last report's, by worker (for metrics)
        self.registry = build_registry(self, clock)
        self._tracer = tracer or trace.get_tracer("onepool.cachestate")
        self._part_bytes = part_bytes
        self._pending = ViewChanges()
        self._view_seq = 0
        self._view_sent_at = clock()  # when the last view update went out (the heartbeat's reference)
        # Our own round trip through the server: published and heard every expire check.
        self._echo_subject = s.echo_subject(uuid.uuid4().hex)
        self._heard_self = clock()
        self._deaf_after_s = DEAF_AFTER_CHECKS * settings.expire_check_ms / 1e3
        self._suspended = False  # liveness judging suspended: the silence would be ours
        self._view_lock = asyncio.Lock()  # view seq order == publish order
        # The view snapshot now gathering requests (set from the first request until it is built): the
        # requests that arrive meanwhile share it, so N gateways resyncing together cost one broadcast.
        self._gathering: asyncio.Future[s.ViewSnapshotAck] | None = None
        self._started_at = clock()  # set again by start(): view snapshots wait out the warm-up from there
        self._feature_seq = 0
        self._resyncs: dict[str, asyncio.Task[None]] = {}
        self._synced: dict[str, asyncio.Event] = {}
        self._subs: list[Subscription] = []
        self._tasks = TaskOwner("cachestate")
        self.metrics_server: MetricsServer | None = None
        self._dec_digest = s.decoder(s.WorkerDigest)
        self._dec_view_req = s.decoder(s.ViewSnapshotRequest)
        self._dec_ack = s.decoder(s.SnapshotAck)

    # ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.metrics_server = await start_metrics_server(
            self.registry,
            host=self.settings.metrics_host,
            port=self.settings.metrics_port,
            health=lambda: {"source": self.source, "workers_live": len(self.tracker.live_workers())},
        )
        self._started_at = self._clock()
        self._heard_self = self._clock()
        self._subs.append(await self.bus.subscribe(self._echo_subject, self._on_echo, traced=False))
        self._subs.append(await self.bus.subscribe(s.DIGEST_WILDCARD, self._on_digest))
        # Handlers start as requests arrive, so that those arriving while one gathers can ride along.
        self._subs.append(
            await self.bus.subscribe(s.VIEW_SNAPSHOT_SUBJECT, self._on_view_snapshot, concurrency=64)
        )
        self._tasks.spawn(self._view_loop(), name="view-deltas")
        self._tasks.spawn(self._echo_loop(), name="echo")
        self._tasks.spawn(self._expire_loop(), name="expiry")
        self._tasks.spawn(self._features_loop(), name="features")
        log.info(
            "cachestate ready",
            source=self.source,
            max_entries=self.settings.max_entries,
            dead_after_periods=self.settings.dead_after_periods,
            metrics=self.metrics_server.url if self.metrics_server is not None else None,
        )

    async def stop(self) -> None:
        """Stop taking digests, stop the loops and snapshot requests, close the metrics server."""
        for sub in self._subs:
            await sub.stop(drain=True, timeout_s=2.0)
        self._subs.clear()
        await self._tasks.close(timeout_s=2.0)
        if self.metrics_server is not None:
            await self.metrics_server.stop()

    # ---- digests --------------------------------------------------------------------------------------
    async def _on_digest(self, msg: Message) -> None:
        try:
            digest = s.decode(self._dec_digest, msg.data)
            if msg.subject != s.digest_subject(digest.worker_id):
                raise s.DecodeError(f"worker_id {digest.worker_id!r} does not match the subject", "worker_id")
        except s.DecodeError as exc:
            self.counters.bad_messages += 1
            log.warning("bad digest dropped", subject=msg.subject, error=exc.message, field=exc.field)
            return
        wid = digest.worker_id
        outcome = self.tracker.apply(digest, self._clock())
        self._pending.merge(outcome.changes)
        if outcome.live:
            self.features.observe(digest)
        if outcome.need_snapshot:
            self._ensure_resync(wid, outcome.reason)
        else:
            event = self._synced.get(wid)
            if event is not None and not self.tracker.needs_snapshot(wid):
                event.set()
        if outcome.reason.startswith(("new", "seq gap", "seq restart")):
            log.info(
                "worker digest",
                worker_id=wid,
                incarnation=digest.incarnation,
                seq=digest.seq,
                reason=outcome.reason,
            )

    # ---- snapshot requests to workers ------------------------------------------------------------------
    def _ensure_resync(self, worker_id: str, reason: str) -> None:
        if worker_id in self._resyncs:
            return  # one request in flight per worker
        task = self._tasks.spawn(self._resync(worker_id, reason), name=f"resync:{worker_id}")
        self._resyncs[worker_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._resyncs.get(worker_id) is t:
                del self._resyncs[worker_id]

        task.add_done_callback(done)

    async def _resync(self, worker_id: str, reason: str) -> None:
        timeout_s = self.settings.snapshot_timeout_ms / 1e3
        pause = self.settings.snapshot_backoff_ms / 1e3
        event = self._synced[worker_id] = asyncio.Event()  # this task's own (an older task may unwind)
        try:
            while self.tracker.needs_snapshot(worker_id):
                event.clear()
                self.counters.snapshot_requests += 1
                log.info("asking worker for a snapshot", worker_id=worker_id, reason=reason)
                try:
                    with self._tracer.start_as_current_span("cachestate.snapshot_request") as span:
                        span.set_attribute("onepool.worker.id", worker_id)
                        span.set_attribute("onepool.reason", reason)
                        raw = await self.bus.request(
                            s.snapshot_request_subject(worker_id),
                            s.encode(s.SnapshotRequest(reason=reason)),
                            timeout_s=timeout_s,
                        )
                        ack = s.decode(self._dec_ack, raw)
                        if ack.worker_id != worker_id:
                            raise s.DecodeError(f"ack names worker {ack.worker_id!r}", "worker_id")
                except OnepoolError as exc:
                    self.counters.snapshot_request_failures += 1
                    log.info("snapshot request failed", worker_id=worker_id, error=str(exc))
                else:
                    # Someone answers on the worker's own subject: that process is the worker.
                    was_verified = self.tracker.is_verified(worker_id)
                    self._pending.merge(
                        self.tracker.verify(worker_id, ack.incarnation, ack.seq, self._clock())
                    )
                    if not was_verified and self.tracker.is_verified(worker_id):
                        log.info("worker verified", worker_id=worker_id, incarnation=ack.incarnation)
                    await self._await_snapshot(worker_id, event, timeout_s)
                if not self.tracker.needs_snapshot(worker_id):
                    break
                reason = "previous snapshot request unanswered or incomplete"
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.settings.snapshot_backoff_max_ms / 1e3)
        finally:
            if self._synced.get(worker_id) is event:
                del self._synced[worker_id]

    async def _await_snapshot(self, worker_id: str, event: asyncio.Event, timeout_s: float) -> None:
        """After an ack: wait for the snapshot digest (it follows the ack, or came just before it) for up to
        `timeout_s`, and for as long again each time more of its parts have arrived meanwhile: a large
        snapshot in many parts is slow, not lost, and asking again would only restart it."""
        parts_seen = 0
        while self.tracker.needs_snapshot(worker_id):
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
                return
            except TimeoutError:
                pass
            parts = self.tracker.snapshot_parts_received(worker_id)
            if parts is None or parts <= parts_seen:
                return  # nothing (more) arrived: the caller asks again
            parts_seen = parts
            self.counters.snapshot_waits_extended += 1

    # ---- expiry ---------------------------------------------------------------------------------------
    def _may_judge(self, now: float) -> str | None:
        """Why nobody may be judged by their silence now (None: they may): our own connection is down, or
        our echo has not come back (a connection silently cut is noticed by the client only after its pings
        time out, seconds later; the echo says at once that what we send, and so what we hear, is stuck)."""
        if not self.bus.is_connected:
            return "cachestate's own bus connection is down"
        if now - self._heard_self > self._deaf_after_s:
            return f"cachestate has not heard its own echo for {now - self._heard_self:.1f} s"
        return None

    async def _echo_loop(self) -> None:
        period = self.settings.expire_check_ms / 1e3
        while True:
            with contextlib.suppress(OnepoolError):  # a lost echo is what the echo is for
                await self.bus.publish(self._echo_subject, b"", traced=False)
            await asyncio.sleep(period)

    async def _on_echo(self, _: Message) -> None:
        self._heard_self = self._clock()

    async def _expire_loop(self) -> None:
        period = self.settings.expire_check_ms / 1e3
        while True:
            await asyncio.sleep(period)
            now = self._clock()
            why = self._may_judge(now)
            if why is not None:
                if not self._suspended:
                    self._suspended = True
                    self.counters.liveness_suspensions += 1
                    log.warning("liveness judging suspended: the silence is ours", reason=why)
                continue
            if self._suspended:
                self._suspended = False
                grace_s = self.settings.reconnect_grace_ms / 1e3
                self.tracker.refresh(now + grace_s)
                log.info("liveness judging resumed: every worker gets a fresh period", grace_s=grace_s)
            dead = self.tracker.expire(now)
            if not dead:
                continue
            for wid in dead:
                self._pending.remove_worker(wid)
                self.features.forget(wid)
                self.last_features.pop(wid, None)
                task = self._resyncs.pop(wid, None)
                if task is not None:
                    task.cancel()
                log.warning(
                    "worker declared dead: fenced and purged",
                    worker_id=wid,
                    dead_after_periods=self.settings.dead_after_periods,
                )
            await self._publish_pending()  # fencing must not wait for the next batch

    # ---- view to gateways -----------------------------------------------------------------------------
    async def _view_loop(self) -> None:
        period = self.settings.view_delta_ms / 1e3
        heartbeat = self.settings.view_heartbeat_ms / 1e3
        while True:
            await asyncio.sleep(period)
            await self._publish_pending(heartbeat=self._clock() - self._view_sent_at >= heartbeat)

    async def _publish_pending(self, *, heartbeat: bool = False) -> None:
        async with self._view_lock:
            await self._publish_pending_locked(heartbeat=heartbeat)

    async def _publish_pending_locked(self, *, heartbeat: bool = False) -> None:
        """Publish the changes gathered so far; with `heartbeat`, an empty delta too when there are none."""
        if self._pending.empty and not heartbeat:
            return
        changes, self._pending = self._pending, ViewChanges()
        updates = changes.to_updates(
            source=self.source,
            first_seq=self._view_seq,
            sent_at_ms=time.time() * 1e3,
            part_bytes=self._part_bytes,
        )
        await self._publish_view(updates)

    async def _publish_view(self, updates: list[s.ViewUpdate]) -> None:
        # Numbers are spent before publishing: an update that fails to leave shows up as a gap at the
        # gateways (which then resync) rather than vanishing.
        self._view_seq += len(updates)
        self._view_sent_at = self._clock()
        for update in updates:
            try:
                await self.bus.publish(s.VIEW_SUBJECT, s.encode(update))
                self.counters.view_updates += 1
            except OnepoolError as exc:
                log.warning("view update not published", seq=update.seq, error=str(exc))

    def _snapshot_updates(self, first_seq: int) -> list[s.ViewUpdate]:
        index = self.index
        return pack_updates(
            kind="snapshot",
            source=self.source,
            first_seq=first_seq,
            sent_at_ms=time.time() * 1e3,
            workers=self.tracker.worker_states(),
            kv_upserts=[s.KvPlacement(u, w, n) for u, w, n in index.kv_placements()],
            emb_added={w: index.worker_emb(w) for w in index.workers() if index.emb_count(w)},
            part_bytes=self._part_bytes,
        )

    async def _on_view_snapshot(self, msg: Message) -> bytes:
        try:
            requester = s.decode(self._dec_view_req, msg.data).requester or "?"
        except s.DecodeError:
            self.counters.bad_messages += 1
            raise  # the bus answers the requester with an error reply and logs it
        gathering = self._gathering
        if gathering is not None:
            # It is built after this request arrived, so it covers it; its parts reach this requester,
            # which subscribed to the view before asking.
            self.counters.view_snapshots_coalesced += 1
            return s.encode(await asyncio.shield(gathering))
        gathering = self._gathering = asyncio.get_running_loop().create_future()
        try:
            # Gather the requests arriving together; just after a start, also wait out the warm-up so that
            # the snapshot lists every worker rather than those heard from so far.
            warmup_left = self._started_at + self.settings.view_warmup_ms / 1e3 - self._clock()
            await asyncio.sleep(max(self.settings.view_snapshot_gather_ms / 1e3, warmup_left))
            self._gathering = None  # requests from now on wait for the next snapshot
            async with self._view_lock:
                await self._publish_pending_locked()  # so the snapshot follows every delta before it
                updates = self._snapshot_updates(self._view_seq)  # built before any await: one cut
                await self._publish_view(updates)
            ack = s.ViewSnapshotAck(source=self.source, seq=updates[0].seq, parts=len(updates))
            gathering.set_result(ack)
        except BaseException:
            if self._gathering is gathering:
                self._gathering = None
            gathering.cancel()  # those riding along give up too (their requesters will ask again)
            raise
        self.counters.view_snapshots += 1
        log.info("view snapshot published", requester=requester, seq=ack.seq, parts=ack.parts)
        return s.encode(ack)

    # ---- features to the controller --------------------------------------------------------------------
    async def _features_loop(self) -> None:
        while True:
            wait = self.features.window_start + self.features.window_s - self._clock()
            await asyncio.sleep(max(0.0, wait))
            report = s.FeatureReport(
                source=self.source,
                seq=self._feature_seq,
                sent_at_ms=time.time() * 1e3,
                workers=self.features.close(self._clock()),
            )
            self._feature_seq += 1
            self.last_features = {f.worker_id: f for f in report.workers}
            try:
                await self.bus.publish(s.FEATURES_SUBJECT, s.encode(report))
                self.counters.feature_reports += 1
            except OnepoolError as exc:
                log.warning("feature report not published", seq=report.seq, error=str(exc))
