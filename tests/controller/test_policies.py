"""The controller's pure core: policies, the clamp, spec parsing, settings and the CLI hook."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pytest
from msgspec.structs import replace as replace_struct

from services.controller.cli import add_controller_command
from services.controller.core.policies import Clamp, HitBalancePolicy, StaticPolicy, parse_policy
from services.controller.settings import ENV_PREFIX, ControllerSettings
from shared.errors import SettingsError
from shared.schemas import CostCoefficients, WorkerFeatures
from shared.settings import load_settings
from tests.controller.features import worker_features

# 100 requests in the window; with the default cost model one 128-byte row missed per request costs 1 us
# and one recomputed token 10 us.
ROW = 128
REQUESTS = 100


def feat(**overrides: Any) -> WorkerFeatures:
    return worker_features(**{**{}, **overrides})


def pressure(emb_ms: float, kv_ms: float, **overrides: Any) -> WorkerFeatures:
    """Features whose EMB and KV misses cost exactly emb_ms and kv_ms per request (default cost model)."""
    misses_per_request = round(emb_ms / 0.001)
    kv_miss = kv_ms / (100.0 * 0.01)  # mean_history 100, 0.01 ms per token
    return feat(
        miss_bytes=misses_per_request * ROW * REQUESTS,
        kv_hit_rate=1.0 - kv_miss,
        new_token_fraction=1.0,
        **overrides,
    )


# ---- static ----------------------------------------------------------------------------------------------
def test_static_returns_its_value_whatever_the_features() -> None:
    p = StaticPolicy(0.3)
    assert p.name == "static:0.3"
    for f in (feat(), pressure(5.0, 0.0), pressure(0.0, 5.0), feat(request_rate=0.0)):
        assert p.decide(f, 0.9) == 0.3


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan"), float("inf")])
def test_static_rejects_out_of_range(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        StaticPolicy(alpha)


# ---- clamp -----------------------------------------------------------------------------------------------
def test_clamp_limits_the_step_both_ways() -> None:
    c = Clamp(0.05, 0.95, 0.1)
    assert c(0.9, 0.5) == 0.6
    assert c(0.1, 0.5) == 0.4
    assert c(0.55, 0.5) == 0.55
    assert c(0.5, 0.5) == 0.5


def test_clamp_keeps_the_range_and_the_range_wins() -> None:
    c = Clamp(0.2, 0.8, 0.1)
    assert c(0.9, 0.75) == 0.8
    assert c(0.0, 0.25) == 0.2
    assert c(0.5, 0.0) == 0.2  # a worker found below the range is brought inside at once
    assert c(0.5, 1.0) == 0.8


def test_clamp_holds_on_a_non_finite_proposal() -> None:
    c = Clamp(0.05, 0.95, 0.1)
    assert c(float("nan"), 0.4) == 0.4
    assert c(float("inf"), 0.4) == 0.4
    assert c(0.7, float("nan")) == 0.6  # no usable current: from the middle of the range


@pytest.mark.parametrize(
    ("lo", "hi", "step", "match"),
    [
        (0.6, 0.4, 0.1, "lo <= hi"),
        (-0.1, 0.5, 0.1, "lo <= hi"),
        (0.1, 1.5, 0.1, "lo <= hi"),
        (0, 1, 0, "> 0"),
    ],
)
def test_clamp_rejects_bad_parameters(lo: float, hi: float, step: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Clamp(lo, hi, step)


# ---- hit-balance -----------------------------------------------------------------------------------------
def test_pressures_follow_the_documented_cost_model() -> None:
    p = HitBalancePolicy()
    # 1000 misses of 128 B per request at 1 us; half the users miss their KV: 100 tokens at 10 us.
    f = feat(miss_bytes=1000 * ROW * REQUESTS, kv_hit_rate=0.5, new_token_fraction=0.6)
    assert p.pressures(f) == pytest.approx((1.0, 0.5))
    # new_token_fraction bounds what KV misses can have cost.
    assert p.pressures(feat(kv_hit_rate=0.0, new_token_fraction=0.2))[1] == pytest.approx(0.2)


def test_a_worker_with_a_fitted_model_is_priced_with_it() -> None:
    fitted = CostCoefficients(ms_per_new_token=0.002, ms_per_emb_miss=0.01, samples=50)
    f = feat(
        miss_bytes=1000 * ROW * REQUESTS,  # what the parameters would price: 1.0 ms of EMB misses
        emb_misses_per_request=300.0,
        kv_hit_rate=0.5,
        new_token_fraction=0.6,
        cost=fitted,
    )
    # 300 misses x 0.01 ms; 100 tokens x min(0.5, 0.6) x 0.002 ms
    assert HitBalancePolicy().pressures(f) == pytest.approx((3.0, 0.1))
    # worker_cost=0, or a worker with no fit yet (samples 0): the parameters, as before
    assert HitBalancePolicy(worker_cost=0.0).pressures(f) == pytest.approx((1.0, 0.5))
    unfitted = replace_struct(f, cost=CostCoefficients(ms_per_new_token=0.002, ms_per_emb_miss=0.01))
    assert HitBalancePolicy().pressures(unfitted) == pytest.approx((1.0, 0.5))


def test_the_fitted_prices_can_turn_a_decision_around() -> None:
    # The parameters see dear KV misses (10 us a token); this worker's own fit says tokens are cheap and
    # its EMB misses dear: alpha goes up (more EMB) rather than down.
    f = feat(
        miss_bytes=100 * ROW * REQUESTS,
        emb_misses_per_request=100.0,
        kv_hit_rate=0.0,
        new_token_fraction=1.0,
        emb_hit_rate=0.5,
    )
    assert HitBalancePolicy(worker_cost=0.0).decide(f, 0.5) < 0.5
    fitted = replace_struct(
        f, cost=CostCoefficients(ms_per_new_token=0.0001, ms_per_emb_miss=0.02, samples=9)
    )
    assert HitBalancePolicy().decide(fitted, 0.5) > 0.5


def test_raises_alpha_when_emb_misses_dominate() -> None:
    p = HitBalancePolicy()
    assert p.decide(pressure(1.0, 0.0), 0.5) == pytest.approx(0.55)  # full imbalance: one gain
    assert p.decide(pressure(0.8, 0.2), 0.5) == pytest.approx(0.525)  # e=0.6: (0.6-0.2)/0.8 of a gain


def test_lowers_alpha_when_kv_misses_dominate() -> None:
    p = HitBalancePolicy()
    assert p.decide(pressure(0.0, 0.5), 0.5) == pytest.approx(0.45)
    assert p.decide(pressure(0.2, 0.8), 0.4) == pytest.approx(0.375)


@pytest.mark.parametrize(("emb", "kv"), [(0.5, 0.5), (0.55, 0.45), (0.4, 0.6), (0.6, 0.4)])
def test_holds_inside_the_dead_band(emb: float, kv: float) -> None:
    assert HitBalancePolicy().decide(pressure(emb, kv), 0.42) == 0.42


def test_step_is_continuous_at_the_dead_band_edge() -> None:
    p = HitBalancePolicy()
    assert p.decide(pressure(0.61, 0.39), 0.5) - 0.5 < 0.002


def test_holds_when_healthy_idle_unsettled_or_negligible() -> None:
    p = HitBalancePolicy()
    emb_heavy = {"miss_bytes": 1000 * ROW * REQUESTS}
    # SLO met and both hit rates high: hold even though EMB misses dominate what little is missed.
    assert (
        p.decide(feat(**emb_heavy, emb_hit_rate=0.95, kv_hit_rate=0.95, slo_violation_rate=0.0), 0.5) == 0.5
    )
    # ... but not when the SLO is violated.
    assert p.decide(feat(**emb_heavy, emb_hit_rate=0.95, kv_hit_rate=0.95, slo_violation_rate=0.2), 0.5) > 0.5
    assert p.decide(feat(**emb_heavy, request_rate=0.0), 0.5) == 0.5  # no traffic
    assert p.decide(feat(**emb_heavy, window_ms=0.0), 0.5) == 0.5
    assert p.decide(feat(**emb_heavy, alpha=0.3, alpha_target=0.5), 0.5) == 0.5  # still moving
    assert p.decide(feat(miss_bytes=ROW * REQUESTS // 10), 0.5) == 0.5  # 0.1 us per request: negligible


def test_burst_moves_faster() -> None:
    p = HitBalancePolicy()
    assert p.decide(pressure(1.0, 0.0, request_rate_delta=60.0), 0.5) == pytest.approx(0.6)
    assert p.decide(pressure(1.0, 0.0, request_rate_delta=-60.0), 0.5) == pytest.approx(0.6)
    assert p.decide(pressure(1.0, 0.0, request_rate_delta=40.0), 0.5) == pytest.approx(0.55)
    assert p.decide(pressure(1.0, 0.0, request_rate_delta=float("nan")), 0.5) == pytest.approx(0.55)
    # The delta is a derivative (per second): over a 0.5 s window, 60/s^2 is a change of 30 req/s, of 100.
    half = {"window_ms": 500.0, "request_rate_delta": 60.0}
    assert p.decide(pressure(1.0, 0.0, **half), 0.5) == pytest.approx(0.55)
    assert p.decide(pressure(1.0, 0.0, **{**half, "request_rate_delta": 100.0}), 0.5) == pytest.approx(0.6)


def test_hit_balance_converges_under_a_fixed_imbalance_and_the_clamp() -> None:
    p, clamp = HitBalancePolicy(), Clamp(0.05, 0.95, 0.1)
    alpha = 0.5
    for _ in range(100):
        alpha = clamp(p.decide(pressure(0.0, 2.0, alpha=alpha, alpha_target=alpha), alpha), alpha)
    assert alpha == 0.05


# ---- parsing ---------------------------------------------------------------------------------------------
def test_parse_policy_builds_each_policy() -> None:
    static = parse_policy("static:0.25")
    assert isinstance(static, StaticPolicy) and static.alpha == 0.25 and static.name == "static:0.25"
    assert isinstance(parse_policy(" Static:1 "), StaticPolicy)
    hb = parse_policy("hit-balance")
    assert isinstance(hb, HitBalancePolicy) and hb == HitBalancePolicy()
    tuned = parse_policy("hit-balance:gain=0.1, deadband=0.3,token_ms=0.001")
    assert isinstance(tuned, HitBalancePolicy)
    assert (tuned.gain, tuned.deadband, tuned.token_ms) == (0.1, 0.3, 0.001)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("static", "needs a value"),
        ("static:", "needs a value"),
        ("static:abc", "not a number"),
        ("static:1.5", r"in \[0, 1\]"),
        ("static:-0.1", r"in \[0, 1\]"),
        ("static:nan", r"in \[0, 1\]"),
        ("helm:whatever", "'whatever' is not key=value"),
        ("helm:layers=0", "layers must be 1, 2 or 3"),
        ("helm:weights=/nonexistent.npz", "no actor weights at /nonexistent.npz"),
        ("ppo", "unknown alpha policy 'ppo'.*static:A.*hit-balance"),
        ("", "unknown alpha policy"),
        ("hit-balance:bogus=1", "known key.*gain"),
        ("hit-balance:gain", "key=value"),
        ("hit-balance:gain=fast", "gain='fast' is not a number"),
        ("hit-balance:deadband=1", "deadband must be < 1"),
        ("hit-balance:gain=-1", "gain must be a finite number >= 0"),
        ("hit-balance:row_bytes=0", "row_bytes must be > 0"),
    ],
)
def test_parse_errors_are_clear(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_policy(spec)


# ---- decision latency ------------------------------------------------------------------------------------
def _median_ns(policy: Any, f: WorkerFeatures, n: int = 20_000) -> float:
    clamp = Clamp(0.05, 0.95, 0.1)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        clamp(policy.decide(f, 0.5), 0.5)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples)


def test_decide_takes_microseconds() -> None:
    # The bar is HELM's 32 us; these take ~1 us. The bound is loose: CI machines are shared and noisy.
    assert _median_ns(HitBalancePolicy(), pressure(0.8, 0.2)) < 20_000
    assert _median_ns(StaticPolicy(0.5), feat()) < 20_000


# ---- settings and CLI ------------------------------------------------------------------------------------
def test_settings_defaults_and_env() -> None:
    st = load_settings(ControllerSettings, prefix=ENV_PREFIX, env={})
    assert (st.policy, st.alpha_min, st.alpha_max, st.max_step, st.min_change) == (
        "hit-balance",
        0.05,
        0.95,
        0.1,
        0.01,
    )
    st = load_settings(
        ControllerSettings, prefix=ENV_PREFIX, env={"ONEPOOL_CONTROLLER_POLICY": "static:0.7", "X": "y"}
    )
    assert st.policy == "static:0.7"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"ONEPOOL_CONTROLLER_POLICY": "helm:bogus=1"}, "ONEPOOL_CONTROLLER_POLICY.*bogus"),
        ({"ONEPOOL_CONTROLLER_POLICY": "static:2"}, "ONEPOOL_CONTROLLER_POLICY"),
        ({"ONEPOOL_CONTROLLER_ALPHA_MIN": "0.9", "ONEPOOL_CONTROLLER_ALPHA_MAX": "0.1"}, "ALPHA_MIN"),
        ({"ONEPOOL_CONTROLLER_MAX_STEP": "0"}, "MAX_STEP"),
        ({"ONEPOOL_CONTROLLER_MIN_CHANGE": "0.5"}, "MIN_CHANGE"),
        ({"ONEPOOL_CONTROLLER_ID": "a.b"}, "ONEPOOL_CONTROLLER_ID"),
        ({"ONEPOOL_CONTROLLER_MAX_STEP": "lots"}, "ONEPOOL_CONTROLLER_MAX_STEP"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        load_settings(ControllerSettings, prefix=ENV_PREFIX, env=env)


def test_controller_command_registers_every_setting_as_a_flag() -> None:
    parser = argparse.ArgumentParser(prog="onepool")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = add_controller_command(sub)
    help_text = " ".join(cmd.format_help().split())
    for name in ControllerSettings.__dataclass_fields__:
        assert f"{ENV_PREFIX}{name.upper()}" in help_text, name
    args = parser.parse_args(["controller", "--policy", "static:0.3", "--max-step", "0.2"])
    assert args.command == "controller" and callable(args.func)
    assert (args.policy, args.max_step) == ("static:0.3", "0.2")
