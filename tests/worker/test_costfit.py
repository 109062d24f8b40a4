"""The worker's online cost fit (pure numpy)."""

from __future__ import annotations

import numpy as np
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


def test_batches_teach_a_request_s_share_of_its_batch() -> None:
    # Batches of 1..8 requests whose time is 2 ms per request plus the token and candidate costs: the fit
    # prices one request as at batch size 1, and counts requests, not batches.
    fit = CostFitter(PRIOR, prior_weight=1e-6)
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 4, 8):
        for _ in range(6):
            new = rng.integers(0, 200, size)
            cands = rng.integers(8, 64, size)
            ms = float(2.0 * size + 0.05 * new.sum() + 0.02 * cands.sum())
            fit.observe(
                requests=size,
                new_tokens=int(new.sum()),
                cached_tokens=0,
                candidates=int(cands.sum()),
                emb_misses=0,
                ms=ms,
            )
    est = fit.estimate()
    assert est.fixed_ms == pytest.approx(2.0, rel=1e-3)
    assert est.ms_per_new_token == pytest.approx(0.05, rel=1e-3)
    assert est.ms_per_candidate == pytest.approx(0.02, rel=1e-3)
    assert est.samples == 6 * (1 + 2 + 3 + 4 + 8)
    with pytest.raises(ValueError, match="requests"):
        fit.observe(requests=0, new_tokens=0, cached_tokens=0, candidates=0, emb_misses=0, ms=1.0)


def test_a_cached_token_never_costs_more_than_a_new_one() -> None:
    fit = CostFitter(PRIOR, prior_weight=1e-6)
    for cached in (0, 100, 200, 300):  # data in which cached tokens look dearer than new ones
        fit.observe(new_tokens=10, cached_tokens=cached, candidates=8, emb_misses=0, ms=1.0 + 0.05 * cached)
        fit.observe(new_tokens=20, cached_tokens=cached, candidates=8, emb_misses=0, ms=1.1 + 0.05 * cached)
    est = fit.estimate()
    assert est.ms_per_cached_token <= est.ms_per_new_token
    assert min(est.fixed_ms, est.ms_per_new_token, est.ms_per_candidate, est.ms_per_emb_miss) >= 0.0


def _true_ms(new: int, cached: int, cands: int, misses: int) -> float:
    return 2.0 + 0.05 * new + 0.002 * cached + 0.02 * cands + 0.003 * misses


def _varied(fit: CostFitter, rng: np.random.Generator, n: int, noise_ms: float) -> None:
    for _ in range(n):
        new, cached = int(rng.integers(0, 300)), int(rng.integers(0, 800))
        cands, misses = int(rng.integers(8, 128)), int(rng.integers(0, 400))
        ms = _true_ms(new, cached, cands, misses) + float(rng.normal(0.0, noise_ms))
        fit.observe(new_tokens=new, cached_tokens=cached, candidates=cands, emb_misses=misses, ms=ms)


def test_a_few_stalled_requests_do_not_move_the_fit() -> None:
    rng = np.random.default_rng(7)
    clean, stalled = CostFitter(PRIOR, prior_weight=1e-6), CostFitter(PRIOR, prior_weight=1e-6)
    _varied(clean, np.random.default_rng(7), 500, noise_ms=0.05)
    _varied(stalled, rng, 500, noise_ms=0.05)
    for _ in range(12):  # 12 of 512 requests hit a 200 ms pause (a GC, a stalled thread)
        stalled.observe(new_tokens=50, cached_tokens=200, candidates=64, emb_misses=100, ms=200.0)
    a, b = clean.estimate(), stalled.estimate()
    for field in ("fixed_ms", "ms_per_new_token", "ms_per_cached_token", "ms_per_candidate"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=0.05), field
    assert b.predict(50, 200, 64, 100) == pytest.approx(_true_ms(50, 200, 64, 100), rel=0.02)
    # Left in, the 12 pauses make this prediction ~32 ms instead of 6.5 (the fit's slopes collapse to 0).
    assert b.predict(50, 200, 64, 100) < _true_ms(50, 200, 64, 100) + 0.5


def test_a_worker_that_really_got_slower_is_followed() -> None:
    fit = CostFitter(PRIOR, prior_weight=1e-6, window=256)
    _varied(fit, np.random.default_rng(1), 256, noise_ms=0.05)
    rng = np.random.default_rng(2)
    for _ in range(256):  # from now on everything takes twice as long: a whole window of it
        new, cached, cands = int(rng.integers(0, 300)), int(rng.integers(0, 800)), int(rng.integers(8, 128))
        ms = 2 * _true_ms(new, cached, cands, 0)
        fit.observe(new_tokens=new, cached_tokens=cached, candidates=cands, emb_misses=0, ms=ms)
    assert fit.estimate().predict(100, 400, 64, 0) == pytest.approx(2 * _true_ms(100, 400, 64, 0), rel=1e-3)


def test_clean_data_fits_the_same_with_or_without_the_robust_pass() -> None:
    fit = CostFitter(PRIOR, prior_weight=1e-6)
    _varied(fit, np.random.default_rng(3), 200, noise_ms=0.0)  # exactly linear: nothing to clip
    est = fit.estimate()
    assert est.fixed_ms == pytest.approx(2.0, rel=1e-6)
    assert est.ms_per_new_token == pytest.approx(0.05, rel=1e-6)
    assert est.ms_per_emb_miss == pytest.approx(0.003, rel=1e-6)
