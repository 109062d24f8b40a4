"""The controller service against a real nats-server; the test plays cachestate (and, once, a real worker)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from services.controller.main import run_controller
from services.controller.service import ControllerService
from services.controller.settings import ControllerSettings
from services.worker.engine import Engine
from services.worker.service import WorkerService, engine_config_from
from shared import schemas as s
from shared.bus import Bus, Message
from shared.errors import NoResponders
from tests.controller.test_policies import pressure
from tests.helpers import eventually, free_port, samples
from tests.worker.harness import SETTINGS as WORKER_SETTINGS

ROOT = Path(__file__).resolve().parents[2]

SETTINGS = ControllerSettings(
    id="ctl-test", policy="static:0.7", max_step=0.5, min_change=0.01, resend_s=5.0, stats_s=0.0
)
_seq = itertools.count(1)
# Not a worker: what settle() sends on the controller's own connection, after every decision it sent.
SETTLED_SUBJECT = s.alpha_subject("settled")


def features(
    worker_id: str = "w1", alpha: float = 0.5, alpha_target: float | None = None
) -> s.WorkerFeatures:
    target = alpha if alpha_target is None else alpha_target
    return replace_features(pressure(0.5, 0.5), worker_id=worker_id, alpha=alpha, alpha_target=target)


def replace_features(f: s.WorkerFeatures, **changes: Any) -> s.WorkerFeatures:
    return msgspec.structs.replace(f, **changes)


def report(*workers: s.WorkerFeatures, source: str = "cachestate-a", seq: int | None = None) -> bytes:
    return s.encode(
        s.FeatureReport(
            source=source, seq=next(_seq) if seq is None else seq, sent_at_ms=0.0, workers=list(workers)
        )
    )


@dataclass
class Running:
    service: ControllerService
    bus: Bus
    client: Bus
    decisions: list[s.AlphaDecision]
    settled: list[int] = field(default_factory=list)  # settle() markers seen, in arrival order
    published: int = 0  # messages this test sent on the features subject

    async def send(self, *workers: s.WorkerFeatures, **kw: Any) -> None:
        await self.publish_raw(report(*workers, **kw))

    async def publish_raw(self, payload: bytes) -> None:
        await self.client.publish(s.FEATURES_SUBJECT, payload)
        self.published += 1

    async def settle(self) -> None:
        """Wait until every message sent on the features subject so far has been handled and every
        decision the controller published meanwhile has reached ``decisions``."""
        sub = self.service._sub
        assert sub is not None
        await eventually(lambda: sub.handled == self.published)
        # A marker on the controller's own connection, after everything it has published: the server keeps
        # one connection's messages in order, and our one decisions subscription handles them in order.
        marker = len(self.settled)
        await self.bus.publish(SETTLED_SUBJECT, b"%d" % marker)
        await eventually(lambda: marker in self.settled)


@contextlib.asynccontextmanager
async def running_controller(
    url: str, settings: ControllerSettings = SETTINGS, **kw: Any
) -> AsyncIterator[Running]:
    decisions: list[s.AlphaDecision] = []
    dec = s.decoder(s.AlphaDecision)
    bus = await Bus.connect(url, name="controller-under-test", tracer=kw.get("tracer"))
    # The reports' sender traces with the same tracer: a decision span is recorded when the report's trace
    # is (parent-based sampling), whatever global provider an earlier test left behind.
    client = await Bus.connect(url, name="test-cachestate", tracer=kw.get("tracer"))

    settled: list[int] = []

    async def on_decision(msg: Message) -> None:
        if msg.subject == SETTLED_SUBJECT:
            settled.append(int(msg.data))
        else:
            decisions.append(s.decode(dec, msg.data))

    await client.subscribe("onepool.worker.*.alpha", on_decision)
    service = ControllerService(settings, bus, **kw)
    await service.start()
    try:
        yield Running(service, bus, client, decisions, settled)
    finally:
        await service.stop()
        await bus.close()
        await client.close()


@pytest.fixture
async def controller(nats_server: Any) -> AsyncIterator[Running]:
    async with running_controller(nats_server.url) as c:
        yield c


async def test_report_yields_decisions_on_each_workers_subject(controller: Running) -> None:
    await controller.send(
        features("w1", 0.5),  # -> 0.7
        features("w2", 0.7),  # already there: nothing
        features("w3", 0.1),  # -> 0.6 (max_step 0.5)
        features("w4", 0.5, alpha_target=0.695),  # within min_change: nothing
    )
    await eventually(lambda: len(controller.decisions) == 2)
    await controller.settle()
    got = {d.worker_id: d for d in controller.decisions}
    assert set(got) == {"w1", "w3"}
    assert got["w1"].target_alpha == pytest.approx(0.7)
    assert got["w3"].target_alpha == pytest.approx(0.6)
    assert got["w1"].decision_id != got["w3"].decision_id
    assert all(d.decision_id.startswith("ctl-test-") and d.issued_at_ms > 0 for d in got.values())
    c = controller.service.counters
    assert (c.reports, c.decisions, c.decisions_sent) == (1, 4, 2)
    assert controller.service.sent["w1"].decision == got["w1"]


async def test_decisions_arrive_on_the_workers_own_subject(controller: Running) -> None:
    received: list[str] = []

    async def on_w7(msg: Message) -> None:
        received.append(msg.subject)

    await controller.client.subscribe(s.alpha_subject("w7"), on_w7)
    await controller.send(features("w7", 0.2))
    await eventually(lambda: received == [s.alpha_subject("w7")])


async def test_static_sends_nothing_once_the_worker_is_there(controller: Running) -> None:
    await controller.send(features("w1", 0.5))
    await eventually(lambda: len(controller.decisions) == 1)
    # The worker applied it: its reports now say alpha_target 0.7, twice.
    await controller.send(features("w1", 0.6, alpha_target=0.7))
    await controller.send(features("w1", 0.7, alpha_target=0.7))
    await controller.settle()
    assert len(controller.decisions) == 1
    assert controller.service.counters.resends_suppressed == 0


async def test_an_unapplied_decision_is_not_repeated_every_window(nats_server: Any) -> None:
    async with running_controller(nats_server.url, replace(SETTINGS, resend_s=0.3)) as c:
        await c.send(features("w1", 0.5))
        await c.send(features("w1", 0.5))  # the worker has not applied it yet
        await c.settle()
        assert len(c.decisions) == 1 and c.service.counters.resends_suppressed == 1
        # Lost, or the worker restarted: once resend_s has passed since it was sent, it is sent again.
        sent_at = c.service.sent["w1"].at
        await eventually(lambda: time.monotonic() - sent_at >= 0.3)
        await c.send(features("w1", 0.5))
        await eventually(lambda: len(c.decisions) == 2)
        assert c.decisions[1].target_alpha == pytest.approx(0.7)
        assert c.decisions[1].decision_id != c.decisions[0].decision_id


async def test_garbage_is_counted_and_dropped(controller: Running) -> None:
    await controller.publish_raw(b"\xc1 not msgpack")
    await controller.publish_raw(msgspec.msgpack.encode({"source": "x", "seq": -1}))
    bad_worker = msgspec.msgpack.encode(
        {"source": "x", "seq": 1, "sent_at_ms": 0.0, "workers": [{"worker_id": "w1", "alpha": 2.0}]}
    )
    await controller.publish_raw(bad_worker)
    await controller.publish_raw(s.encode(s.ViewSnapshotRequest()))
    await eventually(lambda: controller.service.counters.bad_messages == 4)
    # A worker id that cannot be a subject token is skipped; the rest of the report is decided.
    await controller.send(features("bad.id", 0.5), features("w1", 0.5))
    await eventually(lambda: len(controller.decisions) == 1)
    assert controller.decisions[0].worker_id == "w1"
    c = controller.service.counters
    assert (c.bad_messages, c.bad_workers, c.reports) == (4, 1, 1)
    assert controller.service._sub is not None and controller.service._sub.errors == 0


async def test_stale_reports_are_dropped(controller: Running) -> None:
    await controller.send(features("w1", 0.5, alpha_target=0.7), source="cs", seq=10)
    await controller.send(features("w2", 0.5), source="cs", seq=10)  # replayed number: dropped
    await controller.send(features("w3", 0.5), source="cs", seq=9)  # older: dropped
    await controller.send(features("w4", 0.5), source="cs-restarted", seq=0)  # a new cachestate: taken
    await eventually(lambda: len(controller.decisions) == 1)
    await controller.settle()
    assert [d.worker_id for d in controller.decisions] == ["w4"]
    assert controller.service.counters.stale_reports == 2


async def test_hit_balance_moves_toward_the_costlier_misses(nats_server: Any) -> None:
    settings = replace(SETTINGS, policy="hit-balance", max_step=0.1)
    async with running_controller(nats_server.url, settings) as c:
        await c.send(
            replace_features(pressure(1.0, 0.0), worker_id="emb", alpha=0.5, alpha_target=0.5),
            replace_features(pressure(0.0, 1.0), worker_id="kv", alpha=0.5, alpha_target=0.5),
            replace_features(pressure(0.5, 0.5), worker_id="even", alpha=0.5, alpha_target=0.5),
        )
        await eventually(lambda: len(c.decisions) == 2)
        await c.settle()
        got = {d.worker_id: d.target_alpha for d in c.decisions}
        assert got == {"emb": pytest.approx(0.55), "kv": pytest.approx(0.45)}


async def test_decision_latency_is_recorded(controller: Running) -> None:
    assert controller.service.latency.percentile_us(50) is None
    for i in range(20):
        await controller.send(features(f"w{i}", 0.7))
    await eventually(lambda: controller.service.counters.decisions == 20)
    p50, p99 = controller.service.latency_p50_us, controller.service.latency_p99_us
    assert p50 is not None and p99 is not None and 0 < p50 <= p99 < 10_000
    assert len(controller.service.latency) == 20


async def test_each_decision_is_a_span_with_its_features(nats_server: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    async with running_controller(nats_server.url, tracer=tracer) as c:
        cost = s.CostCoefficients(fixed_ms=1.5, ms_per_new_token=0.02, ms_per_emb_miss=0.004, samples=40)
        f = replace_features(
            features("w1", 0.45, alpha_target=0.5), emb_hit_rate=0.61, max_history=321, cost=cost
        )
        await c.send(f, features("w2", 0.7))
        await eventually(lambda: len(c.decisions) == 1)
        await c.settle()
    spans = [sp for sp in exporter.get_finished_spans() if sp.name == "controller.decide"]
    by_worker = {sp.attributes["onepool.features.worker_id"]: sp for sp in spans if sp.attributes}
    assert set(by_worker) == {"w1", "w2"}
    a = by_worker["w1"].attributes
    assert a is not None
    for name in s.WorkerFeatures.__struct_fields__:
        if name != "cost":
            assert a[f"onepool.features.{name}"] == getattr(f, name), name
    for name in s.CostCoefficients.__struct_fields__:
        assert a[f"onepool.features.cost.{name}"] == getattr(cost, name), name
    assert a["onepool.features.cost.samples"] == 40
    assert a["onepool.alpha.current"] == 0.5
    assert a["onepool.alpha.target"] == pytest.approx(0.7)
    assert a["onepool.policy"] == "static:0.7"
    assert a["onepool.decision.sent"] is True and a["onepool.decision.id"] == c.decisions[0].decision_id
    b = by_worker["w2"].attributes
    assert b is not None and b["onepool.decision.sent"] is False and b["onepool.alpha.target"] == 0.7
    # The decision's publish is a child of its span, and the span a child of the report's "process" span.
    decide = by_worker["w1"]
    publish = next(
        sp for sp in exporter.get_finished_spans() if sp.name == "publish onepool.worker.{worker}.alpha"
    )
    assert publish.parent is not None and publish.parent.span_id == decide.context.span_id
    process = next(sp for sp in exporter.get_finished_spans() if sp.name == "process onepool.features")
    assert decide.parent is not None and decide.parent.span_id == process.context.span_id


async def test_a_failing_policy_leaves_the_worker_alone(nats_server: Any) -> None:
    class Broken:
        name = "broken"

        def decide(self, features: s.WorkerFeatures, current: float) -> float:
            raise ZeroDivisionError("oops")

    async with running_controller(nats_server.url, policy=Broken()) as c:
        await c.send(features("w1", 0.5))
        await eventually(lambda: c.service.counters.policy_errors == 1)
        await c.settle()
        assert c.decisions == []


async def test_stop_is_clean_and_idempotent(nats_server: Any) -> None:
    async with running_controller(nats_server.url, replace(SETTINGS, stats_s=0.01)) as c:
        await c.send(features("w1", 0.5))
        await eventually(lambda: len(c.decisions) == 1)
        assert len(c.service._tasks) == 1  # the stats loop
        await c.service.stop()
        assert len(c.service._tasks) == 0 and c.service._sub is not None and not c.service._sub.is_active
        await c.service.stop()
        # Nobody listens any more: the server itself says so (the stopped controller unsubscribed).
        with pytest.raises(NoResponders):
            await c.client.request(s.FEATURES_SUBJECT, report(features("w2", 0.5)), timeout_s=5)
        assert len(c.decisions) == 1 and c.service.counters.reports == 1


async def test_run_controller_serves_until_stopped(nats_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A private provider and no logging setup: the real setup_telemetry would install a process-global
    # tracer provider (once per process), which other tests rely on being absent.
    from opentelemetry.sdk.trace import TracerProvider

    from shared.telemetry import Telemetry

    def private_telemetry(name: str, **_: Any) -> Telemetry:
        return Telemetry(name, TracerProvider(), owns_provider=True, traces_endpoint=None)

    monkeypatch.setattr("shared.runner.setup_telemetry", private_telemetry)
    client = await Bus.connect(nats_server.url, name="test-cachestate")
    got: list[s.AlphaDecision] = []

    async def on_decision(msg: Message) -> None:
        got.append(s.decode(s.decoder(s.AlphaDecision), msg.data))

    await client.subscribe(s.alpha_subject("w1"), on_decision)
    stop = asyncio.Event()
    task = asyncio.create_task(run_controller(replace(SETTINGS, nats_url=nats_server.url), stop))
    try:
        for _ in range(100):  # until the controller has subscribed
            await client.publish(s.FEATURES_SUBJECT, report(features("w1", 0.5)))
            await asyncio.sleep(0.05)
            if got:
                break
        assert got and got[0].target_alpha == pytest.approx(0.7)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await client.close()


_CLI = """
import argparse, sys
from services.controller.cli import add_controller_command
parser = argparse.ArgumentParser(prog="onepool")
add_controller_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


