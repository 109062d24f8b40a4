"""Controller decision latency (``onepool bench controller``): one alpha decision, per policy.

Map
---
* :class:`FeatureStream` -- seeded synthetic ``WorkerFeatures`` that drift as a cluster's do (rates with
  bursts and idle windows, history lengths, hit rates following the split, the cost fit arriving late);
  decisions are fed back into it. Not timed.
* :func:`measure_policy` -- times exactly what ``ControllerService.decide`` times: ``policy.decide`` then
  the controller's ``Clamp`` (from ``ControllerSettings``), between two ``perf_counter_ns`` calls, the GC
  off; one worker's decisions and whole rounds of ``workers``.
* :func:`run_controller_bench` -- every ``--policy`` (default ``helm``), the JSON report and
  ``--report``'s markdown and histogram. Keys and figures: docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import machine_ref, write_report
from services.cachestate.settings import CacheStateSettings
from services.controller.core.policies import AlphaPolicy, Clamp, parse_policy
from services.controller.service import DecisionLatency
from services.controller.settings import ControllerSettings
from shared.extras import extra_imports
from shared.schemas import CostCoefficients, WorkerFeatures
from shared.slo import DEFAULT_SLO_MS

__all__ = [
    "DEFAULT_DECISIONS",
    "DEFAULT_WORKERS",
    "TARGET_P99_US",
    "ControllerBenchOptions",
    "FeatureStream",
    "measure_policy",
    "run_controller_bench",
]

DEFAULT_DECISIONS = 20_000
DEFAULT_WORKERS = 32
DEFAULT_SEED = 0
TARGET_P99_US = 10.0
MIN_ROUNDS = 100
WARMUP_DECISIONS = 2_000
WARMUP_ROUNDS = 10
HISTOGRAM_BINS = 40
ALPHA_SPEED = 0.04  # how far a worker's alpha follows its target per window (reallocation in progress)
ROW_BYTES = 128  # bytes per EMB row (the tiny preset: item_dim 32 x float32)
CANDIDATES = 128


@dataclass(slots=True)
class _Worker:
    """One synthetic worker's slowly moving state; ``FeatureStream.next`` turns it into a window."""

    worker_id: str
    base_rate: float
    rate: float
    history: float
    emb_bias: float
    kv_bias: float
    emb_hit: float
    kv_hit: float
    alpha: float
    alpha_target: float
    true_cost: CostCoefficients
    burst_left: int = 0
    burst_factor: float = 1.0
    windows: int = 0
    samples: int = 0


