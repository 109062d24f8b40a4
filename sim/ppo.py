"""HELM's layer 1, trained: a small PPO (clipped surrogate, GAE, a Beta policy) on :class:`sim.env.SplitEnv`.

Map
---
* :class:`TrainConfig` -- every hyper-parameter, with its reason; written into the weights' metadata.
* :class:`RunningNorm` -- the observation statistics (Welford), updated while training and frozen into the
  shipped file.
* :class:`ActorCritic` -- separate actor and critic MLPs (tanh); the actor's two outputs are a Beta's
  parameters ``1 + softplus(.)``, the layout :class:`services.controller.core.helm.Actor` reads in numpy.
* :func:`train` -- iterations of (collect episodes, PPO update); returns the numpy actor and the learning
  curve. ``onepool train-controller`` (sim/cli.py) runs it.

Workers share one policy and are treated as parallel agents of one episode: each worker's trajectory gets
its own advantages (GAE) from its own rewards. An episode ends by time (truncation), so its last value is
bootstrapped. Deterministic for a seed: torch runs one thread, the simulator is seeded per episode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from services.controller.core.helm import FEATURES, OBS_CLIP, Actor
from sim.env import EnvConfig, SplitEnv

__all__ = ["ActorCritic", "RunningNorm", "TrainConfig", "TrainResult", "train"]

F64 = npt.NDArray[np.float64]
VERSION = "helm-ppo-1"


# Twice the local preset's workers at the same load per worker: twice the agents (transitions) per simulated
# second, which is what the training's CPU time buys.
TRAIN_WORKERS = 4
TRAIN_RATE = 600.0


def _train_env() -> EnvConfig:
    return EnvConfig(workers=TRAIN_WORKERS, rate=TRAIN_RATE)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    iterations: int = 16
    episodes_per_iteration: int = 4  # each on a regime drawn at random; 4 x 120 windows x workers per update
    env: EnvConfig = field(default_factory=_train_env)
    hidden: int = 32  # two layers of 32: a decision stays a few microseconds in numpy
    gamma: float = 0.9  # 1-s windows; a move ramps over a few windows and its effect fades in ~10
    lam: float = 0.9
    clip: float = 0.2  # PPO's usual ratio clip
    epochs: int = 8
    minibatch: int = 128
    lr: float = 1e-3  # at 3e-4 the actor barely left its initial split in 12 iterations
    entropy: float = 1e-3  # a little exploration; a Beta's entropy is bounded
    value_coef: float = 0.5
    max_grad_norm: float = 0.5

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["env"]["regimes"] = list(self.env.regimes)
        return out


class RunningNorm:
    """Mean and variance of every feature over all observations seen (Welford, merged batch by batch)."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, x: F64) -> None:
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> F64:
        var = self.m2 / max(1, self.count - 1)
        out: F64 = np.maximum(np.sqrt(var), 1e-3)  # a constant feature must not blow up
        return out

    def __call__(self, x: F64) -> F64:
        """Normalised and clipped to +-OBS_CLIP, as the serving actor clips its inputs."""
        out: F64 = np.clip((x - self.mean) / self.std, -OBS_CLIP, OBS_CLIP)
        return out


