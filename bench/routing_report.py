"""`onepool bench routing`: routing decision latency and what the gateway adds end to end."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

from bench.gateway_overhead import measure_gateway_overhead
from bench.report import write_report
from bench.routing import measure_route_latency


@dataclass(frozen=True)
class RoutingBenchOptions:
    json_path: str
    quick: bool = False
    repeats: int = 3
    rate: float = 200.0


def run_routing_bench(opts: RoutingBenchOptions) -> int:
    if opts.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {opts.repeats}")
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
    report.update(
        measure_gateway_overhead(rate=opts.rate, requests=200 if opts.quick else 1000, repeats=repeats)
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
        ]
    )
