"""The gateway shell's handling of view updates, against a real nats-server."""

from __future__ import annotations

from typing import Any

from services.gateway.core.router import RouteRequest
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings
from shared import schemas as s
from shared.bus import Bus, Message


async def test_a_repaired_worker_keeps_its_in_flight_count_and_predictions(nats_server: Any) -> None:
    bus = await Bus.connect(nats_server.url, name="gw-test")
    try:
        gateway = Gateway(GatewaySettings(nats_url=nats_server.url, instance="gw-test"), bus)
        req = RouteRequest(user_id="u", history=[1, 2, 3], candidates=[4])
        gateway.router.on_dispatch("w1", req, now=0.0)
        repair = s.ViewUpdate(
            source="cs",
            seq=0,
            kind="delta",
            workers_removed=["w1"],  # cachestate dropping a worker's residency ...
            workers=[s.WorkerState(worker_id="w1", incarnation="i1")],  # ... and re-adding the worker
        )
        await gateway._on_view(Message(subject=s.VIEW_SUBJECT, data=s.encode(repair)))
        assert gateway.router.in_flight("w1") == 1
        gone = s.ViewUpdate(source="cs", seq=1, kind="delta", workers_removed=["w1"])
        await gateway._on_view(Message(subject=s.VIEW_SUBJECT, data=s.encode(gone)))
        assert gateway.router.in_flight("w1") == 0
    finally:
        await bus.close()