async def test_controller_command_runs_until_sigterm(nats_server: Any) -> None:
    env = {**os.environ, "ONEPOOL_CONTROLLER_POLICY": "static:0.3", "ONEPOOL_CONTROLLER_ID": "ctl-cli"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLI,
        "controller",
        "--nats-url",
        nats_server.url,
        "--max-step",
        "0.5",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = await Bus.connect(nats_server.url, name="test-cachestate")
    got: list[s.AlphaDecision] = []

    async def on_decision(msg: Message) -> None:
        got.append(s.decode(s.decoder(s.AlphaDecision), msg.data))

    await client.subscribe(s.alpha_subject("w1"), on_decision)
    try:
        for _ in range(300):  # the child imports and connects first
            await client.publish(s.FEATURES_SUBJECT, report(features("w1", 0.5)))
            await asyncio.sleep(0.05)
            if got or proc.returncode is not None:
                break
        assert got, "no decision from the controller process"
        assert got[0].target_alpha == pytest.approx(0.3) and got[0].decision_id.startswith("ctl-cli-")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        assert b"controller stopped" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()


# ---- with a real worker ----------------------------------------------------------------------------------
WORKER = replace(WORKER_SETTINGS, id="wctl", max_chunks_per_tick=2, tick_ms=10.0)


async def test_controller_moves_a_real_workers_alpha(nats_server: Any) -> None:
    """Worker digests -> (this test as cachestate) FeatureReports -> controller -> AlphaDecisions -> worker.
    static:0.8 with max_step 0.1 from 0.5: three decisions, each applied by the worker before the next."""
    settings = replace(SETTINGS, policy="static:0.8", max_step=0.1)
    engine = Engine(engine_config_from(replace(WORKER, device="cpu")))
    engine.start()
    worker_bus = await Bus.connect(nats_server.url, name="worker-under-test")
    worker = WorkerService(WORKER, engine, worker_bus)
    digests: list[s.WorkerDigest] = []
    dec = s.decoder(s.WorkerDigest)
    seq = itertools.count()
    async with running_controller(nats_server.url, settings) as c:

        async def as_cachestate(msg: Message) -> None:
            d = s.decode(dec, msg.data)
            digests.append(d)
            f = replace_features(
                features(d.worker_id), window_ms=d.period_ms, alpha=d.alpha, alpha_target=d.alpha_target
            )
            await c.client.publish(s.FEATURES_SUBJECT, report(f, source="test-cs", seq=next(seq)))

        await c.client.subscribe(s.digest_subject(WORKER.id), as_cachestate)
        await worker.start()
        try:
            total = engine.geometry.total_chunks
            goal = round(0.8 * total) / total

            def arrived() -> bool:
                last = c.service.sent.get("wctl")
                return any(
                    last is not None
                    and d.applied_decision_id == last.decision.decision_id
                    and d.alpha_target == pytest.approx(0.8)
                    and d.alpha == pytest.approx(goal)
                    for d in digests
                )

            await eventually(arrived, timeout_s=15)
        finally:
            await worker.stop()
            await worker_bus.close()
            engine.stop()
    targets = [d.target_alpha for d in c.decisions if d.worker_id == "wctl"]
    assert targets == pytest.approx([0.6, 0.7, 0.8])
    applied = {d.applied_decision_id for d in digests} - {None}
    assert applied == {d.decision_id for d in c.decisions}
    # The worker's alpha moved through the steps in between, never beyond the target.
    alphas = [d.alpha for d in digests]
    assert alphas[0] == pytest.approx(0.5) and max(alphas) == pytest.approx(goal)
    assert alphas == sorted(alphas)


async def test_metrics_count_decisions_by_outcome_and_show_the_last_targets(nats_server: Any) -> None:
    settings = replace(SETTINGS, metrics_port=free_port(), metrics_host="127.0.0.1")
    async with running_controller(nats_server.url, settings) as c:
        await c.send(features("w1", 0.5), features("w2", 0.7))  # w1 -> 0.7 sent; w2 already there
        await c.settle()
        await c.send(features("w1", 0.5))  # not applied yet: not sent again within resend_s
        await c.settle()
        assert c.service.metrics_server is not None
        url = c.service.metrics_server.url
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            async with http.get(url + "/healthz") as resp:
                health = await resp.json()
    assert health == {"status": "ok", "controller_id": "ctl-test", "policy": "static:0.7"}
    got = samples(text)
    p = 'policy="static:0.7"'
    expected = {
        "onepool_controller_reports_total": 2,
        f'onepool_controller_decisions_total{{outcome="sent",{p}}}': 1,
        f'onepool_controller_decisions_total{{outcome="unchanged",{p}}}': 1,
        f'onepool_controller_decisions_total{{outcome="resend_suppressed",{p}}}': 1,
        f'onepool_controller_decisions_total{{outcome="policy_error",{p}}}': 0,
        "onepool_controller_decision_seconds_count": 3,
        'onepool_controller_alpha_target{worker="w1"}': pytest.approx(0.7),
        'onepool_controller_policy_info{policy="static:0.7",weights=""}': 1,
    }
    assert {k: got.get(k) for k in expected} == expected
    # only the workers of the last report
    assert not any(k.startswith('onepool_controller_alpha_target{worker="w2"') for k in got)
