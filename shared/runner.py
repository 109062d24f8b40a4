"""The common shape of a bus-only service's main: telemetry, a NATS connection, start, wait, stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog
from opentelemetry.trace import Tracer

from shared.bus import Bus
from shared.telemetry import setup_telemetry


class BusService(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_bus_service(
    name: str,
    *,
    instance_id: str,
    nats_url: str,
    build: Callable[[Bus, Tracer], BusService],
    stop: asyncio.Event,
) -> None:
    """Run the service `build` makes until `stop` is set; everything is closed in reverse order, also on
    failure. `name` is the short service name ("cachestate"): `onepool-<name>` in traces and on the bus."""
    telemetry = setup_telemetry(f"onepool-{name}", service_instance_id=instance_id)
    log = structlog.get_logger(f"onepool.{name}")
    try:
        tracer = telemetry.tracer(f"onepool.{name}")
        bus = await Bus.connect(nats_url, name=f"onepool-{name}-{instance_id}", tracer=tracer)
        try:
            service = build(bus, tracer)
            try:
                await service.start()
                await stop.wait()
                log.info(f"{name} stopping", instance=instance_id)
            finally:
                await service.stop()
        finally:
            await bus.close()
    finally:
        telemetry.shutdown()
