"""`onepool cachestate`: connect to NATS, keep the cluster's residency view until signalled."""

from __future__ import annotations

import asyncio

from services.cachestate.service import CacheStateService
from services.cachestate.settings import CacheStateSettings
from shared.runner import run_bus_service


async def run_cachestate(settings: CacheStateSettings, stop: asyncio.Event) -> None:
    await run_bus_service(
        "cachestate",
        instance_id=settings.id,
        nats_url=settings.nats_url,
        build=lambda bus, tracer: CacheStateService(settings, bus, tracer=tracer),
        stop=stop,
    )
