"""A real worker (engine + WorkerService) on a real nats-server, for the tests of every service that talks
to one: the worker's own tests, cachestate's and the controller's."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import nats

from services.worker.engine import Engine
from services.worker.service import WorkerService, engine_config_from
from services.worker.settings import WorkerSettings
from shared import schemas as s
from shared.bus import Bus

SETTINGS = WorkerSettings(
    id="wtest",
    model="tiny",
    num_items=5000,
    budget_mib=4.0,
    chunk_kib=64,
    page_tokens=16,
    alpha=0.5,
    alpha_min=0.1,
    alpha_max=0.9,
    max_chunks_per_tick=1,
    tick_ms=20.0,
    digest_ms=100.0,
    link_latency_us=1.0,
    max_queue=8,
)


@dataclass
class Running:
    service: WorkerService
    engine: Engine
    bus: Bus
    client: Bus
    digests: list[s.WorkerDigest]

    async def infer(self, **fields: Any) -> s.InferenceReply:
        body = {"request_id": "r1", "user_id": "u1", "history": [1, 2, 3], "candidates": [4, 5, 6], **fields}
        raw = await self.client.request(
            s.infer_subject(self.service.worker_id), msgspec.msgpack.encode(body), timeout_s=10
        )
        return s.decode(s.decoder(s.InferenceReply), raw)

    @contextlib.contextmanager
    def engine_held(self) -> Iterator[threading.Event]:
        """Occupy the model thread until the yielded event is set (at the latest when the block ends):
        requests received meanwhile wait in the engine's queue, in flight, for as long as the test says.
        The block starts once the thread is parked, so the test may also use the pool meanwhile."""
        release = threading.Event()
        parked = threading.Event()
        held = self.engine.pause_until(release, parked)
        try:
            if not parked.wait(10):
                raise AssertionError("the model thread was not parked within 10 s")
            yield release
        finally:
            release.set()
            held.result(timeout=10)

    async def wait_digest(self, pred: Any, timeout_s: float = 5.0) -> s.WorkerDigest:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for d in self.digests:
                if pred(d):
                    return d
            await asyncio.sleep(0.02)
        raise AssertionError(f"no matching digest among {len(self.digests)}")


@contextlib.asynccontextmanager
async def running_worker(url: str, settings: WorkerSettings = SETTINGS) -> AsyncIterator[Running]:
    digests: list[s.WorkerDigest] = []
    listener = await nats.connect(url)
    dec = s.decoder(s.WorkerDigest)

    async def on_digest(msg: Any) -> None:
        digests.append(s.decode(dec, msg.data))

    await listener.subscribe(s.digest_subject(settings.id), cb=on_digest)
    engine = Engine(engine_config_from(replace(settings, device="cpu")))
    engine.start()
    bus = await Bus.connect(url, name="worker-under-test")
    client = await Bus.connect(url, name="test-client")
    service = WorkerService(settings, engine, bus)
    await service.start()
    try:
        yield Running(service, engine, bus, client, digests)
    finally:
        await service.stop()
        await bus.close()
        await client.close()
        await listener.close()
        engine.stop()
