"""`onepool gateway`: the HTTP API in front of the workers."""

from __future__ import annotations

import asyncio

import structlog

from services.gateway.service import Gateway, build_app, serve_http
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from shared.telemetry import setup_telemetry

log = structlog.get_logger("onepool.gateway")


async def run_gateway(settings: GatewaySettings, stop: asyncio.Event) -> None:
    telemetry = setup_telemetry("onepool-gateway", service_instance_id=settings.instance)
    tracer = telemetry.tracer("onepool.gateway")
    try:
        bus = await Bus.connect(settings.nats_url, name=f"onepool-gateway-{settings.instance}", tracer=tracer)
        try:
            gateway = Gateway(settings, bus, tracer=tracer)
            async with serve_http(
                build_app(gateway, tracer),
                settings.host,
                settings.port,
                max_connections=settings.max_connections,
                idle_timeout_s=settings.idle_timeout_ms / 1e3,
                retry_after_s=settings.retry_after_s,
            ):
                log.info(
                    "gateway listening",
                    url=f"http://{settings.host}:{settings.port}",
                    routing=settings.routing,
                    instance=settings.instance,
                )
                await stop.wait()
                log.info("gateway stopping")
        finally:
            await bus.close()
    finally:
        telemetry.shutdown()
