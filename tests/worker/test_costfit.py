"""The worker's online cost fit (pure numpy)."""

from __future__ import annotations

import pytest

from services.worker.core.costfit import CostEstimate, CostFitter

PRIOR = CostEstimate(
    fixed_ms=1.0,
    ms_per_new_token=0.01,
    ms_per_cached_token=0.001,
    ms_per_candidate=0.01,
    ms_per_emb_miss=0.001,
    samples=0,
)


def test_without_samples_the_prior_is_the_estimate() -> None:
    assert CostFitter(PRIOR).estimate() == PRIOR


def test_recovers_a_linear_cost_from_varied_samples() -> None:
    fit = CostFitter(PRIOR, prior_weight=1e-6)
    for new in (0, 10, 50, 200):
        for cached in (0, 100, 400):
            for cands in (8, 64):
                ms = 2.0 + 0.05 * new + 0.002 * cached + 0.02 * cands
                fit.observe(new_tokens=new, cached_tokens=cached, candidates=cands, emb_misses=0, ms=ms)
    est = fit.estimate()
    assert est.fixed_ms == pytest.approx(2.0, rel=1e-3)
    assert est.ms_per_new_token == pytest.approx(0.05, rel=1e-3)
    assert est.ms_per_cached_token == pytest.approx(0.002, rel=1e-2)
    assert est.ms_per_candidate == pytest.approx(0.02, rel=1e-3)
    assert est.samples == 24


def test_a_cached_token_never_costs_more_than_a_new_one() -> None:
    fit = CostFitter(PRIOR, prior_weight=1e-6)
    for cached in (0, 100, 200, 300):  # data in which cached tokens look dearer than new ones
        fit.observe(new_tokens=10, cached_tokens=cached, candidates=8, emb_misses=0, ms=1.0 + 0.05 * cached)
        fit.observe(new_tokens=20, cached_tokens=cached, candidates=8, emb_misses=0, ms=1.1 + 0.05 * cached)
    est = fit.estimate()
    assert est.ms_per_cached_token <= est.ms_per_new_token
    assert min(est.fixed_ms, est.ms_per_new_token, est.ms_per_candidate, est.ms_per_emb_miss) >= 0.0
