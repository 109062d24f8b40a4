"""The cachestate service against a real nats-server and the real gateway (in-process, without its HTTP
server). Synthetic digests published over NATS by the test are the protocol itself; fake workers answer
snapshot requests on their own subjects as workers do (that answer is what verifies a worker); two tests
run a real worker (engine + WorkerService) on the same server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import msgspec
import pytest

from services.cachestate.service import CacheStateService
from services.cachestate.settings import CacheStateSettings
from services.gateway.core.router import NoWorkers, RouteRequest
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings
from shared import schemas as s
from shared.bus import Bus, Message
from shared.errors import ErrorKind, RemoteError
from tests.helpers import eventually, free_port, samples
from tests.worker.harness import running_worker

SETTINGS = CacheStateSettings(
    id="cs-test",
    dead_after_periods=3.0,
    expire_check_ms=20.0,
    view_delta_ms=20.0,
    features_window_ms=200.0,
    snapshot_timeout_ms=500.0,
    snapshot_backoff_ms=50.0,
    snapshot_backoff_max_ms=200.0,
    view_warmup_ms=0.0,
)


def replace_str(msg: s.WorkerDigest, **fields: str) -> s.WorkerDigest:
    return msgspec.structs.replace(msg, **fields)


@contextlib.asynccontextmanager
async def running_cachestate(
    url: str, settings: CacheStateSettings = SETTINGS
) -> AsyncIterator[CacheStateService]:
    bus = await Bus.connect(url, name="cachestate-under-test")
    service = CacheStateService(settings, bus)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await bus.close()


class ViewWatch:
    """Every view message on the bus, as a gateway receives them, with their arrival times."""

    def __init__(self) -> None:
        self.updates: list[tuple[float, s.ViewUpdate]] = []

    async def on_view(self, msg: Message) -> None:
        self.updates.append((time.monotonic(), s.decode(s.decoder(s.ViewUpdate), msg.data)))


@contextlib.asynccontextmanager
async def gateway(url: str) -> AsyncIterator[Gateway]:
    """The real gateway, in-process without its HTTP server: it follows the view and resyncs by itself."""
    bus = await Bus.connect(url, name="test-gateway")
    gw = Gateway(GatewaySettings(nats_url=url, instance="t", snapshot_retry_ms=50.0), bus)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()
        await bus.close()


async def synced(gw: Gateway) -> s.ViewSnapshotAck:
    """Ask cachestate for a view snapshot now; return once the gateway's replica has applied it."""
    raw = await gw.bus.request(
        s.VIEW_SNAPSHOT_SUBJECT, s.encode(s.ViewSnapshotRequest(requester="t")), timeout_s=5
    )
    ack = s.decode(s.decoder(s.ViewSnapshotAck), raw)
    await eventually(lambda: gw.replica.in_sync and gw.replica.seq >= ack.seq + ack.parts - 1)
    return ack


def ranked(gw: Gateway) -> list[str]:
    """The workers the gateway's router would try for a request, best first ([] when none)."""
    try:
        return gw.router.route(gw.view, RouteRequest("anyone", [1, 2], [3]), time.monotonic()).worker_ids
    except NoWorkers:
        return []


@dataclass
class FakeWorker:
    """Publishes digests the way a worker does; answers snapshot requests when told to."""

    bus: Bus
    worker_id: str = "w1"
    incarnation: str = "inc-1"
    period_ms: float = 100.0
    seq: int = 0
    kv: dict[str, int] = field(default_factory=dict)
    emb: set[int] = field(default_factory=set)
    snapshot_requests: int = 0

    async def send(self, kind: str = "delta", *, skip: int = 0, **fields: Any) -> s.WorkerDigest:
        self.seq += skip
        d = s.WorkerDigest(
            worker_id=self.worker_id,
            incarnation=self.incarnation,
            seq=self.seq,
            kind=kind,  # type: ignore[arg-type]
            sent_at_ms=time.time() * 1e3,
            period_ms=self.period_ms,
            **fields,
        )
        self.seq += 1
        await self.bus.publish(s.digest_subject(self.worker_id), s.encode(d))
        return d

    async def send_snapshot(self) -> s.WorkerDigest:
        entries = [s.KvEntry(u, n) for u, n in sorted(self.kv.items())]
        return await self.send("snapshot", kv_upserts=entries, emb_added=sorted(self.emb))

    async def answer_snapshots(self) -> None:
        """Answer snapshot requests as a worker does: publish a snapshot digest, then ack it. Until this is
        called nobody answers on the worker's subject, and cachestate cannot verify the worker."""

        async def handle(msg: Message) -> bytes:
            self.snapshot_requests += 1
            first = (await self.send_snapshot()).seq
            return s.encode(s.SnapshotAck(worker_id=self.worker_id, incarnation=self.incarnation, seq=first))

        await self.bus.subscribe(s.snapshot_request_subject(self.worker_id), handle)


