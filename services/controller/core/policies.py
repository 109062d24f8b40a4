"""Alpha policies: one worker's windowed features in, that worker's next EMB share of the pool out.

Pure code (no asyncio, NATS, torch or clock): the controller's shell calls ``decide`` once per worker per
feature report and then ``Clamp``; both are plain float arithmetic so a decision takes microseconds.

Interface
---------
``AlphaPolicy.decide(features, current) -> float`` proposes the worker's next alpha. ``current`` is the
worker's committed alpha (its ``alpha_target``: where the pool is heading, which the shell uses as the base
so that an in-flight move is not proposed twice). A policy may keep per-worker state (e.g. a filter or an
online adapter) inside itself, keyed by ``features.worker_id``: ``static`` and ``hit-balance`` are
stateless, ``pi`` keeps an integral and ``predict-greedy`` forecasters per worker. The proposal need not be in
range: ``Clamp`` is applied after every policy.

``Clamp(lo, hi, max_step)``: first limits the move to ``max_step`` away from ``current``, then clamps to
``[lo, hi]``; the range wins, so a worker found outside the range is brought inside in one decision (a
worker rejects out-of-range targets anyway). A non-finite proposal means "hold".

Policies (``parse_policy`` specs)
---------------------------------
``static:A``
    Always ``A`` (0 <= A <= 1); with the clamp the worker ramps to ``A`` by ``max_step`` per decision.
``hit-balance[:key=value,...]``
    A feedback heuristic, :class:`HitBalancePolicy`. Each side's misses are priced in milliseconds per
    request with the worker's own service-time model (``ms = ... + ms_per_new_token * new_tokens +
    ms_per_emb_miss * emb_misses``), fitted by the worker and carried in its features::

        emb_ms = emb_misses_per_request * cost.ms_per_emb_miss
        kv_ms  = mean_history * min(1 - kv_hit_rate, new_token_fraction) * cost.ms_per_new_token

    (the KV rule is ``split_model.kv_miss_ms``, shared with the split model). A worker with no fit yet
    (``cost.samples == 0``), or ``worker_cost=0``, is priced with the parameters instead (their defaults are
    the worker's cost-fit prior and the tiny preset's EMB row)::

        emb_ms = miss_bytes / requests_in_window / row_bytes * miss_ms
        kv_ms  = mean_history * min(1 - kv_hit_rate, new_token_fraction) * token_ms

    ``kv_ms`` counts only the recomputation a KV hit would have saved: a missing user recomputes their
    whole history, and ``new_token_fraction`` bounds it from above (it also holds the unavoidable tokens
    appended since the user's last request, which no split can save). The imbalance
    ``e = (emb_ms - kv_ms) / (emb_ms + kv_ms)`` in [-1, 1] moves alpha toward the side whose misses cost
    more: ``step = gain * (|e| - deadband) / (1 - deadband) * sign(e)``, zero inside the dead band
    (continuous at its edge). It holds when there is nothing to learn or nothing to fix: no traffic, the
    worker still moving toward its last target (``|alpha - alpha_target| > settle``), the SLO met
    (``slo_violation_rate <= slo_ok``) with both hit rates ``>= high_hit``, or total miss cost below
    ``min_pressure_ms``. Burst guard: when the request rate changed by ``burst_ratio`` of itself or more
    over the window (``|request_rate_delta| * window >= burst_ratio * request_rate``; the delta is a
    derivative, per second), the gain is multiplied by ``burst_boost`` (the clamp's ``max_step`` still
    bounds the move).
    Equalising the two miss costs (rather than their marginal gains) is the heuristic: each cache gets
    more room while its misses dominate, with diminishing returns doing the rest.
``pi[:key=value,...]``
    A baseline, :class:`PIPolicy`: a PI controller that drives the difference between the two caches'
    marginal savings per unit of share (``split_model.SplitModel.marginal`` at the current split) to zero,
    with the integral's anti-windup tied to the clamp's limits (its keys ``lo``, ``hi``, ``max_step``).
``predict-greedy[:key=value,...]``
    A baseline standing in for the paper's temporal-prediction controllers, :class:`PredictGreedyPolicy`:
    a Holt (level + trend) forecast of the split model's inputs one window ahead, then the split of a grid
    (0.05..0.95 by 0.01, inside the clamp range ``lo``..``hi``) with the lowest predicted P99.
    Both price misses with the worker's fitted model (``cost``) through :mod:`.split_model`; both hold, as
    hit-balance does, on no traffic and while the previous move is unsettled.
``helm[:key=value,...]``
    HELM's three layers (frozen PPO actor, online residual adapter, burst-aware recovery),
    :class:`~.helm.HelmPolicy` built by :func:`~.helm.build_helm`: its keys, ``weights=PATH`` (default: the
    shipped actor) and the ablations ``layers=1`` (the PPO base alone), ``adapter=0``, ``recovery=0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Final, Protocol

from services.controller.core.split_model import (
    DEFAULT_EMB_SLOPE,
    DEFAULT_KV_CEILING,
    DEFAULT_KV_EXPONENT,
    DEFAULT_RHO_EPS,
    ModelParams,
    SplitModel,
    kv_miss_ms,
    miss_pressures,
    recompute_share,
)
from shared.schemas import WorkerFeatures

MIB: Final = 1024 * 1024

# The controller's clamp defaults (ControllerSettings' ALPHA_MIN, ALPHA_MAX, MAX_STEP take them from here):
# no cache is starved below 5% of the pool, and one decision moves at most a tenth of it, so a wrong
# decision costs one window's worth of misses rather than a whole cache.
DEFAULT_ALPHA_MIN: Final = 0.05
DEFAULT_ALPHA_MAX: Final = 0.95
DEFAULT_MAX_STEP: Final = 0.1


class AlphaPolicy(Protocol):
    """Proposes a worker's next alpha from its features; see the module docstring."""

    name: str

    def decide(self, features: WorkerFeatures, current: float) -> float: ...


