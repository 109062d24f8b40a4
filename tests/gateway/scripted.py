"""A scripted cluster around the REAL gateway, in-process: for fast tests of its failure handling.

Everything talks over a real nats-server (the ``nats_server`` fixture) and real HTTP:

* the gateway is ``Gateway`` + ``build_app`` + ``serve_http`` on 127.0.0.1 and a free port, with its own
  ``Bus`` and small timeouts (``HARNESS_SETTINGS``), so a failure path takes a fraction of a second;
  ``serve_http`` gets the settings' connection limit, idle timeout and Retry-After, as ``onepool gateway``
  passes them (services/gateway/main.py);
* ``ScriptedCachestate`` stands in for cachestate's view: it answers ``VIEW_SNAPSHOT_SUBJECT`` requests
  with a ``ViewSnapshotAck`` after publishing a one-part snapshot on ``VIEW_SUBJECT`` that lists the
  scripted workers, can ignore the first N requests (acked, but no snapshot follows: a lost snapshot) and
  publishes deltas on demand; it is silent otherwise, unless told to send heartbeats (empty deltas, as
  cachestate does every ``CACHESTATE_VIEW_HEARTBEAT_MS``) until told to stop;
* ``ScriptedWorker`` answers on its real subject (``infer_subject(id)``) as its ``behaviour`` says, and
  records what it got; every worker also appends its id to one shared list, so a test sees which workers
  were tried and in which order.

The ranking is made deterministic through the view's load figures (``ranked_load``), not by reaching into
the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from multidict import CIMultiDictProxy
from opentelemetry.trace import Tracer
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.service import Gateway, build_app, serve_http
from services.gateway.settings import GatewaySettings
from shared import schemas as s
from shared.bus import Bus, Message
from tests.helpers import eventually, free_port

HOST = "127.0.0.1"

# Small timeouts: a request that fails everywhere ends in well under a second.
HARNESS_SETTINGS: dict[str, Any] = {
    "instance": "gw-scripted",
    "request_timeout_ms": 600.0,
    "attempt_timeout_ms": 200.0,
    "max_attempts": 3,
    "retry_after_s": 3,  # not the default (1), so a test sees the setting travel into the header
    "snapshot_retry_ms": 50.0,
}

DEFAULT_BODY: dict[str, Any] = {"user_id": "u-1", "history": [1, 2, 3], "candidates": [10, 11, 12], "k": 2}

# How a scripted worker answers an InferenceRequest:
#   ok            a valid InferenceReply with an InferenceResult (the first k candidates)
#   retry_error   an ErrorBody kind "retry", code "overloaded" (try the next worker)
#   client_error  an ErrorBody kind "client", code "invalid_request", naming `client_field`
#   sleep         waits `sleep_s` (past any harness deadline) before answering ok; released at teardown
#   garbage       bytes that are not msgpack
#   absent        never subscribes: the gateway's request gets "no responders" from nats-server
Behaviour = Literal["ok", "retry_error", "client_error", "sleep", "garbage", "absent"]

GARBAGE_REPLY = b"\xc1 this is not msgpack"  # 0xc1 is never used by msgpack

_decode_request = s.decoder(s.InferenceRequest)


class HasUrl(Protocol):
    """What the harness needs of the ``nats_server`` fixture."""

    url: str


def ranked_load(rank: int) -> s.LoadInfo:
    """A load the router ranks by `rank` (0 first) whatever the policy's other terms (the scripted workers
    report no cost coefficients, so only the queue counts): ``queue_ms = queue_depth * ewma / (1 +
    queue_depth) = 1000 * rank`` ms, far beyond the router's 1% tie band. Below the overload guard
    (queue_depth < 256) for rank <= 25."""
    if not 0 <= rank <= 25:
        raise ValueError(f"rank must be in 0..25, got {rank}")
    depth = 10 * rank
    return s.LoadInfo(queue_depth=depth, ewma_latency_ms=100.0 * (1 + depth))


class ScriptedWorker:
    """A stand-in worker answering on ``infer_subject(worker_id)`` as ``behaviour`` says.

    ``rank`` sets the load it reports through the scripted view (see ``ranked_load``); change it and
    publish a delta to re-rank it. ``load``, when given, is reported instead (e.g. a ``max_queue``, an
    ``ewma_service_ms``). ``requests`` holds every request it received, in order.
    """

    def __init__(
        self,
        worker_id: str,
        behaviour: Behaviour = "ok",
        *,
        rank: int = 0,
        sleep_s: float = 5.0,
        client_field: str = "candidates[2]",
        load: s.LoadInfo | None = None,
    ) -> None:
        self.worker_id = s.check_worker_id(worker_id)
        self.behaviour: Behaviour = behaviour
        self.rank = rank
        self.load = load
        self.sleep_s = sleep_s
        self.client_field = client_field
        self.requests: list[s.InferenceRequest] = []
        self.tried: list[str] | None = None  # the cluster-wide log, set by the harness
        self._release = asyncio.Event()

    def state(self) -> s.WorkerState:
        """This worker's record in the scripted view."""
        load = ranked_load(self.rank) if self.load is None else self.load
        return s.WorkerState(worker_id=self.worker_id, incarnation=f"inc-{self.worker_id}", load=load)

    def release(self) -> None:
        """End every sleep now (teardown)."""
        self._release.set()

    async def handle(self, msg: Message) -> bytes:
        request = s.decode(_decode_request, msg.data)
        self.requests.append(request)
        if self.tried is not None:
            self.tried.append(self.worker_id)
        if self.behaviour == "garbage":
            return GARBAGE_REPLY
        if self.behaviour == "retry_error":
            error = s.ErrorBody(code="overloaded", message="scripted: queue full", kind="retry")
            return s.encode(
                s.InferenceReply(request_id=request.request_id, worker_id=self.worker_id, error=error)
            )
        if self.behaviour == "client_error":
            error = s.ErrorBody(
                code="invalid_request",
                message="scripted: item outside the catalogue",
                field=self.client_field,
                kind="client",
            )
            return s.encode(
                s.InferenceReply(request_id=request.request_id, worker_id=self.worker_id, error=error)
            )
        if self.behaviour == "sleep":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.sleep_s)
        return s.encode(self.ok_reply(request))

    def ok_reply(self, request: s.InferenceRequest) -> s.InferenceReply:
        k = request.k or len(request.candidates)
        items = list(request.candidates[:k])
        result = s.InferenceResult(
            items=items,
            scores=[float(len(items) - i) for i in range(len(items))],
            cached_tokens=0,
            computed_tokens=len(request.history) + len(request.candidates),
            emb_hits=0,
            emb_misses=0,
            queue_ms=0.0,
            compute_ms=1.0,
            total_ms=1.0,
        )
        return s.InferenceReply(request_id=request.request_id, worker_id=self.worker_id, ok=result)


