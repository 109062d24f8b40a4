"""`onepool cachestate`: connect to NATS, keep the cluster's residency view until signalled."""

from __future__ import annotations

import asyncio

from opentelemetry.trace import Tracer

from services.cachestate.service import CacheStateService
from services.cachestate.settings import CacheStateSettings
from shared.bus import Bus
from shared.runner import run_bus_service


async def run_cachestate(settings: CacheStateSettings, stop: asyncio.Event) -> None:
    async def build(bus: Bus, tracer: Tracer) -> CacheStateService:
        return CacheStateService(settings, bus, tracer=tracer)

    await run_bus_service(
        "cachestate",
        instance_id=settings.id,
        nats_url=settings.nats_url,
        build=build,
        stop=stop,
    )
