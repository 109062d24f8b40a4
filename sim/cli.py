"""The `onepool sim`, `onepool trace gen` and `onepool calibrate` subcommands (parsers and handlers)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import write_report
from services.controller.core.policies import parse_policy
from services.controller.settings import ControllerSettings
from services.gateway.core.router import Policy
from services.worker.core.pool import RefillMode
from services.worker.settings import DEFAULT_MAX_BATCH
from shared.errors import EXIT_USAGE
from shared.extras import extra_imports, require_extra
from shared.slo import DEFAULT_SLO_MS
from sim.cluster import SimConfig
from sim.compare import ABLATIONS, BASELINES, COMPARE_REGIMES, HELM, compare_regime
from sim.cost import CostProfile, load_profile
from sim.report import compare_plots, motivation_plot, run_plots, sweep_plots, write_markdown
from sim.run import STATIC_GRID, RunOutcome, geometry_for, run_policy, sweep
from workloads.presets import PRESETS, Preset, get_preset
from workloads.sources import REGIMES, Source, open_source
from workloads.synthetic import WorkloadParams
from workloads.trace import write_trace

__all__ = ["add_calibrate_command", "add_sim_command", "add_trace_command"]

MOTIVATION_REGIMES = ("steady", "trend", "burst")
# per regime and static alpha, beside the P99: what moves it
MOTIVATION_DETAILS = ("p50_ms", "p99_ms", "emb_hit_rate", "kv_hit_rate", "utilisation", "slo_satisfaction")
# The services' own defaults, read from their settings (one source).
DEFAULT_POLICY = str(ControllerSettings.__dataclass_fields__["policy"].default)

__all__ += ["add_workload_args", "positive"]  # shared with `onepool bench cluster`


def _guarded(name: str, handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (a trace line, a profile file, a missing dataset) ends in one clear line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"onepool {name}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_workload_args(p: argparse.ArgumentParser, *, trace_input: bool) -> None:
    src = p.add_mutually_exclusive_group(required=not trace_input)  # sim: none with --motivation
    src.add_argument(
        "--regime", choices=REGIMES, help="a synthetic regime, or movielens (from the recbole wheel)"
    )
    if trace_input:
        src.add_argument("--trace", metavar="PATH", help="replay this trace file (docs/trace-format.md)")
    p.add_argument("--duration", type=positive(float), default=None, help="seconds of traffic (default 300)")
    p.add_argument("--rate", type=positive(float), default=None, help="requests per second (default: preset)")
    p.add_argument("--seed", type=int, default=0, help="workload and router seed (default 0)")
    p.add_argument("--preset", choices=list(PRESETS), default="local", help="sizes (default local)")
    p.add_argument("--num-items", type=positive(int), default=None, help="catalogue size (default: preset)")
    p.add_argument(
        "--compression", type=positive(float), default=20_000.0, help="movielens: time compression (20000)"
    )
    p.add_argument(
        "--workload",
        type=_workload_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any number of the synthetic workload (docs/workloads.md), e.g. hot_users=2500 (repeatable)",
    )


_NUMERIC_PARAMS = {f.name: f.type for f in dataclasses.fields(WorkloadParams) if f.type in ("int", "float")}


def _workload_setting(text: str) -> tuple[str, float]:
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or key not in _NUMERIC_PARAMS:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY one of {', '.join(sorted(_NUMERIC_PARAMS))}, got {text!r}"
        )
    try:
        number = int(value) if _NUMERIC_PARAMS[key] == "int" else float(value)
    except ValueError:
        kind = "an integer" if _NUMERIC_PARAMS[key] == "int" else "a number"
        raise argparse.ArgumentTypeError(f"{key} must be {kind}, got {value!r}") from None
    return key, number


def _preset(args: argparse.Namespace) -> Preset:
    preset = get_preset(args.preset)
    changes: dict[str, Any] = {}
    if args.rate is not None:
        changes["rate"] = args.rate
    if args.num_items is not None:
        changes["num_items"] = args.num_items
    changes.update(dict(args.workload))
    return preset.with_workload(**changes) if changes else preset


def _sim_preset(args: argparse.Namespace) -> Preset:
    """The preset with the sim's geometry flags applied."""
    preset = _preset(args)
    if args.model is not None:
        preset = preset.with_model(args.model)
    if args.chunk_kib is not None:
        preset = preset.with_shape(chunk_kib=args.chunk_kib)
    # the report's ratios are those of the cluster simulated
    if args.workers is not None:
        preset = preset.with_shape(workers=args.workers)
    if args.pool_mib is not None:
        preset = preset.with_shape(pool_mib=args.pool_mib)
    return preset


