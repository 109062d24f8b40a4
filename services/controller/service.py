"""The controller's async shell: FeatureReports in, AlphaDecisions out. Decisions live in core.policies.

For each worker in a report: ``policy.decide`` then ``Clamp`` (timed with perf_counter_ns, inside a
"controller.decide" span carrying the features), and an AlphaDecision on that worker's alpha subject when
the target moves the worker's committed alpha (``alpha_target``) by at least ``min_change``. A decision the
worker has not applied yet is repeated only after ``resend_s`` (lost message, restarted worker).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer

from services.controller.core.helm import HelmPolicy
from services.controller.core.policies import AlphaPolicy, Clamp, parse_policy
from services.controller.metrics import DECISION_SECONDS_BUCKETS, build_registry
from services.controller.settings import ControllerSettings
from shared import schemas as s
from shared.bus import Bus, Message, Subscription
from shared.lifecycle import TaskOwner
from shared.metrics import Buckets, MetricsServer, start_metrics_server
from shared.sequence import SeqOrder, classify, gap_start

log = structlog.get_logger("onepool.controller")

_FEATURE_FIELDS = s.WorkerFeatures.__struct_fields__
_COST_FIELDS = s.CostCoefficients.__struct_fields__


def feature_attributes(features: s.WorkerFeatures) -> dict[str, str | int | float]:
    """A decision span's inputs: onepool.features.<field>, the cost model as onepool.features.cost.<field>."""
    out: dict[str, str | int | float] = {}
    for name in _FEATURE_FIELDS:
        value = getattr(features, name)
        if isinstance(value, s.CostCoefficients):
            for cost_name in _COST_FIELDS:
                out[f"onepool.features.{name}.{cost_name}"] = getattr(value, cost_name)
        else:
            out[f"onepool.features.{name}"] = value
    return out


@dataclass
class ControllerCounters:
    reports: int = 0  # FeatureReports accepted
    bad_messages: int = 0  # undecodable/invalid reports, counted, logged and dropped
    stale_reports: int = 0  # a report just behind the last one from the same source (a replay), dropped
    seq_restarts: int = 0  # a report far from the last seq either way (shared.sequence): accepted
    bad_workers: int = 0  # worker entries with an id that cannot be a subject token, skipped
    decisions: int = 0  # policy evaluations
    decisions_sent: int = 0
    unchanged: int = 0  # a target within min_change of the worker's: nothing to send
    resends_suppressed: int = 0  # an unchanged decision not repeated within resend_s
    policy_errors: int = 0
    publish_errors: int = 0


@dataclass(frozen=True)
class SentDecision:
    decision: s.AlphaDecision
    at: float  # time.monotonic() when sent


class DecisionLatency:
    """The most recent ``maxlen`` decision latencies (policy + clamp), in ns, for percentiles in us; and
    every one in histogram buckets (seconds), for the metrics."""

    def __init__(self, maxlen: int) -> None:
        self._ns: deque[int] = deque(maxlen=maxlen)
        self.total = 0
        self.buckets = Buckets(DECISION_SECONDS_BUCKETS)

    def add(self, ns: int) -> None:
        self._ns.append(ns)
        self.total += 1
        self.buckets.observe(ns / 1e9)

    def __len__(self) -> int:
        return len(self._ns)

    def percentile_us(self, q: float) -> float | None:
        """Nearest-rank percentile (0 < q <= 100) of the kept samples, None when there are none."""
        if not self._ns:
            return None
        ordered = sorted(self._ns)
        rank = max(1, math.ceil(q / 100.0 * len(ordered)))
        return ordered[rank - 1] / 1e3