def _nothing_to_learn(f: WorkerFeatures, settle: float) -> bool:
    """The holds every feedback policy shares: no traffic in the window (nothing to learn from), or the
    previous move still under way (``|alpha - alpha_target| > settle``: these features predate it)."""
    return not (f.request_rate > 0.0 and f.window_ms > 0.0) or abs(f.alpha - f.alpha_target) > settle


@dataclass(frozen=True, slots=True)
class Clamp:
    """Applied after every policy: at most ``max_step`` from ``current``, then inside ``[lo, hi]``."""

    lo: float
    hi: float
    max_step: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and 0.0 <= self.lo <= self.hi <= 1.0):
            raise ValueError(f"clamp range must satisfy 0 <= lo <= hi <= 1, got lo={self.lo}, hi={self.hi}")
        if not (math.isfinite(self.max_step) and self.max_step > 0.0):
            raise ValueError(f"clamp max_step must be > 0, got {self.max_step}")

    def __call__(self, proposed: float, current: float) -> float:
        if not math.isfinite(current):
            current = 0.5 * (self.lo + self.hi)
        if not math.isfinite(proposed):
            proposed = current  # a policy that cannot decide holds
        step = self.max_step
        if proposed > current + step:
            proposed = current + step
        elif proposed < current - step:
            proposed = current - step
        if proposed < self.lo:
            return self.lo
        if proposed > self.hi:
            return self.hi
        return proposed


@dataclass(slots=True)
class StaticPolicy:
    """Always the same alpha (the fixed-split baseline)."""

    alpha: float
    name: str = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"static alpha must be a number in [0, 1], got {self.alpha}")
        self.name = f"static:{self.alpha:g}"

    def decide(self, features: WorkerFeatures, current: float) -> float:
        return self.alpha