@contextlib.asynccontextmanager
async def fake_worker(url: str, *, answer: bool = True, **fields: Any) -> AsyncIterator[FakeWorker]:
    bus = await Bus.connect(url, name=f"fake-{fields.get('worker_id', 'w1')}")
    try:
        worker = FakeWorker(bus, **fields)
        if answer:
            await worker.answer_snapshots()
        yield worker
    finally:
        await bus.close()


# ---------------------------------------------------------------------------------------------------------
async def test_gap_triggers_a_snapshot_request_that_the_worker_answers(nats_server: Any) -> None:
    async with (
        running_cachestate(nats_server.url) as cs,
        gateway(nats_server.url) as gw,
        fake_worker(nats_server.url) as w,
    ):
        w.kv = {"a": 3}
        await w.send_snapshot()
        # A new worker is verified first: one snapshot request, answered on its own subject.
        await eventually(lambda: cs.tracker.is_verified("w1") and not cs.tracker.needs_snapshot("w1"))
        assert w.snapshot_requests == 1
        await w.send(kv_upserts=[s.KvEntry("b", 2)])
        await eventually(lambda: gw.replica.index.kv_workers("b") == {"w1": 2})
        assert ranked(gw) == ["w1"]
        # Digest seq is lost; the next one arrives.
        w.kv = {"a": 3, "b": 2, "c": 1, "d": 9}
        await w.send(skip=1, kv_upserts=[s.KvEntry("c", 1)])
        await eventually(lambda: gw.replica.index.kv_workers("d") == {"w1": 9})
        assert w.snapshot_requests == 2
        assert gw.replica.index.worker_kv("w1") == {"a": 3, "b": 2, "c": 1, "d": 9}
        t = cs.tracker.counters
        assert (t.gaps, t.repairs, cs.counters.snapshot_requests) == (1, 1, 2)
        assert cs.counters.snapshot_request_failures == 0
        assert ranked(gw) == ["w1"]  # never out of the view: a gap drops residency, not the worker


async def test_a_worker_nobody_answers_for_is_never_routable(nats_server: Any) -> None:
    async with (
        running_cachestate(nats_server.url, replace(SETTINGS, max_period_ms=300.0)) as cs,
        gateway(nats_server.url) as gw,
        fake_worker(nats_server.url, answer=False, period_ms=1e9) as phantom,
        fake_worker(nats_server.url, worker_id="w2", period_ms=250.0) as real,
    ):
        phantom.kv = {"u": 10_000}
        await phantom.send_snapshot()  # a forged digest: an 11-day period, and KV for user u
        await real.send_snapshot()
        await eventually(lambda: cs.tracker.is_verified("w2"))
        await eventually(lambda: cs.counters.snapshot_request_failures >= 2)  # nobody answers for w1
        await synced(gw)
        assert ranked(gw) == ["w2"] and "w1" not in gw.replica.workers
        assert not cs.tracker.is_verified("w1") and cs.tracker.unverified() == ["w1"]
        assert cs.tracker.counters.periods_clamped >= 1  # judged by max_period_ms, not by its 1e9
        # ... and it expires within dead_after_periods x max_period_ms (3 x 0.3 s here), while w2, which
        # keeps digesting, stays
        deadline = time.monotonic() + 3.0
        while cs.tracker.is_live("w1"):
            assert time.monotonic() < deadline
            await real.send()
            await asyncio.sleep(0.1)
        assert ranked(gw) == ["w2"]


async def test_a_forged_incarnation_of_a_real_worker_loses_to_the_worker(nats_server: Any) -> None:
    async with (
        running_cachestate(nats_server.url) as cs,
        gateway(nats_server.url) as gw,
        fake_worker(nats_server.url, incarnation="real", period_ms=10_000.0) as w,
        fake_worker(nats_server.url, answer=False, incarnation="forged", period_ms=10_000.0) as forger,
    ):
        w.kv = {"a": 1}
        await w.send_snapshot()
        await eventually(lambda: gw.replica.index.kv_workers("a") == {"w1": 1} and ranked(gw) == ["w1"])
        await forger.send_snapshot()  # same worker id, "new incarnation", no residency
        # cachestate asks w1's own subject; the real worker answers with its incarnation, and wins: the
        # claim is retired, and the real worker never left the view nor lost its residency.
        await eventually(lambda: cs.tracker.counters.incarnations_rejected == 1)
        assert cs.index.kv_workers("a") == {"w1": 1} and gw.replica.index.kv_workers("a") == {"w1": 1}
        assert ranked(gw) == ["w1"] and cs.tracker.unverified() == []
        await w.send(kv_upserts=[s.KvEntry("b", 2)])
        await eventually(lambda: gw.replica.index.kv_workers("b") == {"w1": 2})
        assert ranked(gw) == ["w1"] and gw.replica.workers["w1"].incarnation == "real"


