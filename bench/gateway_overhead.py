"""What the gateway adds: P99 through HTTP + routing + NATS minus P99 straight to the worker over NATS.

Both arms send the same shapes of request to one worker of a real local cluster (`onepool up --workers 1`
as a child process: nats-server, cachestate, controller, worker, gateway), their requests dealt in turn
from one open-loop Poisson stream: the worker sees the stated rate, and both arms the same moments.
Latency is measured from the scheduled send time (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import aiohttp
import numpy as np

from shared import schemas as s
from shared.bus import Bus


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


async def _open_loop(
    arms: list[Any], bodies: list[list[dict[str, Any]]], rate: float, seed: int
) -> list[list[float]]:
    """One open-loop Poisson stream at `rate`, its arrivals dealt to the arms in turn: every arm sees the
    same load, the same moment and the same noise (sequential arms on a shared machine differ by more than
    the overhead measured). Latency is taken from the scheduled send time (no coordinated omission)."""
    rng = np.random.default_rng(seed)
    latencies: list[list[float]] = [[] for _ in arms]
    at = time.perf_counter()
    tasks = []

    async def one(arm: int, body: dict[str, Any], scheduled: float) -> None:
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


async def _measure(gateway: str, nats_url: str, rate: float, requests: int, repeats: int) -> dict[str, Any]:
    bus = await Bus.connect(nats_url, name="bench-direct")
    dec = s.decoder(s.InferenceReply)
    direct_p99, gateway_p99 = [], []
    try:
        async with aiohttp.ClientSession() as http:

            async def via_gateway(body: dict[str, Any]) -> None:
                async with http.post(gateway + "/v1/recommend", json=body) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"gateway answered {resp.status}")

            async def direct(body: dict[str, Any]) -> None:
                req = s.InferenceRequest(request_id="b", **body)
                reply = s.decode(dec, await bus.request(s.infer_subject("w0"), s.encode(req), timeout_s=5))
                if reply.error is not None:
                    raise RuntimeError(reply.error.message)

            for r in range(repeats):
                # Same shapes, fresh users per arm and repeat, both arms in one interleaved stream.
                bodies = [_bodies(requests, f"d{r}-", r), _bodies(requests, f"g{r}-", r)]
                d, g = await _open_loop([direct, via_gateway], bodies, rate, 100 + r)
                direct_p99.append(float(np.percentile(d, 99)))
                gateway_p99.append(float(np.percentile(g, 99)))
                print(
                    f"  repeat {r + 1}/{repeats}: direct P99 {direct_p99[-1]:.2f} ms, "
                    f"gateway P99 {gateway_p99[-1]:.2f} ms",
                    flush=True,
                )
    finally:
        await bus.close()
    overhead = [g - d for g, d in zip(gateway_p99, direct_p99, strict=True)]
    return {
        "gateway_overhead_p99_ms": float(np.median(overhead)),
        "gateway_p99_ms": float(np.median(gateway_p99)),
        "direct_p99_ms": float(np.median(direct_p99)),
        "gateway_overhead_setup": {
            "rate_per_s": rate,
            "requests_per_arm": requests,
            "repeats": repeats,
            "arms": "interleaved in one Poisson stream at rate_per_s (the worker sees rate_per_s in all)",
        },
    }


def measure_gateway_overhead(*, rate: float, requests: int, repeats: int) -> dict[str, Any]:
    port, nats_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "services.cli", "up", "--workers", "1", "--port", str(port)]
    argv += ["--nats-port", str(nats_port), "--alpha-policy", "static:0.5"]
    argv += ["--worker-env", "ONEPOOL_WORKER_NUM_ITEMS=20000", "--worker-env", "ONEPOOL_WORKER_BUDGET_MIB=64"]
    cluster = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert cluster.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = cluster.stdout.readline()
            if not line:
                raise RuntimeError("the local cluster exited during start-up")
            if "local cluster is up" in line:
                break
        else:
            raise TimeoutError("the local cluster did not start")
        # Keep reading its output so that it never blocks on a full pipe.
        out = cluster.stdout
        threading.Thread(target=lambda: [None for _ in iter(out.readline, "")], daemon=True).start()
        gateway, nats_url = f"http://127.0.0.1:{port}", f"nats://127.0.0.1:{nats_port}"
        return asyncio.run(_measure(gateway, nats_url, rate, requests, repeats))
    finally:
        with contextlib.suppress(ProcessLookupError):
            cluster.send_signal(signal.SIGTERM)
        try:
            cluster.wait(60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()
        if cluster.stdout is not None:
            cluster.stdout.close()


if __name__ == "__main__":
    print(json.dumps(measure_gateway_overhead(rate=200, requests=400, repeats=1), indent=2))
