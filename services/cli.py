"""The `onepool` console script. Heavy imports (torch) happen inside the subcommand that needs them, and a
subcommand that needs an extra (shared/extras.py) says so in one line when it is not installed."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared.errors import EXIT_USAGE, MissingExtra, UsageError
from shared.extras import extra_imports, require_extra
from shared.version import onepool_version


def _load_worker_main() -> Any:
    with extra_imports("worker", "onepool worker"):
        from services.worker.main import run_worker  # imports torch: only when the worker runs

    return run_worker


def _up(args: argparse.Namespace) -> int:
    import os
    import signal

    from services.localcluster import ClusterSettings, GatewaySpec, run_local_cluster
    from shared.lifecycle import run, run_until_signalled
    from shared.telemetry import check_telemetry_env

    check_telemetry_env(os.environ)  # the services inherit this environment

    require_extra("worker", "onepool up (its CPU workers)")
    try:
        settings = ClusterSettings(
            workers=args.workers,
            nats_port=args.nats_port,
            gateways=(GatewaySpec(port=args.port, routing=args.routing),),
            alpha_policy=args.alpha_policy,
            worker_env=dict(pair.split("=", 1) for pair in args.worker_env),
        )
    except ValueError as exc:  # arguments that are fine alone but not together (the same port twice)
        print(f"onepool up: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> None:
        code = 0

        async def serve(stop: asyncio.Event) -> None:
            nonlocal code
            code = await run_local_cluster(settings, stop)

        # SIGHUP too: closing the terminal must not orphan the cluster.
        await run_until_signalled(serve, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        if code:
            raise SystemExit(code)

    return run(main)


def _bench_worker(args: argparse.Namespace) -> int:
    with extra_imports("worker", "onepool bench worker"):
        from bench.worker import BenchOptions, run_bench

    return run_bench(
        BenchOptions(json_path=args.json, quick=args.quick, repeats=args.repeats, device=args.device)
    )


def _infer(args: argparse.Namespace) -> int:
    from services.infer_client import InferArgs, run_infer

    return run_infer(
        InferArgs(
            nats_url=args.nats_url,
            worker=args.worker,
            user_id=args.user,
            history=args.history,
            timestamps=args.timestamps,
            candidates=args.candidates,
            k=args.k,
            timeout_s=args.timeout,
        )
    )


def _make_inputs(args: argparse.Namespace) -> int:
    from services.worker.model_config import PRESETS

    with extra_imports("worker", "onepool make-inputs"):
        from services.worker.model_inputs import write_checkpoint, write_table

    model = PRESETS[args.model]
    table = write_table(args.out, num_items=args.num_items, model=model, seed=args.seed, dtype=args.dtype)
    print(f"wrote embedding table {table.describe()}")
    env = [f"ONEPOOL_WORKER_MODEL={args.model}", f"ONEPOOL_WORKER_EMBEDDING_TABLE={args.out}"]
    if args.checkpoint_out is not None:
        checkpoint = write_checkpoint(args.checkpoint_out, model=model, seed=args.seed)
        print(f"wrote HSTU checkpoint {checkpoint.describe()}")
        env.append(f"ONEPOOL_WORKER_CHECKPOINT={args.checkpoint_out}")
    print("a worker serves them with: " + " ".join(env))
    return 0


def _npy_path(text: str) -> Path:
    if not text.endswith(".npy"):
        raise argparse.ArgumentTypeError(f"a table file ends in .npy, got {text!r}")
    return Path(text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bench_routing(args: argparse.Namespace) -> int:
    from bench.routing_report import RoutingBenchOptions, run_routing_bench

    require_extra("worker", "onepool bench routing (its local cluster's CPU worker)")

    return run_routing_bench(
        RoutingBenchOptions(
            json_path=args.json,
            quick=args.quick,
            repeats=args.repeats,
            rate=args.rate,
            requests=args.requests,
            http_client=args.http_client,
        )
    )


def _bench_faults(args: argparse.Namespace) -> int:
    from bench.faults import SCENARIOS, FaultBenchOptions, run_fault_bench

    require_extra("worker", "onepool bench faults (its local cluster's CPU workers)")

    return run_fault_bench(
        FaultBenchOptions(
            json_path=args.json,
            rate=args.rate,
            scenarios=tuple(args.scenarios) if args.scenarios else SCENARIOS,
            outage_s=args.outage,
            overload_s=2.0 if args.quick else 5.0,
            quick=args.quick,
        )
    )


def _bench_controller(args: argparse.Namespace) -> int:
    from bench.cluster import command_line
    from bench.controller import ControllerBenchOptions, run_controller_bench

    if args.report:
        require_extra("plots", "onepool bench controller --report")

    return run_controller_bench(
        ControllerBenchOptions(
            json_path=args.json,
            policies=tuple(args.policy or ()),
            workers=args.workers,
            decisions=args.decisions,
            seed=args.seed,
            report_dir=args.report,
            command=command_line(),
        )
    )


def _alpha_policy(text: str) -> str:
    """An argparse type: an alpha policy spec that parse_policy accepts (its message otherwise)."""
    from services.controller.core.policies import parse_policy

    try:
        parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


class _AppendOnce(argparse.Action):
    """`append`, but the same value twice is a usage error (the values key a report's sections)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, self.dest) or [])
        if values in items:
            raise argparse.ArgumentError(self, f"{values!r} given twice")
        setattr(namespace, self.dest, [*items, values])


def _scenarios(text: str) -> list[str]:
    from bench.faults import SCENARIOS

    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SCENARIOS)}, got {text!r}")
    return names