async def test_a_far_jump_of_the_seq_restarts_the_numbering_not_the_silence(nats_server: Any) -> None:
    async with (
        running_cachestate(nats_server.url) as cs,
        gateway(nats_server.url) as gw,
        fake_worker(nats_server.url, period_ms=10_000.0) as w,
        fake_worker(nats_server.url, answer=False, period_ms=10_000.0) as forger,
    ):
        await w.send_snapshot()
        await eventually(lambda: cs.tracker.is_verified("w1") and not cs.tracker.needs_snapshot("w1"))
        forger.seq = 2**63 - 1  # the real worker's incarnation, numbered as far ahead as it gets
        await forger.send()
        # The genuine digests that follow (the snapshot asked for at once, then deltas) are not "old": the
        # numbering restarts once more, back to the worker's, and they apply.
        await eventually(
            lambda: cs.tracker.counters.seq_restarts == 2 and not cs.tracker.needs_snapshot("w1")
        )
        await w.send(kv_upserts=[s.KvEntry("x", 5)])
        await eventually(lambda: gw.replica.index.kv_workers("x") == {"w1": 5}, timeout_s=5)
        assert cs.tracker.counters.digests_ignored == 0 and ranked(gw) == ["w1"]


async def test_snapshot_requests_are_retried_until_the_worker_answers(nats_server: Any) -> None:
    async with (
        running_cachestate(nats_server.url) as cs,
        gateway(nats_server.url) as gw,
        fake_worker(nats_server.url, answer=False) as w,
    ):
        w.kv = {"u": 4}
        await w.send(skip=10)  # an unknown worker's delta: its residency needs a snapshot
        await eventually(lambda: cs.counters.snapshot_request_failures >= 2)  # nobody answers yet
        assert cs.tracker.needs_snapshot("w1") and cs.tracker.is_live("w1")
        assert ranked(gw) == []  # unverified: not routable
        await w.answer_snapshots()
        await eventually(lambda: not cs.tracker.needs_snapshot("w1"))
        assert w.snapshot_requests == 1
        assert cs.index.kv_workers("u") == {"w1": 4}
        await synced(gw)
        assert gw.replica.index.kv_workers("u") == {"w1": 4} and ranked(gw) == ["w1"]


async def test_a_slow_snapshot_in_many_parts_is_waited_for_not_asked_again(nats_server: Any) -> None:
    # Its four parts take ~0.9 s in all, longer than SNAPSHOT_TIMEOUT_MS (0.5 s): parts keep arriving, so
    # cachestate keeps waiting instead of asking again (which would restart the snapshot, forever).
    async with (
        running_cachestate(nats_server.url) as cs,
        fake_worker(nats_server.url, answer=False, period_ms=10_000.0) as w,
    ):
        answered: list[asyncio.Task[None]] = []

        async def send_parts() -> None:
            for part in range(4):
                await asyncio.sleep(0.22)
                await w.send("snapshot", part=part, parts=4, kv_upserts=[s.KvEntry(f"u{part}", part + 1)])

        async def slow_snapshot(msg: Message) -> bytes:
            w.snapshot_requests += 1
            answered.append(asyncio.create_task(send_parts()))
            return s.encode(s.SnapshotAck(worker_id=w.worker_id, incarnation=w.incarnation, seq=w.seq))

        await w.bus.subscribe(s.snapshot_request_subject(w.worker_id), slow_snapshot, concurrency=4)
        await w.send(skip=10)  # an unknown worker's delta: its residency needs a snapshot
        await eventually(lambda: cs.tracker.is_live("w1"))
        await eventually(lambda: not cs.tracker.needs_snapshot("w1"), timeout_s=5)
        assert w.snapshot_requests == 1 and cs.counters.snapshot_requests == 1
        assert cs.counters.snapshot_waits_extended >= 1
        assert cs.index.worker_kv("w1") == {"u0": 1, "u1": 2, "u2": 3, "u3": 4}
        await asyncio.gather(*answered)


