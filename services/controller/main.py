"""`onepool controller`: connect to NATS, turn feature reports into alpha decisions until signalled."""

from __future__ import annotations

import asyncio

from opentelemetry.trace import Tracer

from services.controller.service import ControllerService
from services.controller.settings import ControllerSettings
from shared.bus import Bus
from shared.runner import run_bus_service


async def run_controller(settings: ControllerSettings, stop: asyncio.Event) -> None:
    async def build(bus: Bus, tracer: Tracer) -> ControllerService:
        return ControllerService(settings, bus, tracer=tracer)

    await run_bus_service(
        "controller",
        instance_id=settings.id,
        nats_url=settings.nats_url,
        build=build,
        stop=stop,
    )
