"""HELM's training side: the gymnasium environment over the simulator, PPO's pieces, train-controller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.controller.core.helm import FEATURES, Actor, build_helm
from sim.compare import opt_gap, static_gap
from sim.env import EnvConfig, SplitEnv
from sim.ppo import RunningNorm, TrainConfig, gae, train

ONEPOOL = str(Path(sys.executable).with_name("onepool"))


def test_env_steps_are_windows_and_actions_go_through_the_clamp() -> None:
    env = SplitEnv(EnvConfig(duration_s=6.0))
    obs, info = env.reset(seed=3, options={"regime": "steady", "alpha0": 0.5})
    assert obs.shape == (2, len(FEATURES)) and info["regime"] == "steady"
    assert env.observation_space.shape == obs.shape and env.action_space.shape == (2,)
    assert env.sim is not None
    before = [
        (w.pool.counters.critical_refill_bytes, w.pool.counters.prefetch_bytes) for w in env.sim.workers
    ]
    obs, reward, terminated, truncated, step = env.step(np.array([1.0, 0.0], dtype=np.float32))
    # targets 0.95 and 0.05 asked; the controller's clamp moves at most max_step (0.1) from 0.5
    assert step["targets"] == pytest.approx([0.6, 0.4])
    assert not terminated and not truncated
    assert reward == pytest.approx(float(np.mean(step["rewards"])))
    # the reward is the documented sum for each worker's window
    rw, slo = env.config.reward, env.sim.cfg.slo_ms
    for w, (crit0, bg0), f, r in zip(env.sim.workers, before, env.features(), step["rewards"], strict=True):
        assert f is not None
        crit = (w.pool.counters.critical_refill_bytes - crit0) / 2**20
        bg = (w.pool.counters.prefetch_bytes - bg0) / 2**20
        expected = -(
            rw.p99 * min(f.p99_latency_ms / slo, 10.0)
            + rw.violations * f.slo_violation_rate
            + rw.critical_mib * crit
            + rw.background_mib * bg
            + rw.churn * 0.1
        )
        assert r == pytest.approx(expected)
    # a move below min_change is not sent: the target stays and no churn is charged
    obs, reward, terminated, truncated, step = env.step(
        np.array([(0.6 - 0.05 + 0.004) / 0.9, 0.5], dtype=np.float32)
    )
    assert step["targets"][0] == pytest.approx(0.6)
    steps = 2
    while not truncated:
        obs, reward, terminated, truncated, step = env.step(np.array([0.5, 0.5], dtype=np.float32))
        steps += 1
    assert steps == 5  # windows 2..6 of a 6-s episode


def test_env_is_deterministic_for_a_seed() -> None:
    def roll() -> list[float]:
        env = SplitEnv(EnvConfig(duration_s=4.0))
        env.reset(seed=11)
        return [env.step(np.array([0.3, 0.7], dtype=np.float32))[1] for _ in range(3)]

    assert roll() == roll()


def test_gae_by_hand() -> None:
    adv, ret = gae(np.array([[1.0], [2.0]]), np.array([[0.5], [0.5]]), np.array([1.0]), gamma=0.5, lam=0.5)
    # t=1: 2 + 0.5 x 1 - 0.5 = 2; t=0: 1 + 0.5 x 0.5 - 0.5 + 0.25 x 2 = 1.25
    assert adv[:, 0] == pytest.approx([1.25, 2.0])
    assert ret[:, 0] == pytest.approx([1.75, 2.5])


def test_running_norm_matches_numpy_over_batches() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(2.0, 3.0, size=(100, 4))
    data[:, 3] = 7.0  # a constant feature gets the floor, not a division by zero
    norm = RunningNorm(4)
    for chunk in np.array_split(data, 7):
        norm.update(chunk)
    assert norm.mean == pytest.approx(data.mean(axis=0))
    assert norm.std[:3] == pytest.approx(data.std(axis=0, ddof=1)[:3])
    assert norm.std[3] == 1e-3


def test_training_is_deterministic_for_a_seed() -> None:
    cfg = TrainConfig(seed=5, iterations=1, episodes_per_iteration=1, env=EnvConfig(duration_s=5.0))
    a, b = train(cfg), train(cfg)
    assert a.actor.digest == b.actor.digest
    assert a.transitions == 4 * 2  # 4 steps after the first window, 2 workers
    assert json.loads(a.actor.meta)["train"]["seed"] == 5


def test_static_gap_uses_the_runs_decision_times() -> None:
    # alpha* windows of 5 s: 0.3, 0.7, 0.5; decisions every second; after a 4.5-s warm-up the times 5..15
    # fall in windows 0 (t=5), 1 (6..10), 2 (11..15); t=16 lies past alpha*'s span and is left out
    times = [float(t) for t in range(1, 17)]
    expected = (0.2 + 5 * 0.2 + 5 * 0.0) / 11
    assert static_gap(0.5, times, [0.3, 0.7, 0.5], window_s=5.0, warmup_s=4.5) == pytest.approx(expected)


@pytest.mark.slow
def test_train_controller_cli_writes_an_actor_helm_loads(tmp_path: Path) -> None:
    out, report = tmp_path / "actor.npz", tmp_path / "train.json"
    args = ["train-controller", "--seed", "2", "--iterations", "1", "--episodes", "1", "--duration", "5"]
    proc = subprocess.run(
        [ONEPOOL, *args, "--json", str(report), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CPU time" in proc.stdout
    data = json.loads(report.read_text())
    actor = Actor.load(out)
    assert data["sha256"] == actor.digest and data["cpu_s"] > 0 and len(data["curve"]) == 1
    assert "machine_ref" in data
    policy = build_helm(f"weights={out}")
    assert policy.weights.endswith(actor.digest)
    bad = subprocess.run(
        [ONEPOOL, *args[:1], "--iterations", "0", "--json", str(report)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--iterations" in bad.stderr


def test_opt_gap_of_a_run_uses_the_timeline() -> None:
    from sim.cluster import SimResult, WorkerTimeline

    tl = WorkerTimeline()
    tl.t += [1.0, 2.0, 6.0]
    tl.alpha += [[0.5, 0.5], [0.4, 0.6], [0.9, 0.7]]
    tl.target += tl.alpha
    empty = np.zeros(0)
    r = SimResult(
        empty, empty, empty.astype(np.int64), *(empty.astype(np.int64),) * 4, 0, 0, 0, 0, 0, 0, [], 6.0, tl
    )
    # alpha* windows of 5 s: [0.5, 0.8]; after a 1.5-s warm-up: t=2 (|0.4-0.5|, |0.6-0.5|), t=6 (0.1, 0.1)
    assert opt_gap(r, [0.5, 0.8], window_s=5.0, warmup_s=1.5) == pytest.approx(0.1)