def _source(args: argparse.Namespace, preset: Preset) -> Source:
    return open_source(
        preset=preset,
        regime=args.regime,
        trace=args.trace,
        duration_s=args.duration,
        seed=args.seed,
        compression=args.compression,
    )


# ----------------------------------------------------------------------------------------------- trace gen
def _trace_gen(args: argparse.Namespace) -> int:
    preset = _preset(args)
    source = _source(args, preset)
    started = time.perf_counter()
    count = write_trace(args.out, source.header, source.open())
    elapsed = time.perf_counter() - started
    print(f"wrote {count} requests over {source.duration_s:g} s to {args.out} ({elapsed:.1f} s)")
    return 0


def add_trace_command(sub: Any) -> None:
    trace = sub.add_parser("trace", help="workload traces (docs/trace-format.md)")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True, metavar="COMMAND")
    gen = trace_sub.add_parser(
        "gen",
        help="write a synthetic or MovieLens workload as a JSON Lines trace",
        description="Generate a seeded workload (steady, trend, burst; or MovieLens-100K replayed in time "
        "order) and write it in the trace format v1 (docs/trace-format.md). Every command that replays "
        "traffic takes the file with --trace.",
    )
    add_workload_args(gen, trace_input=False)
    gen.add_argument("--out", required=True, metavar="PATH", help="where to write the trace")
    gen.set_defaults(func=_guarded("trace gen", _trace_gen), trace=None)


# ----------------------------------------------------------------------------------------------- sim
def _config(args: argparse.Namespace, preset: Preset, cost: CostProfile) -> SimConfig:
    return SimConfig(
        # --workers and --pool-mib are in the preset's shape (_sim_preset)
        workers=preset.shape.workers,
        geometry=geometry_for(preset),
        cost=cost,
        routing=Policy(args.routing),
        refill_mode=RefillMode(args.refill_mode),
        max_batch=args.max_batch,
        slo_ms=args.slo_ms,
        seed=args.seed,
    )


def _cost(args: argparse.Namespace, preset: Preset) -> CostProfile:
    spec = args.cost if args.cost is not None else preset.shape.cost
    return load_profile(spec)


def _setup(
    args: argparse.Namespace, preset: Preset, cfg: SimConfig, source: Source, warmup: float
) -> dict[str, Any]:
    return {
        "preset": preset.to_json(),
        "sim": cfg.to_json(),
        "input": {"name": source.name, "duration_s": source.duration_s, **source.setup},
        "warmup_s": warmup,
        "window_s": args.window,
    }


def _progress(label: str) -> None:
    print(f"  ... {label}", flush=True)