class FeatureStream:
    """Seeded per-worker feature windows with drift, noise, bursts and the split's feedback; see the module
    docstring. ``next(i)`` is worker i's next window; ``commit(i, target)`` feeds a decision back."""

    def __init__(
        self, workers: int, seed: int, *, window_ms: float, min_change: float, slo_ms: float
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.rng = random.Random(seed)
        self.window_ms = window_ms
        self.min_change = min_change
        self.slo_ms = slo_ms
        r = self.rng
        self.workers = [
            _Worker(
                worker_id=f"w{i}",
                base_rate=(base := math.exp(r.uniform(math.log(10.0), math.log(200.0)))),
                rate=base,
                history=math.exp(r.uniform(math.log(64.0), math.log(1024.0))),
                emb_bias=r.uniform(0.45, 0.7),
                kv_bias=r.uniform(0.3, 0.55),
                emb_hit=0.7,
                kv_hit=0.6,
                alpha=(alpha := r.uniform(0.3, 0.7)),
                alpha_target=alpha,
                true_cost=CostCoefficients(
                    fixed_ms=r.uniform(1.0, 4.0),
                    ms_per_new_token=r.uniform(0.005, 0.02),
                    ms_per_cached_token=r.uniform(0.0005, 0.002),
                    ms_per_candidate=r.uniform(0.002, 0.01),
                    ms_per_emb_miss=r.uniform(0.0005, 0.004),
                ),
            )
            for i in range(workers)
        ]

    def __len__(self) -> int:
        return len(self.workers)

    def next(self, i: int) -> WorkerFeatures:
        w = self.workers[i]
        r = self.rng
        window_s = self.window_ms / 1e3
        w.windows += 1
        # Load: a log random walk of the base, bursts, noise, the odd idle window.
        w.base_rate = min(500.0, max(5.0, w.base_rate * math.exp(r.gauss(0.0, 0.03))))
        if w.burst_left > 0:
            w.burst_left -= 1
        elif r.random() < 0.02:
            w.burst_left, w.burst_factor = r.randint(3, 8), r.uniform(2.0, 3.5)
        burst = w.burst_left > 0
        prev_rate = w.rate
        if r.random() < 0.01:
            w.rate = 0.0
        else:
            w.rate = w.base_rate * (w.burst_factor if burst else 1.0) * math.exp(r.gauss(0.0, 0.08))
        # History length drifts; this window's mean is noisy around it.
        w.history = min(2048.0, max(32.0, w.history * math.exp(r.gauss(0.0, 0.02))))
        mean_history = w.history * math.exp(r.gauss(0.0, 0.05))
        # The split: alpha follows its target; hit rates follow the split, lagged and noisy.
        step = w.alpha_target - w.alpha
        w.alpha += max(-ALPHA_SPEED, min(ALPHA_SPEED, step))
        emb_eq = _clip(w.emb_bias + 0.35 * w.alpha - (0.05 if burst else 0.0), 0.2, 0.995)
        kv_eq = _clip(w.kv_bias + 0.5 * (1.0 - w.alpha) - (0.1 if burst else 0.0), 0.05, 0.99)
        w.emb_hit = _clip(w.emb_hit + 0.3 * (emb_eq - w.emb_hit) + r.gauss(0.0, 0.01), 0.0, 1.0)
        w.kv_hit = _clip(w.kv_hit + 0.3 * (kv_eq - w.kv_hit) + r.gauss(0.0, 0.015), 0.0, 1.0)
        new_token_fraction = _clip((1.0 - w.kv_hit) + 0.04 * w.kv_hit + r.gauss(0.0, 0.01), 0.005, 1.0)
        misses_per_request = (1.0 - w.emb_hit) * (0.8 * mean_history + CANDIDATES)
        requests = w.rate * window_s
        w.samples += int(requests)
        # The worker's own cost fit: none for its first windows, a noisy estimate of the truth after.
        t = w.true_cost
        cost = (
            CostCoefficients()
            if w.windows <= 3
            else CostCoefficients(
                fixed_ms=t.fixed_ms * _noise(r),
                ms_per_new_token=t.ms_per_new_token * _noise(r),
                ms_per_cached_token=t.ms_per_cached_token * _noise(r),
                ms_per_candidate=t.ms_per_candidate * _noise(r),
                ms_per_emb_miss=t.ms_per_emb_miss * _noise(r),
                samples=max(1, w.samples),
            )
        )
        service_ms = (
            t.fixed_ms
            + t.ms_per_new_token * new_token_fraction * mean_history
            + t.ms_per_cached_token * (1.0 - new_token_fraction) * mean_history
            + t.ms_per_candidate * CANDIDATES
            + t.ms_per_emb_miss * misses_per_request
        )
        load = min(0.95, requests * service_ms / max(self.window_ms, 1e-9))
        p99 = service_ms * (3.0 + 10.0 * load * load) * math.exp(r.gauss(0.0, 0.1)) if requests else 0.0
        if requests == 0:
            slo_violation_rate = 0.0
        elif p99 > self.slo_ms:
            slo_violation_rate = _clip(0.01 + 0.1 * (p99 / self.slo_ms - 1.0), 0.0, 1.0)
        else:
            slo_violation_rate = _clip(r.gauss(0.003, 0.004), 0.0, 1.0)
        return WorkerFeatures(
            worker_id=w.worker_id,
            window_ms=self.window_ms,
            request_rate=w.rate,
            request_rate_delta=(w.rate - prev_rate) / window_s,
            hot_user_share=_clip(w.kv_hit + r.gauss(0.0, 0.02), 0.0, 1.0) if requests else 0.0,
            mean_history=mean_history if requests else 0.0,
            max_history=int(min(4096.0, mean_history * r.uniform(2.0, 4.0))) if requests else 0,
            new_token_fraction=new_token_fraction if requests else 0.0,
            emb_hit_rate=w.emb_hit if requests else 0.0,
            kv_hit_rate=w.kv_hit if requests else 0.0,
            miss_bytes=int(misses_per_request * requests * ROW_BYTES),
            emb_misses_per_request=misses_per_request if requests else 0.0,
            p99_latency_ms=p99,
            slo_violation_rate=slo_violation_rate,
            alpha=_clip(w.alpha, 0.0, 1.0),
            alpha_target=w.alpha_target,
            cost=cost,
        )

    def commit(self, i: int, target: float) -> None:
        """A decision for worker i: its target moves when the controller would have sent it."""
        w = self.workers[i]
        if abs(target - w.alpha_target) >= self.min_change:
            w.alpha_target = target


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _noise(r: random.Random) -> float:
    return math.exp(r.gauss(0.0, 0.05))


@dataclass(frozen=True)
class ControllerBenchOptions:
    json_path: str
    policies: tuple[str, ...] = ()  # specs for parse_policy; () means the controller's default
    workers: int = DEFAULT_WORKERS
    decisions: int = DEFAULT_DECISIONS
    seed: int = DEFAULT_SEED
    report_dir: str | None = None
    command: str = ""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.decisions < 1:
            raise ValueError(f"decisions must be >= 1, got {self.decisions}")


@dataclass
class _Setting:
    clamp: Clamp
    min_change: float
    window_ms: float
    slo_ms: float


# The figure the HELM issue asks for: its full three-layer decision.
DEFAULT_POLICY = "helm"


def _setting() -> _Setting:
    settings = ControllerSettings()
    return _Setting(
        clamp=Clamp(settings.alpha_min, settings.alpha_max, settings.max_step),
        min_change=settings.min_change,
        window_ms=CacheStateSettings().features_window_ms,
        slo_ms=DEFAULT_SLO_MS,
    )


def _percentile_us(ns: Sequence[int], q: float) -> float:
    lat = DecisionLatency(len(ns))  # the controller's own definition: nearest rank
    for v in ns:
        lat.add(v)
    value = lat.percentile_us(q)
    assert value is not None
    return value


def _histogram(ns: Sequence[int]) -> dict[str, Any]:
    """Log-spaced bins from the fastest to the slowest decision: edges in us, counts summing to len(ns)."""
    us = np.asarray(ns, dtype=np.float64) / 1e3
    lo = max(float(us.min()), 1e-3)
    hi = max(float(us.max()), lo * 1.01)
    edges = np.geomspace(lo, hi, HISTOGRAM_BINS + 1)
    edges[0], edges[-1] = min(lo, float(us.min())), hi  # every sample inside, the last edge included
    counts, _ = np.histogram(us, bins=edges)
    return {"scale": "log", "edges_us": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def _timed_decisions(
    policy: AlphaPolicy, clamp: Clamp, stream: FeatureStream, decisions: int, warmup: int
) -> tuple[list[int], int]:
    """One worker's decision at a time, the workers in turn: ns of each of the last ``decisions``, and how
    many of those moved their worker's target (by ``min_change`` or more: a decision the controller sends)."""
    n = len(stream)
    out = [0] * decisions
    moved = 0
    ns = time.perf_counter_ns
    for k in range(warmup + decisions):
        i = k % n
        features = stream.next(i)
        current = features.alpha_target
        t0 = ns()
        target = clamp(policy.decide(features, current), current)
        elapsed = ns() - t0
        stream.commit(i, target)
        if k >= warmup:
            out[k - warmup] = elapsed
            moved += abs(target - current) >= stream.min_change
    return out, moved


def _timed_rounds(
    policy: AlphaPolicy, clamp: Clamp, stream: FeatureStream, rounds: int, warmup: int
) -> list[int]:
    """Whole rounds (every worker's decision, in order, as one report); ns of each of the last ``rounds``."""
    n = len(stream)
    out = [0] * rounds
    targets = [0.0] * n
    ns = time.perf_counter_ns
    for r in range(warmup + rounds):
        report = [stream.next(i) for i in range(n)]
        t0 = ns()
        for j, features in enumerate(report):
            current = features.alpha_target
            targets[j] = clamp(policy.decide(features, current), current)
        elapsed = ns() - t0
        for j in range(n):
            stream.commit(j, targets[j])
        if r >= warmup:
            out[r - warmup] = elapsed
    return out


def rounds_for(decisions: int, workers: int) -> int:
    return max(MIN_ROUNDS, decisions // workers)


def measure_policy(spec: str, *, workers: int, decisions: int, seed: int) -> dict[str, Any]:
    """The figures of one policy (see the module docstring). GC is off while timing, back on after."""
    setting = _setting()
    policy = parse_policy(spec)

    def stream() -> FeatureStream:
        return FeatureStream(
            workers, seed, window_ms=setting.window_ms, min_change=setting.min_change, slo_ms=setting.slo_ms
        )

    rounds = rounds_for(decisions, workers)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        one, moved = _timed_decisions(
            policy, setting.clamp, stream(), decisions, min(decisions, WARMUP_DECISIONS)
        )
        policy = parse_policy(spec)  # a stateful policy starts the round figures from nothing as well
        whole = _timed_rounds(policy, setting.clamp, stream(), rounds, WARMUP_ROUNDS)
    finally:
        if was_enabled:
            gc.enable()
    p99 = _percentile_us(one, 99)
    return {
        "policy": policy.name,
        "decision_p50_us": _percentile_us(one, 50),
        "decision_p99_us": p99,
        "decision_mean_us": round(sum(one) / len(one) / 1e3, 4),
        "decision_max_us": max(one) / 1e3,
        "decision_32_workers_us": _percentile_us(whole, 50),
        "decision_32_workers_p99_us": _percentile_us(whole, 99),
        "workers": workers,
        "rounds": rounds,
        "moved_share": round(moved / decisions, 4),
        "histogram": _histogram(one),
        "target_p99_us": TARGET_P99_US,
        "met": p99 <= TARGET_P99_US,
    }


def _timer_floor_us(samples: int = 10_000) -> float:
    """p50 of two back-to-back perf_counter_ns() calls: what every timed decision includes."""
    ns = time.perf_counter_ns
    out = []
    for _ in range(samples):
        t0 = ns()
        out.append(ns() - t0)
    return _percentile_us(out, 50)


def _summary(report: dict[str, Any]) -> str:
    lines = []
    for spec, p in report["policies"].items():
        lines.append(
            f"{spec}: decision p50 {p['decision_p50_us']:.2f} us, p99 {p['decision_p99_us']:.2f} us "
            f"(target <= {TARGET_P99_US:g}: {'met' if p['met'] else 'NOT met'}), mean "
            f"{p['decision_mean_us']:.2f} us, max {p['decision_max_us']:.1f} us; a round of {p['workers']} "
            f"workers p50 {p['decision_32_workers_us']:.1f} us"
        )
    return "\n".join(lines)


def run_controller_bench(opts: ControllerBenchOptions) -> int:
    setting = _setting()
    specs = opts.policies or (DEFAULT_POLICY,)
    for spec in specs:
        parse_policy(spec)  # every spec checked before anything is timed (ValueError names it)
    policies = {
        spec: measure_policy(spec, workers=opts.workers, decisions=opts.decisions, seed=opts.seed)
        for spec in specs
    }
    clamp = setting.clamp
    first = policies[specs[0]]
    report: dict[str, Any] = {
        # the first policy's figures at the top level too (the keys), all of them under "policies"
        "policy": specs[0],
        **{
            k: first[k] for k in ("decision_p50_us", "decision_p99_us", "decision_32_workers_us", "histogram")
        },
        "policies": policies,
        "target_p99_us": TARGET_P99_US,
        "met": all(p["met"] for p in policies.values()),
        "setup": {
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
            "decisions": opts.decisions,
            "warmup_decisions": min(opts.decisions, WARMUP_DECISIONS),
            "rounds": rounds_for(opts.decisions, opts.workers),
            "warmup_rounds": WARMUP_ROUNDS,
            "workers": opts.workers,
            "seed": opts.seed,
            "clamp": {"lo": clamp.lo, "hi": clamp.hi, "max_step": clamp.max_step},
            "min_change": setting.min_change,
            "window_ms": setting.window_ms,
            "gc": "disabled while timing (after gc.collect()), re-enabled after",
            "timer": "time.perf_counter_ns around policy.decide + Clamp, as ControllerService.decide",
            "timer_floor_p50_us": _timer_floor_us(),
            "percentiles": "nearest rank (the controller's DecisionLatency)",
        },
        "command": opts.command,
        "machine_ref": machine_ref(),
    }
    write_report(opts.json_path, report, _summary(report))
    if opts.report_dir is not None:
        out = Path(opts.report_dir)
        files = write_controller_report(report, out)
        print(f"wrote {', '.join(str(out / f) for f in files)}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# --report DIR: controller.md and decision_latency.png
# ---------------------------------------------------------------------------------------------------------
def _plt() -> Any:
    with extra_imports("plots", "a report's plots"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_controller_report(report: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, p in report["policies"].items():
        h = p["histogram"]
        edges, counts = np.asarray(h["edges_us"]), np.asarray(h["counts"], dtype=np.float64)
        share = counts / max(counts.sum(), 1.0)
        steps = ax.stairs(share, edges, label=f"{spec} (p99 {p['decision_p99_us']:.2f} us)")
        ax.axvline(p["decision_p99_us"], color=steps.get_edgecolor(), linestyle=":", linewidth=0.8)
    ax.axvline(
        TARGET_P99_US, color="red", linestyle="--", linewidth=1.0, label=f"target p99 {TARGET_P99_US:g} us"
    )
    ax.set_xscale("log")
    ax.set_xlabel("one worker's decision: policy.decide + Clamp (us)")
    ax.set_ylabel("share of decisions")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "decision_latency.png", dpi=100)
    plt.close(fig)

    setup = report["setup"]
    rows = [
        "| policy | p50 us | p99 us | mean us | max us | round of "
        f"{setup['workers']} workers, p50 us | moved | p99 <= {TARGET_P99_US:g} us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec, p in report["policies"].items():
        rows.append(
            f"| `{spec}` | {p['decision_p50_us']:.2f} | {p['decision_p99_us']:.2f} | "
            f"{p['decision_mean_us']:.2f} | {p['decision_max_us']:.1f} | {p['decision_32_workers_us']:.1f} | "
            f"{p['moved_share']:.0%} | {'met' if p['met'] else 'not met'} |"
        )
    ref = report.get("machine_ref", {})
    text = "\n".join(
        [
            "# Controller decision latency",
            "",
            f"`{report.get('command') or 'onepool bench controller'}`",
            "",
            *rows,
            "",
            f"{setup['decisions']} one-worker decisions per policy after {setup['warmup_decisions']} warm-up "
            f"ones; {setup['rounds']} rounds of {setup['workers']} workers after {setup['warmup_rounds']}; "
            f"seed {setup['seed']}; Python {setup['python']}; GC {setup['gc']}; clamp "
            f"[{setup['clamp']['lo']:g}, {setup['clamp']['hi']:g}], max_step {setup['clamp']['max_step']:g}; "
            f"timer floor (two perf_counter_ns calls) p50 {setup['timer_floor_p50_us']:.3f} us.",
            "",
            "Machine reference timings: " + ", ".join(f"`{k}` {v}" for k, v in ref.items()),
            "",
            "![one worker's decision latency](decision_latency.png)",
            "",
        ]
    )
    (out / "controller.md").write_text(text)
    return ["controller.md", "decision_latency.png"]