def _at_least(low: float, kind: type[int] | type[float] = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that is >= low (a clear usage error otherwise)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    port: int = _at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {text}")
    return port


def _env_pair(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    from services.localcluster import RestartPolicy

    restart = RestartPolicy()
    from services.cachestate.cli import add_cachestate_command
    from services.controller.cli import add_controller_command
    from services.gateway.cli import add_gateway_command
    from services.worker.settings import ENV_PREFIX, WorkerSettings
    from shared.runner import add_service_command

    parser = argparse.ArgumentParser(
        prog="onepool",
        description="Serve HSTU recommenders on workers that share one memory pool between an embedding "
        "hot cache and a per-user KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"onepool {onepool_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_service_command(
        sub,
        "worker",
        WorkerSettings,
        ENV_PREFIX,
        _load_worker_main,
        help="run one worker (HSTU + partitioned pool) on NATS",
        description="Run one worker.",
    )

    add_gateway_command(sub)
    add_cachestate_command(sub)
    add_controller_command(sub)

    up = sub.add_parser(
        "up",
        help="start the local cluster (embedded nats-server, cachestate, controller, CPU workers, gateway)",
        description="Start an embedded nats-server, cachestate, the controller, N CPU workers and the "
        "gateway as supervised child processes, wait until the gateway is ready, print where it listens, and "
        "stop all of them on Ctrl-C or SIGTERM (a second signal kills them at once). A child that dies is "
        f"restarted with back-off; one that crash-loops ({restart.crash_loop_exits} exits in "
        f"{restart.crash_loop_window_s:g} s) or exits with code 2 (bad settings) is given up while the rest "
        "keeps serving. Exit code: 0, 3 when a child had been given up, 1 when the cluster could not start "
        "or lost nats-server, 2 for bad arguments.",
    )
    up.add_argument("--workers", type=_at_least(1), default=2, help="number of workers (default 2)")
    up.add_argument("--port", type=_port, default=8080, help="gateway HTTP port (default 8080)")
    up.add_argument(
        "--routing",
        default="joint",
        choices=["joint", "kv", "emb", "least-loaded", "round-robin"],
        help="gateway routing policy (default joint)",
    )
    up.add_argument(
        "--alpha-policy", default=None, help="controller policy, e.g. static:0.5 (default: the controller's)"
    )
    up.add_argument(
        "--nats-port", type=_port, default=4222, help="port of the embedded nats-server (default 4222)"
    )
    up.add_argument(
        "--worker-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every worker, e.g. ONEPOOL_WORKER_BUDGET_MIB=64 (repeatable)",
    )
    up.set_defaults(func=_up)

    infer = sub.add_parser(
        "infer",
        help="send one inference request straight to a worker over NATS and print the reply",
        description="Send one inference request to a worker's subject and print the JSON reply: a way to "
        "poke a worker by hand (the gateway's HTTP API is the way for clients).",
    )
    infer.add_argument("--nats-url", default="nats://127.0.0.1:4222", help="NATS URL (default %(default)s)")
    infer.add_argument("--worker", default="w0", help="worker id (default %(default)s)")
    infer.add_argument("--user", default="user-1", help="user id (default %(default)s)")
    infer.add_argument("--history", type=_int_list, default=[], metavar="I,J,...", help="history item ids")
    infer.add_argument(
        "--timestamps", type=_int_list, default=None, metavar="T,U,...", help="per-item timestamps"
    )
    infer.add_argument("--candidates", type=_int_list, required=True, metavar="I,J,...", help="items to rank")
    infer.add_argument("--k", type=int, default=None, help="how many to return (default: all)")
    infer.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default %(default)s)")
    infer.set_defaults(func=_infer)

    from services.worker.model_config import PRESETS, TABLE_DTYPES
    from services.worker.settings import DEFAULT_NUM_ITEMS

    worker_defaults = WorkerSettings.__dataclass_fields__
    make_inputs = sub.add_parser(
        "make-inputs",
        help="write a host embedding table file (and an HSTU checkpoint) that a worker loads",
        description="Write a host embedding table [num-items, item_dim of --model] as .npy, the worker's "
        "synthetic rows of --seed, and optionally an HSTU checkpoint of the --model preset with the seeded "
        "weights of --seed; print each file's shape, size and SHA-256 (docs/model-inputs.md). The table is "
        "held in memory while it is written.",
    )
    make_inputs.add_argument(
        "--out", type=_npy_path, required=True, metavar="PATH", help="the table file to write (.npy)"
    )
    make_inputs.add_argument(
        "--num-items",
        type=_at_least(1),
        default=DEFAULT_NUM_ITEMS,
        help="rows of the table: the item catalogue (default %(default)s)",
    )
    make_inputs.add_argument(
        "--model",
        choices=sorted(PRESETS),
        default=worker_defaults["model"].default,
        help="model preset: its item_dim is the table's width (default %(default)s)",
    )
    make_inputs.add_argument(
        "--seed",
        type=_at_least(0),
        default=worker_defaults["seed"].default,
        help="seed of the rows and the weights (default %(default)s)",
    )
    make_inputs.add_argument(
        "--dtype",
        choices=TABLE_DTYPES,
        default=TABLE_DTYPES[0],
        help="value type of the table file (default %(default)s; the worker holds float32)",
    )
    make_inputs.add_argument(
        "--checkpoint-out", type=Path, default=None, metavar="PATH", help="also write a checkpoint here"
    )
    make_inputs.set_defaults(func=_make_inputs)

    bench = sub.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    bw = bench_sub.add_parser(
        "worker",
        help="KV reuse speedup, EMB miss cost, P99 during reallocation (incremental vs naive)",
        description="Worker benchmark on this machine (CPU, emulated host link). Writes the keys listed in "
        "docs/benchmarks.md to --json.",
    )
    bw.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    bw.add_argument(
        "--quick", action="store_true", help="small sizes and short phases (a smoke run, not figures)"
    )
    bw.add_argument(
        "--repeats", type=_at_least(1), default=3, help="repeats per figure; the median is reported"
    )
    bw.add_argument(
        "--device",
        default="cpu",
        help="torch device of the engines: cpu (emulated host link, the default) or cuda / cuda:N (real H2D "
        "from a pinned host table)",
    )
    bw.set_defaults(func=_bench_worker)
    br = bench_sub.add_parser(
        "routing",
        help="routing decision latency; P99 added by the gateway over direct NATS requests",
        description="Routing benchmark: route_p50_us/route_p99_us (joint policy, 32 workers, 512-item "
        "history, 128 candidates) and gateway_overhead_p99_ms (a local cluster with one CPU worker, "
        "open-loop Poisson load). Writes the keys listed in docs/benchmarks.md to --json.",
    )
    br.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    br.add_argument("--quick", action="store_true", help="short runs (a smoke run, not figures)")
    br.add_argument(
        "--repeats", type=_at_least(1), default=3, help="repeats per figure; the median is reported"
    )
    br.add_argument(
        "--rate", type=_at_least(1, float), default=200.0, help="requests per second for the overhead (200)"
    )
    br.add_argument(
        "--requests",
        type=_at_least(100),
        default=None,
        help="requests per arm and repeat for the overhead (default 2000; 200 with --quick)",
    )
    br.add_argument(
        "--http-client",
        choices=("lean", "aiohttp"),
        default="lean",
        help="the load generator's HTTP client: a minimal keep-alive one (default), or aiohttp's",
    )
    br.set_defaults(func=_bench_routing)
    bf = bench_sub.add_parser(
        "faults",
        help="what each fault costs clients: kills, a NATS restart, a paused worker, 3x overload",
        description="Fault benchmark on a local cluster (2 CPU workers) under steady open-loop load: per "
        "scenario failed_requests, total_requests, recovery_s, p99_ms_during; for overload shed_p99_ms, "
        "goodput_ratio, healthz_p99_ms. Writes the keys listed in docs/benchmarks.md to --json.",
    )
    bf.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    bf.add_argument("--quick", action="store_true", help="shorter phases (a smoke run, not figures)")
    bf.add_argument(
        "--rate", type=_at_least(1, float), default=40.0, help="steady load, requests per second (40)"
    )
    bf.add_argument(
        "--outage", type=_at_least(0.1, float), default=3.0, help="seconds nats-server stays down (3)"
    )
    bf.add_argument(
        "--scenarios",
        type=_scenarios,
        default=None,
        metavar="A,B,...",
        help="which scenarios (default all: worker_kill, controller_kill, cachestate_kill, nats_restart, "
        "worker_pause, overload)",
    )
    bf.set_defaults(func=_bench_faults)
    from bench.controller import DEFAULT_DECISIONS, DEFAULT_SEED, DEFAULT_WORKERS, TARGET_P99_US

    bcon = bench_sub.add_parser(
        "controller",
        help="controller decision latency per alpha policy: one worker's decide + clamp, and a whole round",
        description="Controller decision latency on this machine: policy.decide + Clamp timed as the "
        "controller times it, on seeded drifting per-worker features. Writes, per policy under 'policies', "
        "decision_p50_us, decision_p99_us, decision_mean_us, decision_max_us, decision_32_workers_us (a "
        f"round over --workers), a histogram and met (p99 <= {TARGET_P99_US:g} us) to --json "
        "(docs/benchmarks.md).",
    )
    bcon.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    bcon.add_argument(
        "--policy",
        type=_alpha_policy,
        action=_AppendOnce,
        default=None,
        metavar="SPEC",
        help="alpha policy to measure: static:A, hit-balance, pi, predict-greedy, helm (each with "
        "[:key=value,...]); repeatable, one section each (default helm, the full three-layer decision)",
    )
    bcon.add_argument(
        "--workers",
        type=_at_least(1),
        default=DEFAULT_WORKERS,
        help=f"workers in the synthetic cluster and in a timed round (default {DEFAULT_WORKERS})",
    )
    bcon.add_argument(
        "--decisions",
        type=_at_least(100),
        default=DEFAULT_DECISIONS,
        metavar="K",
        help=f"timed one-worker decisions per policy, after a warm-up (default {DEFAULT_DECISIONS})",
    )
    bcon.add_argument(
        "--seed", type=_at_least(0), default=DEFAULT_SEED, help="seed of the feature stream (default 0)"
    )
    bcon.add_argument(
        "--report", metavar="DIR", default=None, help="also write controller.md and decision_latency.png here"
    )
    bcon.set_defaults(func=_bench_controller)
    from bench.cluster_cli import add_cluster_command

    add_cluster_command(bench_sub)

    from sim.cli import (
        add_calibrate_command,
        add_detector_command,
        add_sim_command,
        add_trace_command,
        add_train_command,
    )

    add_detector_command(bench_sub)
    add_trace_command(sub)
    add_sim_command(sub)
    add_calibrate_command(sub)
    add_train_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MissingExtra as exc:  # its message names the command
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"onepool: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
