"""HELM's serving side: the numpy actor (and its file), the adapter, the burst detector, the three layers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.controller.core.helm import (
    CUSUM_FLOOR,
    DEFAULT_WEIGHTS,
    FEATURES,
    OBS_CLIP,
    Actor,
    Adapter,
    BurstDetector,
    HelmPolicy,
    build_helm,
    detector_signals,
    observe,
    pressures,
)
from shared.schemas import CostCoefficients, WorkerFeatures
from sim.ppo import VERSION, ActorCritic, RunningNorm, TrainConfig
from tests.controller.features import worker_features

D = len(FEATURES)


def feat(**overrides: Any) -> WorkerFeatures:
    return worker_features(
        **{
            **{
                "new_token_fraction": 0.5,
                "emb_misses_per_request": 20.0,
                "slo_violation_rate": 0.0,
                "cost": CostCoefficients(
                    fixed_ms=1.0, ms_per_new_token=0.01, ms_per_emb_miss=0.05, samples=10
                ),
            },
            **overrides,
        }
    )


def zero_actor(h: int = 4, bias: tuple[float, float] = (0.0, 0.0)) -> Actor:
    z = np.zeros
    return Actor(
        z((h, D)), z(h), z((h, h)), z(h), z((2, h)), np.array(bias, dtype=float),
        obs_mean=z(D), obs_std=np.ones(D), version="test",
    )  # fmt: skip


def test_observe_orders_the_features_and_prices_both_sides() -> None:
    f = feat(request_rate_delta=50.0)
    emb_ms, kv_ms = pressures(f)
    assert emb_ms == pytest.approx(20 * 0.05)  # misses per request x ms per miss
    assert kv_ms == pytest.approx(100 * min(0.5, 0.5) * 0.01)  # history x missed share x ms per token
    x = observe(f)
    assert len(x) == D
    named = dict(zip(FEATURES, x, strict=True))
    assert named["rate_change"] == pytest.approx(0.5)  # +50/s over a 1-s window at 100/s
    assert named["log_request_rate"] == pytest.approx(math.log1p(100.0))
    assert named["emb_pressure_share"] == pytest.approx(1.0 / 1.5)
    assert named["log_pressure_ms"] == pytest.approx(math.log1p(1.5))
    # no fitted model yet: no pressure either way
    assert pressures(feat(cost=CostCoefficients()))[0] == 0.0
    assert (
        dict(zip(FEATURES, observe(feat(cost=CostCoefficients())), strict=True))["emb_pressure_share"] == 0.5
    )


def test_numpy_actor_matches_the_torch_actor_it_was_exported_from() -> None:
    torch.manual_seed(3)
    model = ActorCritic(D, 8)
    for p in model.actor.parameters():  # a non-trivial output layer
        torch.nn.init.normal_(p, std=0.5)
    rng = np.random.default_rng(0)
    norm = RunningNorm(D)
    norm.update(rng.normal(3.0, 2.0, size=(64, D)))
    actor = model.export(norm, {"test": True})
    for _ in range(5):
        raw = rng.normal(3.0, 2.0, size=D)
        with torch.no_grad():
            d = model.dist(torch.as_tensor(norm(raw), dtype=torch.float64).float())
        a, b = actor.beta(raw)
        assert a == pytest.approx(float(d.concentration1), rel=1e-5)
        assert b == pytest.approx(float(d.concentration0), rel=1e-5)
        assert actor.mean(raw) == pytest.approx(float(d.mean), rel=1e-5)


def test_actor_file_round_trips_and_refuses_tampering(tmp_path: Path) -> None:
    actor = zero_actor(bias=(0.3, -0.2))
    path = tmp_path / "a.npz"
    actor.save(path)
    back = Actor.load(path)
    assert back.digest == actor.digest and back.version == "test"
    assert back.mean(np.zeros(D)) == pytest.approx(actor.mean(np.zeros(D)))
    # a changed weight with the old hash is refused
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["b3"] = np.array([0.5, -0.2])
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="does not match the stored"):
        Actor.load(tmp_path / "bad.npz")
    arrays["b3"], arrays["features"] = np.array([0.3, -0.2]), np.array(FEATURES[:-1])
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="trained on features"):
        Actor.load(tmp_path / "old.npz")
    with pytest.raises(ValueError, match="cannot read"):
        Actor.load(tmp_path / "missing.npz")


def test_actor_refuses_bad_shapes() -> None:
    z = np.zeros
    with pytest.raises(ValueError, match="w2 has shape"):
        Actor(
            z((4, D)), z(4), z((4, 3)), z(4), z((2, 4)), z(2), obs_mean=z(D), obs_std=np.ones(D), version="x"
        )
    with pytest.raises(ValueError, match="obs_std must be > 0"):
        Actor(z((4, D)), z(4), z((4, 4)), z(4), z((2, 4)), z(2), obs_mean=z(D), obs_std=z(D), version="x")


def adapter(**kw: Any) -> Adapter:
    base: dict[str, Any] = {
        "rate": 0.1, "step_cap": 0.05, "cap": 0.12, "leak": 0.5, "deadband": 0.2,
        "ramp": 4, "patience": 2, "tolerance": 0.1,
    }  # fmt: skip
    base.update(kw)
    return Adapter(**base)


def test_adapter_leaks_caps_its_step_and_its_size_and_ramps_in() -> None:
    a = adapter()
    a.update(0.1, 10.0)  # inside the dead band: no push, only the leak
    assert a.r == 0.0 and a.decisions == 1
    a.update(1.0, 10.0)  # 0.1 x 1.0 capped at 0.05
    assert a.r == pytest.approx(0.05)
    assert a.correction() == pytest.approx(2 / 4 * 0.05)  # two decisions of a ramp of four
    a.update(-0.3, 10.0)  # 0.5 x 0.05 - 0.03
    assert a.r == pytest.approx(-0.005)
    b = adapter(leak=0.0)
    for _ in range(5):
        b.update(1.0, 10.0)
    assert b.r == pytest.approx(0.12)  # the norm cap
    assert b.correction() == pytest.approx(0.12)  # full authority after the ramp


def test_adapter_resets_when_it_trails() -> None:
    a = adapter(leak=0.0)
    a.update(1.0, 10.0)  # reference P99 10 ms, r 0.05
    a.update(1.0, 10.5)  # within 10%
    assert a.worse == 0 and a.r == pytest.approx(0.1)
    a.update(1.0, 11.5)  # worse once
    assert a.worse == 1 and a.r == pytest.approx(0.12)
    a.update(1.0, 12.0)  # worse twice: patience 2 -> reset
    assert (a.r, a.decisions, a.resets) == (0.0, 0, 1)
    a.update(1.0, 12.0)  # restarts, with the P99 it finds as reference
    assert a.reference_p99 == 12.0 and a.r == pytest.approx(0.05)


def test_cusum_stays_quiet_on_a_flat_signal_and_flags_a_step() -> None:
    d = BurstDetector(k=0.5, h=4.0, baseline=0.1, warmup=3, floor=1.0)
    for _ in range(20):
        assert not d.update([1.0])
    # var 0 + floor 1: z = the step itself; S+ grows by (3 - 0.5) a window: over 4 on the second
    assert not d.update([4.0])
    assert d.pos[0] == pytest.approx(2.5)
    assert d.update([4.0])
    mean_before = d.mean[0]
    assert d.update([4.0])  # still alarmed, and the baseline does not learn the burst
    assert d.mean[0] == mean_before
    d.reset()
    assert d.statistic() == 0.0


def test_helm_layers_and_names() -> None:
    actor = zero_actor()  # Beta(1 + ln 2, 1 + ln 2): mean 0.5 -> alpha 0.5 on [0.05, 0.95]
    one = HelmPolicy(actor, layers=1)
    assert one.name == "helm:layers=1" and not one.adapter and not one.recovery
    assert one.decide(feat(), 0.3) == pytest.approx(0.5)
    assert HelmPolicy(actor).name == "helm"
    assert HelmPolicy(actor, adapter=False).name == "helm:adapter=0"
    assert HelmPolicy(actor, recovery=False).name == "helm:recovery=0"
    assert HelmPolicy(actor, layers=2).name == "helm:layers=2"
    assert HelmPolicy(actor).weights == f"test sha256:{actor.digest}"
    assert one.decide(feat(request_rate=0.0), 0.3) == 0.3  # no traffic: hold


def test_helm_adapter_follows_the_dearer_side() -> None:
    policy = HelmPolicy(
        zero_actor(), recovery=False, adapter_ramp=1, adapter_leak=0.0, adapter_rate=0.02, adapter_step=0.01
    )
    # EMB misses cost 1 ms, KV 0.5 ms: imbalance 1/3 > dead band 0.2 -> +0.02 x 1/3 per decision
    first = policy.decide(feat(), 0.5)
    assert first == pytest.approx(0.5 + 0.02 / 3)
    assert policy.decide(feat(), 0.5) == pytest.approx(0.5 + 0.04 / 3)
    # KV dearer on another worker (its own state): 0.02 x -0.67 is beyond the 0.01 step cap
    other = policy.decide(feat(worker_id="w2", emb_misses_per_request=2.0), 0.5)
    assert other == pytest.approx(0.5 - 0.01)


def test_helm_recovery_takes_over_in_a_burst_and_hands_back_with_a_blend() -> None:
    policy = HelmPolicy(
        zero_actor(), adapter=False, cusum_warmup=3, cusum_h=4.0, calm_windows=2, blend_windows=2,
        protect_gain=0.1,
    )  # fmt: skip
    for _ in range(30):
        assert policy.decide(feat(), 0.5) == pytest.approx(0.5)
    assert policy.mode("w1") == "normal"
    burst = feat(request_rate=400.0, hot_user_share=0.9)
    emb_ms, kv_ms = pressures(burst)
    protective = 0.42 + 0.1 * (emb_ms - kv_ms) / (emb_ms + kv_ms)
    assert policy.decide(burst, 0.42) == pytest.approx(protective)
    assert policy.mode("w1") == "recovery"
    # back to the baseline: no alarm, calm 1 (still protecting, moved by the normal window's imbalance)
    e = (1.0 - 0.5) / 1.5
    protective += 0.1 * e
    assert policy.decide(feat(), 0.5) == pytest.approx(protective)
    assert policy.mode("w1") == "recovery"
    # calm 2: hand back, half of the blend
    assert policy.decide(feat(), 0.5) == pytest.approx(0.5 * protective + 0.5 * 0.5)
    assert policy.mode("w1") == "blend"
    assert policy.decide(feat(), 0.5) == pytest.approx(0.5)
    assert policy.mode("w1") == "normal"


def test_helm_detector_does_not_learn_a_burst_while_recovering() -> None:
    policy = HelmPolicy(zero_actor(), adapter=False, cusum_warmup=3, cusum_h=4.0, max_recovery=3)
    for _ in range(10):
        policy.decide(feat(), 0.5)
    det = policy._state("w1").detector
    baseline = list(det.mean)
    burst = feat(request_rate=400.0)
    policy.decide(burst, 0.5)
    policy.decide(burst, 0.5)
    assert det.mean == baseline  # alarmed, then recovering: the baseline holds
    policy.decide(burst, 0.5)
    policy.decide(burst, 0.5)  # still bursting after max_recovery windows: the new level is the norm
    assert det.mean[0] == pytest.approx(math.log1p(400.0))
    assert policy.mode("w1") == "blend"


def test_build_helm_parses_keys_and_names_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    zero_actor().save(path)
    p = build_helm(f"layers=2,adapter_cap=0.1,weights={path}")
    assert p.layers == 2 and p.adapter_cap == 0.1 and not p.recovery
    assert build_helm("recovery=0", weights=path).name == "helm:recovery=0"
    assert build_helm("protect_gain=0.05", weights=path).name == "helm:protect_gain=0.05"
    assert build_helm("", weights=path).name == "helm"
    with pytest.raises(ValueError, match="'bogus=1' is not key=value"):
        build_helm("bogus=1", weights=path)
    with pytest.raises(ValueError, match="adapter must be 0 or 1"):
        build_helm("adapter=yes", weights=path)
    with pytest.raises(ValueError, match="layers must be an integer"):
        build_helm("layers=1.5", weights=path)
    with pytest.raises(ValueError, match="layers must be 1, 2 or 3"):
        build_helm("layers=4", weights=path)
    with pytest.raises(ValueError, match="blend_windows must be an integer >= 1"):
        build_helm("blend_windows=0", weights=path)
    with pytest.raises(ValueError, match="adapter_ramp must be an integer >= 0"):
        build_helm("adapter_ramp=-1", weights=path)
    with pytest.raises(ValueError, match="max_recovery must be an integer"):
        build_helm("max_recovery=2.5", weights=path)
    with pytest.raises(ValueError, match="adapter_leak is a weight"):
        build_helm("adapter_leak=1.5", weights=path)
    with pytest.raises(ValueError, match="no actor weights at"):
        build_helm(f"weights={tmp_path / 'none.npz'}")


def test_the_shipped_actor_is_what_train_controller_makes_by_default() -> None:
    actor = Actor.load(DEFAULT_WEIGHTS)
    assert actor.version == VERSION
    meta = json.loads(actor.meta)
    assert meta["train"] == TrainConfig().to_json()
    assert meta["reward"] == TrainConfig().env.reward.to_json()


# ------------------------------------------------------------------------------------------------------
# The tuned decision (issue 9: HELM's decision in <= 10 us) against the plain computation it replaced
# ------------------------------------------------------------------------------------------------------
def plain_beta(actor: Actor, raw: Any) -> tuple[float, float]:
    """The actor as the training side computes it: normalise, clip to +-OBS_CLIP, three layers, softplus."""
    z = np.clip((np.asarray(raw, dtype=np.float64) - actor.obs_mean) / actor.obs_std, -OBS_CLIP, OBS_CLIP)
    h = np.tanh(actor.w1 @ z + actor.b1)
    h = np.tanh(actor.w2 @ h + actor.b2)
    a, b = np.logaddexp(0.0, actor.w3 @ h + actor.b3)  # softplus
    return 1.0 + float(a), 1.0 + float(b)


def random_actor(rng: np.random.Generator, h: int = 32) -> Actor:
    return Actor(
        rng.normal(0.0, 0.6, (h, D)), rng.normal(0.0, 0.3, h), rng.normal(0.0, 0.4, (h, h)),
        rng.normal(0.0, 0.3, h), rng.normal(0.0, 1.5, (2, h)), rng.normal(0.0, 1.0, 2),
        obs_mean=rng.normal(0.0, 3.0, D), obs_std=rng.uniform(0.01, 5.0, D), version="random",
    )  # fmt: skip


@pytest.mark.parametrize("which", ["shipped", "random"])
def test_actor_equals_the_plain_network_on_random_inputs(which: str) -> None:
    rng = np.random.default_rng(7)
    actor = Actor.load(DEFAULT_WEIGHTS) if which == "shipped" else random_actor(rng)
    for i in range(500):
        # inside the clip, and far outside it (every third draw: up to 20 standard deviations away)
        spread = 20.0 if i % 3 == 0 else 2.0
        raw = actor.obs_mean + actor.obs_std * rng.normal(0.0, spread, D)
        want = plain_beta(actor, raw)
        for x in (raw, raw.tolist()):  # an array or the list observe() returns
            a, b = actor.beta(x)
            assert a == pytest.approx(want[0], rel=1e-9, abs=1e-12)
            assert b == pytest.approx(want[1], rel=1e-9, abs=1e-12)
            assert actor.mean(x) == pytest.approx(want[0] / (want[0] + want[1]), rel=1e-9, abs=1e-12)
    assert actor.beta(raw.tolist()) == actor.beta(raw.tolist())  # its buffers carry nothing over


def test_the_detector_watches_three_of_the_actors_features() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        f = feat(
            request_rate=float(rng.uniform(0.5, 500.0)),
            hot_user_share=float(rng.uniform()),
            new_token_fraction=float(rng.uniform()),
        )
        named = dict(zip(FEATURES, observe(f), strict=True))
        want = [named["log_request_rate"], named["hot_user_share"], named["new_token_fraction"]]
        assert detector_signals(f) == want  # HelmPolicy.decide takes them from the observation


@dataclass
class PlainAdapter:
    """Adapter.update and correction as first written (min/max, abs), for the tuned ones to equal."""

    rate: float
    step_cap: float
    cap: float
    leak: float
    deadband: float
    ramp: int
    patience: int
    tolerance: float
    r: float = 0.0
    decisions: int = 0
    reference_p99: float = math.nan
    worse: int = 0
    resets: int = 0

    def correction(self) -> float:
        return min(1.0, self.decisions / self.ramp) * self.r if self.ramp > 0 else self.r

    def update(self, imbalance: float, p99_ms: float) -> None:
        if abs(self.r) < 0.25 * self.step_cap or not math.isfinite(self.reference_p99):
            self.reference_p99 = p99_ms
            self.worse = 0
        elif p99_ms > self.reference_p99 * (1.0 + self.tolerance):
            self.worse += 1
            if self.worse >= self.patience:
                self.r, self.decisions, self.worse = 0.0, 0, 0
                self.reference_p99 = math.nan
                self.resets += 1
                return
        else:
            self.worse = 0
        e = imbalance if abs(imbalance) > self.deadband else 0.0
        step = max(-self.step_cap, min(self.step_cap, self.rate * e))
        r = max(-self.cap, min(self.cap, (1.0 - self.leak) * self.r + step))
        if r * self.r < 0.0:
            self.reference_p99, self.worse = p99_ms, 0
        self.r = r
        self.decisions += 1


@dataclass
class PlainDetector:
    """BurstDetector.step as first written (one loop, the deltas kept), for the tuned one to equal."""

    k: float
    h: float
    baseline: float
    warmup: int
    floor: float
    mean: list[float] = field(default_factory=list)
    var: list[float] = field(default_factory=list)
    pos: list[float] = field(default_factory=list)
    neg: list[float] = field(default_factory=list)
    seen: int = 0

    def step(self, signals: list[float], *, learn: bool = True) -> bool:
        if not self.mean:
            n = len(signals)
            self.mean, self.var, self.pos, self.neg = list(signals), [0.0] * n, [0.0] * n, [0.0] * n
            self.seen = 1
            return False
        self.seen += 1
        armed = self.seen > self.warmup
        alarmed = False
        deltas = []
        for i, x in enumerate(signals):
            d = x - self.mean[i]
            deltas.append(d)
            if armed:
                z = d / math.sqrt(self.var[i] + self.floor)
                self.pos[i] = max(0.0, self.pos[i] + z - self.k)
                self.neg[i] = max(0.0, self.neg[i] - z - self.k)
                alarmed = alarmed or self.pos[i] > self.h or self.neg[i] > self.h
        if learn and not alarmed:
            w = self.baseline if armed else 1.0 / self.seen
            for i, d in enumerate(deltas):
                self.mean[i] += w * d
                self.var[i] = (1.0 - w) * (self.var[i] + w * d * d)
        if alarmed:
            self.pos, self.neg = [0.0] * len(self.pos), [0.0] * len(self.neg)
        return alarmed

    def rebase(self, signals: list[float]) -> None:
        self.mean = list(signals)
        self.pos, self.neg = [0.0] * len(self.pos), [0.0] * len(self.neg)


def test_adapter_and_detector_equal_their_plain_forms_on_random_input() -> None:
    rng = np.random.default_rng(5)
    for trial in range(20):
        kw: dict[str, Any] = {
            "rate": float(rng.uniform(0.0, 0.3)), "step_cap": float(rng.uniform(0.001, 0.05)),
            "cap": float(rng.uniform(0.01, 0.2)), "leak": float(rng.uniform(0.0, 0.5)),
            "deadband": float(rng.uniform(0.0, 0.5)), "ramp": int(rng.integers(0, 20)),
            "patience": int(rng.integers(1, 5)), "tolerance": float(rng.uniform(0.0, 0.3)),
        }  # fmt: skip
        tuned, plain = adapter(**kw), PlainAdapter(**kw)
        for _ in range(300):
            imbalance, p99 = float(rng.uniform(-1.0, 1.0)), float(rng.uniform(5.0, 50.0))
            tuned.update(imbalance, p99)
            plain.update(imbalance, p99)
            assert tuned.correction() == plain.correction()
            got = (tuned.r, tuned.decisions, tuned.reference_p99, tuned.worse, tuned.resets)
            want = (plain.r, plain.decisions, plain.reference_p99, plain.worse, plain.resets)
            assert got == pytest.approx(want, rel=0, abs=0, nan_ok=True), trial
        assert plain.resets > 0 or kw["patience"] > 2
        n = int(rng.integers(1, 5))
        dkw: dict[str, Any] = {
            "k": float(rng.uniform(0.0, 1.5)), "h": float(rng.uniform(1.0, 8.0)),
            "baseline": float(rng.uniform(0.0, 0.2)), "warmup": int(rng.integers(0, 10)),
            "floor": float(rng.uniform(1e-6, 1e-2)),
        }  # fmt: skip
        det, ref = BurstDetector(**dkw), PlainDetector(**dkw)
        level = rng.normal(0.0, 1.0, n)
        for _ in range(300):
            if rng.random() < 0.05:
                level = level + rng.normal(0.0, 1.0, n)  # a step: alarms
            signals = (level + rng.normal(0.0, 0.05, n)).tolist()
            learn = bool(rng.random() < 0.8)
            assert det.step(signals, learn=learn) == ref.step(signals, learn=learn)
            assert (det.mean, det.var, det.pos, det.neg, det.seen) == (
                ref.mean,
                ref.var,
                ref.pos,
                ref.neg,
                ref.seen,
            )


def plain_observe(f: WorkerFeatures, priced: tuple[float, float]) -> list[float]:
    """observe() as first written (min/max, math.log1p)."""
    rate = f.request_rate
    change = f.request_rate_delta * f.window_ms * 1e-3 / rate if rate > 0.0 else 0.0
    emb_ms, kv_ms = priced
    total = emb_ms + kv_ms
    return [
        f.alpha, f.alpha_target, f.emb_hit_rate, f.kv_hit_rate, math.log1p(rate), max(-4.0, min(4.0, change)),
        f.hot_user_share, math.log1p(f.mean_history), f.new_token_fraction,
        math.log1p(f.emb_misses_per_request), math.log1p(f.p99_latency_ms), f.slo_violation_rate,
        emb_ms / total if total > 0.0 else 0.5, math.log1p(total),
    ]  # fmt: skip


class PlainHelm:
    """HelmPolicy.decide as it read before it was tuned for speed, on the plain adapter and detector, with
    the settings of ``policy`` (whose own state it leaves alone)."""

    def __init__(self, policy: HelmPolicy) -> None:
        self.p = policy
        self.adapters: dict[str, PlainAdapter] = {}
        self.detectors: dict[str, PlainDetector] = {}
        self.mode: dict[str, str] = {}
        self.calm: dict[str, int] = {}
        self.held: dict[str, int] = {}
        self.blend: dict[str, int] = {}
        self.protective: dict[str, float] = {}

    def decide(self, f: WorkerFeatures, current: float) -> float:
        p, w = self.p, f.worker_id
        if not (f.request_rate > 0.0 and f.window_ms > 0.0):
            return current
        priced = pressures(f)
        base = p.lo + (p.hi - p.lo) * p.actor.mean(plain_observe(f, priced))
        if p.layers == 1:
            return base
        if w not in self.mode:
            self.mode[w] = "normal"
            self.adapters[w] = PlainAdapter(
                p.adapter_rate, p.adapter_step, p.adapter_cap, p.adapter_leak, p.adapter_deadband,
                p.adapter_ramp, p.adapter_patience, p.adapter_tolerance,
            )  # fmt: skip
            self.detectors[w] = PlainDetector(
                p.cusum_k, p.cusum_h, p.cusum_baseline, p.cusum_warmup, CUSUM_FLOOR
            )
        adapter, detector = self.adapters[w], self.detectors[w]
        emb_ms, kv_ms = priced
        total = emb_ms + kv_ms
        imbalance = (emb_ms - kv_ms) / total if total > 0.0 else 0.0
        if p.recovery:
            signals = detector_signals(f)
            alarm = detector.step(signals, learn=self.mode[w] == "normal")
            if self.mode[w] == "recovery":
                self.held[w] += 1
                self.calm[w] = 0 if alarm else self.calm[w] + 1
                if self.held[w] >= p.max_recovery:
                    detector.rebase(signals)
                if self.calm[w] >= p.calm_windows or self.held[w] >= p.max_recovery:
                    self.mode[w], self.blend[w] = "blend", 0
            elif alarm:
                self.mode[w], self.calm[w], self.held[w] = "recovery", 0, 0
                self.protective[w] = current
        if p.adapter and self.mode[w] == "normal":
            adapter.update(imbalance, f.p99_latency_ms)
        normal = base + (adapter.correction() if p.adapter else 0.0)
        if self.mode[w] == "recovery":
            self.protective[w] = min(p.hi, max(p.lo, self.protective[w] + p.protect_gain * imbalance))
            return self.protective[w]
        if self.mode[w] == "blend":
            self.blend[w] += 1
            weight = self.blend[w] / p.blend_windows
            if self.blend[w] >= p.blend_windows:
                self.mode[w] = "normal"
            return (1.0 - weight) * self.protective[w] + weight * normal
        return normal


def drifting_windows(seed: int, windows: int, workers: int = 3) -> list[WorkerFeatures]:
    """Windows taken in turn from a few workers: drifting load with bursts, idle windows, no cost fit at
    first, P99 moving with the load (the adapter resets), values far outside the actor's clip now and then."""
    rng = np.random.default_rng(seed)
    out = []
    rates = [float(r) for r in rng.uniform(20.0, 200.0, workers)]
    burst = [0] * workers
    last = list(rates)  # each worker's previous window's rate
    for k in range(windows):
        i = k % workers
        if burst[i] > 0:
            burst[i] -= 1
        elif rng.random() < 0.03:
            burst[i] = int(rng.integers(2, 40))
        rates[i] *= float(np.exp(rng.normal(0.0, 0.05)))
        rate = 0.0 if rng.random() < 0.02 else rates[i] * (6.0 if burst[i] else 1.0)
        prev, last[i] = last[i], rate  # a burst's start and end: rate changes beyond +-4 (clipped)
        jump = float(rng.normal(0.0, 10.0 * rate)) if rng.random() < 0.1 else 0.0  # a noisy delta: +-4 too
        samples = 0 if k < 6 * workers else int(rng.integers(1, 1000))
        out.append(
            feat(
                worker_id=f"w{i}",
                request_rate=rate,
                request_rate_delta=(rate - prev) * float(rng.uniform(0.5, 1.5)) + jump,
                hot_user_share=float(rng.uniform(0.0, 0.3) if burst[i] else rng.uniform(0.5, 0.7)),
                mean_history=float(rng.uniform(50.0, 500.0)),
                new_token_fraction=float(rng.uniform(0.0, 1.0)),
                emb_hit_rate=float(rng.uniform()),
                kv_hit_rate=float(rng.uniform()),
                emb_misses_per_request=float(rng.uniform(0.0, 400.0)),
                p99_latency_ms=float(rng.uniform(5.0, 50.0) * (1.0 + rate / 100.0)),
                slo_violation_rate=float(rng.uniform(0.0, 0.02) if rng.random() < 0.9 else rng.uniform()),
                alpha=float(rng.uniform()),
                alpha_target=float(rng.uniform()),
                cost=CostCoefficients(
                    fixed_ms=1.0,
                    ms_per_new_token=float(rng.uniform(0.001, 0.05)),
                    ms_per_emb_miss=float(rng.uniform(0.0005, 0.01)),
                    samples=samples,
                ),
            )
        )
    return out


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layers": 1},
        {"layers": 2},
        {"recovery": False},
        {"adapter": False},
        {"protect_gain": 0.05, "max_recovery": 8, "adapter_patience": 2, "adapter_rate": 0.05},
        {
            "adapter_rate": 0.2,
            "adapter_step": 0.05,
            "adapter_cap": 0.06,
            "adapter_leak": 0.0,
            "adapter_ramp": 0,
            "adapter_patience": 2,
        },
    ],
)
def test_helm_decide_equals_its_layers_composed_plainly(options: dict[str, Any]) -> None:
    actor = Actor.load(DEFAULT_WEIGHTS)
    settings: dict[str, Any] = {"cusum_warmup": 5, "adapter_ramp": 10, **options}
    tuned, plain = HelmPolicy(actor, **settings), PlainHelm(HelmPolicy(actor, **settings))
    modes = set()
    for f in drifting_windows(11, 3000):
        current = f.alpha_target
        assert observe(f) == plain_observe(f, pressures(f))
        assert tuned.decide(f, current) == plain.decide(f, current)  # bit for bit
        assert tuned.mode(f.worker_id) == plain.mode.get(f.worker_id, "normal")
        modes.add(tuned.mode(f.worker_id))
        if tuned.layers > 1 and f.request_rate > 0.0:  # and the layers' state, to the last bit
            st, det, ad = tuned._state(f.worker_id), plain.detectors[f.worker_id], plain.adapters[f.worker_id]
            assert (st.detector.mean, st.detector.var, st.detector.pos) == (det.mean, det.var, det.pos)
            assert st.detector.neg == det.neg
            got = (st.adapter.r, st.adapter.decisions, st.adapter.reference_p99, st.adapter.worse)
            want = (ad.r, ad.decisions, ad.reference_p99, ad.worse)
            assert got == pytest.approx(want, rel=0, abs=0, nan_ok=True)
    if tuned.recovery:
        assert modes == {"normal", "recovery", "blend"}
    if tuned.adapter:
        assert sum(plain.adapters[w].resets for w in ("w0", "w1", "w2")) > 0


def test_a_feature_vector_of_the_wrong_length_is_a_clear_error() -> None:
    actor = Actor.load(DEFAULT_WEIGHTS)
    for n in (len(FEATURES) - 1, len(FEATURES) + 1):
        with pytest.raises(ValueError, match=f"takes {len(FEATURES)} features, got {n}"):
            actor.beta([0.0] * n)
    actor.beta([0.0] * len(FEATURES))  # and the actor still works after a refusal
