"""`onepool worker`: build the engine, connect to NATS, serve until signalled."""

from __future__ import annotations

import asyncio

import structlog
import torch

from services.worker.engine import Engine
from services.worker.service import WorkerService, engine_config_from
from services.worker.settings import WorkerSettings
from shared.bus import Bus
from shared.telemetry import setup_telemetry

log = structlog.get_logger("onepool.worker")


async def run_worker(settings: WorkerSettings, stop: asyncio.Event) -> None:
    telemetry = setup_telemetry("onepool-worker", service_instance_id=settings.id)
    engine: Engine | None = None
    try:
        cfg = engine_config_from(settings)
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        # Building the model and allocating the pool take a while: keep the loop responsive meanwhile.
        engine = await asyncio.to_thread(Engine, cfg)
        if cfg.checkpoint is None:
            log.warning(
                "HSTU is running on random weights: its rankings are meaningless", source=engine.model_source
            )
        else:
            log.info("HSTU weights loaded", source=engine.model_source)
        if engine.link.emulated:
            log.info("CPU mode: misses pay an emulated host link", link=engine.link.describe())
        await asyncio.to_thread(engine.warm_up)
        engine.start()
        bus = await Bus.connect(
            settings.nats_url,
            name=f"onepool-worker-{settings.id}",
            tracer=telemetry.tracer("onepool.worker"),
        )
        try:
            service = WorkerService(settings, engine, bus, tracer=telemetry.tracer("onepool.worker"))
            try:
                await service.start()
                await stop.wait()
                log.info("worker stopping", worker_id=service.worker_id, in_flight=service.in_flight)
            finally:
                await service.stop()
        finally:
            await bus.close()
    finally:
        if engine is not None:
            await asyncio.to_thread(engine.stop)
        telemetry.shutdown()
