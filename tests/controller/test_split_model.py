"""The split model: hand-computed predictions, the laws' clips, monotonicity and the closed-form marginals."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from services.controller.core.split_model import (
    LN_100,
    ModelParams,
    SplitModel,
    kv_miss_ms,
    recompute_share,
)
from shared.schemas import CostCoefficients, WorkerFeatures
from tests.controller.features import worker_features

# Prices: 1 ms fixed, 20 us per recomputed token, 1 us per cached token, 10 us per EMB miss.
COST = CostCoefficients(
    fixed_ms=1.0, ms_per_new_token=0.02, ms_per_cached_token=0.001, ms_per_emb_miss=0.01, samples=10
)
LINEAR = ModelParams(emb_slope=0.1, kv_exponent=1.0)  # g = 1: hand arithmetic stays short


def window(**overrides: Any) -> WorkerFeatures:
    """Observed at alpha 0.5: 100 EMB items per request, 60% hit (40 misses); half the users' KV hit, 100
    history tokens, 60 of them computed; 100 requests per second; no P99 (the fit's price alone)."""
    return worker_features(
        **{
            **{
                "new_token_fraction": 0.6,
                "emb_hit_rate": 0.6,
                "emb_misses_per_request": 40.0,
                "p99_latency_ms": 0.0,
                "slo_violation_rate": 0.0,
                "cost": COST,
            },
            **overrides,
        }
    )


def model(params: ModelParams = LINEAR, **overrides: Any) -> SplitModel:
    m = SplitModel.from_features(window(**overrides), params)
    assert m is not None
    return m


# ---- the shared KV rule ----------------------------------------------------------------------------------
def test_kv_miss_ms_is_the_bounded_recomputation() -> None:
    assert kv_miss_ms(100.0, 0.5, 0.6, 0.02) == pytest.approx(1.0)  # 100 tokens x 0.5 missing x 20 us
    assert kv_miss_ms(100.0, 0.0, 0.2, 0.02) == pytest.approx(0.4)  # new_token_fraction bounds it
    assert recompute_share(0.5, 0.6) == 1.0
    assert recompute_share(0.5, 0.2) == pytest.approx(0.4)  # 0.2 of the history over 0.5 of the users
    assert recompute_share(1.0, 0.1) == 1.0  # no miss seen: a miss recomputes the whole history


# ---- building the model ----------------------------------------------------------------------------------
def test_from_features_in_split_invariant_form() -> None:
    m = model()
    assert m.emb_items == pytest.approx(100.0)  # 40 misses / (1 - 0.6)
    assert m.emb_intercept == pytest.approx(0.6 - 0.1 * math.log(0.5))
    assert m.kv_intercept == pytest.approx(1.0)  # 0.5 / (1 - 0.5)
    assert m.kv_cap == 1.0
    assert m.emb_miss_ms == 0.01
    assert m.kv_miss_cost_ms == pytest.approx(2.0)  # 100 tokens x 20 us per missing request
    # priced service: 1 + 60 x 0.02 + 40 x 0.001 + 40 x 0.01 = 2.64 ms, less the misses (0.4 + 1.0)
    assert m.base_ms == pytest.approx(1.24)


def test_the_model_reproduces_the_window_at_its_own_split() -> None:
    m = model()
    assert m.emb_hit(0.5) == pytest.approx(0.6)
    assert m.kv_hit(0.5) == pytest.approx(0.5)
    assert m.emb_ms(0.5) == pytest.approx(0.4)  # 40 misses x 10 us
    assert m.kv_ms(0.5) == pytest.approx(kv_miss_ms(100.0, 0.5, 0.6, 0.02))
    assert m.service_ms(0.5) == pytest.approx(2.64)


def test_hand_computed_predictions_at_another_split() -> None:
    m = model()
    # a = 0.25: EMB hit 0.6 + 0.1 ln(1/2); KV hit 0.5 x 0.75 / 0.5
    emb_hit = 0.6 - 0.1 * math.log(2.0)
    assert m.emb_hit(0.25) == pytest.approx(emb_hit)
    assert m.emb_ms(0.25) == pytest.approx(100.0 * (1.0 - emb_hit) * 0.01)
    assert m.kv_hit(0.25) == pytest.approx(0.75)
    assert m.kv_ms(0.25) == pytest.approx(0.5)
    service = 1.24 + 100.0 * (1.0 - emb_hit) * 0.01 + 0.5
    assert m.service_ms(0.25) == pytest.approx(service)
    assert m.rho(0.25) == pytest.approx(100.0 * service / 1000.0)
    assert m.p99_ms(0.25) == pytest.approx(service / (1.0 - 0.1 * service) * math.log(100.0))
    assert m.p99_ms(0.5) == pytest.approx(2.64 / 0.736 * LN_100)


def test_the_observed_p99_anchors_the_base_service() -> None:
    # 50 ms at 100/s implies s = 50 / (ln 100 + 5) under the model's own tail: larger than the priced 2.64
    m = model(p99_latency_ms=50.0)
    implied = 50.0 / (LN_100 + 5.0)
    assert m.base_ms == pytest.approx(implied - 1.4)
    assert m.p99_ms(0.5) == pytest.approx(50.0)
    # a P99 below what the fit prices: the priced service stands
    assert model(p99_latency_ms=1.0).base_ms == pytest.approx(1.24)


def test_the_laws_clip_and_cap() -> None:
    m = model()
    assert m.emb_hit(0.99) < 1.0  # 0.6 + 0.1 ln 1.98 = 0.668
    high = model(emb_hit_rate=0.95, emb_misses_per_request=5.0)
    assert high.emb_hit(0.95) == 1.0  # 0.95 + 0.1 ln 1.9 > 1
    assert high.emb_ms(0.95) == 0.0
    low = model(emb_hit_rate=0.05, emb_misses_per_request=95.0)
    assert low.emb_hit(0.05) == 0.0  # 0.05 + 0.1 ln 0.1 < 0
    capped = model(ModelParams(emb_slope=0.1, kv_exponent=1.0, kv_ceiling=0.8))
    assert capped.kv_cap == 0.8
    assert capped.kv_hit(0.1) == 0.8  # 0.9 uncapped
    assert capped.kv_hit(0.4) == pytest.approx(0.6)
    # the cap never sits below what the window saw (per lookup or per request)
    assert model(ModelParams(kv_ceiling=0.3), hot_user_share=0.55).kv_cap == 0.55


def test_edge_windows() -> None:
    assert SplitModel.from_features(window(alpha=0.0)) is None
    assert SplitModel.from_features(window(alpha=1.0)) is None
    # a window that missed no EMB item: items unknown, EMB predicted free
    m = model(emb_hit_rate=1.0, emb_misses_per_request=0.0)
    assert m.emb_items == 0.0 and m.emb_ms(0.1) == 0.0
    # no KV miss: a miss is priced at the whole history
    assert model(kv_hit_rate=1.0).kv_miss_cost_ms == pytest.approx(2.0)
    # zero prices (a sender without a cost model): both sides cost nothing at any split
    free = model(cost=CostCoefficients())
    assert free.emb_ms(0.2) == free.kv_ms(0.8) == 0.0
    assert free.marginal(0.5) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("emb_slope", -0.1, "emb_slope must be a finite number >= 0"),
        ("kv_exponent", 0.0, "kv_exponent must be a finite number > 0"),
        ("kv_ceiling", 0.0, r"kv_ceiling must be a finite number in \(0, 1\]"),
        ("kv_ceiling", 1.5, "kv_ceiling"),
        ("rho_eps", 1.0, r"rho_eps must be a finite number in \(0, 1\)"),
        ("emb_slope", float("nan"), "emb_slope"),
    ],
)
def test_params_validation_names_the_field(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelParams(**{field: value})


# ---- shape -----------------------------------------------------------------------------------------------
GRID = [i / 100 for i in range(1, 100)]
SHAPES = [
    {},
    {"emb_hit_rate": 0.9, "emb_misses_per_request": 10.0, "kv_hit_rate": 0.2},
    {"emb_hit_rate": 0.1, "emb_misses_per_request": 90.0, "kv_hit_rate": 0.9, "alpha": 0.2},
    {"alpha": 0.8, "kv_hit_rate": 0.05, "new_token_fraction": 0.3},
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [LINEAR, ModelParams(), ModelParams(kv_exponent=2.0, kv_ceiling=0.7)])
def test_emb_cost_falls_and_kv_cost_rises_with_alpha(shape: dict[str, Any], params: ModelParams) -> None:
    m = model(params, **shape)
    emb = [m.emb_ms(a) for a in GRID]
    kv = [m.kv_ms(a) for a in GRID]
    assert all(x >= y for x, y in itertools.pairwise(emb))
    assert all(x <= y for x, y in itertools.pairwise(kv))
    assert emb[0] > emb[-1] and kv[0] < kv[-1]  # and both do move over the range


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [LINEAR, ModelParams(), ModelParams(kv_exponent=2.0)])
def test_marginal_is_the_derivative(shape: dict[str, Any], params: ModelParams) -> None:
    m = model(params, **shape)
    h = 1e-6
    checked = 0
    for a in (0.07, 0.15, 0.3, 0.45, 0.55, 0.7, 0.85, 0.93):
        emb, kv = m.marginal(a)
        emb_fd = -(m.emb_ms(a + h) - m.emb_ms(a - h)) / (2 * h)
        kv_fd = (m.kv_ms(a + h) - m.kv_ms(a - h)) / (2 * h)
        # away from the clips (where the one-sided rule is a convention): the central difference
        raw_emb = m.emb_intercept + params.emb_slope * math.log(a)
        if 1e-4 < raw_emb < 1 - 1e-4:
            assert emb == pytest.approx(emb_fd, rel=1e-5, abs=1e-9)
            checked += 1
        if m.kv_intercept * (1 - a) ** params.kv_exponent < m.kv_cap - 1e-4:
            assert kv == pytest.approx(kv_fd, rel=1e-5, abs=1e-9)
            checked += 1
    assert checked >= 8


def test_marginal_hand_values_and_one_sided_clips() -> None:
    m = model()
    assert m.marginal(0.5) == pytest.approx((0.2, 2.0))  # 100 x 0.01 x 0.1 / 0.5; 2.0 x 1 x 0.5 / 0.5
    assert m.marginal(0.25) == pytest.approx((0.4, 2.0))  # g = 1: the KV saving is flat in a
    assert model(ModelParams()).marginal(0.5)[1] == pytest.approx(2.0 * 0.6)  # g = 0.6
    # EMB at hit rate 1: more share saves nothing; at hit rate 0 its growth still counts
    assert model(emb_hit_rate=0.95, emb_misses_per_request=5.0).marginal(0.95)[0] == 0.0
    zero = model(emb_hit_rate=0.0, emb_misses_per_request=100.0)
    assert zero.marginal(0.5)[0] == pytest.approx(0.2)
    # KV at its cap: nothing; at hit rate 0 the multiplicative law has nothing to grow
    assert model(ModelParams(kv_exponent=1.0, kv_ceiling=0.8)).marginal(0.1)[1] == 0.0
    assert model(kv_hit_rate=0.0, new_token_fraction=1.0).marginal(0.5)[1] == 0.0
