"""`onepool controller`: connect to NATS, turn feature reports into alpha decisions until signalled."""

from __future__ import annotations

import asyncio

import structlog

from services.controller.service import ControllerService
from services.controller.settings import ControllerSettings
from shared.bus import Bus
from shared.telemetry import setup_telemetry

log = structlog.get_logger("onepool.controller")


async def run_controller(settings: ControllerSettings, stop: asyncio.Event) -> None:
    telemetry = setup_telemetry("onepool-controller", service_instance_id=settings.id)
    try:
        tracer = telemetry.tracer("onepool.controller")
        bus = await Bus.connect(settings.nats_url, name=f"onepool-controller-{settings.id}", tracer=tracer)
        try:
            service = ControllerService(settings, bus, tracer=tracer)
            try:
                await service.start()
                await stop.wait()
                log.info("controller stopping", controller_id=settings.id)
            finally:
                await service.stop()
        finally:
            await bus.close()
    finally:
        telemetry.shutdown()
