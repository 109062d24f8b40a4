"""`onepool cachestate`: connect to NATS, keep the cluster's residency view until signalled."""

from __future__ import annotations

import asyncio

import structlog

from services.cachestate.service import CacheStateService
from services.cachestate.settings import CacheStateSettings
from shared.bus import Bus
from shared.telemetry import setup_telemetry

log = structlog.get_logger("onepool.cachestate")


async def run_cachestate(settings: CacheStateSettings, stop: asyncio.Event) -> None:
    telemetry = setup_telemetry("onepool-cachestate", service_instance_id=settings.id)
    try:
        tracer = telemetry.tracer("onepool.cachestate")
        bus = await Bus.connect(settings.nats_url, name=f"onepool-cachestate-{settings.id}", tracer=tracer)
        try:
            service = CacheStateService(settings, bus, tracer=tracer)
            try:
                await service.start()
                await stop.wait()
                log.info("cachestate stopping", source=service.source)
            finally:
                await service.stop()
        finally:
            await bus.close()
    finally:
        telemetry.shutdown()
