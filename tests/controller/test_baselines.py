"""The baseline policies: pi (PI on the marginal-saving imbalance) and predict-greedy (Holt forecast, grid
argmin of the split model's P99)."""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import pytest

from services.controller.core.policies import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_ALPHA_MIN,
    DEFAULT_MAX_STEP,
    Clamp,
    Holt,
    PIPolicy,
    PredictGreedyPolicy,
    parse_policy,
)
from services.controller.core.split_model import ModelParams, SplitModel
from services.controller.settings import ENV_PREFIX, ControllerSettings
from shared.schemas import CostCoefficients, WorkerFeatures
from shared.settings import load_settings
from tests.controller.test_split_model import window

LINEAR: dict[str, float] = {"emb_slope": 0.1, "kv_exponent": 1.0}  # the hand arithmetic's model


def emb_only(**overrides: Any) -> WorkerFeatures:
    """Error +1: every KV hit rate is 0 (nothing for the multiplicative KV law to grow), EMB misses."""
    return window(kv_hit_rate=0.0, hot_user_share=0.0, new_token_fraction=1.0, **overrides)


def kv_only(**overrides: Any) -> WorkerFeatures:
    """Error -1: the EMB cache missed nothing (items unknown: no EMB saving), half the users' KV hits."""
    return window(emb_hit_rate=1.0, emb_misses_per_request=0.0, **overrides)


# ---- pi --------------------------------------------------------------------------------------------------
def test_pi_defaults_are_the_controllers_clamp() -> None:
    st = load_settings(ControllerSettings, prefix=ENV_PREFIX, env={})
    p = PIPolicy()
    assert (p.lo, p.hi, p.max_step) == (st.alpha_min, st.alpha_max, st.max_step)
    assert (DEFAULT_ALPHA_MIN, DEFAULT_ALPHA_MAX, DEFAULT_MAX_STEP) == (0.05, 0.95, 0.1)


def test_pi_error_is_the_normalised_marginal_imbalance() -> None:
    p = PIPolicy(**LINEAR)
    # at 0.5: EMB saves 0.2 ms per unit of share, KV 2.0 (test_split_model's hand values)
    assert p.error(window(), 0.5) == pytest.approx((0.2 - 2.0) / 2.2)
    assert p.error(window(), 0.25) == pytest.approx((0.4 - 2.0) / 2.4)
    assert p.error(emb_only(), 0.5) == 1.0
    assert p.error(kv_only(), 0.5) == -1.0


def test_pi_decisions_by_hand() -> None:
    p = PIPolicy(**LINEAR)
    e1 = (0.2 - 2.0) / 2.2
    # first decision: base 0.5, integral e1; 0.5 + 0.05 e1 + 0.05 e1
    assert p.decide(window(), 0.5) == pytest.approx(0.5 + 0.1 * e1)
    assert p.integral("w1") == pytest.approx(e1)
    # second, from 0.45 (the error there: EMB 0.1 / 0.45 against KV 2.0); the base stays 0.5
    e2 = (0.1 / 0.45 - 2.0) / (0.1 / 0.45 + 2.0)
    assert p.decide(window(), 0.45) == pytest.approx(0.5 + 0.05 * e2 + 0.05 * (e1 + e2))
    assert p.integral("w1") == pytest.approx(e1 + e2)


def test_pi_holds_and_leaves_the_integral_alone() -> None:
    p = PIPolicy()
    assert p.decide(emb_only(request_rate=0.0), 0.5) == 0.5  # no traffic
    assert p.decide(emb_only(window_ms=0.0), 0.5) == 0.5
    assert p.decide(emb_only(alpha=0.3, alpha_target=0.5), 0.5) == 0.5  # the last move is not done
    assert p.decide(emb_only(alpha=1.0, alpha_target=1.0), 1.0) == 1.0  # no model (the clamp brings it in)
    assert p.decide(emb_only(), 1.0) == 1.0  # no marginal at a current of 1
    assert p.decide(window(cost=CostCoefficients()), 0.5) == 0.5  # nothing priced: no error
    assert p.integral("w1") == 0.0


def test_pi_anti_windup_stops_the_integral_at_the_range() -> None:
    # Binary-exact numbers: the proposal is 0.5 + 0.125 * integral, the range [0.125, 0.875].
    p = PIPolicy(kp=0.0, ki=0.125, lo=0.125, hi=0.875, max_step=0.25)
    clamp = Clamp(0.125, 0.875, 0.25)
    alpha, seen = 0.5, []
    for _ in range(12):
        alpha = clamp(p.decide(emb_only(), alpha), alpha)
        seen.append((alpha, p.integral("w1")))
    # integral 1, 2, 3 reaches hi exactly (0.875 is not beyond it); then it stops at 3, not 12
    assert seen[:4] == [(0.625, 1.0), (0.75, 2.0), (0.875, 3.0), (0.875, 3.0)]
    assert seen[-1] == (0.875, 3.0)
    # the first decision after the error turns leaves the limit (a wound-up integral of 12 would hold it 9)
    assert p.decide(kv_only(), alpha) == 0.75
    assert p.integral("w1") == 2.0