class ControllerService:
    def __init__(
        self,
        settings: ControllerSettings,
        bus: Bus,
        *,
        policy: AlphaPolicy | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.policy = policy if policy is not None else parse_policy(settings.policy)
        self.clamp = Clamp(settings.alpha_min, settings.alpha_max, settings.max_step)
        self.incarnation = uuid.uuid4().hex[:8]
        self.counters = ControllerCounters()
        self.latency = DecisionLatency(settings.latency_samples)
        self.sent: dict[str, SentDecision] = {}  # the last decision sent to each worker
        # The target decided (after the clamp, sent or not) for each worker of the last report.
        self.targets: dict[str, float] = {}
        self.registry = build_registry(self)
        self.metrics_server: MetricsServer | None = None
        self._tracer = tracer or trace.get_tracer("onepool.controller")
        self._decoder = s.decoder(s.FeatureReport)
        self._last_report: tuple[str, int] | None = None  # (source, seq)
        self._gap_from: int | None = None  # where the last gap in that source's numbering began
        self._n = 0
        self._sub: Subscription | None = None
        self._tasks = TaskOwner("controller")
        self._stopped = False

    @property
    def latency_p50_us(self) -> float | None:
        return self.latency.percentile_us(50)

    @property
    def latency_p99_us(self) -> float | None:
        return self.latency.percentile_us(99)

    # ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.metrics_server = await start_metrics_server(
            self.registry,
            host=self.settings.metrics_host,
            port=self.settings.metrics_port,
            health=lambda: {"controller_id": self.settings.id, "policy": self.policy.name},
        )
        # One handler at a time: reports are decided in arrival order.
        self._sub = await self.bus.subscribe(s.FEATURES_SUBJECT, self._handle_report, concurrency=1)
        if self.settings.stats_s > 0:
            self._tasks.spawn(self._stats_loop(), name="stats-loop")
        log.info(
            "controller ready",
            controller_id=self.settings.id,
            incarnation=self.incarnation,
            policy=self.policy.name,
            # HELM's frozen actor: its version and hash, so a run names the weights it decided with
            weights=self.policy.weights if isinstance(self.policy, HelmPolicy) else None,
            clamp=[self.clamp.lo, self.clamp.hi],
            max_step=self.clamp.max_step,
            min_change=self.settings.min_change,
            subject=s.FEATURES_SUBJECT,
            metrics=self.metrics_server.url if self.metrics_server is not None else None,
        )

    async def stop(self) -> None:
        """Finish the report being decided, stop listening, end owned tasks. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._sub is not None:
            await self._sub.stop(drain=True)
        await self._tasks.close(timeout_s=2.0)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        self._log_stats("controller stopped")

    # ---------------------------------------------------------------------------------------------------
    async def _handle_report(self, msg: Message) -> None:
        try:
            report = s.decode(self._decoder, msg.data)
        except s.DecodeError as exc:
            self.counters.bad_messages += 1
            log.warning("bad feature report dropped", subject=msg.subject, error=exc.message, field=exc.field)
            return
        last = self._last_report
        if last is not None and last[0] == report.source:
            order = classify(report.seq, last[1] + 1, self._gap_from)
            self._gap_from = gap_start(order, last[1] + 1, self._gap_from)
            if order is SeqOrder.DUPLICATE:
                self.counters.stale_reports += 1
                log.info(
                    "stale feature report dropped", source=report.source, seq=report.seq, last_seq=last[1]
                )
                return
            if order is SeqOrder.RESTART:  # far from the last seq either way: a new numbering, not a replay
                self.counters.seq_restarts += 1
                log.info("feature report numbering restarted", source=report.source, seq=report.seq)
        if last is None or last[0] != report.source:
            self._gap_from = None  # a new source: a new numbering
        self._last_report = (report.source, report.seq)
        self.counters.reports += 1
        self.targets = {}
        for features in report.workers:
            await self.decide(features)

    async def decide(self, features: s.WorkerFeatures) -> s.AlphaDecision | None:
        """Decide for one worker and send the decision if it is worth sending; returns what was sent."""
        try:
            s.check_worker_id(features.worker_id)
        except ValueError as exc:
            self.counters.bad_workers += 1
            log.warning("worker entry with a bad id skipped", error=str(exc))
            return None
        with self._tracer.start_as_current_span("controller.decide") as span:
            span.set_attributes(feature_attributes(features))
            current = features.alpha_target
            span.set_attribute("onepool.policy", self.policy.name)
            span.set_attribute("onepool.alpha.current", current)
            self.counters.decisions += 1
            try:
                t0 = time.perf_counter_ns()
                target = self.clamp(self.policy.decide(features, current), current)
                elapsed = time.perf_counter_ns() - t0
            except Exception as exc:
                self.counters.policy_errors += 1
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                log.exception("policy failed; worker left as it is", worker_id=features.worker_id)
                return None
            self.latency.add(elapsed)
            self.targets[features.worker_id] = target
            span.set_attribute("onepool.alpha.target", target)
            span.set_attribute("onepool.decide_ns", elapsed)
            if not self._worth_sending(features.worker_id, current, target):
                span.set_attribute("onepool.decision.sent", False)
                return None
            self._n += 1
            decision = s.AlphaDecision(
                decision_id=f"{self.settings.id}-{self.incarnation}-{self._n}",
                worker_id=features.worker_id,
                target_alpha=target,
                issued_at_ms=time.time() * 1e3,
            )
            span.set_attribute("onepool.decision.id", decision.decision_id)
            try:
                await self.bus.publish(s.alpha_subject(features.worker_id), s.encode(decision))
            except Exception as exc:
                self.counters.publish_errors += 1
                span.set_attribute("onepool.decision.sent", False)
                log.warning(
                    "alpha decision not sent",
                    worker_id=features.worker_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
                return None
            span.set_attribute("onepool.decision.sent", True)
        self.sent[features.worker_id] = SentDecision(decision, time.monotonic())
        self.counters.decisions_sent += 1
        log.info(
            "alpha decision sent",
            worker_id=features.worker_id,
            decision_id=decision.decision_id,
            alpha=features.alpha,
            alpha_target=current,
            target_alpha=target,
            policy=self.policy.name,
        )
        return decision

    def _worth_sending(self, worker_id: str, current: float, target: float) -> bool:
        min_change = self.settings.min_change
        if abs(target - current) < min_change or (min_change == 0 and target == current):
            self.counters.unchanged += 1
            return False
        last = self.sent.get(worker_id)
        if (
            last is not None
            and abs(last.decision.target_alpha - target) < max(min_change, 1e-12)
            and time.monotonic() - last.at < self.settings.resend_s
        ):
            # Sent already and not applied yet (or the report predates it): do not repeat it every window.
            self.counters.resends_suppressed += 1
            return False
        return True

    # ---------------------------------------------------------------------------------------------------
    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_s)
            self._log_stats("controller stats")

    def _log_stats(self, event: str) -> None:
        c = self.counters
        log.info(
            event,
            reports=c.reports,
            decisions=c.decisions,
            decisions_sent=c.decisions_sent,
            bad_messages=c.bad_messages,
            stale_reports=c.stale_reports,
            seq_restarts=c.seq_restarts,
            policy_errors=c.policy_errors,
            publish_errors=c.publish_errors,
            decide_p50_us=self.latency_p50_us,
            decide_p99_us=self.latency_p99_us,
            workers=len(self.sent),
        )