def _motivation(args: argparse.Namespace, preset: Preset, cost: CostProfile) -> dict[str, Any]:
    per_regime: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, dict[str, float]]] = {}  # regime -> alpha -> what explains its P99
    normalised: dict[str, dict[str, float]] = {}
    best: dict[str, float] = {}
    speed: list[float] = []
    for regime in MOTIVATION_REGIMES:
        print(f"[{regime}] static grid ...", flush=True)
        source = open_source(preset=preset, regime=regime, duration_s=args.duration, seed=args.seed)
        cfg = _config(args, preset, cost)
        warmup = args.warmup if args.warmup is not None else 0.2 * source.duration_s
        row: dict[str, float] = {}
        details[regime] = {}
        for alpha in STATIC_GRID:
            o = run_policy(cfg, source, f"static:{alpha:g}", warmup_s=warmup)
            row[f"{alpha:g}"] = o.summary["p99_ms"]
            details[regime][f"{alpha:g}"] = {k: o.summary[k] for k in MOTIVATION_DETAILS}
            speed.append(o.requests_per_s)
            _progress(f"static:{alpha:g} p99 {o.summary['p99_ms']:.2f} ms")
        per_regime[regime] = row
        low = min(row.values())
        normalised[regime] = {a: v / low for a, v in row.items()}
        best[regime] = float(min(row, key=lambda a: row[a]))
    # The single static split best over all regimes: lowest mean normalised P99; its penalty is its
    # largest ratio to a regime's best.
    overall = min(normalised["steady"], key=lambda a: sum(normalised[r][a] for r in normalised))
    return {
        "p99_ms": per_regime,
        "normalised_p99": normalised,
        "static": details,
        "best_static_alpha": best,
        "best_static_shift": max(best.values()) - min(best.values()),
        "overall_static_alpha": float(overall),
        "fixed_split_penalty": max(normalised[r][overall] for r in normalised),
        "sim_requests_per_s": float(sum(speed) / len(speed)),
    }


def _compare(
    args: argparse.Namespace, preset: Preset, cost: CostProfile, report_dir: Path | None
) -> dict[str, Any]:
    policies = args.alpha_policy or [HELM, *BASELINES, *ABLATIONS]
    keys = (
        "opt_gap",
        "p99_ms",
        "p50_ms",
        "slo_satisfaction",
        "throughput_rps",
        "emb_hit_rate",
        "kv_hit_rate",
    )
    out: dict[str, Any] = {k: {} for k in keys}
    for k in ("p99_reduction_vs_best_static", "p99_ratio_to_oracle", "best_static_alpha", "alpha_star"):
        out[k] = {}
    out["alpha_series"], out["refill_bytes"] = {}, {}
    images: list[str] = []
    speed: list[tuple[int, float]] = []
    for regime in COMPARE_REGIMES:
        print(f"[{regime}] static grid, alpha*, oracle and {len(policies)} policies ...", flush=True)
        source = open_source(preset=preset, regime=regime, duration_s=args.duration, seed=args.seed)
        cfg = _config(args, preset, cost)
        warmup = args.warmup if args.warmup is not None else min(0.2 * source.duration_s, 60.0)
        r = compare_regime(
            cfg, source, warmup_s=warmup, window_s=args.window, policies=policies, progress=_progress
        )
        for name, row in r["policies"].items():
            for k in keys:
                out[k].setdefault(regime, {})[name] = row[k]
        for k in ("p99_reduction_vs_best_static", "p99_ratio_to_oracle", "alpha_series", "refill_bytes"):
            if k in r:
                out[k][regime] = r[k]
        out["best_static_alpha"][regime] = r["best_static_alpha"]
        out["alpha_star"][regime] = r["alpha_star"]
        speed += [(len(o.result.arrival), o.wall_s) for o in r["runs"].values()]
    out["sim_requests_per_s"] = sum(n for n, _ in speed) / sum(w for _, w in speed)
    if report_dir is not None:
        images = compare_plots(out, report_dir)
    out["_images"] = images
    return out


