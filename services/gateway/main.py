"""`onepool gateway`: the HTTP API in front of the workers."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from opentelemetry.trace import Tracer

from services.gateway.service import Gateway, build_app, serve_http
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from shared.runner import run_bus_service

log = structlog.get_logger("onepool.gateway")


class GatewayServer:
    """The gateway and its HTTP server, started and stopped as one service (the app's start-up runs the
    gateway's own start and stop)."""

    def __init__(self, settings: GatewaySettings, bus: Bus, tracer: Tracer) -> None:
        self.settings = settings
        self.gateway = Gateway(settings, bus, tracer=tracer)
        self._tracer = tracer
        self._http = contextlib.AsyncExitStack()

    async def start(self) -> None:
        s = self.settings
        await self._http.enter_async_context(
            serve_http(
                build_app(self.gateway, self._tracer),
                s,
                on_refuse=lambda: self.gateway.metrics.count_shed("connections"),
            )
        )
        log.info("gateway listening", url=f"http://{s.host}:{s.port}", routing=s.routing, instance=s.instance)

    async def stop(self) -> None:
        await self._http.aclose()


async def run_gateway(settings: GatewaySettings, stop: asyncio.Event) -> None:
    async def build(bus: Bus, tracer: Tracer) -> GatewayServer:
        return GatewayServer(settings, bus, tracer)

    await run_bus_service(
        "gateway", instance_id=settings.instance, nats_url=settings.nats_url, build=build, stop=stop
    )
