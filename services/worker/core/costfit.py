"""Online fit of the worker's own service-time model, published in every digest for the router.

    compute_ms ~= fixed + a*new_tokens + b*cached_tokens + c*candidates + d*emb_misses

per request. A batch of requests served together is one sample: its time against the sums of its
requests' features, with the number of requests as the regressor of `fixed`, so the model predicts a
request's share of the batch it is served in (at batch size 1, the request's own time).

Ridge regression over a sliding window, shrunk toward a prior so that the estimate is usable from the
first request and stays stable when the features are collinear (a new user has both many new tokens and
many misses). Coefficients are clipped at zero: a negative cost would make the router prefer more work.
Outliers (a GC pause, a stalled thread: a request that took ten times its due) must not move the model the
router trusts: once the window holds ROBUST_MIN_SAMPLES, samples whose residual lies more than OUTLIER_MADS
robust standard deviations from the median residual (from the median absolute deviation, never below
MIN_OUTLIER_MS) are left out and the model is fitted again, for a few rounds (a trimmed fit). They stay in
the window: if the worker really got slower, the fit follows once most of the window says so.
Pure numpy: no torch, no clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

FEATURES = ("fixed", "new_tokens", "cached_tokens", "candidates", "emb_misses")

ROBUST_MIN_SAMPLES = 16  # fewer: a median of residuals says too little to call anything an outlier
OUTLIER_MADS = 4.0  # samples whose residual is beyond this many robust standard deviations are left out
MIN_OUTLIER_MS = 0.05  # ... and never below this (an exactly linear window has a deviation of 0)
ROBUST_ITERATIONS = 3  # leave-out-and-refit rounds (each from the previous, less contaminated, fit)
_MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal distribution, in standard deviations


@dataclass(frozen=True)
class CostEstimate:
    fixed_ms: float
    ms_per_new_token: float
    ms_per_cached_token: float
    ms_per_candidate: float
    ms_per_emb_miss: float
    samples: int

    def predict(self, new_tokens: int, cached_tokens: int, candidates: int, emb_misses: int) -> float:
        return (
            self.fixed_ms
            + self.ms_per_new_token * new_tokens
            + self.ms_per_cached_token * cached_tokens
            + self.ms_per_candidate * candidates
            + self.ms_per_emb_miss * emb_misses
        )


class CostFitter:
    def __init__(
        self,
        prior: CostEstimate,
        *,
        window: int = 512,
        prior_weight: float = 4.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._prior = np.array(
            [
                prior.fixed_ms,
                prior.ms_per_new_token,
                prior.ms_per_cached_token,
                prior.ms_per_candidate,
                prior.ms_per_emb_miss,
            ],
            dtype=np.float64,
        )
        self._rows: deque[tuple[float, float, float, float, float, float]] = deque(maxlen=window)
        self._prior_weight = prior_weight
        self._total = 0

    def observe(
        self,
        *,
        new_tokens: int,
        cached_tokens: int,
        candidates: int,
        emb_misses: int,
        ms: float,
        requests: int = 1,
    ) -> None:
        """One request, or a batch of `requests` served together in `ms` (features summed over it)."""
        if requests < 1:
            raise ValueError(f"requests must be >= 1, got {requests}")
        self._rows.append(
            (
                float(requests),
                float(new_tokens),
                float(cached_tokens),
                float(candidates),
                float(emb_misses),
                ms,
            )
        )
        self._total += requests

    def estimate(self) -> CostEstimate:
        coef = self._prior.copy()
        if self._rows:
            data = np.asarray(self._rows, dtype=np.float64)
            x, y = data[:, :5], data[:, 5]
            # Scale each feature so one ridge weight means the same for tokens (hundreds) and the constant.
            scale = np.maximum(np.abs(x).max(axis=0), 1.0)
            xs = x / scale
            prior_s = self._prior * scale
            lam = self._prior_weight
            # Minimise |xs w - y|^2 + lam |w - prior_s|^2 in closed form.
            a = xs.T @ xs + lam * np.eye(5)
            w = np.linalg.solve(a, xs.T @ y + lam * prior_s)
            if len(y) >= ROBUST_MIN_SAMPLES:
                keep = np.ones(len(y), dtype=np.bool_)
                for _ in range(ROBUST_ITERATIONS):
                    resid = y - xs @ w
                    mid = float(np.median(resid[keep]))  # a contaminated fit shifts every residual
                    mad = float(np.median(np.abs(resid[keep] - mid)))
                    limit = max(OUTLIER_MADS * _MAD_TO_SIGMA * mad, MIN_OUTLIER_MS)
                    inside = np.abs(resid - mid) <= limit
                    if np.array_equal(inside, keep):
                        break
                    keep = inside
                    k = xs[keep]
                    w = np.linalg.solve(k.T @ k + lam * np.eye(5), k.T @ y[keep] + lam * prior_s)
            coef = w / scale
        coef = np.clip(coef, 0.0, None)
        # A token served from the KV cache is never dearer than one computed anew; a noisy fit that says
        # otherwise would turn the router's KV credit into a penalty.
        coef[2] = min(coef[2], coef[1])
        return CostEstimate(
            fixed_ms=float(coef[0]),
            ms_per_new_token=float(coef[1]),
            ms_per_cached_token=float(coef[2]),
            ms_per_candidate=float(coef[3]),
            ms_per_emb_miss=float(coef[4]),
            samples=self._total,
        )
