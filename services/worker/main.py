"""`onepool worker`: build and warm up the engine, then serve on NATS until signalled."""

from __future__ import annotations

import asyncio

import structlog
import torch
from opentelemetry.trace import Tracer

from services.worker.engine import Engine
from services.worker.service import WorkerService, engine_config_from
from services.worker.settings import WorkerSettings
from shared.bus import Bus
from shared.runner import run_bus_service

log = structlog.get_logger("onepool.worker")


async def build_worker(settings: WorkerSettings, bus: Bus, tracer: Tracer) -> WorkerService:
    """The engine built (off the event loop: it takes a while), warmed up and started, in its service; the
    service's stop() stops the engine too."""
    cfg = engine_config_from(settings)
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    engine = await asyncio.to_thread(Engine, cfg)
    try:
        if cfg.checkpoint is None:
            log.warning(
                "HSTU is running on random weights: its rankings are meaningless", source=engine.model_source
            )
        else:
            log.info("HSTU weights loaded", source=engine.model_source)
        if cfg.embedding_table is None:
            log.warning("the host embedding table is synthetic", source=engine.table_source)
        else:
            log.info("host embedding table loaded", source=engine.table_source, rows=engine.num_items)
        if engine.link.emulated:
            log.info("CPU mode: misses pay an emulated host link", link=engine.link.describe())
        await asyncio.to_thread(engine.warm_up)
        engine.start()
    except BaseException:
        await asyncio.to_thread(engine.stop)
        raise
    return WorkerService(settings, engine, bus, tracer=tracer)


async def run_worker(settings: WorkerSettings, stop: asyncio.Event) -> None:
    async def build(bus: Bus, tracer: Tracer) -> WorkerService:
        return await build_worker(settings, bus, tracer)

    # A refused model file is a ModelInputError, a UsageError: the process exits with EXIT_USAGE.
    await run_bus_service(
        "worker", instance_id=settings.id, nats_url=settings.nats_url, build=build, stop=stop
    )
