"""Open-loop replay of a request stream against the gateway: each request leaves at its trace time.

A request is sent at ``t0 + t`` (its trace time) whether or not earlier ones were answered, and its latency
runs from that scheduled moment, so a stalled gateway shows in the figures instead of slowing the replay
down (no coordinated omission). The body is built before the wait, off the clock. When the replay falls
behind (this process could not send on time) the lag is kept per request (``send_lag_ms``) and counts in
the latency, as it would for a real client.

Each request ends in one :class:`ReplayRecord` (JSON Lines with :func:`write_records`): its scheduled
time, latency, HTTP status (0: no answer within ``timeout_s``), the error code of a JSON error body, and for
a 200 the worker, cached/computed tokens and EMB hits/misses the gateway reported, the worker's wait for
its model thread, its batch's time and size (``worker_queue_ms``, ``worker_compute_ms``, ``batch_size``), and
the gateway's own ``latency_ms`` (``gateway_ms``: the request's time inside the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from bench.http_client import HttpProtocolError, KeepAliveHttpClient
from workloads.trace import TraceRequest

__all__ = ["Progress", "ReplayRecord", "read_records", "replay", "write_records"]

RECOMMEND = "/v1/recommend"


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    t: float  # scheduled send time, seconds from the start of the replay (the trace's t)
    latency_ms: float  # from the scheduled send time to the answer (or to giving up)
    status: int  # HTTP status; 0: no answer
    code: str = ""  # error code of a JSON error body; "no_answer" when status is 0
    worker: str = ""
    cached_tokens: int = 0
    computed_tokens: int = 0
    emb_hits: int = 0
    emb_misses: int = 0
    gateway_ms: float = 0.0  # the gateway's own latency_ms (a 200 only)
    worker_queue_ms: float = 0.0  # the worker's wait for its model thread (a 200 only)
    worker_compute_ms: float = 0.0  # the batch it was served in (a 200 only)
    batch_size: int = 0  # requests in that batch (a 200 only)
    send_lag_ms: float = 0.0  # how late this process sent it (0 when on time)

    @property
    def ok(self) -> bool:
        return self.status == 200


class _Answer(msgspec.Struct):
    """The fields of a 200 answer a record keeps (the rest is ignored)."""

    worker: str = ""
    cached_tokens: int = 0
    computed_tokens: int = 0
    emb_hits: int = 0
    emb_misses: int = 0
    worker_queue_ms: float = 0.0
    worker_compute_ms: float = 0.0
    batch_size: int = 0
    latency_ms: float = 0.0


class _ErrorBody(msgspec.Struct):
    code: str = ""


class _Error(msgspec.Struct):
    error: _ErrorBody | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)
_error_decoder = msgspec.json.Decoder(_Error)
_body_encoder = msgspec.json.Encoder()


def _record(t: float, latency_ms: float, lag_ms: float, status: int, body: bytes) -> ReplayRecord:
    if status == 200:
        try:
            a = _answer_decoder.decode(body)
        except msgspec.DecodeError:
            return ReplayRecord(t, latency_ms, status, "bad_answer", send_lag_ms=lag_ms)
        return ReplayRecord(
            t,
            latency_ms,
            status,
            worker=a.worker,
            cached_tokens=a.cached_tokens,
            computed_tokens=a.computed_tokens,
            emb_hits=a.emb_hits,
            emb_misses=a.emb_misses,
            gateway_ms=a.latency_ms,
            worker_queue_ms=a.worker_queue_ms,
            worker_compute_ms=a.worker_compute_ms,
            batch_size=a.batch_size,
            send_lag_ms=lag_ms,
        )
    try:
        err = _error_decoder.decode(body).error
        code = err.code if err is not None else "no_error_body"
    except msgspec.DecodeError:
        code = "not_json"
    return ReplayRecord(t, latency_ms, status, code, send_lag_ms=lag_ms)


@dataclass
class Progress:
    """Counts the replay updates; `line()` is what the progress display shows."""

    total_s: float
    t0: float = field(default_factory=time.perf_counter)
    sent: int = 0
    answered: int = 0
    failed: int = 0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        return (
            f"sent {self.sent}  answered {self.answered}  failed {self.failed}  "
            f"{elapsed:5.1f} / {self.total_s:.1f} s"
        )


async def _show(progress: Progress, label: str, out: IO[str], period_s: float) -> None:
    """Print the progress line every `period_s` (in place on a terminal; one line per 10 s otherwise)."""
    tty = out.isatty()
    every = 1 if tty else max(1, round(10.0 / period_s))
    n = 0
    while True:
        await asyncio.sleep(period_s)
        n += 1
        if tty:
            out.write(f"\r  {label}: {progress.line()}   ")
            out.flush()
        elif n % every == 0:
            out.write(f"  {label}: {progress.line()}\n")
            out.flush()


async def replay(
    requests: Iterable[TraceRequest],
    host: str,
    port: int,
    *,
    duration_s: float,
    timeout_s: float = 10.0,
    label: str = "replay",
    progress_out: IO[str] | None = None,
    progress_period_s: float = 1.0,
    on_start: Callable[[float], None] | None = None,
) -> list[ReplayRecord]:
    """Send every request at its time ``t`` (seconds after the start), never waiting for answers; return
    the records once every answer is in (each bounded by ``timeout_s``), in order of ``t``.

    ``duration_s`` is the length shown by the progress line (the source's duration). ``on_start`` gets the
    start moment (``time.monotonic()``) so that other timelines (the digests) share the replay's clock."""
    client = KeepAliveHttpClient(host, port)
    records: list[ReplayRecord] = []
    inflight: set[asyncio.Task[None]] = set()
    out = sys.stdout if progress_out is None else progress_out
    t0 = time.perf_counter()
    progress = Progress(duration_s, t0)
    shower = asyncio.create_task(_show(progress, label, out, progress_period_s), name="replay-progress")
    if on_start is not None:
        on_start(time.monotonic())

    async def one(request: bytes, t: float, lag_ms: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                status, body = await client.send(request)
        except (TimeoutError, OSError, HttpProtocolError):
            latency = (time.perf_counter() - t0 - t) * 1e3
            records.append(ReplayRecord(t, latency, 0, "no_answer", send_lag_ms=lag_ms))
            progress.failed += 1
            return
        latency = (time.perf_counter() - t0 - t) * 1e3
        rec = _record(t, latency, lag_ms, status, body)
        records.append(rec)
        if rec.ok:
            progress.answered += 1
        else:
            progress.failed += 1

    try:
        it: Iterator[TraceRequest] = iter(requests)
        for req in it:
            request = client.request_bytes(RECOMMEND, _body_encoder.encode(req.body()))
            delay = req.t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            lag_ms = max(0.0, (time.perf_counter() - t0 - req.t) * 1e3)
            task = asyncio.create_task(one(request, req.t, lag_ms))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            progress.sent += 1
        if inflight:
            await asyncio.wait(set(inflight))
    finally:
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        shower.cancel()
        await asyncio.gather(shower, return_exceptions=True)
        if out.isatty():
            out.write("\n")
        out.write(f"  {label}: {progress.line()} (done)\n")
        out.flush()
        with contextlib.suppress(Exception):
            await client.close()
    records.sort(key=lambda r: r.t)
    return records


def write_records(path: Path, records: Iterable[ReplayRecord]) -> int:
    """One JSON object per line; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), separators=(",", ":")) + "\n")
            n += 1
    return n


def read_records(path: Path) -> list[ReplayRecord]:
    with path.open(encoding="utf-8") as f:
        rows: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]
    return [ReplayRecord(**row) for row in rows]
