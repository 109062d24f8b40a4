"""The simulator as a gymnasium environment: HELM's base policy is trained on it (:mod:`sim.ppo`).

One episode is one simulated run of a preset's cluster on one regime (drawn per episode) and one workload
seed. A step is one controller window: the observation is every worker's window features as the actor sees
them (:func:`services.controller.core.helm.observe`, shape ``(workers, len(FEATURES))``), the action every
worker's alpha target in [0, 1] (mapped onto the controller's clamp range ``[alpha_min, alpha_max]`` and
then through the controller's own rule, :meth:`sim.cluster.Simulation.propose`: the rate limit and
``min_change``). Workers share the policy; each has its own reward, in ``info["rewards"]`` (the scalar
reward is their mean):

    r = -(p99 x P99 / SLO (capped at 10) + violations x slo_violation_rate
          + critical_mib x critical-path refill MiB + background_mib x prefetch MiB in the window
          + churn x |target sent - target before|)

A worker that reported no features in a window (none does with the default periods: digests every 0.5 s,
windows of 1 s) gets the mean of the others' rewards.

(docs/controller.md says why these weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium
import numpy as np
import numpy.typing as npt

from services.controller.core.helm import FEATURES, observe
from shared.schemas import WorkerFeatures
from sim.cluster import SimConfig, Simulation
from sim.cost import load_profile
from sim.run import geometry_for
from workloads.presets import Preset, get_preset
from workloads.sources import open_source
from workloads.trace import TraceRequest

__all__ = ["EnvConfig", "RewardWeights", "SplitEnv"]

F32 = npt.NDArray[np.float32]
MIB = 1024 * 1024


@dataclass(frozen=True)
class RewardWeights:
    p99: float = 1.0  # P99 in units of the SLO: the tail is what the split is for
    violations: float = 2.0  # a window's share of requests over the SLO, on top of the P99
    # Refill traffic per window: on the critical path (naive refill) a MiB stalls requests, so it costs as
    # much as 5% of the SLO; in the background (prefetch) it only uses the link, a fifth of that.
    critical_mib: float = 0.05
    background_mib: float = 0.01
    churn: float = 0.5  # |target move| per window: a split that dithers costs ticks and refills

    def to_json(self) -> dict[str, float]:
        return {
            "p99": self.p99,
            "violations": self.violations,
            "critical_mib": self.critical_mib,
            "background_mib": self.background_mib,
            "churn": self.churn,
        }


@dataclass(frozen=True)
class EnvConfig:
    preset: str = "local"
    regimes: tuple[str, ...] = ("steady", "trend", "burst")
    duration_s: float = 120.0
    workers: int | None = None  # default: the preset's
    rate: float | None = None  # default: the preset's
    cost: str | None = None  # default: the preset's profile
    reward: RewardWeights = field(default_factory=RewardWeights)

    def preset_obj(self) -> Preset:
        p = get_preset(self.preset)
        if self.workers is not None:
            p = p.with_shape(workers=self.workers)
        if self.rate is not None:
            p = p.with_workload(rate=self.rate)
        return p


class _Recorder:
    """The simulation's policy while the agent drives: records each window's features, proposes nothing
    (a NaN proposal holds); the agent's action is applied through ``Simulation.propose`` after the window."""

    name = "agent"

    def __init__(self) -> None:
        self.seen: dict[str, WorkerFeatures] = {}

    def decide(self, features: WorkerFeatures, current: float) -> float:
        del current
        self.seen[features.worker_id] = features
        return math.nan