def _sim(args: argparse.Namespace) -> int:
    preset = _sim_preset(args)
    if args.validate:
        require_extra("worker", "onepool sim --validate (its local cluster's CPU workers)")
        return _validate(args, preset)
    if args.report:
        require_extra("plots", "onepool sim --report")
    for flag in ("motivation", "compare"):
        if getattr(args, flag) and (args.trace or args.regime):
            raise ValueError(f"--{flag} runs the three synthetic regimes: it takes no --regime or --trace")
    if args.motivation and args.compare:
        raise ValueError("give one of --motivation and --compare")
    regimes_mode = args.motivation or args.compare
    source = None if regimes_mode else _source(args, preset)  # a bad trace is named before anything runs
    cost = _cost(args, preset)
    command = "onepool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report_dir = Path(args.report) if args.report else None
    if args.compare:
        result = _compare(args, preset, cost, report_dir)
        cfg = _config(args, preset, cost)
        report = {"command": command, "setup": {"preset": preset.to_json(), "sim": cfg.to_json()}, **result}
        images: list[str] = result.pop("_images")
        summary = "\n".join(
            f"  {regime}: helm p99 {report['p99_ms'][regime].get('helm', float('nan')):.2f} ms, "
            f"best static {report['p99_ms'][regime]['best-static']:.2f} ms, "
            f"oracle {report['p99_ms'][regime]['oracle']:.2f} ms; opt_gap helm "
            f"{report['opt_gap'][regime].get('helm', float('nan')):.3f}"
            for regime in report["p99_ms"]
        )
    elif args.motivation:
        result = _motivation(args, preset, cost)
        cfg = _config(args, preset, cost)
        report = {"command": command, "setup": {"preset": preset.to_json(), "sim": cfg.to_json()}, **result}
        images = motivation_plot(result["normalised_p99"], report_dir) if report_dir else []
        summary = (
            f"best static alpha per regime {result['best_static_alpha']}; "
            f"shift {result['best_static_shift']:.2f}; fixed split {result['overall_static_alpha']:g} "
            f"penalty {result['fixed_split_penalty']:.3f}"
        )
    else:
        assert source is not None
        cfg = _config(args, preset, cost)
        warmup = args.warmup if args.warmup is not None else min(0.2 * source.duration_s, 60.0)
        report = {"command": command, "setup": _setup(args, preset, cfg, source, warmup)}
        outcomes: list[RunOutcome] = []
        images = []
        if args.sweep:
            print(f"static grid and alpha* on {source.name} ({source.duration_s:g} s) ...", flush=True)
            swept = sweep(cfg, source, warmup_s=warmup, window_s=args.window, progress=_progress)
            report.update(swept.to_json())
            outcomes += [*swept.static.values(), swept.oracle]
            if report_dir:
                images += sweep_plots(swept, report_dir)
        for spec in args.alpha_policy or ([] if args.sweep else [DEFAULT_POLICY]):
            print(f"policy {spec} on {source.name} ({source.duration_s:g} s) ...", flush=True)
            outcomes.append(run_policy(cfg, source, spec, warmup_s=warmup))
        report["policies"] = {o.policy: o.summary for o in outcomes}
        main = outcomes[-1]
        report.update({k: v for k, v in main.summary.items()})
        report["policy"] = main.policy
        report["sim_requests_per_s"] = sum(len(o.result.arrival) for o in outcomes) / sum(
            o.wall_s for o in outcomes
        )
        if report_dir:
            images = run_plots(outcomes, report_dir) + images
        summary = "\n".join(
            f"  {o.policy:>12}: p50 {o.summary['p50_ms']:.2f} ms  p99 {o.summary['p99_ms']:.2f} ms  "
            f"slo {o.summary['slo_satisfaction']:.3f}  emb {o.summary['emb_hit_rate']:.3f}  "
            f"kv {o.summary['kv_hit_rate']:.3f}"
            for o in outcomes
        )
        summary += f"\n  simulated {report['sim_requests_per_s']:.0f} requests/s of wall time"
    if report_dir:
        write_markdown(report_dir, "onepool sim", report, images)
    write_report(args.json, report, summary)
    return 0


# ----------------------------------------------------------------------------------------------- validate
VALIDATE_WORKERS = (2, 4)  # the real side runs on this machine: 2-4 local workers