class ScriptedCachestate:
    """Stands in for cachestate's routing view: snapshots on request (after ignoring the first
    ``ignore_snapshot_requests``), deltas on demand. The view lists ``workers`` (each one's ``state()``)."""

    SOURCE = "cachestate-scripted"

    def __init__(
        self, bus: Bus, workers: Sequence[ScriptedWorker], *, ignore_snapshot_requests: int = 0
    ) -> None:
        self.bus = bus
        self.workers = list(workers)
        self.ignore_snapshot_requests = ignore_snapshot_requests
        self.snapshot_requests = 0  # every request received, ignored ones included
        self.snapshots_published = 0
        self.seq = 0  # the next update's seq
        self.heartbeats_published = 0
        self._decode_request = s.decoder(s.ViewSnapshotRequest)
        self._heartbeats: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.bus.subscribe(s.VIEW_SNAPSHOT_SUBJECT, self._on_snapshot_request)

    async def _on_snapshot_request(self, msg: Message) -> bytes:
        s.decode(self._decode_request, msg.data)  # a malformed request fails the test (handler error)
        self.snapshot_requests += 1
        first = self.seq
        if self.snapshot_requests > self.ignore_snapshot_requests:
            # As cachestate does: publish the snapshot, then ack (the requester already listens to the view).
            snapshot = s.ViewUpdate(
                source=self.SOURCE,
                seq=first,
                kind="snapshot",
                part=0,
                parts=1,
                sent_at_ms=time.time() * 1e3,
                workers=[w.state() for w in self.workers],
            )
            self.seq += 1
            await self.bus.publish(s.VIEW_SUBJECT, s.encode(snapshot))
            self.snapshots_published += 1
        # An ignored request is acked too but no snapshot follows (a lost snapshot): the gateway must ask
        # again on its own. (Not answering at all would cost the gateway's fixed 2 s request timeout.)
        return s.encode(s.ViewSnapshotAck(source=self.SOURCE, seq=first, parts=1))

    async def publish_delta(
        self, workers: Sequence[ScriptedWorker] = (), workers_removed: Sequence[str] = ()
    ) -> int:
        """Publish a delta with these workers' current records (and removals); returns its seq."""
        seq = self.seq
        self.seq += 1
        delta = s.ViewUpdate(
            source=self.SOURCE,
            seq=seq,
            kind="delta",
            sent_at_ms=time.time() * 1e3,
            workers=[w.state() for w in workers],
            workers_removed=list(workers_removed),
        )
        await self.bus.publish(s.VIEW_SUBJECT, s.encode(delta))
        return seq

    async def heartbeat(self) -> int:
        """Publish one heartbeat (an empty delta, what cachestate sends when nothing changed); its seq."""
        seq = await self.publish_delta()
        self.heartbeats_published += 1
        return seq

    def start_heartbeats(self, period_s: float) -> None:
        """Send a heartbeat every `period_s` until ``stop_heartbeats`` (or teardown)."""
        if self._heartbeats is not None:
            raise RuntimeError("heartbeats already running")

        async def beat() -> None:
            while True:
                await self.heartbeat()
                await asyncio.sleep(period_s)

        self._heartbeats = asyncio.get_running_loop().create_task(beat(), name="scripted-heartbeats")

    async def stop_heartbeats(self) -> None:
        """No heartbeat is published after this returns (cachestate falls silent)."""
        task, self._heartbeats = self._heartbeats, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # decoded JSON, or the text when the answer is not JSON
    headers: CIMultiDictProxy[str]
    elapsed_s: float


