"""`onepool bench faults`: what each fault costs the clients of a local cluster under steady open-loop load.

One `LocalCluster` (what `onepool up` runs: 2 CPU workers, supervised) serves every scenario in turn; before
each, the bench waits until the cluster is whole again (every child running, the gateway ready with both
workers). Scenarios, each under steady Poisson load at `rate` from this process (on uvloop):

- worker_kill, controller_kill, cachestate_kill: SIGKILL that process; the supervisor restarts it;
- nats_restart: nats-server stopped for `outage_s`, then started again (recovery is counted from then);
- worker_pause: SIGSTOP a worker for 5 s, then SIGCONT;
- overload: capacity first (4 closed-loop clients per worker, after a 1 s warm-up), then open loop at 3x
  it for 5 s while /healthz is probed every 100 ms, both on one stream of returning users.

Per scenario: total_requests, failed_requests (anything but a 200), recovery_s (from the fault, or from
nats-server's return, to the last failed request; 0 when none failed), p99_ms_during (requests sent from
the fault until the cluster was whole again). For overload: shed_p99_ms (the 503 answers), goodput_ratio
(200s per second during overload over the capacity), healthz_p99_ms, and the gateway's memory before and
after.

The workers stand for accelerators: most of a request's time is an emulated host-link transfer (20 ms),
a wait that costs no CPU (one request at a time: `MAX_BATCH` 1), so that two CPU workers do not take this
machine's CPU from the gateway and the load generator (3x their capacity would otherwise measure the
gateway's own limit, not its shedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import OpenLoop, Record, percentile, recovery_s, returning_users, summarise
from bench.report import write_report
from services.localcluster import ClusterSettings, GatewaySpec, LocalCluster, free_port

SCENARIOS = ("worker_kill", "controller_kill", "cachestate_kill", "nats_restart", "worker_pause", "overload")
TARGETS = {
    "failed_requests": "0 for worker_kill, controller_kill, cachestate_kill, worker_pause",
    "nats_restart.recovery_s": "<= 2",
    "overload.shed_p99_ms": "<= 50",
    "overload.goodput_ratio": ">= 0.9",
}
WORKER_ENV = {
    "ONEPOOL_WORKER_MODEL": "tiny",
    "ONEPOOL_WORKER_NUM_ITEMS": "20000",
    "ONEPOOL_WORKER_BUDGET_MIB": "8",
    "ONEPOOL_WORKER_CHUNK_KIB": "64",
    "ONEPOOL_WORKER_LINK_LATENCY_US": "20000",
    # One request per transfer: batched, eight requests would share one 20 ms wait and the workers would
    # no longer stand for a fixed cost per request.
    "ONEPOOL_WORKER_MAX_BATCH": "1",
}
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class FaultBenchOptions:
    json_path: str
    rate: float = 40.0
    scenarios: tuple[str, ...] = SCENARIOS
    outage_s: float = 3.0
    overload_s: float = 5.0
    quick: bool = False


def rss_mib(pid: int | None) -> float:
    """The resident memory of a process, MiB (0 when it is gone)."""
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def closed_loop_capacity(
    http: aiohttp.ClientSession,
    url: str,
    bodies: Iterator[bytes],
    *,
    clients: int,
    seconds: float,
    warmup_s: float,
) -> float:
    """200s per second from `clients` closed-loop clients posting `bodies` to the gateway at `url`, counted
    after `warmup_s` (the caches fill, the cost fits settle)."""
    done = 0
    start = time.monotonic() + warmup_s
    stop = start + seconds

    async def client() -> None:
        nonlocal done
        while (now := time.monotonic()) < stop:
            async with http.post(url + "/v1/recommend", data=next(bodies), headers=JSON) as r:
                await r.read()
                done += r.status == 200 and now >= start

    await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds


async def probe_healthz(
    http: aiohttp.ClientSession, url: str, latencies: list[float], period_s: float = 0.1
) -> None:
    """GET `url`/healthz every `period_s` until cancelled: the latency of each 200 into `latencies`, and
    10,000 ms for any other answer or none (so that a P99 shows it)."""
    while True:
        t0 = time.perf_counter()
        try:
            async with http.get(url + "/healthz") as resp:
                await resp.read()
            ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        latencies.append((time.perf_counter() - t0) * 1e3 if ok else 10_000.0)
        await asyncio.sleep(period_s)


class Bench:
    def __init__(self, cluster: LocalCluster, opts: FaultBenchOptions) -> None:
        self.cluster = cluster
        self.opts = opts
        self.port = cluster.settings.gateways[0].port
        self.url = cluster.gateway_url()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def whole(self) -> None:
        await self.cluster.wait_whole(timeout_s=120.0)

    async def under_load(self, name: str, inject: Callable[[OpenLoop], Awaitable[float]]) -> dict[str, Any]:
        """Steady load; `inject` makes the fault and returns the moment recovery is counted from."""
        await self.whole()
        load = OpenLoop(
            "127.0.0.1", self.port, self.opts.rate, returning_users(name, users=256), timeout_s=10
        )
        async with load:
            await asyncio.sleep(1.0 if self.opts.quick else 2.0)
            fault_at = load.now_s()
            recover_from = await inject(load)
            await self.whole()
            whole_at = load.now_s()
            await asyncio.sleep(1.0 if self.opts.quick else 2.0)
        records = load.records
        during = summarise(records, since_s=fault_at, until_s=whole_at)
        return {
            **{k: v for k, v in summarise(records).items() if k in ("total_requests", "failed_requests")},
            "failures_by_status": summarise(records)["failures_by_status"],
            "recovery_s": round(recovery_s(records, recover_from), 3),
            "p99_ms_during": round(during["p99_ms"], 2),
            "whole_again_after_s": round(whole_at - fault_at, 2),
        }

    async def kill(self, name: str) -> dict[str, Any]:
        async def inject(load: OpenLoop) -> float:
            at = load.now_s()
            starts = self.cluster.child(name).starts
            self.cluster.kill(name)
            await self.cluster.wait_started(name, after=starts)
            return at

        return await self.under_load(f"kill-{name}", inject)

    async def nats_restart(self) -> dict[str, Any]:
        async def inject(load: OpenLoop) -> float:
            await self.cluster.stop_child("nats")
            await asyncio.sleep(self.opts.outage_s)
            await self.cluster.start_child("nats")
            return load.now_s()

        return {**await self.under_load("nats", inject), "outage_s": self.opts.outage_s}

    async def pause(self, name: str, seconds: float = 5.0) -> dict[str, Any]:
        async def inject(load: OpenLoop) -> float:
            at = load.now_s()
            self.cluster.signal(name, signal.SIGSTOP)
            try:
                await asyncio.sleep(seconds)
            finally:
                self.cluster.signal(name, signal.SIGCONT)
            return at

        return {**await self.under_load(f"pause-{name}", inject), "paused_s": seconds}

    async def capacity(self, bodies: Iterator[bytes], seconds: float, warmup_s: float) -> float:
        """4 closed-loop clients per worker: enough that a worker never waits for work, few enough that its
        queue stays well under the gateway's MAX_QUEUE_WAIT_MS (no request shed)."""
        clients = 4 * len(self.cluster.settings.worker_ids)
        return await closed_loop_capacity(
            self.http, self.url, bodies, clients=clients, seconds=seconds, warmup_s=warmup_s
        )

    async def overload(self) -> dict[str, Any]:
        await self.whole()
        pid = self.cluster.child(self.cluster.settings.gateways[0].name).pid
        # One workload for both phases, its users returning throughout: the capacity is that of the
        # workload the overload phase offers three times over.
        bodies = returning_users("overload", users=512)
        capacity = await self.capacity(bodies, 2.0 if self.opts.quick else 4.0, warmup_s=1.0)
        await asyncio.sleep(1.0)
        rss_before = rss_mib(pid)
        health: list[float] = []
        prober = asyncio.create_task(probe_healthz(self.http, self.url, health))
        load = OpenLoop(
            "127.0.0.1", self.port, 3 * capacity, bodies, duration_s=self.opts.overload_s, timeout_s=10
        )
        try:
            records: list[Record] = await load.run()
        finally:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        await self.whole()
        await asyncio.sleep(2.0)
        shed = [r.latency_ms for r in records if r.status == 503]
        ok = sum(r.ok for r in records)
        return {
            "capacity_per_s": round(capacity, 1),
            "offered_per_s": round(3 * capacity, 1),
            "total_requests": len(records),
            "ok_requests": ok,
            "shed_requests": len(shed),
            "other_failures": summarise([r for r in records if r.status not in (200, 503)])[
                "failures_by_status"
            ],
            "shed_p50_ms": round(percentile(shed, 50), 2),
            "shed_p99_ms": round(percentile(shed, 99), 2),
            "ok_p99_ms": round(percentile([r.latency_ms for r in records if r.ok], 99), 2),
            "goodput_ratio": round(ok / self.opts.overload_s / capacity, 3) if capacity else 0.0,
            "healthz_p99_ms": round(percentile(health, 99), 2),
            "gateway_rss_mib_before": round(rss_before, 1),
            "gateway_rss_mib_after": round(rss_mib(pid), 1),
        }