def _validate(args: argparse.Namespace, preset: Preset) -> int:
    """`--validate`: the input on a real local cluster and in the simulator (bench/validate.py)."""
    from dataclasses import replace

    from bench.validate import ValidateOptions, run_validation

    if args.sweep or args.motivation or len(args.alpha_policy or []) > 1:
        raise ValueError("--validate compares one policy: no --sweep, --motivation or second --alpha-policy")
    workers = VALIDATE_WORKERS[0] if args.workers is None else args.workers
    if not VALIDATE_WORKERS[0] <= workers <= VALIDATE_WORKERS[1]:
        raise ValueError(
            f"--validate runs {VALIDATE_WORKERS[0]}-{VALIDATE_WORKERS[1]} local workers, got {workers}"
        )
    source = _source(args, preset)
    # priced as the model runs inside this machine's local cluster (the profile's cluster_scale_quantiles)
    cfg = replace(_config(args, preset, _cost(args, preset).in_cluster()), workers=workers)
    warmup = args.warmup if args.warmup is not None else min(0.2 * source.duration_s, 60.0)
    return run_validation(
        ValidateOptions(
            json_path=args.json,
            preset=preset,
            source=source,
            cfg=cfg,
            policy=(args.alpha_policy or [DEFAULT_POLICY])[0],
            warmup_s=warmup,
            # what the preset's geometry does not say: the same on both sides
            worker_env={
                "ONEPOOL_WORKER_REFILL_MODE": args.refill_mode,
                "ONEPOOL_WORKER_MAX_BATCH": str(args.max_batch),
                "ONEPOOL_WORKER_SLO_MS": f"{args.slo_ms:g}",
            },
            report_dir=args.report,
            command="onepool " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        )
    )


def _policy_spec(text: str) -> str:
    try:
        parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_sim_command(sub: Any) -> None:
    p = sub.add_parser(
        "sim",
        help="discrete-event simulation of a cluster on the serving cores",
        description="Simulate N workers behind a gateway with the real pool, router, residency index, "
        "feature windows and controller policies; service times from a cost profile. Writes the keys listed "
        "in docs/simulator.md to --json.",
    )
    add_workload_args(p, trace_input=True)
    p.add_argument("--workers", type=positive(int), default=None, help="workers (default: preset)")
    p.add_argument(
        "--alpha-policy",
        type=_policy_spec,
        action="append",
        default=None,
        metavar="SPEC",
        help="controller policy (repeatable: one run each; default hit-balance unless --sweep)",
    )
    p.add_argument("--routing", choices=[x.value for x in Policy], default="joint", help="routing policy")
    p.add_argument("--pool-mib", type=positive(float), default=None, help="pool per worker (default: preset)")
    p.add_argument("--chunk-kib", type=positive(int), default=None, help="pool chunk (default: preset)")
    p.add_argument(
        "--model",
        choices=["tiny", "bench", "paper"],
        default=None,
        help="take EMB row and KV token sizes from this HSTU preset (default: the preset's sizes)",
    )
    p.add_argument("--max-batch", type=positive(int), default=DEFAULT_MAX_BATCH, help="batch size limit (8)")
    p.add_argument(
        "--slo-ms",
        type=positive(float),
        default=DEFAULT_SLO_MS,
        help="latency SLO, ms (the worker's default)",
    )
    p.add_argument(
        "--cost", default=None, help="cost profile: a100, cpu or a calibration JSON (default: preset)"
    )
    p.add_argument(
        "--refill-mode",
        choices=[m.value for m in RefillMode],
        default="incremental",
        help="reallocation refill",
    )
    p.add_argument("--warmup", type=float, default=None, help="seconds left out of the figures (20%%, <= 60)")
    p.add_argument("--window", type=positive(float), default=5.0, help="alpha* decision window, s (5)")
    p.add_argument("--sweep", action="store_true", help="static grid 0.1..0.9, alpha* and the oracle run")
    p.add_argument("--motivation", action="store_true", help="normalised P99 vs static alpha per regime")
    p.add_argument(
        "--compare",
        action="store_true",
        help="every alpha policy (HELM, baselines, ablations; or the --alpha-policy list) against the static "
        "grid, alpha* and the oracle on the three regimes",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="also run the input on a real local cluster (2-4 workers): the P50/P99 errors of the simulator",
    )
    p.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--report", metavar="DIR", default=None, help="also write report.md and PNG plots here")
    p.set_defaults(func=_guarded("sim", _sim))


# ----------------------------------------------------------------------------------------------- calibrate
def _calibrate(args: argparse.Namespace) -> int:
    with extra_imports("worker", "onepool calibrate"):
        from bench.calibrate import CalibrateOptions, run_calibrate  # imports torch

    return run_calibrate(
        CalibrateOptions(
            json_path=args.json,
            model=args.model,
            batches=args.batches,
            link_gbps=args.link_gbps,
            overhead_ms=args.overhead_ms,
            overhead_rate=args.overhead_rate,
            overhead_duration_s=args.overhead_duration,
            seed=args.seed,
            quick=args.quick,
        )
    )


