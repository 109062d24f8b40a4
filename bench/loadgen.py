"""An open-loop load generator against the gateway's HTTP API, for benchmarks and fault tests.

Open loop: requests leave at their scheduled times (Poisson arrivals at `rate`) whether or not earlier
ones were answered, and latency runs from the scheduled time, so a stalled gateway shows up in the figures
instead of slowing the generator down (no coordinated omission). Each request ends in one `Record`: its
HTTP status, the error code of a JSON error body, the worker of a 200, or status 0 when no answer came
(connection refused or reset, or nothing within `timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.http_client import HttpProtocolError, KeepAliveHttpClient

RECOMMEND = "/v1/recommend"


@dataclass(frozen=True, slots=True)
class Record:
    sent_s: float  # scheduled send time, seconds since the run started
    latency_ms: float  # from the scheduled send time to the answer (or to giving up)
    status: int  # HTTP status; 0: no answer
    code: str = ""  # the error code of a JSON error body ("" for a 200); "no_answer" when status is 0
    worker: str = ""  # who answered a 200

    @property
    def ok(self) -> bool:
        return self.status == 200


def returning_users(prefix: str, users: int = 32, seed: int = 0, items: int = 20_000) -> Iterator[bytes]:
    """Request bodies of `users` users who come back with histories that grow by 4 items a visit (KV hits
    after their first visit), 16 candidates each: an endless stream."""
    rng = np.random.default_rng(seed)
    histories: dict[int, list[int]] = {}
    while True:
        u = int(rng.integers(users))
        hist = histories.setdefault(u, [int(x) for x in rng.integers(0, items, 16)])
        hist.extend(int(x) for x in rng.integers(0, items, 4))
        if len(hist) > 256:
            del hist[:-16]
        body = {
            "user_id": f"{prefix}{u}",
            "history": hist,
            "candidates": [int(x) for x in rng.integers(0, items, 16)],
            "k": 4,
        }
        yield json.dumps(body).encode()


def _answer(status: int, body: bytes) -> tuple[str, str]:
    """(error code, worker) read from an answer's JSON body."""
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return ("" if status == 200 else "not_json"), ""
    if status == 200:
        return "", str(doc.get("worker", "")) if isinstance(doc, dict) else ""
    err = doc.get("error") if isinstance(doc, dict) else None
    return (str(err.get("code", "")) if isinstance(err, dict) else "no_error_body"), ""


@dataclass
class OpenLoop:
    """Poisson arrivals at `rate` per second until `stop()` (or for `duration_s`), bodies from `bodies`.

    `async with OpenLoop(...) as load:` runs it in the background; `records` fills as answers come."""

    host: str
    port: int
    rate: float
    bodies: Iterator[bytes]
    seed: int = 0
    timeout_s: float = 10.0
    duration_s: float | None = None
    records: list[Record] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        self._client = KeepAliveHttpClient(self.host, self.port)
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._t0 = 0.0

    def now_s(self) -> float:
        """Seconds since the run started (the clock of `Record.sent_s`)."""
        return time.perf_counter() - self._t0

    async def __aenter__(self) -> OpenLoop:
        self._t0 = time.perf_counter()
        self._runner = asyncio.create_task(self._run(), name="open-loop")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> list[Record]:
        """Stop sending, wait for the answers still due (each bounded by timeout_s), return the records."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._client.close()
        return self.records

    async def run(self) -> list[Record]:
        """Run to the end (duration_s) in the foreground."""
        async with self:
            if self._runner is not None:
                await self._runner
        return self.records

    async def _run(self) -> None:
        rng = np.random.default_rng(self.seed)
        at = 0.0
        while not self._stop.is_set():
            at += float(rng.exponential(1.0 / self.rate))
            if self.duration_s is not None and at >= self.duration_s:
                return
            delay = at - self.now_s()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
            request = self._client.request_bytes(RECOMMEND, next(self.bodies))
            task = asyncio.create_task(self._one(request, at))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            self.sent += 1

    async def _one(self, request: bytes, scheduled: float) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                status, body = await self._client.send(request)
        except (TimeoutError, OSError, HttpProtocolError):
            self.records.append(Record(scheduled, (self.now_s() - scheduled) * 1e3, 0, "no_answer"))
            return
        code, worker = _answer(status, body)
        self.records.append(Record(scheduled, (self.now_s() - scheduled) * 1e3, status, code, worker))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def summarise(
    records: list[Record], *, since_s: float = 0.0, until_s: float = float("inf")
) -> dict[str, Any]:
    """Counts and latency figures of the records sent within [since_s, until_s)."""
    window = [r for r in records if since_s <= r.sent_s < until_s]
    ok = [r.latency_ms for r in window if r.ok]
    failed = [r for r in window if not r.ok]
    codes: dict[str, int] = {}
    for r in failed:
        key = f"{r.status} {r.code}".strip()
        codes[key] = codes.get(key, 0) + 1
    return {
        "total_requests": len(window),
        "failed_requests": len(failed),
        "failures_by_status": codes,
        "p50_ms": percentile([r.latency_ms for r in window], 50),
        "p99_ms": percentile([r.latency_ms for r in window], 99),
        "ok_p99_ms": percentile(ok, 99),
    }


def recovery_s(records: list[Record], since_s: float) -> float:
    """Seconds from `since_s` until the last failed request sent after it: 0 when none failed."""
    failed = [r.sent_s for r in records if r.sent_s >= since_s and not r.ok]
    return max(failed) - since_s if failed else 0.0


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.loadgen --port P --rate R --duration S --out PATH`: an open-loop run in a process
    of its own (on uvloop when installed), so that its clock is not shared with a caller's event loop; the
    records go to PATH as JSON Lines."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--prefix", default="load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON Lines of the records")
    args = parser.parse_args(argv)

    async def run() -> list[Record]:
        load = OpenLoop(
            args.host,
            args.port,
            args.rate,
            returning_users(args.prefix, users=args.users, seed=args.seed),
            seed=args.seed,
            duration_s=args.duration,
        )
        return await load.run()

    try:
        import uvloop
    except ImportError:
        records = asyncio.run(run())
    else:
        records = uvloop.run(run())
    with open(args.out, "w") as out:
        for r in records:
            out.write(json.dumps([r.sent_s, r.latency_ms, r.status, r.code, r.worker]) + "\n")
    return 0


def read_records(path: str) -> list[Record]:
    """The records `main` wrote."""
    with open(path) as f:
        return [Record(*json.loads(line)) for line in f if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
