"""The worker's Prometheus metrics (docs/metrics.md): the service's, the engine's and the pool's own counters
read at scrape time (no double bookkeeping), in a registry of its own.

The pool lives on the model thread and is read here from the event loop without a lock: only numbers, each
read whole (a scrape may mix values from before and after one batch, never a torn one).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from shared.metrics import service_registry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from services.worker.service import WorkerService

P = "onepool_worker_"

# Bucket bounds of the worker's batch histograms; its request latency uses shared.metrics'
# LATENCY_SECONDS_BUCKETS (the gateway's too) with the worker's SLO added.
BATCH_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Collector(Collector):
    def __init__(self, service: WorkerService) -> None:
        self._svc = service

    def collect(self) -> Iterator[Metric]:
        svc = self._svc
        engine = svc.engine
        pool = engine.pool
        c = svc.counters
        pc = pool.counters

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, value=value)

        info = InfoMetricFamily("onepool_worker", "this worker process: id, incarnation, device, model")
        info.add_metric(
            [],
            {
                "worker": svc.worker_id,
                "incarnation": svc.incarnation,
                "device": str(engine.device),
                "model": engine.model_source,
            },
        )
        yield info
        yield counter("requests", "inference requests received", c.requests_total)
        replies = CounterMetricFamily(
            P + "replies",
            "inference requests answered, by outcome: ok or the error code",
            labels=["outcome"],
        )
        for outcome, n in sorted(c.replies.items()):
            replies.add_metric([outcome], n)
        yield replies
        yield counter("bad_messages", "undecodable or invalid bus messages", c.bad_messages)
        yield counter(
            "alpha_decisions_rejected",
            "alpha decisions refused (wrong worker, out of range)",
            c.alpha_rejected,
        )
        yield gauge("in_flight", "requests accepted and not yet answered", svc.in_flight)
        yield gauge("queue_depth", "requests waiting for the model thread", engine.queue_depth)
        yield gauge(
            "max_queue",
            "requests in flight beyond which new ones are refused (overloaded)",
            svc.settings.max_queue,
        )
        yield gauge("draining", "1 while the worker shuts down", float(svc.draining))
        yield svc.request_seconds.family(
            P + "request_seconds", "request latency in the worker, receipt to reply"
        )
        yield engine.batch_seconds.family(P + "batch_seconds", "model-thread time of one batch")
        yield engine.batch_sizes.family(P + "batch_size", "requests served together in one batch")
        yield gauge("mean_batch_size", "EWMA of the batch size (what digests report)", engine.mean_batch_size)
        yield gauge(
            "service_ewma_seconds", "EWMA of what one request costs the model thread", engine.service_ms / 1e3
        )
        yield counter("model_seconds", "model-thread time in HSTU forward passes", engine.model_seconds)
        yield counter("ticks", "reallocation ticks run", engine.ticks)
        yield counter(
            "tick_seconds", "model-thread time in ticks (reallocation, refill, prefetch)", engine.tick_seconds
        )
        yield gauge("alpha", "EMB share of the pool (chunks)", pool.alpha)
        yield gauge("alpha_target", "the EMB share the pool is moving to", pool.target_alpha)
        chunk = engine.geometry.chunk_bytes
        owned = GaugeMetricFamily(P + "pool_bytes", "pool bytes by owner: emb, kv or free", labels=["owner"])
        owned.add_metric(["emb"], pool.emb_chunks * chunk)
        owned.add_metric(["kv"], pool.kv_chunks * chunk)
        owned.add_metric(["free"], pool.free_chunks * chunk)
        yield owned
        yield gauge("pool_chunk_bytes", "size of one pool chunk", chunk)
        yield gauge("emb_entries", "EMB entries resident", pool.emb.size)
        yield gauge("emb_capacity_entries", "EMB slots in the EMB chunks", pool.emb.capacity)
        yield gauge("kv_users", "users with a KV entry", pool.kv.size)
        yield gauge("kv_pages", "KV pages in use", pool.kv.used_pages)
        yield gauge("kv_capacity_pages", "KV pages in the KV chunks", pool.kv.capacity_pages)
        yield counter("emb_hits", "EMB lookups found in the pool", pc.emb_hits)
        yield counter("emb_misses", "EMB lookups fetched from the host table", pc.emb_misses)
        yield counter("emb_admissions", "missed EMB rows admitted to the pool", pc.emb_admits)
        yield counter("emb_rejections", "missed EMB rows refused by the admission filter", pc.emb_rejects)
        yield counter("emb_evictions", "EMB entries evicted", pc.emb_evictions)
        yield counter("kv_hits", "KV lookups that found the user's prefix", pc.kv_hits)
        yield counter("kv_misses", "KV lookups that did not", pc.kv_misses)
        yield counter("kv_evictions", "KV entries evicted to make room", pc.kv_evictions)
        yield counter("kv_rejections", "KV commits that could not fit at all", pc.kv_rejects)
        yield counter("chunks_moved", "chunks moved between EMB and KV", pc.chunks_moved)
        yield counter("relocations", "entries relocated to free a chunk", pc.relocations)
        yield counter("emb_miss_bytes", "bytes of EMB rows fetched on misses", pc.emb_miss_bytes)
        refill = CounterMetricFamily(
            P + "refill_bytes",
            "EMB refill after reallocation: critical (synchronous, before serving) or background (prefetch)",
            labels=["mode"],
        )
        refill.add_metric(["critical"], pc.critical_refill_bytes)
        refill.add_metric(["background"], pc.prefetch_bytes)
        yield refill


def build_registry(service: WorkerService) -> CollectorRegistry:
    registry = service_registry()
    registry.register(_Collector(service))
    return registry