async def _measure(opts: FaultBenchOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="onepool-bench-faults-") as logs:
        settings = ClusterSettings(
            workers=2,
            nats_port=free_port(),
            gateways=(GatewaySpec(port=free_port()),),
            alpha_policy="static:0.5",
            worker_env=WORKER_ENV,
            log_dir=Path(logs),
        )
        print(f"starting a local cluster (2 workers); children log to {logs}", flush=True)
        async with LocalCluster(settings) as cluster:
            bench = Bench(cluster, opts)
            runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "worker_kill": lambda: bench.kill("w1"),
                "controller_kill": lambda: bench.kill("controller"),
                "cachestate_kill": lambda: bench.kill("cachestate"),
                "nats_restart": bench.nats_restart,
                "worker_pause": lambda: bench.pause("w1"),
                "overload": bench.overload,
            }
            results: dict[str, Any] = {}
            try:
                for i, name in enumerate(opts.scenarios, 1):
                    print(f"[{i}/{len(opts.scenarios)}] {name} ...", flush=True)
                    results[name] = await runs[name]()
                    print(f"    {json.dumps(results[name])}", flush=True)
            finally:
                await bench.http.close()
    return {
        "scenarios": results,
        "setup": {
            "workers": 2,
            "worker_env": WORKER_ENV,
            "rate_per_s": opts.rate,
            "load": "open-loop Poisson from the bench process (uvloop), returning users, 16 candidates",
            "host_link": f"emulated on CPU: {WORKER_ENV['ONEPOOL_WORKER_LINK_LATENCY_US']} us per transfer "
            "(the workers stand for accelerators)",
            "quick": opts.quick,
        },
        "targets": TARGETS,
    }


def summary(report: dict[str, Any]) -> str:
    lines = ["onepool bench faults (local cluster, 2 CPU workers, steady open-loop load)"]
    for name, r in report["scenarios"].items():
        if name == "overload":
            lines.append(
                f"  overload: capacity {r['capacity_per_s']}/s, offered {r['offered_per_s']}/s; shed p99 "
                f"{r['shed_p99_ms']} ms (target <= 50); goodput ratio {r['goodput_ratio']} (target >= 0.9); "
                f"/healthz p99 {r['healthz_p99_ms']} ms; gateway RSS {r['gateway_rss_mib_before']} -> "
                f"{r['gateway_rss_mib_after']} MiB"
            )
        else:
            lines.append(
                f"  {name}: {r['failed_requests']} failed of {r['total_requests']}; "
                f"recovery {r['recovery_s']} s; p99 during {r['p99_ms_during']} ms"
            )
    return "\n".join(lines)


def run_fault_bench(opts: FaultBenchOptions) -> int:
    unknown = set(opts.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(_measure(opts))
    else:
        report = uvloop.run(_measure(opts))
    write_report(opts.json_path, report, summary(report))
    return 0
