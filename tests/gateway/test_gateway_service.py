"""The gateway shell (view updates, trace context), against a real nats-server and aiohttp server."""

from __future__ import annotations

from typing import Any

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from services.gateway.core.router import RouteRequest
from services.gateway.service import Gateway, build_app, serve_http
from services.gateway.settings import GatewaySettings
from shared import schemas as s
from shared.bus import Bus, Message
from shared.residency import DEFAULT_MAX_ENTRIES


async def test_a_repaired_worker_keeps_its_in_flight_count_and_predictions(nats_server: Any) -> None:
    bus = await Bus.connect(nats_server.url, name="gw-test")
    try:
        gateway = Gateway(GatewaySettings(nats_url=nats_server.url, instance="gw-test"), bus)
        assert gateway.index.max_entries == DEFAULT_MAX_ENTRIES  # the replica's cap is cachestate's default
        req = RouteRequest(user_id="u", history=[1, 2, 3], candidates=[4])
        gateway.router.on_dispatch("w1", req, now=0.0)
        repair = s.ViewUpdate(
            source="cs",
            seq=0,
            kind="delta",
            workers_removed=["w1"],  # cachestate dropping a worker's residency ...
            workers=[s.WorkerState(worker_id="w1", incarnation="i1")],  # ... and re-adding the worker
        )
        await gateway._on_view(Message(subject=s.VIEW_SUBJECT, data=s.encode(repair)))
        assert gateway.router.in_flight("w1") == 1
        gone = s.ViewUpdate(source="cs", seq=1, kind="delta", workers_removed=["w1"])
        await gateway._on_view(Message(subject=s.VIEW_SUBJECT, data=s.encode(gone)))
        assert gateway.router.in_flight("w1") == 0
        # Removed and re-added as another incarnation (a restart): a new process, nothing of ours holds.
        back = s.ViewUpdate(
            source="cs", seq=2, kind="snapshot", workers=[s.WorkerState(worker_id="w1", incarnation="i1")]
        )
        await gateway._on_view(Message(subject=s.VIEW_SUBJECT, data=s.encode(back)))
        gateway.router.on_dispatch("w1", req, now=0.0)
        gateway.router.on_failure("w1", now=0.0)
        restart = s.ViewUpdate(
            source="cs",
            seq=3,
            kind="delta",
            workers_removed=["w1"],
            workers=[s.WorkerState(worker_id="w1", incarnation="i2")],
        )
        await gateway._on_view(Message(subject=s.VIEW_SUBJECT, data=s.encode(restart)))
        assert gateway.router.in_flight("w1") == 0 and gateway.router.demoted_until("w1") is None
    finally:
        await bus.close()


async def test_the_gateway_joins_a_callers_trace_and_starts_one_otherwise(nats_server: Any) -> None:
    # As in production without an exporter: an SDK provider that records nothing but keeps trace ids.
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    bus = await Bus.connect(nats_server.url, name="gw-trace-test")
    settings = GatewaySettings(nats_url=nats_server.url, instance="gw-trace-test")
    try:
        app = build_app(Gateway(settings, bus, tracer=tracer), tracer)
        async with serve_http(app, settings, port=0) as runner:
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as http:
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
                for name in ("traceparent", "Traceparent"):
                    headers = {name: f"00-{trace_id}-00f067aa0ba902b7-01"}
                    async with http.get(f"http://127.0.0.1:{port}/healthz", headers=headers) as resp:
                        assert resp.status == 200
                        assert resp.headers["x-trace-id"] == trace_id
                seen = set()
                for _ in range(2):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        seen.add(resp.headers["x-trace-id"])
                assert len(seen) == 2
                assert all(len(t) == 32 and int(t, 16) != 0 for t in seen)
    finally:
        await bus.close()


async def test_server_spans_follow_the_http_conventions_and_stay_bounded(nats_server: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    bus = await Bus.connect(nats_server.url, name="gw-span-test")
    settings = GatewaySettings(nats_url=nats_server.url, instance="gw-span-test")
    try:
        app = build_app(Gateway(settings, bus, tracer=tracer), tracer)
        async with serve_http(app, settings, port=0) as runner:
            port = runner.addresses[0][1]
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/healthz") as resp:
                    assert resp.status == 200
                for path in ("/wp-admin/1", "/wp-admin/2"):  # a scanner: no route, no span name of its own
                    async with http.get(base + path) as resp:
                        assert resp.status == 404
                async with http.request("PROPFIND", f"{base}/healthz") as resp:
                    assert resp.status == 405
                for host in ("h:abc", "h:99999"):  # no host[:port]: answered, traced without server.*
                    async with http.get(f"{base}/healthz", headers={"Host": host}) as resp:
                        assert resp.status == 200 and "x-trace-id" in resp.headers
                # No workers yet: the gateway cannot serve and says so with a 503.
                body = {"user_id": 1, "history": [1, 2], "candidates": [3]}
                async with http.post(f"{base}/v1/recommend", json=body) as resp:
                    assert resp.status == 503
    finally:
        await bus.close()
    spans = [sp for sp in exporter.get_finished_spans() if sp.kind == SpanKind.SERVER]
    names = ["GET /healthz", "GET", "GET", "HTTP", "GET /healthz", "GET /healthz", "POST /v1/recommend"]
    assert [sp.name for sp in spans] == names
    ok = dict(spans[0].attributes or {})
    assert ok == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": "/healthz",
        "network.protocol.version": "1.1",
        "http.route": "/healthz",
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.response.status_code": 200,
    }
    scanned = dict(spans[1].attributes or {})
    assert "http.route" not in scanned and scanned["url.path"] == "/wp-admin/1"
    assert "error.type" not in scanned  # a 4xx is the client's error, not the server's
    other = dict(spans[3].attributes or {})
    assert other["http.request.method"] == "_OTHER" and other["http.request.method_original"] == "PROPFIND"
    odd_host = dict(spans[4].attributes or {})
    assert "server.address" not in odd_host and odd_host["http.response.status_code"] == 200
    failed = dict(spans[6].attributes or {})
    assert failed["http.response.status_code"] == 503 and failed["error.type"] == "503"
    assert spans[6].status.status_code == StatusCode.ERROR