async def test_a_silent_worker_is_fenced_and_the_removal_is_published_at_once(nats_server: Any) -> None:
    # Deltas are batched every 5 s here: the removal can only arrive in time if fencing flushes at once.
    settings = replace(SETTINGS, view_delta_ms=5000.0)
    watch = ViewWatch()
    async with (
        running_cachestate(nats_server.url, settings) as cs,
        gateway(nats_server.url) as gw,
        fake_worker(nats_server.url, period_ms=50.0) as w,
    ):
        await gw.bus.subscribe(s.VIEW_SUBJECT, watch.on_view)
        w.kv, w.emb = {"a": 1}, {7}
        await w.send_snapshot()
        await eventually(lambda: cs.tracker.is_verified("w1") and not cs.tracker.needs_snapshot("w1"))
        await synced(gw)
        assert gw.replica.index.kv_workers("a") == {"w1": 1} and ranked(gw) == ["w1"]
        last = time.monotonic()
        await w.send()
        await eventually(lambda: any("w1" in u.workers_removed for _, u in watch.updates), timeout_s=3.0)
        at = next(t for t, u in watch.updates if "w1" in u.workers_removed)
        # Dead after 3 periods (150 ms) + at most one expiry check (20 ms) + delivery; well before the
        # 5 s batch (slack for a loaded test machine).
        assert 0.15 <= at - last < 1.0, at - last
        await eventually(lambda: "w1" not in gw.replica.workers)
        assert gw.replica.index.kv_workers("a") == {}
        assert gw.replica.index.emb_masks([7]) == [0]
        assert cs.tracker.counters.workers_dead == 1
        assert cs.index.sizes() == (0, 0, 0, 0)
        assert ranked(gw) == []  # the removed worker is never ranked again
        # ... not even by a gateway that dispatched to it a moment ago (its own count is dropped too)
        assert gw.router.in_flight("w1") == 0


async def test_a_late_joining_gateway_catches_up_from_a_view_snapshot(nats_server: Any) -> None:
    async with (
        running_cachestate(nats_server.url) as cs,
        fake_worker(nats_server.url) as w1,
        fake_worker(nats_server.url, worker_id="w2") as w2,
    ):
        w1.kv, w1.emb = {"a": 3, "b": 5}, {1, 2, 3}
        w2.kv, w2.emb = {"b": 6}, {3, 4}
        await w1.send_snapshot()
        await w2.send_snapshot()
        await eventually(lambda: cs.index.sizes() == (3, 5, 2, 2) and not cs.tracker.unverified())
        async with gateway(nats_server.url) as late:
            # A new replica asks for the whole view by itself.
            await eventually(lambda: late.replica.in_sync and late.ready)
            await w1.send(kv_upserts=[s.KvEntry("c", 1)])
            r = late.replica
            await eventually(lambda: r.index.kv_workers("c") == {"w1": 1})
            assert set(r.workers) == {"w1", "w2"} and sorted(ranked(late)) == ["w1", "w2"]
            assert r.index.kv_workers("b") == {"w1": 5, "w2": 6}
            b1, b2 = r.index.worker_bit("w1"), r.index.worker_bit("w2")
            assert b1 is not None and b2 is not None
            assert r.index.emb_masks([1, 3, 4, 9]) == [1 << b1, (1 << b1) | (1 << b2), 1 << b2, 0]
            # And it stays in sync with what follows.
            await w2.send(kv_removed=["b"], emb_added=[9])
            await eventually(lambda: r.index.kv_workers("b") == {"w1": 5})
            assert r.index.emb_masks([9]) == [1 << b2] and r.in_sync
        assert cs.counters.view_snapshots >= 1


async def test_a_large_view_snapshot_travels_in_parts(nats_server: Any) -> None:
    bus = await Bus.connect(nats_server.url, name="cachestate-small-parts")
    cs = CacheStateService(SETTINGS, bus, part_bytes=2048)
    await cs.start()
    try:
        async with fake_worker(nats_server.url) as w, gateway(nats_server.url) as gw:
            w.kv, w.emb = {f"user-{i}": i for i in range(200)}, set(range(3000))
            await w.send_snapshot()
            await eventually(lambda: cs.index.sizes() == (200, 3000, 200, 1) and cs.tracker.is_verified("w1"))
            ack = await synced(gw)
            assert ack.parts > 10
            assert gw.replica.index.sizes() == (200, 3000, 200, 1)
            assert gw.replica.index.kv_workers("user-199") == {"w1": 199}
    finally:
        await cs.stop()
        await bus.close()


