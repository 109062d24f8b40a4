"""What every service's Prometheus metrics share (the list of metrics: docs/metrics.md).

- `service_registry()`: a registry of the service's own (no process globals) holding the process and
  platform collectors (`add_process_collectors` adds them to one made elsewhere: the gateway's);
- `Buckets`: a histogram's counts kept by the code that observes (any one thread), read at scrape time;
- `LATENCY_SECONDS_BUCKETS`: the bucket bounds of every request-latency histogram (the gateway's and the
  workers'), the default SLO (`shared.slo.DEFAULT_SLO_MS`) among them;
- `MetricsServer`: GET /metrics (Prometheus text) and GET /healthz (200 + JSON) for one registry, started
  and stopped by its owner; port 0 binds a free port (`port` says which). `start_metrics_server` is the
  settings' way: there a port of 0 means no server at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily

from shared.slo import DEFAULT_SLO_MS

__all__ = [
    "LATENCY_SECONDS_BUCKETS",
    "Buckets",
    "MetricsServer",
    "add_process_collectors",
    "service_registry",
    "start_metrics_server",
]

Health = Callable[[], Mapping[str, object]]

# Request latency, in seconds: 1 ms to 5 s in 1-2-5 steps, and the default SLO (a bound, whatever its value:
# "within the SLO" is then one bucket, not an interpolation). A worker adds its own SLO if it differs.
LATENCY_SECONDS_BUCKETS: tuple[float, ...] = tuple(
    sorted({0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, DEFAULT_SLO_MS / 1e3})
)


def add_process_collectors(registry: CollectorRegistry) -> None:
    """`process_*` (CPU, memory, file descriptors, start time; Linux only) and `python_info`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def service_registry() -> CollectorRegistry:
    """A fresh registry with the process collectors; the service registers its own collector in it."""
    registry = CollectorRegistry(auto_describe=False)
    add_process_collectors(registry)
    return registry


class Buckets:
    """A histogram's counts: `observe` from one thread, `family` at scrape time from another (it copies
    the counts first: a scrape racing an observation is off by that one observation, never torn)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(bounds)
        if not self.bounds or len(set(self.bounds)) != len(self.bounds):
            raise ValueError(f"bucket bounds must be distinct and not empty, got {self.bounds}")
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1  # a bucket holds values <= its bound
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts = list(self._counts)
        total = self.sum
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*self.bounds, float("inf")], counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=total)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """A GET /metrics answer: the registry in Prometheus' text format (every service's, the gateway's too)."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsServer:
    """GET /metrics and GET /healthz on host:port; `health()` makes the /healthz body (`status: ok` added)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        health: Health | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self._port = port
        self._health = health
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose when asked for 0), once started."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return metrics_response(self.registry)

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok", **(self._health() if self._health else {})})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("metrics server already started")
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the server (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_metrics_server(
    registry: CollectorRegistry, *, host: str, port: int, health: Health | None = None
) -> MetricsServer | None:
    """A started server, or None when `port` is 0 (the settings' "off")."""
    if not port:
        return None
    server = MetricsServer(registry, host=host, port=port, health=health)
    await server.start()
    return server
