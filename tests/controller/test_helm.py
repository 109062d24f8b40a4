"""HELM's serving side: the numpy actor (and its file), the adapter, the burst detector, the three layers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.controller.core.helm import (
    DEFAULT_WEIGHTS,
    FEATURES,
    Actor,
    Adapter,
    BurstDetector,
    HelmPolicy,
    build_helm,
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