class SplitEnv(gymnasium.Env[F32, F32]):
    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium's class attribute)

    def __init__(self, config: EnvConfig | None = None) -> None:
        self.config = config if config is not None else EnvConfig()
        self.preset = self.config.preset_obj()
        self.cost = load_profile(self.config.cost if self.config.cost is not None else self.preset.shape.cost)
        self.n_workers = self.preset.shape.workers
        d = len(FEATURES)
        self.observation_space = gymnasium.spaces.Box(
            -np.inf, np.inf, shape=(self.n_workers, d), dtype=np.float32
        )
        self.action_space = gymnasium.spaces.Box(0.0, 1.0, shape=(self.n_workers,), dtype=np.float32)
        self._base_cfg = SimConfig(
            workers=self.n_workers, geometry=geometry_for(self.preset), cost=self.cost, seed=0
        )
        self.window_s = self._base_cfg.window_ms / 1e3
        self.sim: Simulation | None = None
        self.regime = ""
        self._recorder = _Recorder()
        self._requests: Iterator[TraceRequest] = iter(())
        self._pending: TraceRequest | None = None
        self._k = 0
        self._last = np.zeros((self.n_workers, d), dtype=np.float32)
        self._features: list[WorkerFeatures | None] = [None] * self.n_workers
        self._refill = np.zeros((self.n_workers, 2))  # critical, background bytes so far
        self._targets = np.zeros(self.n_workers)

    # ------------------------------------------------------------------------------------------ gymnasium
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[F32, dict[str, Any]]:
        super().reset(seed=seed)
        opts = options or {}
        regimes = self.config.regimes
        self.regime = str(opts.get("regime", regimes[int(self.np_random.integers(len(regimes)))]))
        workload_seed = int(opts.get("workload_seed", self.np_random.integers(2**31)))
        source = open_source(
            preset=self.preset, regime=self.regime, duration_s=self.config.duration_s, seed=workload_seed
        )
        alpha0 = float(opts.get("alpha0", self.np_random.uniform(0.2, 0.8)))
        cfg = replace(self._base_cfg, seed=workload_seed, alpha0=alpha0)
        self._recorder = _Recorder()
        self.sim = Simulation(cfg, self._recorder)
        self._requests = source.open()
        self._pending = next(self._requests, None)
        self._k = 0
        self._targets = np.full(self.n_workers, alpha0)
        self._refill = np.zeros((self.n_workers, 2))
        self._last = np.zeros_like(self._last)
        self._features = [None] * self.n_workers
        self._advance()
        return self._observe(), {"regime": self.regime, "workload_seed": workload_seed}

    def step(self, action: F32) -> tuple[F32, float, bool, bool, dict[str, Any]]:
        sim = self.sim
        if sim is None:
            raise RuntimeError("SplitEnv.step before reset")
        act = np.clip(np.asarray(action, dtype=np.float64).reshape(self.n_workers), 0.0, 1.0)
        lo, hi = sim.cfg.alpha_min, sim.cfg.alpha_max
        moved = np.zeros(self.n_workers)
        for i, w in enumerate(sim.workers):
            f = self._features[i]
            current = f.alpha_target if f is not None else w.pool.target_alpha
            target = sim.propose(w.id, lo + (hi - lo) * float(act[i]), current)
            moved[i] = abs(target - current)
            self._targets[i] = target
        self._advance()
        obs = self._observe()
        rewards = self._rewards(moved)
        truncated = self._k * self.window_s >= self.config.duration_s
        info = {"rewards": rewards, "regime": self.regime, "targets": self._targets.copy()}
        return obs, float(rewards.mean()), False, truncated, info

    # ------------------------------------------------------------------------------------------ internals
    def _advance(self) -> None:
        """Run to just after the next window closes (its features recorded, nothing decided yet)."""
        sim = self.sim
        assert sim is not None
        self._k += 1
        until = self._k * self.window_s + 1e-6
        batch: list[TraceRequest] = []
        while self._pending is not None and self._pending.t < until:
            batch.append(self._pending)
            self._pending = next(self._requests, None)
        self._recorder.seen.clear()
        sim.advance(batch, until=until)

    def _observe(self) -> F32:
        sim = self.sim
        assert sim is not None
        for i, w in enumerate(sim.workers):
            f = self._recorder.seen.get(w.id)
            self._features[i] = f
            if f is not None:
                self._last[i] = observe(f)
        return self._last.copy()

    def _rewards(self, moved: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        sim = self.sim
        assert sim is not None
        rw, slo = self.config.reward, sim.cfg.slo_ms
        out = np.full(self.n_workers, np.nan)
        for i, w in enumerate(sim.workers):
            c = w.pool.counters
            now = np.array([c.critical_refill_bytes, c.prefetch_bytes], dtype=np.float64)
            critical, background = (now - self._refill[i]) / MIB
            self._refill[i] = now
            f = self._features[i]
            if f is None:
                continue
            out[i] = -(
                rw.p99 * min(f.p99_latency_ms / slo, 10.0)
                + rw.violations * f.slo_violation_rate
                + rw.critical_mib * critical
                + rw.background_mib * background
                + rw.churn * float(moved[i])
            )
        missing = np.isnan(out)
        if missing.any():
            out[missing] = float(out[~missing].mean()) if (~missing).any() else 0.0
        return out

    def features(self) -> list[WorkerFeatures | None]:
        """The last window's features per worker (None: that worker reported none)."""
        return list(self._features)
