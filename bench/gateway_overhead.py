"""What the gateway adds: P99 through HTTP + routing + NATS minus P99 straight to the worker over NATS.

Both arms send the same shapes of request to one worker of a real local cluster (`LocalCluster`, as
`onepool up` runs it, with one worker), their requests dealt in turn from one open-loop Poisson stream:
the worker sees the stated rate, and both arms the same moments.
Latency is measured from the scheduled send time (no coordinated omission). The load generator runs on
uvloop, encodes every request before the stream starts, and by default sends HTTP with a minimal
keep-alive client (`bench.http_client`), so that the figure is what the gateway adds, not what a Python
HTTP client costs; `client="aiohttp"` measures through aiohttp's client instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np

from bench.http_client import KeepAliveHttpClient
from services.localcluster import ClusterSettings, GatewaySpec, LocalCluster, free_port
from shared import schemas as s
from shared.bus import Bus


def _bodies(n: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    """Returning users with growing histories (KV hits after the first visit) and 64 candidates."""
    rng = np.random.default_rng(seed)
    users = 32
    histories: dict[int, list[int]] = {}
    out = []
    for _ in range(n):
        u = int(rng.integers(users))
        hist = histories.setdefault(u, [int(x) for x in rng.integers(0, 20_000, 64)])
        hist.extend(int(x) for x in rng.integers(0, 20_000, 4))
        if len(hist) > 900:
            hist[:] = hist[-64:]
        cands = [int(x) for x in rng.integers(0, 20_000, 64)]
        out.append({"user_id": f"{prefix}{u}", "history": list(hist), "candidates": cands, "k": 10})
    return out


async def _open_loop(arms: list[Any], bodies: list[list[Any]], rate: float, seed: int) -> list[list[float]]:
    """One open-loop Poisson stream at `rate`, its arrivals dealt to the arms in turn: every arm sees the
    same load, the same moment and the same noise (sequential arms on a shared machine differ by more than
    the overhead measured). Latency is taken from the scheduled send time (no coordinated omission)."""
    rng = np.random.default_rng(seed)
    latencies: list[list[float]] = [[] for _ in arms]
    at = time.perf_counter()
    tasks = []

    async def one(arm: int, body: Any, scheduled: float) -> None:
        await arms[arm](body)
        latencies[arm].append((time.perf_counter() - scheduled) * 1e3)

    for i in range(sum(len(b) for b in bodies)):
        arm = i % len(arms)
        at += float(rng.exponential(1.0 / rate))
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arm, bodies[arm][i // len(arms)], at)))
    await asyncio.gather(*tasks)
    return latencies


HttpClientKind = Literal["lean", "aiohttp"]


async def _gateway_arm(
    stack: contextlib.AsyncExitStack, kind: HttpClientKind, host: str, port: int
) -> tuple[Callable[[bytes], bytes], Callable[[bytes], Awaitable[None]]]:
    """(prepare a JSON body, send one prepared request) for the chosen HTTP client."""
    path = "/v1/recommend"
    if kind == "lean":
        lean = await stack.enter_async_context(KeepAliveHttpClient(host, port))

        async def send_lean(request: bytes) -> None:
            status, body = await lean.send(request)
            if status != 200:
                raise RuntimeError(f"gateway answered {status}: {body[:200]!r}")

        return (lambda body: lean.request_bytes(path, body)), send_lean
    session = await stack.enter_async_context(aiohttp.ClientSession())
    url, headers = f"http://{host}:{port}{path}", {"Content-Type": "application/json"}

    async def send_aiohttp(body: bytes) -> None:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"gateway answered {resp.status}")

    return (lambda body: body), send_aiohttp


async def _measure(
    port: int, nats_url: str, *, rate: float, requests: int, repeats: int, client: HttpClientKind
) -> dict[str, Any]:
    dec = s.decoder(s.InferenceReply)
    subject = s.infer_subject("w0")
    direct_p99: list[float] = []
    gateway_p99: list[float] = []
    p50_overhead: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        bus = await Bus.connect(nats_url, name="bench-direct")
        stack.push_async_callback(bus.close)
        prepare, via_gateway = await _gateway_arm(stack, client, "127.0.0.1", port)

        async def direct(payload: bytes) -> None:
            reply = s.decode(dec, await bus.request(subject, payload, timeout_s=5))
            if reply.error is not None:
                raise RuntimeError(reply.error.message)

        for r in range(repeats):
            # Same shapes, fresh users per arm and repeat, both arms in one interleaved stream. Encoded
            # before the stream starts: the load generator's own serialisation is not measured.
            direct_bodies = [
                s.encode(s.InferenceRequest(request_id=f"b{i}", **b))
                for i, b in enumerate(_bodies(requests, f"d{r}-", r))
            ]
            gateway_bodies = [prepare(json.dumps(b).encode()) for b in _bodies(requests, f"g{r}-", r)]
            d, g = await _open_loop([direct, via_gateway], [direct_bodies, gateway_bodies], rate, 100 + r)
            direct_p99.append(float(np.percentile(d, 99)))
            gateway_p99.append(float(np.percentile(g, 99)))
            p50_overhead.append(float(np.percentile(g, 50) - np.percentile(d, 50)))
            print(
                f"  repeat {r + 1}/{repeats}: direct P99 {direct_p99[-1]:.2f} ms, "
                f"gateway P99 {gateway_p99[-1]:.2f} ms (P50 overhead {p50_overhead[-1]:.2f} ms)",
                flush=True,
            )
    overhead = [g - d for g, d in zip(gateway_p99, direct_p99, strict=True)]
    return {
        "gateway_overhead_p99_ms": float(np.median(overhead)),
        "gateway_p99_ms": float(np.median(gateway_p99)),
        "direct_p99_ms": float(np.median(direct_p99)),
        "gateway_overhead_p50_ms": float(np.median(p50_overhead)),
        "gateway_overhead_p99_runs_ms": overhead,
        "gateway_overhead_setup": {
            "rate_per_s": rate,
            "requests_per_arm": requests,
            "repeats": repeats,
            "arms": "interleaved in one Poisson stream at rate_per_s (the worker sees rate_per_s in all)",
            "http_client": client,
        },
    }


def _run(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """On uvloop when installed, as the services run: the load generator should cost as little as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def measure_gateway_overhead(
    *, rate: float, requests: int, repeats: int, client: HttpClientKind = "lean"
) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="onepool-bench-routing-") as logs:
            settings = ClusterSettings(
                workers=1,
                nats_port=free_port(),
                gateways=(GatewaySpec(port=free_port()),),
                alpha_policy="static:0.5",
                worker_env={"ONEPOOL_WORKER_NUM_ITEMS": "20000", "ONEPOOL_WORKER_BUDGET_MIB": "64"},
                log_dir=Path(logs),
                ready_timeout_s=180.0,
            )
            async with LocalCluster(settings) as cluster:
                return await _measure(
                    settings.gateways[0].port,
                    cluster.nats_url,
                    rate=rate,
                    requests=requests,
                    repeats=repeats,
                    client=client,
                )

    return _run(main())


if __name__ == "__main__":
    print(json.dumps(measure_gateway_overhead(rate=200, requests=400, repeats=1), indent=2))
