"""The controller's Prometheus metrics (docs/metrics.md), read from its live counters, decision latencies and
last targets at scrape time (no double bookkeeping), in a registry of its own. Per-worker series cover the
workers of the last feature report only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from services.controller.core.helm import HelmPolicy
from shared.metrics import service_registry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from services.controller.service import ControllerService

P = "onepool_controller_"

# Bounds of the decision latency histogram (policy + clamp): microseconds for the heuristics, tens of
# microseconds for HELM's actor.
DECISION_SECONDS_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2)


class _Collector(Collector):
    def __init__(self, service: ControllerService) -> None:
        self._svc = service

    def collect(self) -> Iterator[Metric]:
        svc = self._svc
        c = svc.counters
        policy = svc.policy.name

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, value=value)

        info = InfoMetricFamily(P + "policy", "the alpha policy and, for HELM, its actor's version and hash")
        weights = svc.policy.weights if isinstance(svc.policy, HelmPolicy) else ""
        info.add_metric([], {"policy": policy, "weights": weights})
        yield info
        yield counter("reports", "feature reports accepted", c.reports)
        yield counter("bad_messages", "undecodable or invalid feature reports dropped", c.bad_messages)
        yield counter(
            "stale_reports",
            "feature reports replayed (just behind the last one) and dropped",
            c.stale_reports,
        )
        yield counter(
            "report_seq_restarts",
            "feature reports far from the last seq either way (accepted)",
            c.seq_restarts,
        )
        yield counter(
            "bad_workers", "worker entries with an id that cannot be a subject, skipped", c.bad_workers
        )
        decisions = CounterMetricFamily(
            P + "decisions",
            "policy evaluations by outcome: sent, unchanged (within min_change), resend_suppressed, "
            "policy_error, publish_error",
            labels=["policy", "outcome"],
        )
        for outcome, n in (
            ("sent", c.decisions_sent),
            ("unchanged", c.unchanged),
            ("resend_suppressed", c.resends_suppressed),
            ("policy_error", c.policy_errors),
            ("publish_error", c.publish_errors),
        ):
            decisions.add_metric([policy, outcome], n)
        yield decisions
        yield svc.latency.buckets.family(P + "decision_seconds", "time of one decision: policy + clamp")
        targets = GaugeMetricFamily(
            P + "alpha_target",
            "alpha decided for the worker in the last report (after the clamp, sent or not)",
            labels=["worker"],
        )
        for wid, target in sorted(svc.targets.items()):
            targets.add_metric([wid], target)
        yield targets


def build_registry(service: ControllerService) -> CollectorRegistry:
    registry = service_registry()
    registry.register(_Collector(service))
    return registry
