"""shared.metrics: the histogram buckets and the metrics server, on a real socket."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import Buckets, MetricsServer, service_registry, start_metrics_server
from tests.helpers import free_port


def test_buckets_count_values_up_to_and_including_each_bound() -> None:
    b = Buckets([0.5, 0.1, 1.0])  # any order
    for value in (0.05, 0.1, 0.3, 1.0, 7.0):
        b.observe(value)
    assert b.count == 5 and b.sum == pytest.approx(8.45)
    fam = b.family("x_seconds", "doc")
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "0.5": 3, "1.0": 4, "+Inf": 5}
    assert {s.name: s.value for s in fam.samples if "le" not in s.labels} == {
        "x_seconds_count": 5,
        "x_seconds_sum": pytest.approx(8.45),
    }


def test_buckets_need_distinct_bounds() -> None:
    with pytest.raises(ValueError):
        Buckets([])
    with pytest.raises(ValueError):
        Buckets([1.0, 1.0])


def test_a_service_registry_has_the_process_metrics() -> None:
    names = {f.name for f in text_string_to_metric_families(generate_latest(service_registry()).decode())}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= names


async def test_port_zero_binds_a_free_port_and_serves_metrics_and_healthz() -> None:
    registry = service_registry()
    server = MetricsServer(registry, host="127.0.0.1", port=0, health=lambda: {"who": "me"})
    await server.start()
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "/metrics") as resp:
                assert resp.status == 200 and resp.content_type == "text/plain"
                assert "process_cpu_seconds_total" in await resp.text()
            async with http.get(server.url + "/healthz") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ok", "who": "me"}
    finally:
        await server.stop()
        await server.stop()  # idempotent
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(server.url + "/healthz")


async def test_settings_port_zero_is_off_and_a_taken_port_fails_the_start() -> None:
    assert await start_metrics_server(service_registry(), host="127.0.0.1", port=0) is None
    port = free_port()
    first = await start_metrics_server(service_registry(), host="127.0.0.1", port=port)
    assert first is not None and first.port == port
    try:
        with pytest.raises(OSError):
            await start_metrics_server(service_registry(), host="127.0.0.1", port=port)
    finally:
        await first.stop()
