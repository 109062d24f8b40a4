"""`onepool sim --validate`: one workload on a real local cluster and in the simulator, side by side.

The real side is `onepool bench cluster`'s replay (:func:`bench.cluster.run_local`: a `LocalCluster` with
the preset's geometry, the same alpha and routing policy, each request sent at its trace time, latency from
then). The simulated side is :func:`sim.run.run_policy` with the same preset geometry, policy, routing,
warm-up and the given cost profile. Keys: ``validation_p50_error`` and ``validation_p99_error``
(|sim - real| / real; target <= 0.2 each), both sides' summaries, and ``differences``: what the two sides
measured differently, computed from both runs (hit rates; where the real latency goes: inside the workers,
in the gateway and bus, in HTTP and this process) next to what the profile charges for it. Nothing is
fitted here: a miss is reported with its likely cause, not tuned away.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster import (
    ClusterBenchOptions,
    PolicyRun,
    check_options,
    local_worker_env,
    records_dir_for,
    records_name,
    run_async,
    run_local,
)
from bench.replay import write_records
from bench.report import json_safe, write_report
from sim.cluster import SimConfig
from sim.cost import CostProfile
from sim.run import run_policy
from workloads.presets import Preset
from workloads.sources import Source

__all__ = ["TARGET", "ValidateOptions", "run_validation"]

TARGET = 0.2  # the largest relative error of P50 and of P99 counted as agreement
SUMMARY_KEYS = ("p50_ms", "p99_ms", "slo_satisfaction", "throughput_rps", "emb_hit_rate", "kv_hit_rate")


@dataclass(frozen=True)
class ValidateOptions:
    json_path: str
    preset: Preset
    source: Source
    cfg: SimConfig  # the simulator's side: workers, geometry, cost, routing, refill mode, seed
    policy: str
    warmup_s: float
    worker_env: Mapping[str, str] = field(default_factory=dict)  # extra for the real workers
    report_dir: str | None = None
    command: str = ""

    @property
    def cost(self) -> CostProfile:
        return self.cfg.cost


def relative_error(sim: float, real: float) -> float:
    return abs(sim - real) / real if real > 0 and math.isfinite(sim) else math.nan


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) else math.nan


def differences(real: Mapping[str, Any], sim: Mapping[str, Any], cost: CostProfile) -> dict[str, Any]:
    """Where the two sides part, as numbers and one sentence each."""
    notes: list[str] = []
    emb_gap = _num(sim["emb_hit_rate"]) - _num(real["emb_hit_rate"])
    kv_gap = _num(sim["kv_hit_rate"]) - _num(real["kv_hit_rate"])
    if abs(emb_gap) > 0.05 or abs(kv_gap) > 0.05:
        notes.append(
            f"the caches saw different things: EMB hit rate sim {_num(sim['emb_hit_rate']):.3f} vs real "
            f"{_num(real['emb_hit_rate']):.3f}, KV hit rate sim {_num(sim['kv_hit_rate']):.3f} vs real "
            f"{_num(real['kv_hit_rate']):.3f} (routing on delayed views, or timing, sent requests elsewhere)"
        )
    real_p50 = _num(real["p50_ms"])
    worker_p50 = _num(real.get("worker_p50_ms"))
    gateway_p50 = _num(real.get("gateway_p50_ms"))
    sim_model_p50 = _num(sim["p50_ms"]) - cost.overhead_ms
    if math.isfinite(worker_p50):
        notes.append(
            f"inside the workers (receipt to reply) the real median is {worker_p50:.2f} ms; the simulator's "
            f"median less the profile's overhead_ms is {sim_model_p50:.2f} ms: the cost profile "
            f"{cost.name!r} prices this load {sim_model_p50 / worker_p50 if worker_p50 else math.nan:.2f}x "
            "(a profile measured at another load level, batch mix or machine phase shows here)"
        )
        outside = real_p50 - worker_p50
        notes.append(
            f"outside the workers the real cluster adds {outside:.2f} ms at the median "
            f"(gateway and NATS {gateway_p50 - worker_p50:.2f} ms, HTTP and this process "
            f"{real_p50 - gateway_p50:.2f} ms); the profile's overhead_ms is {cost.overhead_ms:g}"
        )
    lag = _num(real.get("send_lag_p99_ms"))
    if math.isfinite(lag) and lag > 5:
        notes.append(f"the replay itself sent late (P99 {lag:.1f} ms): this machine was busy")
    return {
        "emb_hit_rate_gap": emb_gap,
        "kv_hit_rate_gap": kv_gap,
        "real_worker_p50_ms": worker_p50,
        "real_gateway_p50_ms": gateway_p50,
        "real_outside_workers_p50_ms": real_p50 - worker_p50,
        "sim_p50_less_overhead_ms": sim_model_p50,
        "profile_overhead_ms": cost.overhead_ms,
        "notes": notes,
    }


def _real(opts: ValidateOptions) -> PolicyRun:
    bench = ClusterBenchOptions(
        json_path=opts.json_path,
        source=opts.source,
        preset=opts.preset,
        alpha_policies=(opts.policy,),
        routings=(opts.cfg.routing.value,),
        workers=opts.cfg.workers,
        slo_ms=opts.cfg.slo_ms,
        warmup_s=opts.warmup_s,
        worker_env_extra=dict(opts.worker_env),
        command=opts.command,
    )
    check_options(bench)

    async def go() -> PolicyRun:
        with tempfile.TemporaryDirectory(prefix="onepool-validate-") as logs:
            return await run_local(bench, opts.policy, opts.cfg.routing.value, Path(logs))

    result: PolicyRun = run_async(go())
    return result


def run_validation(opts: ValidateOptions) -> int:
    print(f"simulator: {opts.policy} on {opts.source.name} ({opts.source.duration_s:.1f} s) ...", flush=True)
    outcome = run_policy(opts.cfg, opts.source, opts.policy, warmup_s=opts.warmup_s)
    sim = dict(outcome.summary)
    print(f"real local cluster: {opts.cfg.workers} workers ...", flush=True)
    run = _real(opts)
    real = run.summary(opts.cfg.slo_ms, opts.warmup_s)
    records = records_dir_for(opts.json_path) / f"{records_name(run.key)}.jsonl"
    write_records(records, run.records)
    real["records"] = str(records)
    timelines = {k: real.pop(k) for k in ("alpha_timeline", "counters_timeline") if k in real}
    p50_err = relative_error(sim["p50_ms"], _num(real["p50_ms"]))
    p99_err = relative_error(sim["p99_ms"], _num(real["p99_ms"]))
    met = p50_err <= TARGET and p99_err <= TARGET
    report = json_safe(
        {
            "command": opts.command,
            "validation_p50_error": p50_err,
            "validation_p99_error": p99_err,
            "target": TARGET,
            "met": met,
            "real": real,
            "sim": sim,
            "differences": differences(real, sim, opts.cost),
            "real_timelines": timelines,
            "setup": {
                "preset": opts.preset.to_json(),
                "sim": opts.cfg.to_json(),
                "cost": opts.cost.to_json(),
                "policy": opts.policy,
                "input": {
                    "name": opts.source.name,
                    "duration_s": opts.source.duration_s,
                    **opts.source.setup,
                },
                "warmup_s": opts.warmup_s,
                "real_worker_env": {
                    **local_worker_env(opts.preset, opts.source, opts.policy),
                    **opts.worker_env,
                },
            },
        }
    )
    lines = [
        f"onepool sim --validate: {opts.policy}, {opts.cfg.workers} workers, {opts.source.name}",
        *(
            f"  {side:>4}: "
            + "  ".join(f"{k} {_num(row.get(k)):.3f}" for k in SUMMARY_KEYS)
            + f"  failed {row.get('failed_requests', row.get('shed'))}"
            for side, row in (("real", real), ("sim", sim))
        ),
        f"  validation_p50_error {p50_err:.3f}  validation_p99_error {p99_err:.3f} "
        f"(target <= {TARGET}): {'met' if met else 'MISSED'}",
    ]
    if not met:
        lines += [f"  - {n}" for n in report["differences"]["notes"]]
    if opts.report_dir:
        out = Path(opts.report_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = "\n".join(
            ["# onepool sim --validate", "", f"Command: `{opts.command}`", "", "```", *lines, "```"]
        )
        (out / "validate.md").write_text(text + "\n")
    write_report(opts.json_path, report, "\n".join(lines))
    return 0