@dataclass(slots=True)
class HitBalancePolicy:
    """Moves alpha toward the cache whose misses cost more latency; see the module docstring."""

    # Prices when the worker has no fitted model (or worker_cost=0): the worker's cost-fit prior
    # (services/worker/engine.py) and the tiny preset's EMB row (item_dim 32 x float32).
    worker_cost: float = 1.0  # > 0: price misses with the worker's fitted coefficients when it has any
    token_ms: float = 0.01  # ms to recompute one history token (KV miss)
    miss_ms: float = 0.001  # ms per EMB row missed (fetched over the host link on the critical path)
    row_bytes: float = 128.0  # bytes per EMB row, to turn miss_bytes into misses
    gain: float = 0.05  # alpha moved per decision at full imbalance
    deadband: float = 0.2  # |imbalance| at or below this: hold
    burst_ratio: float = 0.5  # rate changed by this share of itself over one window: a burst
    burst_boost: float = 2.0  # gain multiplier during a burst
    settle: float = 0.05  # hold while |alpha - alpha_target| exceeds this (the last move is not done)
    high_hit: float = 0.9  # both hit rates at least this and the SLO met: hold
    slo_ok: float = 0.01  # SLO violation rate at or below this counts as met
    min_pressure_ms: float = 1e-3  # total miss cost per request below this: nothing worth moving for
    name: str = field(init=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"hit-balance: {f.name} must be a finite number >= 0, got {value}")
        if self.row_bytes <= 0:
            raise ValueError(f"hit-balance: row_bytes must be > 0, got {self.row_bytes}")
        if self.deadband >= 1.0:
            raise ValueError(f"hit-balance: deadband must be < 1, got {self.deadband}")
        for name in ("high_hit", "slo_ok"):
            if getattr(self, name) > 1.0:
                raise ValueError(f"hit-balance: {name} is a rate and must be <= 1, got {getattr(self, name)}")
        self.name = "hit-balance"

    def pressures(self, f: WorkerFeatures) -> tuple[float, float]:
        """(emb_ms, kv_ms): the latency per request that each cache's misses cost in this window."""
        if self.worker_cost > 0.0 and f.cost.samples > 0:
            return miss_pressures(f)
        requests = f.request_rate * f.window_ms * 1e-3
        emb_ms = f.miss_bytes / requests / self.row_bytes * self.miss_ms if requests > 0 else 0.0
        return emb_ms, kv_miss_ms(f.mean_history, f.kv_hit_rate, f.new_token_fraction, self.token_ms)

    def decide(self, features: WorkerFeatures, current: float) -> float:
        f = features
        if _nothing_to_learn(f, self.settle):
            return current
        high = self.high_hit
        if f.slo_violation_rate <= self.slo_ok and f.emb_hit_rate >= high and f.kv_hit_rate >= high:
            return current  # healthy: do not chase noise
        emb_ms, kv_ms = self.pressures(f)
        total = emb_ms + kv_ms
        if not (math.isfinite(total) and total >= self.min_pressure_ms):
            return current
        imbalance = (emb_ms - kv_ms) / total
        excess = abs(imbalance) - self.deadband
        if excess <= 0.0:
            return current
        gain = self.gain
        delta = f.request_rate_delta
        if math.isfinite(delta) and abs(delta) * f.window_ms * 1e-3 >= self.burst_ratio * f.request_rate:
            gain *= self.burst_boost
        step = gain * excess / (1.0 - self.deadband)
        return current + step if imbalance > 0.0 else current - step


def _check_params(policy: str, obj: object, names: tuple[str, ...]) -> None:
    """Every named field finite and >= 0 (the common case; stricter bounds are checked by the caller)."""
    for name in names:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{policy}: {name} must be a finite number >= 0, got {value}")


def _model_params(
    policy: str, emb_slope: float, kv_exponent: float, kv_ceiling: float, rho_eps: float
) -> ModelParams:
    try:
        return ModelParams(emb_slope, kv_exponent, kv_ceiling, rho_eps)
    except ValueError as e:
        raise ValueError(f"{policy}: {e}") from None


def _check_range(policy: str, lo: float, hi: float, max_step: float) -> None:
    try:
        Clamp(lo, hi, max_step)
    except ValueError as e:
        raise ValueError(f"{policy}: {e}") from None


@dataclass(slots=True)
class _PIState:
    base: float  # the worker's alpha when the controller first decided for it
    integral: float = 0.0  # sum of the normalised errors integrated so far