@dataclass
class Harness:
    gateway: Gateway
    settings: GatewaySettings
    cachestate: ScriptedCachestate
    workers: dict[str, ScriptedWorker]
    tried: list[str]  # worker ids in the order their requests arrived (absent workers never appear)
    http: aiohttp.ClientSession
    base_url: str
    cluster: Bus  # the scripted side's connection (workers, cachestate)
    port: int  # the gateway's HTTP port on HOST (for raw connections)

    async def attach(self, worker: ScriptedWorker) -> None:
        """Subscribe `worker` on its subject now (an "absent" worker coming up; set its behaviour first).
        It joins the shared `tried` log; the view is not changed (it may list the worker already)."""
        worker.tried = self.tried
        self.workers[worker.worker_id] = worker
        await self.cluster.subscribe(s.infer_subject(worker.worker_id), worker.handle)

    async def recommend(self, body: dict[str, Any] | None = None, **kwargs: Any) -> Answer:
        """POST /v1/recommend (``DEFAULT_BODY`` unless given; extra kwargs go to aiohttp, e.g. ``data``)."""
        if "data" not in kwargs:
            kwargs["json"] = DEFAULT_BODY if body is None else body
        return await self._call("POST", "/v1/recommend", **kwargs)

    async def get(self, path: str) -> Answer:
        return await self._call("GET", path)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Answer:
        t0 = time.perf_counter()
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            text = await resp.text()
            body: Any = (
                await resp.json(content_type=None) if resp.content_type == "application/json" else text
            )
            return Answer(resp.status, body, resp.headers, time.perf_counter() - t0)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample's value from GET /metrics (0.0 when the labelled child was never touched)."""
        answer = await self.get("/metrics")
        assert answer.status == 200
        for family in text_string_to_metric_families(answer.body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    async def attempts(self, outcome: str) -> float:
        """``onepool_gateway_attempts_total{outcome=...}`` from /metrics."""
        return await self.metric("onepool_gateway_attempts_total", outcome=outcome)

    async def wait_for_update(self, seq: int) -> None:
        """Until the gateway's replica has taken in the scripted update numbered `seq` (applied, or skipped
        as out of sync: a test then sees the view unchanged)."""
        await eventually(lambda: self.gateway.replica.seq >= seq)

    async def wait_for_view(self, snapshots: int = 1) -> None:
        """Until the gateway's replica has applied `snapshots` scripted snapshots (its view then lists the
        scripted workers)."""
        await eventually(lambda: self.gateway.replica.snapshots_applied >= snapshots)


@contextlib.asynccontextmanager
async def scripted_gateway(
    nats: HasUrl,
    workers: Sequence[ScriptedWorker],
    *,
    ignore_snapshot_requests: int = 0,
    wait_for_view: bool = True,
    tracer: Tracer | None = None,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """The real gateway serving HTTP on a free port, a scripted view and scripted workers on the bus.

    ``settings`` override ``HARNESS_SETTINGS`` (any ``GatewaySettings`` field; ``max_connections``,
    ``idle_timeout_ms`` and ``retry_after_s`` reach ``serve_http`` too). With ``wait_for_view`` the block
    starts once the gateway has applied the first snapshot. ``tracer``, when given, is the gateway's (its
    routing spans) and its HTTP middleware's.
    """
    port = free_port(HOST)
    config = GatewaySettings(
        **{**HARNESS_SETTINGS, **settings, "nats_url": nats.url, "host": HOST, "port": port}
    )
    tried: list[str] = []
    cluster = await Bus.connect(nats.url, name="scripted-cluster")
    gateway_bus: Bus | None = None
    cachestate: ScriptedCachestate | None = None
    harness: Harness | None = None
    try:
        for worker in workers:
            worker.tried = tried
            if worker.behaviour != "absent":
                await cluster.subscribe(s.infer_subject(worker.worker_id), worker.handle)
        cachestate = ScriptedCachestate(cluster, workers, ignore_snapshot_requests=ignore_snapshot_requests)
        await cachestate.start()
        gateway_bus = await Bus.connect(nats.url, name=config.instance)
        gateway = Gateway(config, gateway_bus, tracer=tracer)
        async with (
            serve_http(build_app(gateway, tracer), config),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        ):
            harness = Harness(
                gateway=gateway,
                settings=config,
                cachestate=cachestate,
                workers={w.worker_id: w for w in workers},
                tried=tried,
                http=http,
                base_url=f"http://{HOST}:{port}",
                cluster=cluster,
                port=port,
            )
            if wait_for_view:
                await harness.wait_for_view()
            yield harness
    finally:
        if cachestate is not None:
            await cachestate.stop_heartbeats()
        for worker in {*workers, *(harness.workers.values() if harness is not None else ())}:
            worker.release()
        await cluster.close()
        if gateway_bus is not None:
            await gateway_bus.close()


def assert_error(answer: Answer, status: int, code: str, field: str | None = None) -> None:
    """The documented error shape; every 503 carries Retry-After (the harness sets RETRY_AFTER_S=3)."""
    assert answer.status == status, answer.body
    assert isinstance(answer.body, dict) and set(answer.body) == {"error"}, answer.body
    error = answer.body["error"]
    assert set(error) == {"code", "message", "field"}, error
    assert error["code"] == code, error
    assert error["field"] == field, error
    assert isinstance(error["message"], str) and error["message"], error
    if status == 503:
        assert answer.headers.get("Retry-After") == str(HARNESS_SETTINGS["retry_after_s"]), dict(
            answer.headers
        )


def assert_served_by(answer: Answer, worker_id: str) -> None:
    assert answer.status == 200, answer.body
    assert answer.body["worker"] == worker_id
    assert answer.body["items"] == DEFAULT_BODY["candidates"][: DEFAULT_BODY["k"]]
