"""cachestate's Prometheus metrics (docs/metrics.md), read from the live counters, the tracker's live workers
and the last feature report at scrape time (no double bookkeeping), in a registry of its own. Per-worker
series cover the live workers only: a forgotten worker's series go with it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared import schemas as s
from shared.metrics import service_registry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from services.cachestate.core.tracker import LiveWorker
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
        yield from _per_worker(sorted(live, key=lambda w: w.worker_id), svc.last_features)


def _per_worker(live: list[LiveWorker], features: dict[str, s.WorkerFeatures]) -> Iterator[Metric]:
    """What the live workers' last digests (and the last feature report) say, labelled `worker`."""
    W = P + "worker_"

    def family(
        cls: type[GaugeMetricFamily] | type[CounterMetricFamily],
        name: str,
        doc: str,
        value: Callable[[LiveWorker], float],
    ) -> Metric:
        fam = cls(W + name, doc, labels=["worker"])
        for w in live:
            fam.add_metric([w.worker_id], value(w))
        return fam

    def gauge(name: str, doc: str, value: Callable[[LiveWorker], float]) -> Metric:
        return family(GaugeMetricFamily, name, doc, value)

    def counter(name: str, doc: str, value: Callable[[LiveWorker], float]) -> Metric:
        return family(CounterMetricFamily, name, doc, value)

    yield gauge("alpha", "EMB share of the pool (chunks), from the last digest", lambda w: w.alpha)
    yield gauge("alpha_target", "the EMB share the worker is moving to", lambda w: w.alpha_target)
    yield gauge("in_flight", "requests accepted and not yet answered", lambda w: w.load.in_flight)
    yield gauge("queue_depth", "requests waiting for the model thread", lambda w: w.load.queue_depth)
    yield gauge("max_queue", "the worker's queue limit (requests in flight)", lambda w: w.load.max_queue)
    yield gauge(
        "latency_ewma_seconds",
        "EWMA of the request latency, receipt to reply",
        lambda w: w.load.ewma_latency_ms / 1e3,
    )
    yield gauge(
        "service_ewma_seconds",
        "EWMA of what one request costs the model thread",
        lambda w: w.load.ewma_service_ms / 1e3,
    )
    yield gauge("mean_batch_size", "EWMA of the batch size", lambda w: w.load.mean_batch_size)
    yield gauge("emb_entries", "EMB entries resident", lambda w: w.stats.emb_size)
    yield gauge("emb_capacity_entries", "EMB slots in the EMB chunks", lambda w: w.stats.emb_capacity)
    yield gauge("kv_users", "users with a KV entry", lambda w: w.stats.kv_users)
    yield gauge("in_sync", "1 when its residency is known (no snapshot awaited)", lambda w: float(w.in_sync))
    yield gauge("draining", "1 while it shuts down", lambda w: float(w.draining))
    yield counter("requests", "inference requests received", lambda w: w.load.requests_total)
    yield counter("errors", "inference requests answered with an error", lambda w: w.load.errors_total)
    yield counter("emb_hits", "EMB lookups found in the pool", lambda w: w.stats.emb_hits)
    yield counter("emb_misses", "EMB lookups fetched from the host table", lambda w: w.stats.emb_misses)
    yield counter("kv_hits", "KV lookups that found the user's prefix", lambda w: w.stats.kv_hits)
    yield counter("kv_misses", "KV lookups that did not", lambda w: w.stats.kv_misses)
    yield counter("emb_evictions", "EMB entries evicted", lambda w: w.stats.emb_evictions)
    yield counter("kv_evictions", "KV entries evicted to make room", lambda w: w.stats.kv_evictions)
    yield counter("chunks_moved", "chunks moved between EMB and KV", lambda w: w.stats.chunks_moved)
    yield counter("emb_miss_bytes", "bytes of EMB rows fetched on misses", lambda w: w.stats.emb_miss_bytes)
    refill = CounterMetricFamily(
        W + "refill_bytes",
        "EMB refill after reallocation: critical (synchronous, before serving) or background (prefetch)",
        labels=["worker", "mode"],
    )
    for w in live:
        refill.add_metric([w.worker_id, "critical"], w.stats.critical_refill_bytes)
        refill.add_metric([w.worker_id, "background"], w.stats.prefetch_bytes)
    yield refill
    reported = [(w.worker_id, features[w.worker_id]) for w in live if w.worker_id in features]

    def window(name: str, doc: str, value: Callable[[s.WorkerFeatures], float]) -> Metric:
        fam = GaugeMetricFamily(W + name, doc + " (last feature window)", labels=["worker"])
        for wid, f in reported:
            fam.add_metric([wid], value(f))
        return fam

    yield window("emb_hit_ratio", "EMB hits / lookups", lambda f: f.emb_hit_rate)
    yield window("kv_hit_ratio", "KV hits / lookups", lambda f: f.kv_hit_rate)
    yield window(
        "slo_violation_ratio",
        "requests slower than the worker's SLO / requests",
        lambda f: f.slo_violation_rate,
    )
    yield window(
        "latency_p99_seconds", "largest p99 latency of the window's digests", lambda f: f.p99_latency_ms / 1e3
    )


def build_registry(service: CacheStateService, clock: Callable[[], float] = time.time) -> CollectorRegistry:
    registry = service_registry()
    registry.register(_Collector(service, clock))
    return registry
