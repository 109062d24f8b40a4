"""`onepool bench routing`: routing decision latency and what the gateway adds end to end."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

from bench.gateway_overhead import HttpClientKind, measure_gateway_overhead
from bench.report import write_report
from bench.routing import measure_route_latency


@dataclass(frozen=True)
class RoutingBenchOptions:
    json_path: str
    quick: bool = False
    repeats: int = 3
    rate: float = 200.0
    requests: int | None = None  # per arm and repeat; None: 2000 (200 when quick)
    http_client: HttpClientKind = "lean"


def run_routing_bench(opts: RoutingBenchOptions) -> int:
    if opts.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {opts.repeats}")
    if opts.requests is not None and opts.requests < 100:
        raise ValueError(f"--requests must be >= 100 (a P99 needs them), got {opts.requests}")
    if opts.rate <= 0:
        raise ValueError(f"--rate must be > 0, got {opts.rate}")
    started = time.time()
    repeats = 1 if opts.quick else opts.repeats
    report: dict[str, Any] = {
        "bench": "routing",
        "quick": opts.quick,
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    print("[1/2] routing decision latency (joint policy, 32 workers, 512-item history, 128 candidates) ...")
    report.update(measure_route_latency(repeats, opts.quick))
    print(f"[2/2] gateway overhead at {opts.rate:g} req/s (a local cluster with one CPU worker) ...")
    requests = opts.requests or (200 if opts.quick else 2000)
    report.update(
        measure_gateway_overhead(rate=opts.rate, requests=requests, repeats=repeats, client=opts.http_client)
    )
    report["elapsed_s"] = time.time() - started
    write_report(opts.json_path, report, summary(report))
    return 0


def summary(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "onepool routing benchmark" + (" (QUICK smoke run)" if r["quick"] else ""),
            f"  route_p50_us             {r['route_p50_us']:.1f}",
            f"  route_p99_us             {r['route_p99_us']:.1f}   (target <= 50)",
            f"  gateway_overhead_p99_ms  {r['gateway_overhead_p99_ms']:.2f}   (target <= 1; gateway P99 "
            f"{r['gateway_p99_ms']:.2f} ms vs direct {r['direct_p99_ms']:.2f} ms)",
            f"  gateway_overhead_p50_ms  {r['gateway_overhead_p50_ms']:.2f}   (HTTP client: "
            f"{r['gateway_overhead_setup']['http_client']}; P99 overhead per repeat: "
            + ", ".join(f"{x:.2f}" for x in r["gateway_overhead_p99_runs_ms"])
            + ")",
        ]
    )