@dataclass(slots=True)
class PIPolicy:
    """PI control of the split toward equal marginal savings (spec ``pi[:key=value,...]``).

    At the optimum of ``emb_ms(a) + kv_ms(a)`` one more unit of share saves as much on either side, so the
    controlled error is the normalised difference of the two marginal savings (``SplitModel.marginal``, from
    the window's model, at ``current``)::

        e = (emb_saving - kv_saving) / (emb_saving + kv_saving)        in [-1, 1] (positive: more EMB)
        proposal = base + kp * e + ki * integral,   integral += e      (per decision)

    the textbook positional PI, with ``base`` the worker's alpha at its first decision (per worker state,
    keyed by ``worker_id``, with the integral). Not ``alpha += kp * e + ...``: an increment proportional to
    the error already is integral action, and an integral on top would make a double integrator that
    overshoots. At a balance point the integral holds the offset from ``base``.

    Anti-windup by conditional integration: when the proposal would cross the limit that binds it in the
    error's direction (``hi`` or ``current + max_step`` above, ``lo`` or ``current - max_step`` below: the
    controller's clamp, whose defaults these keys share), the integral is integrated only up to where the
    proposal meets that limit, never further (and never backward). Freezing it outright instead would stall
    a worker whenever one integral step exceeds ``max_step``. So at a limit the integral stops, and the
    first decision after the error changes sign leaves the limit.

    Holds (returns ``current``, integral untouched) on no traffic, while the previous move is unsettled
    (``|alpha - alpha_target| > settle``), when the window's split is 0 or 1 or ``current`` is outside
    (0, 1) (no model), and when both savings together are below ``min_saving_ms`` (no error to speak of).
    """

    # Gains, in alpha per unit of error. ki: a full error's step per decision, hit-balance's gain (from 0.5,
    # ~9 decisions to a limit). kp: as much again at once, so a full error's first move is max_step. Under
    # the split model's laws the error at a balance point a falls by (1/a + (1 - g)/(1 - a)) / 2 per unit
    # of alpha: at most ~10 inside the default range, so kp * 10 and ki * 10 (0.5) stay below 1 and
    # neither term overshoots the balance point.
    kp: float = 0.05
    ki: float = 0.05
    settle: float = 0.05  # hold while |alpha - alpha_target| exceeds this (the last move is not done)
    min_saving_ms: float = 1e-3  # both sides together save less per whole pool: nothing worth moving for
    emb_slope: float = DEFAULT_EMB_SLOPE  # the split model's b (split_model.py)
    kv_exponent: float = DEFAULT_KV_EXPONENT  # the split model's g
    kv_ceiling: float = DEFAULT_KV_CEILING  # the split model's KV hit-rate ceiling
    lo: float = DEFAULT_ALPHA_MIN  # the controller's clamp, for anti-windup (set them as the controller's)
    hi: float = DEFAULT_ALPHA_MAX
    max_step: float = DEFAULT_MAX_STEP
    name: str = field(init=False)
    _model: ModelParams = field(init=False, repr=False, compare=False)
    _state: dict[str, _PIState] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_params("pi", self, ("kp", "ki", "settle", "min_saving_ms"))
        self._model = _model_params("pi", self.emb_slope, self.kv_exponent, self.kv_ceiling, DEFAULT_RHO_EPS)
        _check_range("pi", self.lo, self.hi, self.max_step)
        self._state = {}
        self.name = "pi"

    def integral(self, worker_id: str) -> float:
        """The worker's integrated error (0 before its first decision)."""
        st = self._state.get(worker_id)
        return st.integral if st is not None else 0.0

    def error(self, features: WorkerFeatures, at: float) -> float | None:
        """The normalised marginal imbalance at split ``at`` in [-1, 1] (positive: EMB saves more per share),
        or None when the window says nothing (no model, or both savings below ``min_saving_ms``)."""
        if not 0.0 < at < 1.0:
            return None
        model = SplitModel.from_features(features, self._model)
        if model is None:
            return None
        emb, kv = model.marginal(at)
        total = emb + kv
        if not (math.isfinite(total) and total >= self.min_saving_ms):
            return None
        return (emb - kv) / total

    def decide(self, features: WorkerFeatures, current: float) -> float:
        f = features
        if _nothing_to_learn(f, self.settle):
            return current
        e = self.error(f, current)
        if e is None:
            return current
        st = self._state.get(f.worker_id)
        if st is None:
            st = self._state[f.worker_id] = _PIState(base=current)
        integral = st.integral + e
        fixed = st.base + self.kp * e  # the proposal less its integral term
        proposal = fixed + self.ki * integral
        # Conditional integration: integrate only up to where the proposal meets the limit that binds it
        # (the range, or max_step from current), never further in the error's direction.
        if self.ki > 0.0:
            high = min(self.hi, current + self.max_step)
            low = max(self.lo, current - self.max_step)
            if e > 0.0 and proposal > high:
                integral = max(st.integral, (high - fixed) / self.ki)
            elif e < 0.0 and proposal < low:
                integral = min(st.integral, (low - fixed) / self.ki)
            st.integral = integral
        return fixed + self.ki * st.integral