async def test_gateways_resyncing_together_share_view_snapshots(nats_server: Any) -> None:
    bus = await Bus.connect(nats_server.url, name="cachestate-coalescing")
    # A gathering window wide enough for eight requests sent together on a busy 2-core machine.
    cs = CacheStateService(replace(SETTINGS, view_snapshot_gather_ms=200.0), bus, part_bytes=2048)
    await cs.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            # A long digest period: the worker stays live while the test waits out gathering windows.
            w = await stack.enter_async_context(fake_worker(nats_server.url, period_ms=10_000.0))
            w.kv, w.emb = {f"user-{i}": i for i in range(200)}, set(range(3000))
            await w.send_snapshot()
            await eventually(lambda: cs.index.sizes() == (200, 3000, 200, 1) and cs.tracker.is_verified("w1"))
            clients = [await stack.enter_async_context(view_client(nats_server.url)) for _ in range(8)]
            acks = await asyncio.gather(*(c.ask() for c in clients))
            # The first request gathers the others for view_snapshot_gather_ms: one broadcast for all.
            assert (cs.counters.view_snapshots, cs.counters.view_snapshots_coalesced) == (1, 7)
            assert len({(a.seq, a.parts) for a in acks}) == 1 and acks[0].parts > 10
            # A request after that gets a snapshot of its own, with what changed since.
            await w.send(kv_upserts=[s.KvEntry("late-user", 7)])
            await eventually(lambda: cs.index.kv_workers("late-user") == {"w1": 7})
            fresh = await clients[0].ask()
            assert fresh.seq > acks[0].seq
            assert (cs.counters.view_snapshots, cs.counters.view_snapshots_coalesced) == (2, 7)
    finally:
        await cs.stop()
        await bus.close()


@dataclass
class ViewClient:
    bus: Bus

    async def ask(self) -> s.ViewSnapshotAck:
        raw = await self.bus.request(
            s.VIEW_SNAPSHOT_SUBJECT, s.encode(s.ViewSnapshotRequest(requester="t")), timeout_s=5
        )
        return s.decode(s.decoder(s.ViewSnapshotAck), raw)


@contextlib.asynccontextmanager
async def view_client(url: str) -> AsyncIterator[ViewClient]:
    """Asks for view snapshots by hand (eight real gateways would each ask at start on their own)."""
    bus = await Bus.connect(url, name="view-client")
    try:
        yield ViewClient(bus)
    finally:
        await bus.close()


async def test_just_after_a_start_view_snapshots_wait_for_the_workers(nats_server: Any) -> None:
    settings = replace(SETTINGS, view_warmup_ms=600.0)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(view_client(nats_server.url))
        gw = await stack.enter_async_context(gateway(nats_server.url))
        w1 = await stack.enter_async_context(fake_worker(nats_server.url, period_ms=10_000.0))
        w2 = await stack.enter_async_context(fake_worker(nats_server.url, worker_id="w2", period_ms=10_000.0))
        w1.kv, w2.kv = {"a": 3}, {"b": 4}
        cs = await stack.enter_async_context(running_cachestate(nats_server.url, settings))
        started = time.monotonic()
        await w1.send_snapshot()
        asked = asyncio.create_task(client.ask())  # asking at once, before w2 has been heard from
        await asyncio.sleep(0.2)
        await w2.send_snapshot()
        ack = await asked
        assert time.monotonic() - started >= 0.55
        assert ack.source == cs.source
        await eventually(lambda: gw.replica.in_sync and gw.replica.seq >= ack.seq + ack.parts - 1)
        assert set(gw.replica.workers) == {"w1", "w2"}  # the snapshot lists both
        assert gw.replica.index.kv_workers("b") == {"w2": 4}
        # Past the warm-up a snapshot is answered after the short gathering window only.
        t0 = time.monotonic()
        await client.ask()
        assert time.monotonic() - t0 < 0.5


async def test_garbage_on_the_digest_subject_is_counted_and_dropped(nats_server: Any) -> None:
    async with running_cachestate(nats_server.url) as cs, fake_worker(nats_server.url) as w:
        await w.bus.publish(s.digest_subject("w1"), b"\x00 not msgpack")
        await w.bus.publish(s.digest_subject("w1"), s.encode(s.KvEntry("x", 1)))  # another message type
        good = s.WorkerDigest(
            worker_id="w2", incarnation="i", seq=0, kind="snapshot", sent_at_ms=0, period_ms=100
        )
        await w.bus.publish(s.digest_subject("w1"), s.encode(good))  # body names another worker
        bad_utf8 = s.encode(replace_str(good, worker_id="w1", incarnation="MARK")).replace(
            b"MARK", b"\xff\xfe\xfd\xfc"
        )
        await w.bus.publish(s.digest_subject("w1"), bad_utf8)
        await w.send_snapshot()
        await eventually(lambda: cs.tracker.is_live("w1"))
        await eventually(lambda: cs.counters.bad_messages == 4)
        assert not cs.tracker.is_live("w2")
        assert cs.tracker.counters.digests_applied >= 1