def test_pi_anti_windup_at_the_step_limit_integrates_up_to_it() -> None:
    # One integral step (0.125) is twice max_step: frozen outright it would never move; it moves max_step.
    p = PIPolicy(kp=0.0, ki=0.125, lo=0.125, hi=0.875, max_step=0.0625)
    assert p.decide(emb_only(), 0.5) == 0.5625
    assert p.integral("w1") == 0.5
    assert p.decide(emb_only(), 0.5625) == 0.625
    assert p.integral("w1") == 1.0
    assert p.decide(emb_only(), 0.5625) == 0.625  # the worker did not follow: the integral does not run on
    assert p.integral("w1") == 1.0


def test_pi_anti_windup_downward() -> None:
    p = PIPolicy(kp=0.0, ki=0.125, lo=0.125, hi=0.875, max_step=0.25)
    clamp = Clamp(0.125, 0.875, 0.25)
    alpha = 0.5
    for _ in range(8):
        alpha = clamp(p.decide(kv_only(), alpha), alpha)
    assert (alpha, p.integral("w1")) == (0.125, -3.0)
    assert p.decide(emb_only(), alpha) == 0.25


def test_pi_keeps_each_workers_state() -> None:
    p = PIPolicy(kp=0.0, ki=0.125, lo=0.125, hi=0.875, max_step=0.25)
    p.decide(emb_only(), 0.5)
    p.decide(emb_only(), 0.625)
    assert p.integral("w1") == 2.0 and p.integral("w2") == 0.0
    # w2's first decision starts from its own alpha with its own integral
    assert p.decide(kv_only(worker_id="w2"), 0.25) == 0.125
    assert p.integral("w2") == -1.0 and p.integral("w1") == 2.0
    assert p.decide(emb_only(), 0.75) == 0.875  # w1 carries on from 2


def test_pi_converges_without_overshoot_on_its_own_model() -> None:
    # The plant is the split model itself (g = 1): per unit of share EMB saves 100 x 0.01 x 0.1 / a and KV
    # 100 tokens x 5 us = 0.5 (flat), so the balance point is a = 0.1 / 0.5 = 0.2.
    p, clamp = PIPolicy(**LINEAR), Clamp(0.05, 0.95, 0.1)
    f = window(cost=CostCoefficients(ms_per_new_token=0.005, ms_per_emb_miss=0.01, samples=1))
    alpha, path = 0.5, []
    for _ in range(200):
        alpha = clamp(p.decide(f, alpha), alpha)
        path.append(alpha)
    assert path[-1] == pytest.approx(0.2, abs=1e-3)
    assert min(path) > 0.2 - 1e-3  # from above, never below the balance point
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(path))


# ---- Holt ------------------------------------------------------------------------------------------------
def test_holt_forecast_numbers() -> None:
    h = Holt(100.0)
    assert (h.level, h.trend, h.forecast()) == (100.0, 0.0, 100.0)
    h.update(120.0, 0.5, 0.2)  # level 0.5 x 120 + 0.5 x 100 = 110, trend 0.2 x 10 = 2
    assert (h.level, h.trend) == pytest.approx((110.0, 2.0))
    assert h.forecast() == pytest.approx(112.0)
    h.update(150.0, 0.5, 0.2)  # level 0.5 x 150 + 0.5 x 112 = 131, trend 0.2 x 21 + 0.8 x 2 = 5.8
    assert (h.level, h.trend) == pytest.approx((131.0, 5.8))
    assert h.forecast() == pytest.approx(136.8)


def test_greedy_forecasts_its_inputs() -> None:
    p = PredictGreedyPolicy()
    for rate in (100.0, 120.0, 150.0):
        p.observe(window(request_rate=rate))
    m = p.forecast("w1")
    assert m is not None
    assert m.request_rate == pytest.approx(136.8)
    assert m.emb_items == pytest.approx(100.0)  # constant series: level, no trend
    assert m.kv_miss_cost_ms == pytest.approx(2.0)  # 100 tokens x recompute share 1 x 20 us
    assert p.forecast("w2") is None


