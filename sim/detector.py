"""The burst detector's operating points, measured: false alarms on Steady, detection delay on Burst.

:func:`record_features` runs the simulator under a policy (``bench detector``: HELM without its recovery
layer, so the split moves as it does when the detector is in charge of nothing yet) and keeps every
worker's window features;
:func:`operating_points` replays them through :class:`~services.controller.core.helm.BurstDetector`
(HELM's own detector and signals, nothing re-implemented) for a grid of ``(k, h)``:

- ``false_alarms_per_hour``: alarms on the Steady input, per worker-hour (an alarm restarts the sums, as in
  HELM, so a long excursion counts once per restart);
- ``detection_delay_s``: per burst episode of the Burst input (its known start), the time from its start to
  the first alarm on each worker while it lasts, averaged over workers and episodes; ``missed``: the
  episodes x workers with no alarm before the episode ends.

``onepool bench detector`` writes them; HELM's defaults are the point docs/controller.md names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.controller.core.helm import CUSUM_FLOOR, BurstDetector, detector_signals
from services.controller.core.policies import AlphaPolicy, StaticPolicy, parse_policy
from shared.schemas import WorkerFeatures
from sim.cluster import SimConfig, Simulation
from workloads.sources import Source

__all__ = ["GRID_H", "GRID_K", "operating_points", "record_features"]

GRID_K = (0.25, 0.5, 1.0)
GRID_H = (4.0, 6.0, 8.0, 12.0, 16.0)


@dataclass
class _Recording:
    inner: AlphaPolicy
    seen: dict[str, list[tuple[float, WorkerFeatures]]]
    sim: Simulation | None = None
    name: str = "recording"

    def decide(self, features: WorkerFeatures, current: float) -> float:
        t = self.sim.now if self.sim is not None else 0.0
        self.seen.setdefault(features.worker_id, []).append((t, features))
        return self.inner.decide(features, current)


def record_features(
    cfg: SimConfig, source: Source, policy: str = "helm:recovery=0"
) -> dict[str, list[tuple[float, WorkerFeatures]]]:
    """Every worker's (time, features) per controller window of one run under ``policy``."""
    inner = parse_policy(policy)
    rec = _Recording(inner, {})
    if isinstance(inner, StaticPolicy):
        cfg = replace(cfg, alpha0=inner.alpha)
    sim = Simulation(cfg, rec)
    rec.sim = sim
    sim.advance(source.open())
    return rec.seen


def _alarms(
    series: Sequence[tuple[float, WorkerFeatures]], k: float, h: float, warmup: int, baseline: float
) -> list[float]:
    d = BurstDetector(k=k, h=h, baseline=baseline, warmup=warmup, floor=CUSUM_FLOOR)
    return [t for t, f in series if d.step(detector_signals(f))]


def operating_points(
    steady: dict[str, list[tuple[float, WorkerFeatures]]],
    burst: dict[str, list[tuple[float, WorkerFeatures]]],
    episodes: Sequence[tuple[float, float]],
    *,
    warmup: int,
    baseline: float,
    grid_k: Sequence[float] = GRID_K,
    grid_h: Sequence[float] = GRID_H,
) -> list[dict[str, Any]]:
    """One row per ``(k, h)``; ``episodes`` are the Burst input's (start_s, end_s)."""
    rows = []
    steady_hours = sum((s[-1][0] - s[0][0]) for s in steady.values() if s) / 3600.0
    for k in grid_k:
        for h in grid_h:
            false = sum(len(_alarms(s, k, h, warmup, baseline)) for s in steady.values())
            delays: list[float] = []
            missed = 0
            for series in burst.values():
                alarms = np.asarray(_alarms(series, k, h, warmup, baseline))
                for start, end in episodes:
                    hit = alarms[(alarms >= start) & (alarms < end)]
                    if len(hit):
                        delays.append(float(hit[0] - start))
                    else:
                        missed += 1
            rows.append(
                {
                    "k": k,
                    "h": h,
                    "false_alarms_per_hour": false / steady_hours if steady_hours > 0 else float("nan"),
                    "detection_delay_s": float(np.mean(delays)) if delays else float("nan"),
                    "missed": missed,
                    "episodes": len(episodes) * len(burst),
                }
            )
    return rows