class Holt:
    """Holt's linear (level + trend) exponential smoothing of one series; forecasts one step ahead.

        level' = a * x + (1 - a) * (level + trend)
        trend' = b * (level' - level) + (1 - b) * trend
        forecast = level' + trend'

    The first observation sets the level, with a trend of 0."""

    __slots__ = ("level", "trend")

    def __init__(self, x: float) -> None:
        self.level = x
        self.trend = 0.0

    def update(self, x: float, level_gain: float, trend_gain: float) -> None:
        previous = self.level
        self.level = level_gain * x + (1.0 - level_gain) * (previous + self.trend)
        self.trend = trend_gain * (self.level - previous) + (1.0 - trend_gain) * self.trend

    def forecast(self) -> float:
        return self.level + self.trend


# Its grid of splits (before the clamp range bounds it): a split nearer 0 or 1 starves one cache and leaves
# the model's laws (ln a, (1 - a) ** g) where they are least true.
GRID_MIN: Final = 0.05
GRID_MAX: Final = 0.95
_GRID_EPS: Final = 1e-9  # lattice points within this of the range's ends count as inside (float noise)


@dataclass(slots=True)
class _GreedyState:
    series: dict[str, Holt]
    last: SplitModel  # the latest window's model: prices, KV cap and base service
    token_ms: float  # the latest window's price of a recomputed token