class ActorCritic(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.actor = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2)
        )
        self.critic = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        last = self.actor[4]
        assert isinstance(last, nn.Linear)
        nn.init.uniform_(last.weight, -0.01, 0.01)  # start near Beta(1.7, 1.7): mean 0.5, broad
        nn.init.zeros_(last.bias)

    def dist(self, x: torch.Tensor) -> torch.distributions.Beta:
        ab = 1.0 + nn.functional.softplus(self.actor(x))
        return torch.distributions.Beta(ab[..., 0], ab[..., 1])

    def value(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.critic(x).squeeze(-1)
        return out

    def export(self, norm: RunningNorm, meta: dict[str, Any]) -> Actor:
        layers = [m for m in self.actor if isinstance(m, nn.Linear)]
        arrays = [t.detach().double().numpy().copy() for m in layers for t in (m.weight, m.bias)]
        w1, b1, w2, b2, w3, b3 = arrays
        return Actor(
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            obs_mean=norm.mean.copy(),
            obs_std=norm.std.copy(),
            version=VERSION,
            meta=json.dumps(meta, sort_keys=True),
        )


@dataclass
class TrainResult:
    actor: Actor
    curve: list[dict[str, float]]
    cpu_s: float
    wall_s: float
    transitions: int


def _log_prob(d: torch.distributions.Beta, a: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = d.log_prob(a)  # type: ignore[no-untyped-call]
    return out


def _entropy(d: torch.distributions.Beta) -> torch.Tensor:
    out: torch.Tensor = d.entropy()  # type: ignore[no-untyped-call]
    return out


_EPS = 1e-4  # actions are kept inside (0, 1) for the Beta's log-density


def _episode(
    env: SplitEnv, model: ActorCritic, norm: RunningNorm, seed: int
) -> tuple[dict[str, F64], str, float]:
    obs, info = env.reset(seed=seed)
    xs, acts, logps, vals, rews = [], [], [], [], []
    done = False
    while not done:
        raw = obs.astype(np.float64)
        norm.update(raw)
        x = torch.as_tensor(norm(raw), dtype=torch.float32)
        with torch.no_grad():
            d = model.dist(x)
            a = d.sample().clamp(_EPS, 1.0 - _EPS)
            logps.append(_log_prob(d, a).numpy().astype(np.float64))
            vals.append(model.value(x).numpy().astype(np.float64))
        xs.append(x.numpy().astype(np.float64))
        acts.append(a.numpy().astype(np.float64))
        obs, _, _, truncated, step_info = env.step(a.numpy())
        rews.append(np.asarray(step_info["rewards"], dtype=np.float64))
        done = truncated
    with torch.no_grad():
        last = model.value(torch.as_tensor(norm(obs.astype(np.float64)), dtype=torch.float32)).numpy()
    batch = {
        "x": np.stack(xs),  # (T, W, D)
        "a": np.stack(acts),  # (T, W)
        "logp": np.stack(logps),
        "v": np.stack(vals),
        "r": np.stack(rews),
        "last_v": last.astype(np.float64),  # (W,)
    }
    return batch, str(info["regime"]), float(np.stack(rews).mean())


def gae(rewards: F64, values: F64, last_value: F64, gamma: float, lam: float) -> tuple[F64, F64]:
    """Advantages and returns along axis 0 of ``(T, W)`` arrays, bootstrapped from ``last_value`` (the
    episode was cut by time, not ended)."""
    t_len = rewards.shape[0]
    adv = np.zeros_like(rewards)
    running = np.zeros_like(last_value)
    next_value = last_value
    for t in range(t_len - 1, -1, -1):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
        next_value = values[t]
    return adv, adv + values


def _update(
    model: ActorCritic,
    opt: torch.optim.Optimizer,
    data: dict[str, F64],
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> dict[str, float]:
    x = torch.as_tensor(data["x"], dtype=torch.float32)
    a = torch.as_tensor(data["a"], dtype=torch.float32)
    old = torch.as_tensor(data["logp"], dtype=torch.float32)
    adv_np = data["adv"]
    adv_np = (adv_np - adv_np.mean()) / (adv_np.std() + 1e-8)
    adv = torch.as_tensor(adv_np, dtype=torch.float32)
    ret = torch.as_tensor(data["ret"], dtype=torch.float32)
    n = x.shape[0]
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
    steps = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(n)
        for start in range(0, n, cfg.minibatch):
            idx = torch.as_tensor(order[start : start + cfg.minibatch])
            d = model.dist(x[idx])
            logp = _log_prob(d, a[idx])
            ratio = torch.exp(logp - old[idx])
            surr = torch.min(ratio * adv[idx], ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * adv[idx])
            entropy = _entropy(d).mean()
            value_loss = ((model.value(x[idx]) - ret[idx]) ** 2).mean()
            loss = -surr.mean() + cfg.value_coef * value_loss - cfg.entropy * entropy
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            # each network its own norm: the critic's larger gradients must not shrink the actor's steps
            nn.utils.clip_grad_norm_(model.actor.parameters(), cfg.max_grad_norm)
            nn.utils.clip_grad_norm_(model.critic.parameters(), cfg.max_grad_norm)
            opt.step()
            stats["policy_loss"] += float(-surr.mean().detach())
            stats["value_loss"] += float(value_loss.detach())
            stats["entropy"] += float(entropy.detach())
            stats["clip_fraction"] += float(((ratio - 1.0).abs() > cfg.clip).float().mean())
            steps += 1
    return {k: v / max(1, steps) for k, v in stats.items()}


def train(cfg: TrainConfig, progress: Callable[[str], None] = lambda _: None) -> TrainResult:
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, progress: Callable[[str], None]) -> TrainResult:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    env = SplitEnv(cfg.env)
    model = ActorCritic(len(FEATURES), cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    norm = RunningNorm(len(FEATURES))
    curve: list[dict[str, float]] = []
    transitions = 0
    for it in range(cfg.iterations):
        parts: dict[str, list[F64]] = {"x": [], "a": [], "logp": [], "adv": [], "ret": []}
        rewards: dict[str, list[float]] = {}
        for _ in range(cfg.episodes_per_iteration):
            batch, regime, mean_reward = _episode(env, model, norm, int(rng.integers(2**31)))
            rewards.setdefault(regime, []).append(mean_reward)
            adv, ret = gae(batch["r"], batch["v"], batch["last_v"], cfg.gamma, cfg.lam)
            d = batch["x"].shape[-1]
            parts["x"].append(batch["x"].reshape(-1, d))
            for key, arr in (("a", batch["a"]), ("logp", batch["logp"]), ("adv", adv), ("ret", ret)):
                parts[key].append(arr.reshape(-1))
        data = {k: np.concatenate(v) for k, v in parts.items()}
        transitions += data["x"].shape[0]
        stats = _update(model, opt, data, cfg, rng)
        row = {
            "iteration": float(it),
            "mean_reward": float(np.mean([r for rs in rewards.values() for r in rs])),
            **{f"reward_{k}": float(np.mean(v)) for k, v in sorted(rewards.items())},
            **stats,
        }
        curve.append(row)
        progress(
            f"iteration {it + 1}/{cfg.iterations}: reward {row['mean_reward']:.3f} "
            f"entropy {stats['entropy']:.3f} ({time.perf_counter() - wall0:.0f} s)"
        )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    meta = {"train": cfg.to_json(), "reward": cfg.env.reward.to_json(), "transitions": transitions}
    return TrainResult(model.export(norm, meta), curve, cpu, wall, transitions)