def add_calibrate_command(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure this machine's worker cost model (for onepool sim --cost PATH)",
        description="Serve a random design of batches through the real engine and fit the simulator's cost "
        "profile (docs/benchmarks.md).",
    )
    p.add_argument("--json", required=True, metavar="PATH", help="where to write the profile and fit")
    p.add_argument("--model", choices=["tiny", "bench", "paper"], default="tiny", help="HSTU preset (tiny)")
    p.add_argument("--batches", type=positive(int), default=400, help="batches in the design (400)")
    p.add_argument(
        "--link-gbps",
        type=positive(float),
        default=PRESETS["local"].shape.link_gbps,
        help="emulated host link bandwidth, GB/s (default: the local preset's)",
    )
    p.add_argument(
        "--overhead-ms",
        type=float,
        default=None,
        help="time outside the workers per request, ms (default: measured on a local cluster, see "
        "--overhead-rate)",
    )
    p.add_argument(
        "--overhead-rate",
        type=positive(float),
        default=60.0,
        help="requests/s of the overhead run (60: what a 2-core machine's local cluster sustains)",
    )
    p.add_argument(
        "--overhead-duration", type=positive(float), default=30.0, help="seconds of the overhead run (30)"
    )
    p.add_argument("--seed", type=int, default=0, help="design seed")
    p.add_argument("--quick", action="store_true", help="60 batches (a smoke run, not figures)")
    p.set_defaults(func=_guarded("calibrate", _calibrate))


