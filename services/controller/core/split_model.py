"""Split model: from one worker window observed at split ``alpha``, each cache's miss cost, the service
time and a P99 predicted at another split ``a`` (the EMB share; ``1 - a`` is the KV share).

Pure float arithmetic (no asyncio, NATS, numpy or torch): the baseline policies evaluate it for a whole
grid of splits inside one decision.

Map
---
``kv_miss_ms``
    The rule that prices a window's KV misses (shared with ``HitBalancePolicy.pressures``).
``ModelParams``
    The model's constants: the two laws' slopes, the KV ceiling, the queueing guard.
``SplitModel``
    The model of one window, stored in split-invariant form; ``SplitModel.from_features`` builds it from a
    ``WorkerFeatures``. ``emb_hit``/``kv_hit``, ``emb_ms``/``kv_ms`` (miss cost per request), ``service_ms``,
    ``p99_ms`` and ``marginal`` (each side's saving per unit of its share) at any ``0 < a < 1``.
``recompute_share``
    How much of a missing user's history a KV miss recomputed in a window (used to forecast it).

The laws, their parameters and the approximations are documented where they are implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from shared.schemas import WorkerFeatures

# The P99 of an exponential distribution is its mean times ln(1 / 0.01).
LN_100: Final = math.log(100.0)

# b: EMB hit rate gained per e-fold of EMB share. Measured with the simulator's paper preset (a100
# profile, docs/benchmarks.md "the two levers"): 0.569 -> 0.710 from alpha 0.2 to 0.8 with the base mix,
# (0.710 - 0.569) / ln 4 = 0.10 (the cold and hot mixes: 0.08 and 0.13).
DEFAULT_EMB_SLOPE: Final = 0.1
# g: KV hit rate ~ KV share ** g. The same measurements give 0.187 -> 0.083 (base mix), 0.365 -> 0.162
# (hot) and 0.063 -> 0.027 (cold) as the KV share falls 4x from 0.8 to 0.2: ln(2.25) / ln 4 = 0.59 and
# ln(2.33) / ln 4 = 0.61. An LRU over equal users would give g = 1 (hits ~ resident users ~ share); the
# sub-linear measurement is Zipf-like returns (the users that fit first are the most frequent).
DEFAULT_KV_EXPONENT: Final = 0.6
# The largest KV hit rate any split can reach (the share of requests from returning users): a workload
# property the features do not carry, so no bound but the obvious one unless the caller knows it.
DEFAULT_KV_CEILING: Final = 1.0
# Floor of 1 - rho in the queueing tail: an overloaded prediction (rho >= 1 - eps) is outside the model
# anyway; the floor keeps it finite (at most 1 / eps times the unloaded tail) and still increasing in s.
DEFAULT_RHO_EPS: Final = 0.01


def kv_miss_ms(
    mean_history: float, kv_hit_rate: float, new_token_fraction: float, ms_per_token: float
) -> float:
    """Latency per request that a window's KV misses cost: the recomputation a hit would have saved.

        kv_ms = mean_history * min(1 - kv_hit_rate, new_token_fraction) * ms_per_token

    A missing user recomputes their whole history (``1 - kv_hit_rate`` of the requests each recompute
    ``mean_history`` tokens); ``new_token_fraction`` (tokens computed / history tokens) bounds it from above
    (it also holds the tokens appended since a user's last request, which no split can save)."""
    return mean_history * min(1.0 - kv_hit_rate, new_token_fraction) * ms_per_token


def miss_pressures(f: WorkerFeatures) -> tuple[float, float]:
    """(emb_ms, kv_ms): per request, what each cache's misses cost in the window, priced with the worker's
    fitted model ``f.cost``: EMB misses x ms per miss, and :func:`kv_miss_ms` per new token's price."""
    cost = f.cost
    return (
        f.emb_misses_per_request * cost.ms_per_emb_miss,
        kv_miss_ms(f.mean_history, f.kv_hit_rate, f.new_token_fraction, cost.ms_per_new_token),
    )


def recompute_share(kv_hit_rate: float, new_token_fraction: float) -> float:
    """Share of a missing user's history that a KV miss recomputed in the window, in [0, 1]:
    ``kv_miss_ms`` per missing request over ``mean_history * ms_per_token``. With no miss in the window
    (``kv_hit_rate`` 1) a miss is taken to recompute the whole history (1), the premise of ``kv_miss_ms``.
    Unlike ``new_token_fraction`` it does not grow with the miss rate, so it hardly depends on the split."""
    miss = 1.0 - kv_hit_rate
    return kv_miss_ms(1.0, kv_hit_rate, new_token_fraction, 1.0) / miss if miss > 0.0 else 1.0


@dataclass(frozen=True, slots=True)
class ModelParams:
    """The model's constants (defaults and their reasons above); ValueError names a bad one."""

    emb_slope: float = DEFAULT_EMB_SLOPE  # b, >= 0
    kv_exponent: float = DEFAULT_KV_EXPONENT  # g, > 0
    kv_ceiling: float = DEFAULT_KV_CEILING  # in (0, 1]
    rho_eps: float = DEFAULT_RHO_EPS  # in (0, 1)

    def __post_init__(self) -> None:
        checks = (
            ("emb_slope", self.emb_slope >= 0.0, ">= 0"),
            ("kv_exponent", self.kv_exponent > 0.0, "> 0"),
            ("kv_ceiling", 0.0 < self.kv_ceiling <= 1.0, "in (0, 1]"),
            ("rho_eps", 0.0 < self.rho_eps < 1.0, "in (0, 1)"),
        )
        for name, ok, want in checks:
            value = getattr(self, name)
            if not (math.isfinite(value) and ok):
                raise ValueError(f"{name} must be a finite number {want}, got {value}")


@dataclass(frozen=True, slots=True)
class SplitModel:
    """One window's caches as functions of the split ``a`` (0 < a < 1; a math error outside).

    EMB (Zipf-like popularity: an LRU's hit rate grows with the log of its size)::

        emb_hit(a) = clip(emb_hit_rate + b * ln(a / alpha), 0, 1) = clip(emb_intercept + b * ln(a), 0, 1)
        emb_ms(a)  = emb_items * (1 - emb_hit(a)) * emb_miss_ms

    KV (the hit rate grows with the KV share until the ceiling)::

        kv_hit(a) = min(kv_cap, kv_hit_rate * ((1 - a) / (1 - alpha)) ** g)
                  = min(kv_cap, kv_intercept * (1 - a) ** g)
        kv_ms(a)  = (1 - kv_hit(a)) * kv_miss_cost_ms

    i.e. misses scale with the miss rate and each costs what a miss cost on average in the window
    (``kv_miss_ms`` per missing request: at ``a = alpha`` this is exactly ``kv_miss_ms`` of the window).

    Service and tail::

        service_ms(a) = base_ms + emb_ms(a) + kv_ms(a)
        rho(a)        = request_rate * service_ms(a) / 1000
        p99_ms(a)     = service_ms(a) / max(rho_eps, 1 - rho(a)) * ln 100

    The tail is an M/M/1 FIFO queue's (Poisson arrivals, exponential service, one server: the response time
    is exponential with mean s / (1 - rho)): an approximation of a batching worker, whose P99 it only
    orders. For a fixed rate it increases with ``service_ms``, so the split that minimises the predicted
    P99 is the one that minimises the service time.

    The fields are the window in split-invariant form, so a forecaster can smooth them across windows
    observed at different splits without reading its own moves as trends: ``emb_intercept`` is the law's
    (unclipped) EMB hit rate at ``a = 1``, ``kv_intercept`` its (uncapped) KV hit rate at ``a = 0``.
    """

    request_rate: float  # requests per second
    emb_items: float  # EMB items looked up per request
    emb_intercept: float  # emb_hit_rate - b * ln(alpha)
    kv_intercept: float  # kv_hit_rate / (1 - alpha) ** g
    kv_cap: float  # the KV hit rate no split exceeds
    emb_miss_ms: float  # ms per EMB miss
    kv_miss_cost_ms: float  # ms per request whose user's KV missed
    base_ms: float  # the service per request no split changes
    params: ModelParams = ModelParams()

    @classmethod
    def from_features(cls, f: WorkerFeatures, params: ModelParams | None = None) -> SplitModel | None:
        """The model of one window, or None when the window's split is 0 or 1 (one side has no share whose
        growth could be extrapolated).

        Prices are the worker's fitted model (``f.cost``; an unfitted worker sends its prior): an EMB miss
        costs ``ms_per_emb_miss``, a recomputed token ``ms_per_new_token``. Items per request are
        ``emb_misses_per_request / (1 - emb_hit_rate)``, 0 when the window missed nothing (then the count is
        unknown and the EMB side is predicted free).

        ``base_ms``, the service no split changes, is the window's service time less its two miss costs.
        The service time is the larger of two estimates: the cost fit's price of the mean request
        (``fixed_ms`` + its new and cached tokens + its EMB misses; the features carry no candidate count,
        so candidates are left out), and the time the model's own tail implies from the observed P99,
        ``s = p99 / (ln 100 + request_rate * p99 / 1000)`` (the inverse of ``p99_ms``). The second includes
        what the fit cannot see (candidates, the work outside the model, the batching), so when it is the
        larger the model reproduces the window's P99 at its own split."""
        p = params if params is not None else ModelParams()
        alpha = f.alpha
        if not 0.0 < alpha < 1.0:
            return None
        b, g = p.emb_slope, p.kv_exponent
        cost = f.cost
        token_ms = cost.ms_per_new_token
        emb_hit, kv_hit = f.emb_hit_rate, f.kv_hit_rate
        misses = f.emb_misses_per_request
        items = misses / (1.0 - emb_hit) if emb_hit < 1.0 else 0.0
        emb_ms, kv_ms = miss_pressures(f)
        history = f.mean_history
        new_tokens = history * f.new_token_fraction
        priced = (
            cost.fixed_ms + new_tokens * token_ms + (history - new_tokens) * cost.ms_per_cached_token + emb_ms
        )
        p99 = f.p99_latency_ms
        implied = p99 / (LN_100 + f.request_rate * p99 * 1e-3) if p99 > 0.0 else 0.0
        return cls(
            request_rate=f.request_rate,
            emb_items=items,
            emb_intercept=emb_hit - b * math.log(alpha),
            kv_intercept=kv_hit / math.pow(1.0 - alpha, g),
            kv_cap=max(p.kv_ceiling, kv_hit, f.hot_user_share),
            emb_miss_ms=cost.ms_per_emb_miss,
            kv_miss_cost_ms=history * recompute_share(kv_hit, f.new_token_fraction) * token_ms,
            base_ms=max(0.0, max(priced, implied) - emb_ms - kv_ms),
            params=p,
        )

    # ---- the two laws ------------------------------------------------------------------------------------
    def emb_hit(self, a: float) -> float:
        raw = self.emb_intercept + self.params.emb_slope * math.log(a)
        return 0.0 if raw < 0.0 else 1.0 if raw > 1.0 else raw

    def kv_hit(self, a: float) -> float:
        return min(self.kv_cap, self.kv_intercept * math.pow(1.0 - a, self.params.kv_exponent))

    def emb_ms(self, a: float) -> float:
        return self.emb_items * (1.0 - self.emb_hit(a)) * self.emb_miss_ms

    def kv_ms(self, a: float) -> float:
        return (1.0 - self.kv_hit(a)) * self.kv_miss_cost_ms

    # ---- service and tail --------------------------------------------------------------------------------
    def service_ms(self, a: float) -> float:
        return self.base_ms + self.emb_ms(a) + self.kv_ms(a)

    def rho(self, a: float) -> float:
        return self.request_rate * self.service_ms(a) * 1e-3

    def p99_ms(self, a: float) -> float:
        s = self.service_ms(a)
        return s / max(self.params.rho_eps, 1.0 - self.request_rate * s * 1e-3) * LN_100

    # ---- marginal savings --------------------------------------------------------------------------------
    def marginal(self, a: float) -> tuple[float, float]:
        """(emb, kv): ms per request saved per unit of share given to each side at ``a``, both >= 0.

            emb = -d emb_ms / da       = emb_items * emb_miss_ms * b / a              while 0 <= raw < 1
            kv  = -d kv_ms / d(1 - a)  = kv_miss_cost_ms * g * kv_intercept * (1 - a) ** g / (1 - a)
                                                                                   while raw < kv_cap
        where raw is the law's value before its clip; outside those ranges more share saves nothing (the
        derivative one-sided toward a larger share, so a side at hit rate 0 still sees its gain). A share is
        the pool's bytes over the pool size, the same factor on both sides: per byte, both are divided by the
        pool size, and where they balance does not change."""
        p = self.params
        b, g = p.emb_slope, p.kv_exponent
        raw_emb = self.emb_intercept + b * math.log(a)
        emb = self.emb_items * self.emb_miss_ms * b / a if 0.0 <= raw_emb < 1.0 else 0.0
        raw_kv = self.kv_intercept * math.pow(1.0 - a, g)
        kv = self.kv_miss_cost_ms * g * raw_kv / (1.0 - a) if raw_kv < self.kv_cap else 0.0
        return emb, kv


__all__ = [
    "DEFAULT_EMB_SLOPE",
    "DEFAULT_KV_CEILING",
    "DEFAULT_KV_EXPONENT",
    "DEFAULT_RHO_EPS",
    "LN_100",
    "ModelParams",
    "SplitModel",
    "kv_miss_ms",
    "miss_pressures",
    "recompute_share",
]
