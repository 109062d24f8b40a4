"""Running the simulator: request sources, one run per policy, the static sweep and the offline optimum.

- A :class:`~workloads.sources.Source` hands out the same requests afresh for every run, so policies
  are compared on identical input.
- :func:`run_policy`: one run, its summary (the report's keys) and its alpha timeline.
- :func:`sweep`: the static grid 0.1 ... 0.9 on the same input, and the **offline-optimal alpha\\***.
  For each decision window (``window_s``), alpha\\* is the static alpha whose run had the lowest P99 over the
  requests that arrived in that window: each candidate split is judged in the state its own trajectory
  reached (the caches as that split had shaped them), the same alpha on every worker. The *oracle run*
  then follows alpha\\* (every worker's target set at each window's start, moved by the pool's ordinary
  ticks, so its reallocation costs are paid) and gives ``oracle_p99_ms``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.controller.core.policies import AlphaPolicy, StaticPolicy, parse_policy
from services.worker.core.geometry import PoolGeometry
from shared.schemas import WorkerFeatures
from sim.cluster import SimConfig, SimResult, Simulation
from workloads.presets import Preset
from workloads.sources import Source
from workloads.trace import TraceRequest

__all__ = [
    "STATIC_GRID",
    "RunOutcome",
    "SweepOutcome",
    "geometry_for",
    "run_policy",
    "sweep",
]

STATIC_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def geometry_for(preset: Preset, *, pool_mib: float | None = None) -> PoolGeometry:
    shape = preset.shape
    return PoolGeometry(
        budget_bytes=int((pool_mib if pool_mib is not None else shape.pool_mib) * 1024 * 1024),
        chunk_bytes=shape.chunk_kib * 1024,
        emb_entry_bytes=shape.emb_entry_bytes,
        kv_page_bytes=shape.kv_page_bytes,
        kv_page_tokens=shape.page_tokens,
    )


@dataclass
class RunOutcome:
    policy: str
    result: SimResult
    summary: dict[str, float]
    wall_s: float

    @property
    def requests_per_s(self) -> float:
        return len(self.result.arrival) / self.wall_s if self.wall_s > 0 else math.nan


@dataclass
class HoldPolicy:
    """Proposes the current alpha: leaves the split to whoever sets the targets (the oracle run)."""

    name: str = "hold"

    def decide(self, features: WorkerFeatures, current: float) -> float:
        del features
        return current


def _policy(spec: str | AlphaPolicy) -> AlphaPolicy:
    return parse_policy(spec) if isinstance(spec, str) else spec


def run_policy(
    cfg: SimConfig,
    source: Source,
    policy: str | AlphaPolicy,
    *,
    warmup_s: float,
    schedule: Sequence[float] | None = None,
    schedule_window_s: float = 1.0,
) -> RunOutcome:
    """One run. A static policy starts the pools at its alpha (no ramp); ``schedule`` (alpha per window of
    ``schedule_window_s``) overrides the controller by setting every worker's target at each window start."""
    chosen = _policy(policy) if schedule is None else HoldPolicy()
    if isinstance(chosen, StaticPolicy):
        cfg = replace(cfg, alpha0=chosen.alpha)
    sim = Simulation(cfg, chosen)
    started = time.perf_counter()
    if schedule is None:
        sim.advance(source.open())
    else:
        requests = source.open()
        pending: TraceRequest | None = next(requests, None)
        for k, alpha in enumerate(schedule):
            end = (k + 1) * schedule_window_s
            sim.set_targets(alpha)
            batch: list[TraceRequest] = []
            while pending is not None and pending.t < end:
                batch.append(pending)
                pending = next(requests, None)
            sim.advance(batch, until=end)
        rest = [] if pending is None else [pending, *requests]
        sim.advance(rest)
    wall = time.perf_counter() - started
    result = sim.result()
    name = chosen.name if schedule is None else "oracle"
    return RunOutcome(name, result, result.summary(cfg.slo_ms, since=warmup_s), wall)


def window_p99(result: SimResult, window_s: float, n_windows: int) -> np.ndarray:
    """P99 latency of the requests that arrived in each window (NaN for an empty window); a shed request
    counts as infinitely slow."""
    out = np.full(n_windows, np.nan)
    which = np.minimum((result.arrival // window_s).astype(np.int64), n_windows - 1)
    lat = np.where(np.isnan(result.latency_ms), np.inf, result.latency_ms)
    for k in range(n_windows):
        here = lat[which == k]
        if len(here):
            out[k] = float(np.percentile(here, 99))
    return out


@dataclass
class SweepOutcome:
    static: dict[str, RunOutcome]
    best_static_alpha: float
    alpha_star: list[float]
    oracle: RunOutcome
    window_s: float

    def to_json(self) -> dict[str, Any]:
        best = self.static[f"{self.best_static_alpha:g}"]
        return {
            "static": {a: o.summary for a, o in self.static.items()},
            "best_static_alpha": self.best_static_alpha,
            "best_static_p99_ms": best.summary["p99_ms"],
            "alpha_star": self.alpha_star,
            "alpha_star_mean": float(np.mean(self.alpha_star)),
            "alpha_star_window_s": self.window_s,
            "oracle_p99_ms": self.oracle.summary["p99_ms"],
            "oracle": self.oracle.summary,
        }


def sweep(
    cfg: SimConfig,
    source: Source,
    *,
    warmup_s: float,
    window_s: float,
    grid: Sequence[float] = STATIC_GRID,
    progress: Callable[[str], None] = lambda _: None,
) -> SweepOutcome:
    static: dict[str, RunOutcome] = {}
    for alpha in grid:
        progress(f"static:{alpha:g}")
        static[f"{alpha:g}"] = run_policy(cfg, source, StaticPolicy(alpha), warmup_s=warmup_s)
    best = min(grid, key=lambda a: static[f"{a:g}"].summary["p99_ms"])
    n_windows = max(1, math.ceil(source.duration_s / window_s))
    table = np.vstack([window_p99(static[f"{a:g}"].result, window_s, n_windows) for a in grid])
    alpha_star: list[float] = []
    for k in range(n_windows):
        column = table[:, k]
        alpha_star.append(float(grid[int(np.nanargmin(column))]) if np.isfinite(column).any() else best)
    progress("oracle (follows alpha*)")
    oracle = run_policy(
        replace(cfg, alpha0=alpha_star[0]),
        source,
        StaticPolicy(alpha_star[0]),
        warmup_s=warmup_s,
        schedule=alpha_star,
        schedule_window_s=window_s,
    )
    return SweepOutcome(static, best, alpha_star, oracle, window_s)