# ------------------------------------------------------------------------------------------ train-controller
def _train_controller(args: argparse.Namespace) -> int:
    with extra_imports("train", "onepool train-controller"):
        from sim.ppo import TrainConfig, train  # imports torch and gymnasium

    base = TrainConfig(seed=args.seed)
    env_changes = {
        k: v
        for k, v in (
            ("preset", args.preset),
            ("duration_s", args.duration),
            ("workers", args.workers),
            ("rate", args.rate),
        )
        if v is not None
    }
    changes: dict[str, Any] = {
        k: v
        for k, v in (
            ("iterations", args.iterations),
            ("episodes_per_iteration", args.episodes),
            ("lr", args.lr),
        )
        if v is not None
    }
    if args.preset is not None and args.preset != base.env.preset:
        # another preset: its own workers and rate unless given
        env_changes.setdefault("workers", None)
        env_changes.setdefault("rate", None)
    cfg = dataclasses.replace(base, env=dataclasses.replace(base.env, **env_changes), **changes)
    env = cfg.env
    print(
        f"training HELM's base policy: {cfg.iterations} iterations x {cfg.episodes_per_iteration} "
        f"episodes of {env.duration_s:g} s ({env.preset} preset, {env.workers or 'its'} workers at "
        f"{env.rate or 'its'} requests/s, seed {cfg.seed})",
        flush=True,
    )
    result = train(cfg, lambda line: print(f"  {line}", flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.actor.save(out)
    report = {
        "command": "onepool " + " ".join(sys.argv[1:]),
        "weights": str(out),
        "version": result.actor.version,
        "sha256": result.actor.digest,
        "cpu_s": result.cpu_s,
        "wall_s": result.wall_s,
        "transitions": result.transitions,
        "train": cfg.to_json(),
        "curve": result.curve,
    }
    write_report(
        args.json,
        report,
        f"wrote the actor to {out} (sha256:{result.actor.digest}); CPU time {result.cpu_s:.0f} s, "
        f"wall {result.wall_s:.0f} s, {result.transitions} transitions",
    )
    return 0


def add_train_command(sub: Any) -> None:
    p = sub.add_parser(
        "train-controller",
        help="train HELM's base policy (PPO) in the simulator and write its frozen actor",
        description="PPO on the simulator's environment (all three regimes, a seed per episode); writes the "
        "actor as a .npz (weights, frozen normalisation, version, hash) that --alpha-policy helm loads "
        "(docs/controller.md). Prints its CPU time. Defaults: sim/ppo.py's TrainConfig, which made the "
        "shipped actor.",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (0: the shipped actor)")
    p.add_argument("--json", required=True, metavar="PATH", help="where to write the training report")
    p.add_argument(
        "--out",
        default="out/helm-actor.npz",
        metavar="PATH",
        help="where to write the actor (out/helm-actor.npz)",
    )
    p.add_argument("--iterations", type=positive(int), default=None, help="PPO iterations")
    p.add_argument("--episodes", type=positive(int), default=None, help="episodes per iteration")
    p.add_argument("--duration", type=positive(float), default=None, help="seconds per episode")
    p.add_argument("--workers", type=positive(int), default=None, help="workers per episode")
    p.add_argument("--rate", type=positive(float), default=None, help="requests/s per episode")
    p.add_argument("--lr", type=positive(float), default=None, help="Adam's learning rate")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cluster preset")
    p.set_defaults(func=_guarded("train-controller", _train_controller))


# ------------------------------------------------------------------------------------------ bench detector
def _detector(args: argparse.Namespace) -> int:
    from services.controller.core.helm import CUSUM_BASELINE, CUSUM_H, CUSUM_K, CUSUM_WARMUP
    from sim.detector import operating_points, record_features

    preset = get_preset(args.preset)
    cost = load_profile(preset.shape.cost)
    cfg = SimConfig(workers=preset.shape.workers, geometry=geometry_for(preset), cost=cost, seed=args.seed)
    print(
        f"recording {args.steady_duration:g} s of steady and {args.burst_duration:g} s of burst ...",
        flush=True,
    )
    started = time.perf_counter()
    steady = record_features(
        cfg, open_source(preset=preset, regime="steady", duration_s=args.steady_duration, seed=args.seed)
    )
    burst = record_features(
        cfg, open_source(preset=preset, regime="burst", duration_s=args.burst_duration, seed=args.seed)
    )
    d = args.burst_duration
    episodes = [(b.start * d, (b.start + b.length) * d) for b in preset.workload.bursts]
    warmup, baseline = CUSUM_WARMUP, CUSUM_BASELINE
    rows = operating_points(steady, burst, episodes, warmup=warmup, baseline=baseline)
    chosen = next((r for r in rows if r["k"] == CUSUM_K and r["h"] == CUSUM_H), None)
    report = {
        "command": "onepool " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "preset": preset.name,
        "episodes": [
            {"kind": b.kind, "start_s": s, "end_s": e}
            for b, (s, e) in zip(preset.workload.bursts, episodes, strict=True)
        ],
        "warmup_windows": warmup,
        "baseline_weight": baseline,
        "points": rows,
        "helm_default": chosen,
        "wall_s": time.perf_counter() - started,
    }
    lines = [
        f"  k {r['k']:g} h {r['h']:g}: {r['false_alarms_per_hour']:.1f} false alarms per worker-hour, "
        f"delay {r['detection_delay_s']:.1f} s, missed {r['missed']}/{r['episodes']}"
        for r in rows
    ]
    write_report(args.json, report, "\n".join(lines))
    return 0


def add_detector_command(bench_sub: Any) -> None:
    p = bench_sub.add_parser(
        "detector",
        help="HELM's burst detector: false alarms on steady and detection delay on burst, per (k, h)",
        description="Runs the simulator at a fixed split on the steady and the burst regime, replays every "
        "worker's window features through HELM's CUSUM detector for a grid of (k, h) and writes the false "
        "alarms per worker-hour and the detection delay per point (docs/controller.md).",
    )
    p.add_argument("--json", required=True, metavar="PATH", help="where to write the operating points")
    p.add_argument("--preset", choices=sorted(PRESETS), default="local", help="cluster preset (local)")
    p.add_argument("--steady-duration", type=positive(float), default=1200.0, help="seconds of steady (1200)")
    p.add_argument("--burst-duration", type=positive(float), default=300.0, help="seconds of burst (300)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.set_defaults(func=_guarded("bench detector", _detector))