async def test_a_garbled_view_snapshot_request_gets_an_error_reply(nats_server: Any) -> None:
    async with running_cachestate(nats_server.url) as cs, view_client(nats_server.url) as client:
        for garbled in (
            b"\x00 not msgpack",
            s.encode(s.ViewSnapshotRequest(requester="MARK")).replace(b"MARK", b"\xff\xfe\xfd\xfc"),
        ):
            with pytest.raises(RemoteError) as err:
                await client.bus.request(s.VIEW_SNAPSHOT_SUBJECT, garbled, timeout_s=5)
            assert (err.value.code, err.value.kind) == ("bad_message", ErrorKind.CLIENT)
        assert cs.counters.bad_messages == 2 and cs.counters.view_snapshots == 0
        assert isinstance(await client.ask(), s.ViewSnapshotAck)  # and it still answers good ones


async def test_features_arrive_for_a_live_worker(nats_server: Any) -> None:
    reports: list[s.FeatureReport] = []
    async with running_cachestate(nats_server.url) as cs, fake_worker(nats_server.url) as w:

        async def on_features(msg: Message) -> None:
            reports.append(s.decode(s.decoder(s.FeatureReport), msg.data))

        await w.bus.subscribe(s.FEATURES_SUBJECT, on_features)
        window = s.WindowStats(
            window_ms=100.0,
            requests=5,
            kv_hit_requests=2,
            history_tokens=50,
            max_history_tokens=20,
            new_tokens=10,
            emb_hits=3,
            emb_misses=1,
            latency_p99_ms=7.5,
            slo_violations=1,
        )
        await w.send_snapshot()
        await eventually(lambda: cs.tracker.is_verified("w1"))  # an unverified worker's window is not counted
        await w.send(window=window, alpha=0.4, alpha_target=0.5)
        await eventually(lambda: any(r.workers and r.workers[0].window_ms for r in reports), timeout_s=3.0)
        report = next(r for r in reports if r.workers and r.workers[0].window_ms)
        assert report.source == cs.source
        (f,) = report.workers
        assert (f.worker_id, f.window_ms, f.request_rate) == ("w1", 100.0, 50.0)
        assert (f.hot_user_share, f.mean_history, f.max_history, f.new_token_fraction) == (0.4, 10.0, 20, 0.2)
        assert (f.emb_hit_rate, f.p99_latency_ms, f.slo_violation_rate) == (0.75, 7.5, 0.2)
        assert (f.alpha, f.alpha_target) == (0.4, 0.5)
        assert [r.seq for r in reports] == list(range(reports[0].seq, reports[0].seq + len(reports)))


