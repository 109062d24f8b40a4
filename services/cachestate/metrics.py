"""cachestate's Prometheus metrics: read from the live counters at scrape time (no double bookkeeping),
in a registry of its own (no process globals), plus the small aiohttp server that exposes them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from services.cachestate.service import CacheStateService

P = "onepool_cachestate_"


@dataclass
class ServiceCounters:
    bad_messages: int = 0  # undecodable/invalid bus messages, counted, logged and dropped
    snapshot_requests: int = 0  # snapshot requests sent to workers
    snapshot_request_failures: int = 0  # no ack (timeout, no responders, bad ack)
    snapshot_waits_extended: int = 0  # waits for a snapshot prolonged because its parts kept arriving
    view_updates: int = 0  # ViewUpdate messages published (delta and snapshot parts)
    view_snapshots: int = 0  # view snapshots published on request
    view_snapshots_coalesced: int = 0  # snapshot requests answered by a snapshot another request caused
    feature_reports: int = 0
    liveness_suspensions: int = 0  # judging suspended: our own connection down, or our echo not heard


class _Collector(Collector):
    def __init__(self, service: CacheStateService, clock: Callable[[], float]) -> None:
        self._svc = service
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        svc = self._svc
        sizes = svc.index.sizes()
        t = svc.tracker.counters
        c = svc.counters

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, value=value)

        yield gauge("index_kv_placements", "KV placements (user, worker) in the index", sizes.kv_placements)
        yield gauge("index_emb_entries", "EMB (worker, item) entries in the index", sizes.emb_entries)
        yield gauge("index_users", "users with at least one KV placement", sizes.users)
        yield gauge("index_workers", "workers known to the index", sizes.workers)
        yield gauge("index_max_entries", "memory cap: KV placements + EMB entries", svc.index.max_entries)
        evictions = CounterMetricFamily(P + "evictions", "index entries evicted by the cap", labels=["kind"])
        evictions.add_metric(["kv"], svc.index.kv_evictions)
        evictions.add_metric(["emb"], svc.index.emb_evictions)
        yield evictions
        yield counter(
            "digests_applied", "digests whose residency was applied or collected", t.digests_applied
        )
        yield counter("digests_ignored", "duplicate/old digests ignored", t.digests_ignored)
        yield counter(
            "digests_dropped", "digests counted for load only (worker out of sync)", t.digests_dropped
        )
        yield counter("seq_gaps", "sequence gaps detected in worker digests", t.gaps)
        yield counter(
            "seq_restarts",
            "worker digest seq beyond the window either way (numbering restarted)",
            t.seq_restarts,
        )
        yield counter(
            "periods_clamped", "digests whose period_ms was outside the believed range", t.periods_clamped
        )
        yield counter(
            "workers_verified", "workers confirmed by a snapshot ack on their own subject", t.verified
        )
        yield counter(
            "incarnations_rejected",
            "claimed new incarnations that the worker's own subject denied",
            t.incarnations_rejected,
        )
        yield counter(
            "incarnations_corrected",
            "snapshot acks naming an incarnation no digest had claimed",
            t.incarnations_corrected,
        )
        yield gauge(
            "workers_unverified", "workers heard from but not yet confirmed", len(svc.tracker.unverified())
        )
        yield counter(
            "liveness_suspensions",
            "times liveness judging was suspended: cachestate's own connection down, or its echo not heard",
            c.liveness_suspensions,
        )
        yield counter("new_incarnations", "workers seen restarting (new incarnation)", t.new_incarnations)
        yield counter("snapshots_requested", "snapshot requests sent to workers", c.snapshot_requests)
        yield counter(
            "snapshot_request_failures", "snapshot requests without ack", c.snapshot_request_failures
        )
        yield counter(
            "snapshot_waits_extended",
            "waits for a worker snapshot prolonged because its parts kept arriving",
            c.snapshot_waits_extended,
        )
        yield counter("snapshots_applied", "complete worker snapshots applied", t.snapshots_applied)
        yield counter(
            "snapshots_abandoned", "worker snapshots abandoned (a part missing)", t.snapshots_abandoned
        )
        yield counter("repairs", "out-of-sync workers repaired from a snapshot", t.repairs)
        yield counter("workers_dead", "workers declared dead (silent), fenced and purged", t.workers_dead)
        yield counter("bad_messages", "undecodable or invalid messages dropped", c.bad_messages)
        yield counter("view_updates_published", "ViewUpdate messages published", c.view_updates)
        yield counter("view_snapshots_served", "view snapshots published on request", c.view_snapshots)
        yield counter(
            "view_snapshots_coalesced",
            "view snapshot requests answered by a snapshot published for another request",
            c.view_snapshots_coalesced,
        )
        yield counter("feature_reports_published", "FeatureReport messages published", c.feature_reports)
        live = svc.tracker.live_workers()
        yield gauge("workers_live", "live workers", len(live))
        yield gauge(
            "workers_out_of_sync",
            "live workers whose residency awaits a snapshot",
            sum(not w.in_sync for w in live),
        )
        stale = GaugeMetricFamily(
            P + "worker_staleness_seconds", "seconds since the worker's last digest", labels=["worker"]
        )
        for wid, seconds in sorted(svc.tracker.staleness(self._clock()).items()):
            stale.add_metric([wid], seconds)
        yield stale


def build_registry(service: CacheStateService, clock: Callable[[], float] = time.time) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service, clock))
    return registry


def metrics_app(service: CacheStateService, registry: CollectorRegistry) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "source": service.source, "workers_live": len(service.tracker.live_workers())}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app
