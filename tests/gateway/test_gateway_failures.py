"""The REAL gateway's failure handling, in-process: real nats-server, real aiohttp server and client.

Each test scripts the view (which workers exist, in which rank order) and how each worker answers, then
asserts the documented contract only (docs/architecture.md, "HTTP API" and "Attempts, deadline,
replicas"): the status, the JSON error body ``{"error": {"code", "message", "field"}}``, ``Retry-After`` on
every 503, and which workers were tried in which order. Never log text or exact messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.gateway.scripted import (
    Behaviour,
    HasUrl,
    ScriptedWorker,
    assert_error,
    assert_served_by,
    scripted_gateway,
)
from tests.helpers import eventually


async def test_no_worker_in_the_view_is_503_no_worker_with_retry_after(nats_server: HasUrl) -> None:
    async with scripted_gateway(nats_server, workers=[]) as h:  # the snapshot lists no worker
        answer = await h.recommend()
        assert_error(answer, 503, "no_worker")
        ready = await h.get("/readyz")
        assert ready.status == 503
        assert ready.body["ready"] is False


@pytest.mark.parametrize(("failure", "outcome"), [("retry_error", "overloaded"), ("absent", "no_responders")])
async def test_a_failing_first_worker_is_retried_on_the_next_one(
    nats_server: HasUrl, failure: Behaviour, outcome: str
) -> None:
    first = ScriptedWorker("w1", failure, rank=0)
    second = ScriptedWorker("w2", "ok", rank=1)
    third = ScriptedWorker("w3", "ok", rank=2)
    async with scripted_gateway(nats_server, [first, second, third]) as h:
        answer = await h.recommend()
        assert_served_by(answer, "w2")
        # an absent worker never records anything: nats-server answered "no responders" for it
        assert h.tried == (["w1", "w2"] if failure != "absent" else ["w2"])
        assert len(first.requests) == (1 if failure != "absent" else 0)
        assert third.requests == []
        assert await h.attempts(outcome) == 1
        assert await h.attempts("ok") == 1
        # the same request moved on, with the attempt's budget as its deadline
        for got in first.requests + second.requests:
            assert got.request_id == second.requests[0].request_id
            assert 0 < got.deadline_ms <= h.settings.attempt_timeout_ms


async def test_every_worker_past_the_deadline_is_504_deadline_exceeded(nats_server: HasUrl) -> None:
    workers = [ScriptedWorker(f"w{i}", "sleep", rank=i) for i in range(3)]
    # 300 ms for the request, up to 200 ms per attempt: w0 takes 200, w1 the 100 left, w2 is never asked.
    async with scripted_gateway(
        nats_server, workers, request_timeout_ms=300.0, attempt_timeout_ms=200.0
    ) as h:
        answer = await h.recommend()
        assert_error(answer, 504, "deadline_exceeded")
        assert "Retry-After" not in answer.headers  # only 503s carry it
        assert 0.3 <= answer.elapsed_s < 1.5  # the deadline, not the workers' 5 s sleep, ended it
        assert h.tried == ["w0", "w1"]
        assert await h.attempts("bus_timeout") == 2


async def test_every_worker_failing_fast_is_503_upstream_failed_with_retry_after(nats_server: HasUrl) -> None:
    workers = [ScriptedWorker(f"w{i}", "retry_error", rank=i) for i in range(3)]
    async with scripted_gateway(nats_server, workers) as h:
        answer = await h.recommend()
        assert_error(answer, 503, "upstream_failed")
        assert h.tried == ["w0", "w1", "w2"]  # rank order, each once
        assert answer.elapsed_s < h.settings.request_timeout_ms / 1e3  # no waiting for the deadline
        assert await h.attempts("overloaded") == 3


async def test_an_undecodable_reply_is_a_failed_attempt_counted_as_bad_reply(nats_server: HasUrl) -> None:
    garbled = ScriptedWorker("w1", "garbage", rank=0)
    healthy = ScriptedWorker("w2", "ok", rank=1)
    async with scripted_gateway(nats_server, [garbled, healthy]) as h:
        assert await h.attempts("bad_reply") == 0
        answer = await h.recommend()
        assert_served_by(answer, "w2")
        assert h.tried == ["w1", "w2"]
        assert await h.attempts("bad_reply") == 1
        assert await h.attempts("ok") == 1


async def test_a_client_error_from_a_worker_is_400_naming_the_field_and_not_retried(
    nats_server: HasUrl,
) -> None:
    rejecting = ScriptedWorker("w1", "client_error", rank=0, client_field="candidates[2]")
    other = ScriptedWorker("w2", "ok", rank=1)
    async with scripted_gateway(nats_server, [rejecting, other]) as h:
        answer = await h.recommend()
        assert_error(answer, 400, "invalid_request", field="candidates[2]")
        assert h.tried == ["w1"]
        assert other.requests == []


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_max_attempts_bounds_the_workers_tried(nats_server: HasUrl, max_attempts: int) -> None:
    workers = [ScriptedWorker(f"w{i}", "retry_error", rank=i) for i in range(4)]
    async with scripted_gateway(nats_server, workers, max_attempts=max_attempts) as h:
        answer = await h.recommend()
        assert_error(answer, 503, "upstream_failed")
        assert h.tried == [f"w{i}" for i in range(max_attempts)]
        assert all(w.requests == [] for w in workers[max_attempts:])


async def _chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b" " * size


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_body_over_the_limit_is_413_body_too_large(nats_server: HasUrl, framing: str) -> None:
    worker = ScriptedWorker("w1", "ok")
    async with scripted_gateway(nats_server, [worker], max_body_kib=1) as h:
        # chunked: an async generator as data, so aiohttp sends no Content-Length
        data: Any = _chunks(2048) if framing == "chunked" else b" " * 2048
        answer = await h.recommend(data=data, headers={"Content-Type": "application/json"})
        assert_error(answer, 413, "body_too_large")
        assert worker.requests == []


async def test_readyz_is_503_until_a_view_arrives_and_the_gateway_asks_again_by_itself(
    nats_server: HasUrl,
) -> None:
    ignored = 3
    worker = ScriptedWorker("w1", "ok")
    async with scripted_gateway(
        nats_server,
        [worker],
        ignore_snapshot_requests=ignored,
        wait_for_view=False,
        snapshot_retry_ms=100.0,
    ) as h:
        await eventually(lambda: h.cachestate.snapshot_requests >= 1)
        early = await h.get("/readyz")
        # conclusive only if no snapshot had been published when it answered (300 ms of slack above)
        assert h.cachestate.snapshots_published == 0, "too slow: the snapshot came before /readyz answered"
        assert early.status == 503
        assert early.body["ready"] is False
        # nobody but the gateway's own resync loop asks again
        await h.wait_for_view()
        assert h.cachestate.snapshot_requests >= ignored + 1
        ready = await h.get("/readyz")
        assert ready.status == 200
        assert ready.body["ready"] is True
        assert_served_by(await h.recommend(), "w1")


async def test_every_view_update_moves_the_version_and_the_next_decision_follows_it(
    nats_server: HasUrl,
) -> None:
    w1 = ScriptedWorker("w1", "ok", rank=0)
    w2 = ScriptedWorker("w2", "ok", rank=1)
    async with scripted_gateway(nats_server, [w1, w2]) as h:
        assert_served_by(await h.recommend(), "w1")  # the router has built its arrays for this view

        # each delta re-ranks both workers: the other one must answer next
        for ranks, expected in (({"w1": 5, "w2": 0}, "w2"), ({"w1": 0, "w2": 5}, "w1")):
            for worker in (w1, w2):
                worker.rank = ranks[worker.worker_id]
            before = h.gateway.view.version
            seq = await h.cachestate.publish_delta([w1, w2])
            await h.wait_for_update(seq)
            assert h.gateway.view.version != before
            assert_served_by(await h.recommend(), expected)
        assert h.tried == ["w1", "w2", "w1"]
