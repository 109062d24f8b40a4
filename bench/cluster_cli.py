"""The `onepool bench cluster` parser and handler (the bench itself: bench/cluster.py, imported on use)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from shared.errors import EXIT_USAGE
from shared.extras import require_extra

__all__ = ["add_cluster_command"]


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _cluster(args: argparse.Namespace) -> int:
    from bench.cluster import ClusterBenchOptions, check_options, command_line, run_cluster_bench
    from sim.cli import _preset, _source

    if args.url is None:
        require_extra("worker", "onepool bench cluster (its local cluster's CPU workers; or give --url)")
    if args.report:
        require_extra("plots", "onepool bench cluster --report")
    try:
        preset = _preset(args)
        source = _source(args, preset)  # a bad trace line is named here, before any cluster starts
        opts = ClusterBenchOptions(
            json_path=args.json,
            source=source,
            preset=preset,
            alpha_policies=args.alpha_policies,
            routings=args.routing,
            workers=args.workers,
            url=args.url,
            nats_url=args.nats_url,
            slo_ms=args.slo_ms,
            warmup_s=args.warmup,
            report_dir=args.report,
            timeout_s=args.timeout,
            command=command_line(),
        )
        check_options(opts)
    except (ValueError, FileNotFoundError) as exc:
        print(f"onepool bench cluster: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_cluster_bench(opts)


def add_cluster_command(bench_sub: Any) -> None:
    from shared.slo import DEFAULT_SLO_MS
    from sim.cli import add_workload_args, positive

    p = bench_sub.add_parser(
        "cluster",
        help="alpha (and routing) policies side by side on one workload, on a real cluster, open loop",
        description="Replay a trace (or a synthetic regime) open loop against a local cluster started per "
        "(alpha policy, routing) pair, or once against a running gateway (--url). Each request leaves at its "
        "trace time; latency from then. Writes per policy p50_ms, p99_ms, slo_satisfaction, throughput_rps, "
        "emb_hit_rate, kv_hit_rate, critical_refill_bytes (docs/benchmarks.md) to --json, every request's "
        "record to <json stem>.records/<policy>.jsonl, and with --report markdown and PNG plots.",
    )
    add_workload_args(p, trace_input=True)
    p.add_argument("--url", default=None, help="replay once against this gateway (http://HOST:PORT)")
    p.add_argument(
        "--nats-url", default=None, help="with --url: the cluster's NATS, to record the workers' digests"
    )
    p.add_argument("--workers", type=positive(int), default=2, help="workers of each local cluster (2)")
    p.add_argument(
        "--alpha-policies",
        type=_csv,
        default=("hit-balance",),
        metavar="SPEC,...",
        help="controller policies, one run each, e.g. static:0.1,static:0.5,static:0.9,hit-balance "
        "(default hit-balance)",
    )
    p.add_argument(
        "--routing",
        type=_csv,
        default=("joint",),
        metavar="P,...",
        help="gateway routing policies, one run each per alpha policy: joint, kv, emb, least-loaded, "
        "round-robin (default joint)",
    )
    p.add_argument(
        "--slo-ms",
        type=positive(float),
        default=DEFAULT_SLO_MS,
        help=f"latency SLO for slo_satisfaction, ms (default {DEFAULT_SLO_MS:g}: the workers')",
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="seconds left out of the figures (20%% of the run, <= 60)"
    )
    p.add_argument(
        "--timeout", type=positive(float), default=10.0, help="seconds a request may take at most (10)"
    )
    p.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--report", metavar="DIR", default=None, help="also write report.md and PNG plots here")
    p.set_defaults(func=_cluster)