def test_greedy_forecasts_do_not_read_its_own_moves_as_trends() -> None:
    # Windows of one workload (test_split_model's, with the default g) seen at 0.3, 0.5, 0.7: the raw hit
    # rates move with the split, the law's intercepts do not.
    truth = SplitModel.from_features(window(), ModelParams())
    assert truth is not None
    p = PredictGreedyPolicy()
    for a in (0.3, 0.5, 0.7):
        emb_hit, kv_hit = truth.emb_hit(a), truth.kv_hit(a)
        p.observe(
            window(
                alpha=a,
                alpha_target=a,
                emb_hit_rate=emb_hit,
                emb_misses_per_request=100.0 * (1.0 - emb_hit),
                kv_hit_rate=kv_hit,
                hot_user_share=kv_hit,
                new_token_fraction=1.0 - kv_hit,
            )
        )
    m = p.forecast("w1")
    assert m is not None
    assert m.emb_intercept == pytest.approx(truth.emb_intercept)
    assert m.kv_intercept == pytest.approx(truth.kv_intercept)
    assert m.emb_items == pytest.approx(100.0)


def test_greedy_items_series_skips_windows_that_missed_nothing() -> None:
    p = PredictGreedyPolicy()
    p.observe(kv_only())  # no item count yet: the forecast prices EMB at 0 items
    m = p.forecast("w1")
    assert m is not None and m.emb_items == 0.0
    p.observe(window())
    p.observe(kv_only())
    m = p.forecast("w1")
    assert m is not None and m.emb_items == pytest.approx(100.0)


# ---- greedy decisions ------------------------------------------------------------------------------------
def brute_force(p: PredictGreedyPolicy, m: SplitModel, current: float) -> float:
    return min(p.grid, key=lambda a: (m.p99_ms(a), abs(a - current)))


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"emb_hit_rate": 0.3, "emb_misses_per_request": 70.0},
        {"kv_hit_rate": 0.2, "new_token_fraction": 0.9, "mean_history": 400.0},
        {"alpha": 0.3, "alpha_target": 0.3, "p99_latency_ms": 40.0},
    ],
)
def test_greedy_picks_the_models_argmin(shape: dict[str, Any]) -> None:
    p = PredictGreedyPolicy(min_gain=0.0)
    f = window(**shape)
    target = p.decide(f, f.alpha_target)
    m = p.forecast("w1")
    assert m is not None
    assert target == brute_force(p, m, f.alpha_target)
    assert 0.05 < target < 0.95  # these shapes have an inner optimum


def test_greedy_goes_to_the_cheap_end_and_stays_in_the_range() -> None:
    # KV worthless (no hit anywhere): more EMB always helps, up to hi
    assert PredictGreedyPolicy().decide(emb_only(), 0.5) == 0.95
    assert PredictGreedyPolicy(hi=0.8).decide(emb_only(), 0.5) == 0.8
    # EMB worthless (nothing priced), KV priced: down to lo
    free_emb = CostCoefficients(ms_per_new_token=0.02, samples=1)
    assert PredictGreedyPolicy().decide(window(cost=free_emb), 0.5) == 0.05
    assert PredictGreedyPolicy(lo=0.2).decide(window(cost=free_emb), 0.5) == 0.2


def test_greedy_holds_without_enough_to_gain() -> None:
    p = PredictGreedyPolicy()
    f = window()
    best = p.decide(f, 0.5)
    m = p.forecast("w1")
    assert m is not None and best != 0.5
    gain = 1.0 - m.p99_ms(best) / m.p99_ms(0.5)
    assert PredictGreedyPolicy(min_gain=gain * 0.99).decide(f, 0.5) == best
    assert PredictGreedyPolicy(min_gain=gain * 1.01).decide(f, 0.5) == 0.5
    # flat: nothing priced at all
    assert PredictGreedyPolicy().decide(window(cost=CostCoefficients()), 0.42) == 0.42


def test_greedy_holds_on_no_traffic_and_unsettled_moves_without_learning() -> None:
    p = PredictGreedyPolicy()
    assert p.decide(emb_only(request_rate=0.0), 0.5) == 0.5
    assert p.decide(emb_only(alpha=0.3, alpha_target=0.5), 0.5) == 0.5
    assert p.decide(emb_only(alpha=0.0, alpha_target=0.0), 0.0) == 0.0
    assert p.forecast("w1") is None  # none of them fed the forecasters


def test_greedy_keeps_each_workers_forecasts() -> None:
    p = PredictGreedyPolicy()
    for rate in (100.0, 200.0):
        p.decide(window(request_rate=rate), 0.5)
    p.decide(window(worker_id="w2", request_rate=50.0), 0.5)
    m1, m2 = p.forecast("w1"), p.forecast("w2")
    assert m1 is not None and m2 is not None
    assert m1.request_rate == pytest.approx(0.5 * 200 + 0.5 * 100 + 0.2 * 50)  # level 150, trend 10
    assert m2.request_rate == 50.0