async def test_metrics_and_healthz(nats_server: Any) -> None:
    port = free_port()
    settings = replace(SETTINGS, metrics_port=port, metrics_host="127.0.0.1")
    async with running_cachestate(nats_server.url, settings) as cs, fake_worker(nats_server.url) as w:
        w.kv = {"a": 1}
        await w.send_snapshot()
        await w.bus.publish(s.digest_subject("w1"), b"junk")
        await eventually(lambda: cs.counters.bad_messages == 1 and cs.tracker.is_verified("w1"))
        await eventually(lambda: not cs.tracker.needs_snapshot("w1"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
                health = await resp.json()
    assert health == {"status": "ok", "source": cs.source, "workers_live": 1}
    for line in (
        "onepool_cachestate_index_kv_placements 1.0",
        "onepool_cachestate_digests_applied_total 2.0",  # the join snapshot and the one asked for
        "onepool_cachestate_bad_messages_total 1.0",
        "onepool_cachestate_workers_live 1.0",
        "onepool_cachestate_workers_verified_total 1.0",
        "onepool_cachestate_workers_unverified 0.0",
        'onepool_cachestate_evictions_total{kind="kv"} 0.0',
        "onepool_cachestate_seq_gaps_total 0.0",
        "onepool_cachestate_snapshots_requested_total 1.0",
        "onepool_cachestate_repairs_total 0.0",
        "onepool_cachestate_workers_dead_total 0.0",
    ):
        assert line in text, line
    assert 'onepool_cachestate_worker_staleness_seconds{worker="w1"}' in text


async def test_per_worker_metrics_follow_the_live_workers(nats_server: Any) -> None:
    settings = replace(SETTINGS, metrics_port=free_port(), metrics_host="127.0.0.1")
    async with running_cachestate(nats_server.url, settings) as cs, fake_worker(nats_server.url) as w:
        assert cs.metrics_server is not None
        url = cs.metrics_server.url + "/metrics"
        await w.send_snapshot()
        await eventually(lambda: cs.tracker.is_verified("w1"))
        digest = {
            "alpha": 0.4,
            "alpha_target": 0.5,
            "load": s.LoadInfo(queue_depth=2, in_flight=3, max_queue=8, requests_total=5, errors_total=1),
            "stats": s.PoolStats(
                emb_hits=30,
                emb_misses=10,
                kv_hits=4,
                kv_misses=1,
                critical_refill_bytes=64,
                prefetch_bytes=4096,
            ),
            "window": s.WindowStats(window_ms=100.0, requests=5, emb_hits=3, emb_misses=1, slo_violations=1),
        }

        async def keep_sending() -> None:  # a live worker: a digest every period
            while True:
                await w.send(**digest)
                await asyncio.sleep(0.05)

        sending = asyncio.create_task(keep_sending())
        async with aiohttp.ClientSession() as http:

            async def scrape() -> dict[str, float]:
                async with http.get(url) as resp:
                    return samples(await resp.text())

            try:
                deadline = time.monotonic() + 5
                while 'onepool_cachestate_worker_slo_violation_ratio{worker="w1"}' not in (
                    got := await scrape()
                ):
                    assert time.monotonic() < deadline, "no feature window for w1"
                    await asyncio.sleep(0.05)
            finally:
                sending.cancel()
            W = "onepool_cachestate_worker_"
            expected = {
                f'{W}alpha{{worker="w1"}}': 0.4,
                f'{W}alpha_target{{worker="w1"}}': 0.5,
                f'{W}queue_depth{{worker="w1"}}': 2,
                f'{W}max_queue{{worker="w1"}}': 8,
                f'{W}requests_total{{worker="w1"}}': 5,
                f'{W}errors_total{{worker="w1"}}': 1,
                f'{W}emb_hits_total{{worker="w1"}}': 30,
                f'{W}kv_misses_total{{worker="w1"}}': 1,
                f'{W}refill_bytes_total{{mode="critical",worker="w1"}}': 64,
                f'{W}refill_bytes_total{{mode="background",worker="w1"}}': 4096,
                f'{W}in_sync{{worker="w1"}}': 1,
                f'{W}emb_hit_ratio{{worker="w1"}}': 0.75,
                f'{W}slo_violation_ratio{{worker="w1"}}': 0.2,
            }
            assert {k: got.get(k) for k in expected} == expected
            # Silent: declared dead, fenced and purged; its series go with it.
            await eventually(lambda: cs.tracker.counters.workers_dead == 1, timeout_s=3.0)
            assert not [k for k in await scrape() if 'worker="w1"' in k]


async def test_stop_ends_every_task(nats_server: Any) -> None:
    bus = await Bus.connect(nats_server.url, name="cachestate-stop")
    cs = CacheStateService(SETTINGS, bus)
    await cs.start()
    async with fake_worker(nats_server.url, answer=False) as w:
        await w.send(skip=3)  # starts a snapshot-request task that nobody answers
        await eventually(lambda: cs.counters.snapshot_requests >= 1)
        await cs.stop()
    assert len(cs._tasks) == 0 and cs._tasks.failures == []
    await bus.close()


async def test_liveness_is_suspended_while_cachestate_is_cut_off(nats_server: Any) -> None:
    # cachestate's own connection goes down for longer than dead_after_periods x period; when it is back,
    # nobody is fenced for the silence its disconnection caused.
    settings = replace(SETTINGS, reconnect_grace_ms=1000.0)
    bus = await Bus.connect(nats_server.url, name="cachestate-cut-off", reconnect_time_wait_s=0.1)
    cs = CacheStateService(settings, bus)
    await cs.start()
    try:
        async with fake_worker(nats_server.url, period_ms=100.0) as w:
            await w.send_snapshot()
            await eventually(lambda: cs.tracker.is_verified("w1") and not cs.tracker.needs_snapshot("w1"))
            nats_server.stop()
            await eventually(lambda: not bus.is_connected)
            await asyncio.sleep(0.6)  # the outage itself: 6 digest periods without a word
            nats_server.start()
            await eventually(lambda: bus.is_connected and w.bus.is_connected, timeout_s=10)
            await eventually(lambda: cs.counters.liveness_suspensions == 1 and not cs._suspended)
            for _ in range(5):  # the worker goes on digesting after the outage, as a live one does
                await w.send()
                await asyncio.sleep(0.05)
            assert cs.tracker.is_live("w1") and cs.tracker.counters.workers_dead == 0
    finally:
        await cs.stop()
        await bus.close()


# ---- with a real worker ----------------------------------------------------------------------------------
async def test_a_real_workers_kv_reaches_a_gateway_replica(nats_server: Any) -> None:
    async with running_cachestate(nats_server.url) as cs, gateway(nats_server.url) as gw:
        async with running_worker(nats_server.url) as worker:
            await eventually(lambda: ranked(gw) == ["wtest"])
            reply = await worker.infer(user_id="alice", history=[11, 12, 13, 14, 15], candidates=[1, 2])
            assert reply.ok is not None
            await eventually(lambda: gw.replica.index.kv_length("alice", "wtest") == 5)
            bit = gw.replica.index.worker_bit("wtest")
            assert bit is not None
            assert all(m & (1 << bit) for m in gw.replica.index.emb_masks([11, 12, 13, 14, 15]))
            assert gw.replica.in_sync and gw.ready
            # The worker stops: its goodbye digest says draining, then silence fences it.
        await eventually(lambda: "wtest" not in gw.replica.workers, timeout_s=3.0)
        assert gw.replica.index.kv_workers("alice") == {} and ranked(gw) == []
        assert cs.tracker.counters.gaps == 0


async def test_a_late_cachestate_asks_a_real_worker_for_its_snapshot(nats_server: Any) -> None:
    async with running_worker(nats_server.url) as worker:
        reply = await worker.infer(user_id="bob", history=[1, 2, 3], candidates=[4])
        assert reply.ok is not None
        async with running_cachestate(nats_server.url) as cs, gateway(nats_server.url) as gw:
            await eventually(lambda: cs.index.kv_length("bob", "wtest") == 3)
            assert cs.counters.snapshot_requests == 1
            assert cs.tracker.counters.new_workers == 1 and cs.tracker.is_verified("wtest")
            await synced(gw)
            assert gw.replica.index.kv_workers("bob") == {"wtest": 3} and ranked(gw) == ["wtest"]


async def test_a_real_worker_answers_a_garbled_snapshot_request_with_an_error(nats_server: Any) -> None:
    async with running_worker(nats_server.url) as worker, view_client(nats_server.url) as client:
        subject = s.snapshot_request_subject("wtest")
        garbled = s.encode(s.SnapshotRequest(reason="MARK")).replace(b"MARK", b"\xff\xfe\xfd\xfc")
        with pytest.raises(RemoteError) as err:
            await client.bus.request(subject, garbled, timeout_s=5)
        assert (err.value.code, err.value.kind) == ("bad_message", ErrorKind.CLIENT)
        assert worker.service.counters.bad_messages == 1
        ack = s.decode(
            s.decoder(s.SnapshotAck),
            await client.bus.request(subject, s.encode(s.SnapshotRequest()), timeout_s=5),
        )
        assert ack.worker_id == "wtest"


async def test_liveness_is_suspended_while_cachestate_cannot_hear_itself(nats_server: Any) -> None:
    # nats-server frozen (SIGSTOP): nobody's connection drops, nobody hears anything. cachestate notices
    # that its own echo does not come back and judges nobody until it does.
    settings = replace(SETTINGS, reconnect_grace_ms=1000.0)
    async with running_cachestate(nats_server.url, settings) as cs, fake_worker(nats_server.url) as w:
        await w.send_snapshot()
        await eventually(lambda: cs.tracker.is_verified("w1") and not cs.tracker.needs_snapshot("w1"))
        assert nats_server._proc is not None
        pid = nats_server._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await eventually(lambda: cs._suspended, timeout_s=5)  # within DEAF_AFTER_CHECKS x 20 ms
            await asyncio.sleep(0.5)  # frozen for well over 3 digest periods of 100 ms
        finally:
            os.kill(pid, signal.SIGCONT)
        await eventually(lambda: not cs._suspended, timeout_s=5)
        for _ in range(5):  # the worker goes on digesting, as a live one does
            await w.send()
            await asyncio.sleep(0.05)
        assert cs.tracker.is_live("w1") and cs.tracker.counters.workers_dead == 0
        assert cs.counters.liveness_suspensions == 1 and cs.bus.is_connected