@dataclass(slots=True)
class PredictGreedyPolicy:
    """Forecast one window ahead, then the split with the lowest predicted P99 (``predict-greedy[:k=v,...]``).

    Per worker, one :class:`Holt` forecaster (gains ``level`` and ``trend``) per input of the split model,
    each kept in split-invariant form (SplitModel's fields): the request rate, EMB items per request, the EMB
    law's intercept ``emb_hit_rate - b ln alpha`` (in place of the hit rate), the KV law's intercept
    ``kv_hit_rate / (1 - alpha) ** g`` (in place of the KV hit rate and ``hot_user_share``, which measure
    the same resident users), the mean history and the recompute share (``new_token_fraction`` per KV miss).
    Raw hit rates move with the split itself, and a forecaster fed them would read the policy's own moves
    as trends. The items series skips windows that missed nothing (their count is unknown). The forecast
    model takes the latest window's prices, KV cap and base service.

    The decision is the grid split with the lowest predicted P99 under the forecast (``best``); it holds
    unless that P99 is at least ``min_gain`` below the prediction at ``current``, on no traffic, while the
    previous move is unsettled (``|alpha - alpha_target| > settle``; the window is then not fed to the
    forecasters either) and when the window's split is 0 or 1.
    """

    # Holt's gains. A window is a few seconds of Poisson traffic, so one window is noisy: half weight on the
    # newest absorbs a step change in two windows (75%) while halving a single window's noise.
    level: float = 0.5
    # The trend is a difference of two noisy levels: smoothed over ~5 windows, a ramp is still followed
    # while one odd window moves the forecast's slope by a fifth of its jump.
    trend: float = 0.2
    settle: float = 0.05  # hold while |alpha - alpha_target| exceeds this (the last move is not done)
    # Move only for a predicted P99 gain of at least this share: smaller ones are below what the model and
    # one window's forecast can tell apart.
    min_gain: float = 0.01
    grid_step: float = 0.01  # the grid's spacing (the controller's MIN_CHANGE: finer moves are not sent)
    emb_slope: float = DEFAULT_EMB_SLOPE  # the split model's b (split_model.py)
    kv_exponent: float = DEFAULT_KV_EXPONENT  # the split model's g
    kv_ceiling: float = DEFAULT_KV_CEILING  # the split model's KV hit-rate ceiling
    rho_eps: float = DEFAULT_RHO_EPS  # the split model's floor of 1 - rho
    lo: float = DEFAULT_ALPHA_MIN  # the controller's clamp range bounds the grid
    hi: float = DEFAULT_ALPHA_MAX
    name: str = field(init=False)
    _model: ModelParams = field(init=False, repr=False, compare=False)
    _grid: tuple[tuple[float, float, float], ...] = field(init=False, repr=False, compare=False)
    _state: dict[str, _GreedyState] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_params("predict-greedy", self, ("level", "trend", "settle", "min_gain", "grid_step"))
        for key in ("level", "trend", "min_gain"):
            if getattr(self, key) > 1.0:
                raise ValueError(f"predict-greedy: {key} must be <= 1, got {getattr(self, key)}")
        if self.level == 0.0:
            raise ValueError("predict-greedy: level must be > 0 (0 would never read a new window)")
        if self.grid_step == 0.0:
            raise ValueError("predict-greedy: grid_step must be > 0")
        self._model = _model_params(
            "predict-greedy", self.emb_slope, self.kv_exponent, self.kv_ceiling, self.rho_eps
        )
        _check_range("predict-greedy", self.lo, self.hi, 1.0)
        low, high = max(self.lo, GRID_MIN), min(self.hi, GRID_MAX)
        first = math.ceil((low - _GRID_EPS) / self.grid_step)
        last = math.floor((high + _GRID_EPS) / self.grid_step)
        points = [round(i * self.grid_step, 12) for i in range(first, last + 1)]
        if not points:
            raise ValueError(
                f"predict-greedy: no grid point (multiples of grid_step={self.grid_step:g}) lies in "
                f"[{low:g}, {high:g}] (lo, hi and the grid's {GRID_MIN:g}..{GRID_MAX:g})"
            )
        # (a, ln a, (1 - a) ** g) for every point: the loop in decide then does no log or power.
        g = self.kv_exponent
        self._grid = tuple((a, math.log(a), math.pow(1.0 - a, g)) for a in points)
        self._state = {}
        self.name = "predict-greedy"

    @property
    def grid(self) -> tuple[float, ...]:
        return tuple(point[0] for point in self._grid)

    def observe(self, features: WorkerFeatures) -> bool:
        """Feed one window to the worker's forecasters; False when it cannot be modelled (split 0 or 1)."""
        f = features
        model = SplitModel.from_features(f, self._model)
        if model is None:
            return False
        values = {
            "request_rate": f.request_rate,
            "emb_intercept": model.emb_intercept,
            "kv_intercept": model.kv_intercept,
            "mean_history": f.mean_history,
            "recompute_share": recompute_share(f.kv_hit_rate, f.new_token_fraction),
        }
        if f.emb_hit_rate < 1.0:  # otherwise the items per request are unknown: that series holds
            values["emb_items"] = model.emb_items
        st = self._state.get(f.worker_id)
        if st is None:
            series = {k: Holt(v) for k, v in values.items()}
            self._state[f.worker_id] = _GreedyState(series, model, f.cost.ms_per_new_token)
            return True
        st.last, st.token_ms = model, f.cost.ms_per_new_token
        for key, x in values.items():
            holt = st.series.get(key)
            if holt is None:
                st.series[key] = Holt(x)
            else:
                holt.update(x, self.level, self.trend)
        return True

    def forecast(self, worker_id: str) -> SplitModel | None:
        """The split model one window ahead: the forecast inputs (each kept in its range) with the latest
        window's prices, KV cap and base service. None before the worker's first modelled window."""
        st = self._state.get(worker_id)
        if st is None:
            return None
        series = st.series

        def ahead(key: str) -> float:
            holt = series.get(key)
            return holt.forecast() if holt is not None else 0.0

        history = max(0.0, ahead("mean_history"))
        share = min(1.0, max(0.0, ahead("recompute_share")))
        return replace(
            st.last,
            request_rate=max(0.0, ahead("request_rate")),
            emb_items=max(0.0, ahead("emb_items")),
            emb_intercept=ahead("emb_intercept"),
            kv_intercept=max(0.0, ahead("kv_intercept")),
            kv_miss_cost_ms=history * share * st.token_ms,  # as SplitModel.from_features prices a miss
        )

    def best(self, model: SplitModel, current: float) -> float:
        """The grid split with the lowest predicted P99 under ``model`` (ties: the one nearest ``current``).

        For a fixed rate the predicted P99 increases with the service time (SplitModel), so the loop
        compares the split-dependent part of the service time, from the precomputed ln a and (1 - a) ** g."""
        b = model.params.emb_slope
        c, k0, cap = model.emb_intercept, model.kv_intercept, model.kv_cap
        emb_scale = model.emb_items * model.emb_miss_ms
        kv_scale = model.kv_miss_cost_ms
        best_a, best_s = current, math.inf
        for a, ln_a, kv_pow in self._grid:
            h = c + b * ln_a
            h = 0.0 if h < 0.0 else 1.0 if h > 1.0 else h
            k = min(k0 * kv_pow, cap)
            s = emb_scale * (1.0 - h) + kv_scale * (1.0 - k)
            if s < best_s or (s == best_s and abs(a - current) < abs(best_a - current)):
                best_a, best_s = a, s
        return best_a

    def decide(self, features: WorkerFeatures, current: float) -> float:
        f = features
        if _nothing_to_learn(f, self.settle):
            return current
        if not self.observe(f):
            return current
        model = self.forecast(f.worker_id)
        if model is None:  # pragma: no cover - observe() just stored one
            return current
        target = self.best(model, current)
        if 0.0 < current < 1.0 and model.p99_ms(target) > (1.0 - self.min_gain) * model.p99_ms(current):
            return current  # not enough to gain
        return target


