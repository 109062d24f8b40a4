"""The worker service against a real nats-server: requests, digests, alpha decisions, bad input."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest

from services.worker.engine import Engine
from services.worker.service import WorkerService, engine_config_from
from shared import schemas as s
from shared.bus import Bus
from shared.errors import BusError
from shared.residency import DEFAULT_PART_BYTES
from tests.helpers import eventually, free_port, samples
from tests.worker.harness import SETTINGS, Running, running_worker


@pytest.fixture
async def worker(nats_server: Any) -> AsyncIterator[Running]:
    async with running_worker(nats_server.url) as w:
        yield w


async def test_round_trip(worker: Running) -> None:
    reply = await worker.infer(candidates=[10, 11, 12, 13], k=2, timestamps=[5, 6, 7])
    assert reply.error is None and reply.ok is not None
    assert reply.request_id == "r1" and reply.worker_id == "wtest"
    ok = reply.ok
    assert len(ok.items) == 2 and set(ok.items) <= {10, 11, 12, 13}
    assert ok.scores == sorted(ok.scores, reverse=True)
    assert (ok.cached_tokens, ok.computed_tokens) == (0, 3 + 4)
    assert ok.emb_hits + ok.emb_misses == 7
    assert ok.total_ms >= ok.compute_ms > 0


async def test_same_user_second_request_computes_fewer_tokens(worker: Running) -> None:
    history = list(range(100, 140))
    first = await worker.infer(user_id="alice", history=history[:30], candidates=[1, 2, 3])
    second = await worker.infer(user_id="alice", history=history, candidates=[1, 2, 3])
    assert first.ok is not None and second.ok is not None
    assert first.ok.computed_tokens == 33
    assert (second.ok.cached_tokens, second.ok.computed_tokens) == (30, 13)
    delta = await worker.wait_digest(
        lambda d: any(e.user_id == "alice" and e.length == 40 for e in d.kv_upserts)
    )
    assert delta.kind == "delta"


async def test_digests_are_consecutive_and_start_with_a_snapshot(worker: Running) -> None:
    await worker.infer()
    await worker.wait_digest(lambda d: d.seq >= 4)
    seqs = [d.seq for d in worker.digests]
    assert seqs == list(range(len(seqs)))
    first = worker.digests[0]
    assert first.kind == "snapshot" and first.incarnation == worker.service.incarnation
    assert {d.incarnation for d in worker.digests} == {worker.service.incarnation}
    last = worker.digests[-1]
    assert last.period_ms == SETTINGS.digest_ms and last.load.requests_total >= 1
    assert last.cost.fixed_ms >= 0 and last.cost.samples >= 1
    # what a gateway needs to shed at its door: the worker's own queue limit and its service time
    assert last.load.max_queue == SETTINGS.max_queue and last.load.ewma_service_ms > 0
    assert last.load.mean_batch_size == 1.0  # one request at a time so far


async def test_requests_queued_together_are_served_in_one_batch_and_say_so(worker: Running) -> None:
    with worker.engine_held():  # they all wait in the engine's queue, then go in one batch
        pending = [
            asyncio.ensure_future(worker.infer(request_id=f"r{i}", user_id=f"u{i}", history=[i, i + 1]))
            for i in range(4)
        ]
        await eventually(lambda: worker.engine.queue_depth == 4)
    replies = await asyncio.gather(*pending)
    assert all(r.ok is not None and r.ok.batch_size == 4 for r in replies)
    digest = await worker.wait_digest(lambda d: d.load.requests_total >= 4 and d.load.mean_batch_size > 1)
    assert digest.load.mean_batch_size == 4.0


async def test_restart_gets_a_new_incarnation_and_starts_over(nats_server: Any) -> None:
    async with running_worker(nats_server.url) as first:
        await first.wait_digest(lambda d: d.seq >= 1)
        old = first.service.incarnation
    async with running_worker(nats_server.url) as second:
        d = await second.wait_digest(lambda d: d.seq == 0)
        assert d.incarnation != old and d.kind == "snapshot"
    # The drained worker said goodbye in its last digest.
    assert first.digests[-1].draining


async def test_alpha_moves_over_several_ticks_within_budget(worker: Running) -> None:
    engine = worker.engine
    total = engine.geometry.total_chunks
    trace: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pool = engine.pool
            trace.append((pool.emb_chunks, pool.kv_chunks, engine.ticks))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    decision = s.AlphaDecision(decision_id="d-1", worker_id="wtest", target_alpha=0.8)
    await worker.client.publish(s.alpha_subject("wtest"), s.encode(decision))
    acked = await worker.wait_digest(lambda d: d.applied_decision_id == "d-1")
    assert acked.alpha_target == pytest.approx(0.8)
    await worker.wait_digest(lambda d: d.alpha == pytest.approx(round(0.8 * total) / total), timeout_s=10)
    stop.set()
    sampler.join()
    emb_counts = [e for e, _, _ in trace]
    assert all(e + k <= total for e, k, _ in trace)
    # One chunk per tick at most: consecutive observations never jump by more than the ticks between them.
    for (e0, _, t0), (e1, _, t1) in itertools.pairwise(trace):
        assert 0 <= e1 - e0 <= max(1, t1 - t0)
    assert len(set(emb_counts)) > 3  # it really moved through intermediate splits
    await asyncio.wrap_future(engine.check_pool())
    ok = await worker.infer()
    assert ok.ok is not None


async def test_out_of_range_alpha_is_rejected_and_logged(worker: Running) -> None:
    before = worker.engine.pool.target_alpha
    for i, target in enumerate((0.95, -0.1, float("nan"))):
        decision = s.AlphaDecision(decision_id=f"bad-{i}", worker_id="wtest", target_alpha=target)
        await worker.client.publish(s.alpha_subject("wtest"), s.encode(decision))
    await worker.client.publish(s.alpha_subject("wtest"), b"\x00garbage")
    wrong = s.AlphaDecision(decision_id="other", worker_id="someone-else", target_alpha=0.5)
    await worker.client.publish(s.alpha_subject("wtest"), s.encode(wrong))
    await eventually(lambda: worker.service.counters.alpha_rejected >= 4)
    assert worker.service.counters.alpha_rejected == 4
    assert worker.service.counters.bad_messages == 1
    assert worker.engine.pool.target_alpha == before
    d = await worker.wait_digest(lambda d: d.seq >= 2)
    assert d.applied_decision_id is None


async def test_garbage_on_the_request_subject_gets_an_error_reply(worker: Running) -> None:
    raw = await worker.client.request(s.infer_subject("wtest"), b"\xc1\xff not msgpack", timeout_s=5)
    reply = s.decode(s.decoder(s.InferenceReply), raw)
    assert reply.ok is None and reply.error is not None
    assert reply.error.code == "invalid_request" and reply.error.kind == "client"
    assert worker.service.counters.bad_messages == 1
    assert (await worker.infer()).ok is not None  # still serving


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"history": [1, -2]}, "history[1]"),
        ({"candidates": [4, 5000]}, "candidates[1]"),
        ({"history": [1, 2], "timestamps": [1]}, "timestamps"),
        ({"candidates": []}, "candidates"),
        ({"history": list(range(2000))}, "history"),
        ({"surprise": 1}, "surprise"),
        ({"user_id": 7}, "user_id"),
        ({"k": 0}, "k"),
        ({"deadline_ms": -1}, "deadline_ms"),
    ],
)
async def test_invalid_requests_name_the_field(worker: Running, fields: dict[str, Any], field: str) -> None:
    reply = await worker.infer(**fields)
    assert reply.error is not None, reply
    assert (reply.error.code, reply.error.field, reply.error.kind) == ("invalid_request", field, "client")
    assert (await worker.infer()).ok is not None


async def test_missing_field_is_named(worker: Running) -> None:
    body = {"request_id": "x", "history": [], "candidates": [1]}
    raw = await worker.client.request(s.infer_subject("wtest"), msgspec.msgpack.encode(body), timeout_s=5)
    reply = s.decode(s.decoder(s.InferenceReply), raw)
    assert reply.error is not None and reply.error.field == "user_id"


async def test_deadline_exceeded_while_queued(worker: Running) -> None:
    with worker.engine_held() as release:
        pending = asyncio.create_task(worker.infer(deadline_ms=50.0))
        await eventually(lambda: worker.service.in_flight == 1)  # received: queued behind the held thread
        queued_by = time.perf_counter()
        # Real time that must pass (not a stand-in for an event): the deadline runs out while it waits.
        await eventually(lambda: time.perf_counter() > queued_by + 0.05)
        release.set()
        reply = await pending
    assert reply.error is not None and (reply.error.code, reply.error.kind) == ("deadline_exceeded", "retry")


async def test_overload_is_refused_with_a_retryable_error(nats_server: Any) -> None:
    async with running_worker(nats_server.url, replace(SETTINGS, max_queue=1)) as w:
        with w.engine_held() as release:
            first = asyncio.create_task(w.infer(request_id="a"))
            await eventually(lambda: w.service.in_flight == 1)  # "a" holds the only place
            second = await w.infer(request_id="b")
            assert not first.done()
            release.set()
            assert (await first).ok is not None
        assert second.error is not None and (second.error.code, second.error.kind) == ("overloaded", "retry")


async def test_snapshot_on_request(worker: Running) -> None:
    await worker.infer(user_id="bob", history=[1, 2, 3, 4])
    raw = await worker.client.request(
        s.snapshot_request_subject("wtest"), s.encode(s.SnapshotRequest(reason="test")), timeout_s=5
    )
    ack = s.decode(s.decoder(s.SnapshotAck), raw)
    assert ack.incarnation == worker.service.incarnation
    snap = await worker.wait_digest(lambda d: d.seq == ack.seq)
    assert snap.kind == "snapshot"
    assert s.KvEntry("bob", 4) in snap.kv_upserts
    assert {1, 2, 3, 4} <= set(snap.emb_added)
    assert snap.kv_removed == [] and snap.emb_removed == []


async def test_stop_lets_in_flight_requests_finish(nats_server: Any) -> None:
    async with running_worker(nats_server.url) as w:
        infer_subject = s.infer_subject(w.service.worker_id)
        with w.engine_held() as release:
            pending = asyncio.create_task(w.infer(request_id="late"))
            await eventually(lambda: w.service.in_flight == 1)
            stopping = asyncio.create_task(w.service.stop())
            # stop() has begun: the request subscription is being drained ...
            await eventually(lambda: all(sub.subject != infer_subject for sub in w.bus.subscriptions))
            assert not stopping.done() and not pending.done()  # ... and waits for the request in flight
            release.set()
            reply = await pending
            await stopping
        assert reply.ok is not None and reply.request_id == "late"
        goodbye = await w.wait_digest(lambda d: d.draining)
        assert goodbye.load.requests_total == 1 and goodbye.load.in_flight == 0


async def test_a_request_arriving_while_the_worker_drains_is_refused_with_draining(worker: Running) -> None:
    body = {"request_id": "during-drain", "user_id": "u1", "history": [1, 2, 3], "candidates": [4, 5, 6]}
    # Sent on the worker's own connection, then stop() begins at once: on that one connection the request
    # goes out before the UNSUB of the request subscription, so the server still delivers it, and it
    # arrives while the worker drains (stop() sets that before its first await).
    sent = asyncio.create_task(
        worker.bus.request(s.infer_subject("wtest"), msgspec.msgpack.encode(body), timeout_s=10)
    )
    stopping = asyncio.create_task(worker.service.stop())
    raw = await sent
    await stopping
    reply = s.decode(s.decoder(s.InferenceReply), raw)
    assert reply.ok is None and reply.error is not None, reply
    assert (reply.error.code, reply.error.kind) == ("draining", "retry")
    assert reply.request_id == "during-drain" and reply.worker_id == "wtest"
    assert worker.service.counters.errors_total == 1


async def test_request_trace_crosses_nats_into_the_worker(nats_server: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    engine = Engine(engine_config_from(SETTINGS))
    engine.start()
    bus = await Bus.connect(nats_server.url, name="traced-worker", tracer=tracer)
    client = await Bus.connect(nats_server.url, name="traced-client", tracer=tracer)
    service = WorkerService(SETTINGS, engine, bus, tracer=tracer)
    await service.start()
    try:
        body = {"request_id": "t", "user_id": "u", "history": [1, 2], "candidates": [3, 4]}
        with tracer.start_as_current_span("client-root") as root:
            await client.request(s.infer_subject("wtest"), msgspec.msgpack.encode(body), timeout_s=10)
        trace_id = root.get_span_context().trace_id
    finally:
        await service.stop()
        await bus.close()
        await client.close()
        engine.stop()
    spans = {span.name: span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id}
    send = spans["send onepool.worker.{worker}.infer"]
    process = spans["process onepool.worker.{worker}.infer"]
    infer = spans["worker.infer"]
    assert send.parent is not None and send.parent.span_id == root.get_span_context().span_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert infer.parent is not None and infer.parent.span_id == process.context.span_id
    assert infer.attributes is not None and infer.attributes["onepool.computed_tokens"] == 4
    assert process.attributes is not None and process.attributes["messaging.system"] == "nats"


async def test_a_large_snapshot_travels_in_parts_that_fit_a_message(nats_server: Any) -> None:
    settings = replace(SETTINGS, num_items=200_000, budget_mib=24.0)
    async with running_worker(nats_server.url, settings) as w:
        # 66,536 ids x 9 bytes: three parts of at most (256 KiB - 2 KiB of header) / 9 = 28,899 ids
        items = list(range(66_536))
        with w.engine_held():  # the model thread is parked: this thread may use the pool
            w.engine.embeddings(np.array(items, dtype=np.int64))
        raw = await w.client.request(
            s.snapshot_request_subject("wtest"), s.encode(s.SnapshotRequest()), timeout_s=10
        )
        ack = s.decode(s.decoder(s.SnapshotAck), raw)
        parts = [await w.wait_digest(lambda d, i=i: d.seq == ack.seq + i) for i in range(3)]
        assert [(d.kind, d.part, d.parts) for d in parts] == [("snapshot", i, 3) for i in range(3)]
        assert [len(d.emb_added) for d in parts] == [28_899, 28_899, 8_738]
        assert [i for d in parts for i in d.emb_added] == items
        assert all(len(s.encode(d)) <= DEFAULT_PART_BYTES for d in parts)
        later = await w.wait_digest(lambda d: d.seq == ack.seq + 3)  # numbering goes on without a gap
        assert later.kind == "delta" and later.parts == 1


async def test_digest_window_reports_what_was_served(worker: Running) -> None:
    await worker.wait_digest(lambda d: d.seq >= 1)  # start from a fresh window
    mark = len(worker.digests)
    await worker.infer(user_id="w", history=[1, 2, 3, 4], candidates=[5, 6])
    await worker.infer(user_id="w", history=[1, 2, 3, 4, 7, 8], candidates=[5, 6])
    await eventually(lambda: sum(d.window.requests for d in worker.digests[mark:]) >= 2)
    windows = [d.window for d in worker.digests[mark:] if d.window.requests]
    assert sum(w.requests for w in windows) == 2
    assert sum(w.kv_hit_requests for w in windows) == 1
    assert sum(w.history_tokens for w in windows) == 10
    assert sum(w.new_tokens for w in windows) == 4 + 2 and sum(w.cached_tokens for w in windows) == 4
    assert max(w.max_history_tokens for w in windows) == 6
    assert all(w.latency_p99_ms >= w.latency_p50_ms > 0 and w.slo_ms == SETTINGS.slo_ms for w in windows)


async def test_digest_window_counts_requests_slower_than_the_slo(nats_server: Any) -> None:
    slo_ms = 250.0
    async with running_worker(nats_server.url, replace(SETTINGS, slo_ms=slo_ms)) as w:
        await w.wait_digest(lambda d: d.seq >= 1)  # start from a fresh window
        mark = len(w.digests)
        fast = [await w.infer(request_id=f"fast-{i}", user_id=f"f{i}") for i in range(2)]
        with w.engine_held() as release:
            pending = asyncio.create_task(w.infer(request_id="slow", user_id="s"))
            await eventually(lambda: w.service.in_flight == 1)  # received before this moment
            received_by = time.perf_counter()
            # Real time that must pass (not a stand-in for an event): held this long, it misses the SLO.
            await eventually(lambda: time.perf_counter() > received_by + slo_ms / 1e3)
            release.set()
            slow = await pending
        await eventually(lambda: sum(d.window.requests for d in w.digests[mark:]) >= 3)
        windows = [d.window for d in w.digests[mark:] if d.part == 0]
    oks = [r.ok for r in (*fast, slow)]
    assert all(ok is not None for ok in oks), (fast, slow)
    totals = [ok.total_ms for ok in oks if ok is not None]  # the worker's own measure, as in its window
    assert totals[-1] > slo_ms
    assert all(t <= slo_ms for t in totals[:-1]), f"a fast request took {totals} ms: machine overloaded?"
    assert sum(w.requests for w in windows) == 3
    assert sum(w.slo_violations for w in windows) == 1  # the slow one; the fast ones do not count
    assert all(w.slo_ms == slo_ms for w in windows)


async def test_a_digest_that_cannot_be_published_leaves_a_gap_and_the_loop_goes_on(
    worker: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    await worker.wait_digest(lambda d: d.seq >= 1)
    subject = s.digest_subject("wtest")
    publish = worker.bus.publish
    dec = s.decoder(s.WorkerDigest)
    lost: list[s.WorkerDigest] = []

    async def publish_losing_one_digest(subj: str, payload: bytes) -> None:
        if subj == subject and not lost:
            lost.append(s.decode(dec, payload))
            raise BusError("simulated network failure", subject=subj)  # what Bus.publish raises then
        await publish(subj, payload)

    # Patched on this one Bus object, and failing once: it stands for the network dropping one publish;
    # everything else, the worker's digest loop included, is the real thing.
    monkeypatch.setattr(worker.bus, "publish", publish_losing_one_digest)
    await eventually(lambda: lost)
    gap = lost[0].seq
    assert lost[0].kind == "delta"
    await worker.wait_digest(lambda d: d.seq == gap + 2)  # the loop carried on: two more after the failure
    seqs = [d.seq for d in worker.digests]
    assert gap not in seqs
    after = seqs.index(gap - 1) + 1
    assert seqs[after] == gap + 1  # the receiver sees the next digest skip one: a gap, not a renumbering
    assert seqs == [n for n in range(seqs[-1] + 1) if n != gap]
    assert {d.incarnation for d in worker.digests} == {worker.service.incarnation}


async def test_metrics_read_the_live_counters_and_healthz_answers(nats_server: Any) -> None:
    settings = replace(SETTINGS, metrics_port=free_port(), metrics_host="127.0.0.1", slo_ms=30.0)
    async with running_worker(nats_server.url, settings) as w:
        assert w.service.metrics_server is not None
        url = w.service.metrics_server.url
        with w.engine_held():  # queued together: one batch of 3
            pending = [
                asyncio.ensure_future(w.infer(request_id=f"r{i}", user_id=f"u{i}", history=[i, i + 1]))
                for i in range(3)
            ]
            await eventually(lambda: w.engine.queue_depth == 3)
        assert all(r.ok is not None for r in await asyncio.gather(*pending))
        assert (await w.infer(history=[1, -1])).error is not None  # does not decode: invalid_request
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/metrics") as resp:
                assert resp.status == 200
                got = samples(await resp.text())
            async with http.get(url + "/healthz") as resp:
                health = await resp.json()
    assert health == {
        "status": "ok",
        "worker_id": "wtest",
        "incarnation": w.service.incarnation,
        "draining": False,
        "in_flight": 0,
    }
    pool = w.engine.pool
    chunk = w.engine.geometry.chunk_bytes
    expected = {
        "onepool_worker_requests_total": 4,
        'onepool_worker_replies_total{outcome="ok"}': 3,
        'onepool_worker_replies_total{outcome="invalid_request"}': 1,
        "onepool_worker_bad_messages_total": 1,
        "onepool_worker_request_seconds_count": 3,
        'onepool_worker_request_seconds_bucket{le="+Inf"}': 3,
        "onepool_worker_batch_size_count": 1,
        'onepool_worker_batch_size_bucket{le="2.0"}': 0,
        'onepool_worker_batch_size_bucket{le="4.0"}': 1,
        "onepool_worker_batch_seconds_count": 1,
        "onepool_worker_queue_depth": 0,
        "onepool_worker_max_queue": SETTINGS.max_queue,
        "onepool_worker_alpha": pool.alpha,
        "onepool_worker_alpha_target": 0.5,
        'onepool_worker_pool_bytes{owner="emb"}': pool.emb_chunks * chunk,
        'onepool_worker_pool_bytes{owner="kv"}': pool.kv_chunks * chunk,
        "onepool_worker_emb_hits_total": pool.counters.emb_hits,
        "onepool_worker_emb_misses_total": pool.counters.emb_misses,
        "onepool_worker_kv_users": 3,
        'onepool_worker_refill_bytes_total{mode="critical"}': 0,
    }
    assert {k: got.get(k) for k in expected} == expected
    assert pool.counters.emb_hits + pool.counters.emb_misses > 0
    assert 'onepool_worker_request_seconds_bucket{le="0.03"}' in got  # the SLO is a bucket bound
    info = next(k for k in got if k.startswith("onepool_worker_info{"))
    assert f'incarnation="{w.service.incarnation}"' in info and 'worker="wtest"' in info
    assert got["process_cpu_seconds_total"] > 0