def test_greedy_grid_is_bounded_by_the_range() -> None:
    assert PredictGreedyPolicy().grid == tuple(i / 100 for i in range(5, 96))
    g = PredictGreedyPolicy(lo=0.2, hi=0.8).grid
    assert (g[0], g[-1], len(g)) == (0.2, 0.8, 61)
    assert PredictGreedyPolicy(lo=0.333, hi=0.5).grid[0] == 0.34
    assert PredictGreedyPolicy(lo=0.0, hi=1.0).grid[-1] == 0.95
    assert PredictGreedyPolicy(grid_step=0.25).grid == (0.25, 0.5, 0.75)


# ---- parsing ---------------------------------------------------------------------------------------------
def test_parse_builds_the_baselines() -> None:
    pi = parse_policy("pi")
    assert isinstance(pi, PIPolicy) and pi == PIPolicy() and pi.name == "pi"
    tuned = parse_policy(" PI:kp=0.1, ki=0.2,hi=0.9 ")
    assert isinstance(tuned, PIPolicy) and (tuned.kp, tuned.ki, tuned.hi) == (0.1, 0.2, 0.9)
    greedy = parse_policy("predict-greedy")
    assert isinstance(greedy, PredictGreedyPolicy) and greedy.name == "predict-greedy"
    tuned_g = parse_policy("predict-greedy:level=0.3,trend=0.1,kv_exponent=1")
    assert isinstance(tuned_g, PredictGreedyPolicy)
    assert (tuned_g.level, tuned_g.trend, tuned_g.kv_exponent) == (0.3, 0.1, 1.0)
    # each parse is a fresh policy: no state shared between runs
    a, b = parse_policy("pi"), parse_policy("pi")
    assert isinstance(a, PIPolicy) and isinstance(b, PIPolicy)
    a.decide(emb_only(), 0.5)
    assert b.integral("w1") == 0.0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("pi:bogus=1", "'bogus=1' is not key=value with a known key.*kp, ki"),
        ("pi:rho_eps=0.1", "known key"),  # the PI has no tail
        ("pi:kp", "key=value"),
        ("pi:kp=x", "kp='x' is not a number"),
        ("pi:kp=-1", "pi: kp must be a finite number >= 0"),
        ("pi:ki=inf", "pi: ki must be a finite number >= 0"),
        ("pi:lo=0.9,hi=0.1", "pi: clamp range must satisfy 0 <= lo <= hi <= 1"),
        ("pi:max_step=0", "pi: clamp max_step must be > 0"),
        ("pi:kv_exponent=0", "pi: kv_exponent must be a finite number > 0"),
        ("pi:kv_ceiling=2", "pi: kv_ceiling"),
        ("predict-greedy:level=0", "predict-greedy: level must be > 0"),
        ("predict-greedy:level=2", "predict-greedy: level must be <= 1"),
        ("predict-greedy:trend=-0.1", "predict-greedy: trend must be a finite number >= 0"),
        ("predict-greedy:min_gain=1.5", "min_gain must be <= 1"),
        ("predict-greedy:grid_step=0", "grid_step must be > 0"),
        ("predict-greedy:lo=0.331,hi=0.339", "no grid point"),
        ("predict-greedy:rho_eps=1", "predict-greedy: rho_eps"),
        ("predict-greedy:max_step=0.1", "known key.*level"),
        ("greedy", "unknown alpha policy 'greedy'.*pi\\[:key=value.*predict-greedy"),
    ],
)
def test_baseline_parse_errors_name_the_key(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_policy(spec)


def test_settings_accept_the_baselines() -> None:
    for spec in ("pi", "predict-greedy:level=0.4"):
        st = load_settings(ControllerSettings, prefix=ENV_PREFIX, env={"ONEPOOL_CONTROLLER_POLICY": spec})
        assert st.policy == spec


# ---- decision latency ------------------------------------------------------------------------------------
def test_baseline_decisions_take_tens_of_microseconds() -> None:
    # Loose bounds (shared, noisy CI machines): pi ~4 us, predict-greedy ~30 us (a 91-point grid) here.
    clamp = Clamp(0.05, 0.95, 0.1)
    for policy, bound_ns in ((PIPolicy(), 100_000), (PredictGreedyPolicy(), 400_000)):
        f = window()
        samples = []
        for _ in range(2_000):
            t0 = time.perf_counter_ns()
            clamp(policy.decide(f, 0.5), 0.5)
            samples.append(time.perf_counter_ns() - t0)
        assert statistics.median(samples) < bound_ns, policy.name