def _keys(cls: type) -> tuple[str, ...]:
    """A policy's spec keys: its init fields (the dataclass's public parameters)."""
    return tuple(f.name for f in fields(cls) if f.init)


_KEYS: Final[dict[str, tuple[type, tuple[str, ...]]]] = {
    "hit-balance": (HitBalancePolicy, _keys(HitBalancePolicy)),
    "pi": (PIPolicy, _keys(PIPolicy)),
    "predict-greedy": (PredictGreedyPolicy, _keys(PredictGreedyPolicy)),
}
_SPEC_HELP: Final = (
    "expected 'static:A' (0 <= A <= 1), 'hit-balance[:key=value,...]', 'pi[:key=value,...]', "
    "'predict-greedy[:key=value,...]' or 'helm[:key=value,...]'"
)


def _key_values(spec: str, arg: str, keys: tuple[str, ...]) -> dict[str, float]:
    """``key=value,...`` into floats; ValueError naming the item or key at fault."""
    params: dict[str, float] = {}
    for item in arg.split(",") if arg else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in keys:
            raise ValueError(
                f"alpha policy {spec!r}: {item.strip()!r} is not key=value with a known key "
                f"({', '.join(keys)})"
            )
        try:
            params[key] = float(value)
        except ValueError:
            raise ValueError(f"alpha policy {spec!r}: {key}={value.strip()!r} is not a number") from None
    return params


def parse_policy(spec: str) -> AlphaPolicy:
    """Build a policy from its spec: ``static:A``, or ``hit-balance``, ``pi`` or ``predict-greedy``, each
    optionally with ``:key=value,...`` (keys: the policy class's fields, e.g. ``hit-balance:gain=0.1``).
    ``helm[:key=value,...]`` is HELM (:func:`~.helm.build_helm`). Raises ValueError with a message that
    names the problem."""
    text = spec.strip()
    name, _, arg = text.partition(":")
    name = name.strip().lower()
    arg = arg.strip()
    if name == "static":
        if not arg:
            raise ValueError(f"alpha policy {spec!r}: 'static' needs a value, e.g. 'static:0.5'")
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"alpha policy {spec!r}: {arg!r} is not a number; {_SPEC_HELP}") from None
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha policy {spec!r}: static alpha must be in [0, 1], got {arg}")
        return StaticPolicy(alpha)
    if name in _KEYS:
        cls, keys = _KEYS[name]
        params = _key_values(spec, arg, keys)
        try:
            policy: AlphaPolicy = cls(**params)
        except ValueError as e:
            raise ValueError(f"alpha policy {spec!r}: {e}") from None
        return policy
    if name == "helm":
        from services.controller.core.helm import build_helm  # helm imports this module

        try:
            return build_helm(arg)
        except ValueError as e:
            raise ValueError(f"alpha policy {spec!r}: {e}") from None
    raise ValueError(f"unknown alpha policy {spec!r}: {_SPEC_HELP}")


__all__ = [
    "DEFAULT_ALPHA_MAX",
    "DEFAULT_ALPHA_MIN",
    "DEFAULT_MAX_STEP",
    "AlphaPolicy",
    "Clamp",
    "HitBalancePolicy",
    "Holt",
    "PIPolicy",
    "PredictGreedyPolicy",
    "StaticPolicy",
    "parse_policy",
]
