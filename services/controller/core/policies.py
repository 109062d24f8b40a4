"""Alpha policies: one worker's windowed features in, that worker's next EMB share of the pool out.

Pure code (no asyncio, NATS, torch or clock): the controller's shell calls ``decide`` once per worker per
feature report and then ``Clamp``; both are plain float arithmetic so a decision takes microseconds.

Interface
---------
``AlphaPolicy.decide(features, current) -> float`` proposes the worker's next alpha. ``current`` is the
worker's committed alpha (its ``alpha_target``: where the pool is heading, which the shell uses as the base
so that an in-flight move is not proposed twice). A policy may keep per-worker state (e.g. a filter or an
online adapter) inside itself, keyed by ``features.worker_id``; the two policies here are stateless. The
proposal need not be in range: ``Clamp`` is applied after every policy.

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

    A worker with no fit yet (``cost.samples == 0``), or ``worker_cost=0``, is priced with the parameters
    instead (their defaults are the worker's cost-fit prior and the tiny preset's EMB row)::

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
``helm``
    The HELM three-layer PPO policy: not implemented yet (a later issue); parsing it raises ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Final, Protocol

from shared.schemas import WorkerFeatures

MIB: Final = 1024 * 1024


class AlphaPolicy(Protocol):
    """Proposes a worker's next alpha from its features; see the module docstring."""

    name: str

    def decide(self, features: WorkerFeatures, current: float) -> float: ...


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
        cost = f.cost
        if self.worker_cost > 0.0 and cost.samples > 0:
            emb_ms = f.emb_misses_per_request * cost.ms_per_emb_miss
            token_ms = cost.ms_per_new_token
        else:
            requests = f.request_rate * f.window_ms * 1e-3
            emb_ms = f.miss_bytes / requests / self.row_bytes * self.miss_ms if requests > 0 else 0.0
            token_ms = self.token_ms
        kv_ms = f.mean_history * min(1.0 - f.kv_hit_rate, f.new_token_fraction) * token_ms
        return emb_ms, kv_ms

    def decide(self, features: WorkerFeatures, current: float) -> float:
        f = features
        if not (f.request_rate > 0.0 and f.window_ms > 0.0):
            return current  # no traffic: nothing to learn from
        if abs(f.alpha - f.alpha_target) > self.settle:
            return current  # the previous move is still under way: these features predate it
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


_HIT_BALANCE_KEYS: Final = tuple(f.name for f in fields(HitBalancePolicy) if f.name != "name")
_SPEC_HELP: Final = "expected 'static:A' (0 <= A <= 1), 'hit-balance[:key=value,...]' or 'helm'"


def parse_policy(spec: str) -> AlphaPolicy:
    """Build a policy from its spec: ``static:A``, ``hit-balance`` or ``hit-balance:gain=0.1,...``
    (keys: the HitBalancePolicy fields). ``helm`` is reserved for the HELM policy (a later issue).
    Raises ValueError with a message that names the problem."""
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
    if name == "hit-balance":
        params: dict[str, float] = {}
        for item in arg.split(",") if arg else []:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in _HIT_BALANCE_KEYS:
                raise ValueError(
                    f"alpha policy {spec!r}: {item.strip()!r} is not key=value with a known key "
                    f"({', '.join(_HIT_BALANCE_KEYS)})"
                )
            try:
                params[key] = float(value)
            except ValueError:
                raise ValueError(f"alpha policy {spec!r}: {key}={value.strip()!r} is not a number") from None
        try:
            return HitBalancePolicy(**params)
        except ValueError as e:
            raise ValueError(f"alpha policy {spec!r}: {e}") from None
    if name == "helm":
        raise ValueError(
            "alpha policy 'helm' (HELM's three-layer policy: frozen PPO actor, online residual adapter, "
            "burst detector) is not implemented yet; it comes in a later issue. Use 'hit-balance' or "
            "'static:A' meanwhile"
        )
    raise ValueError(f"unknown alpha policy {spec!r}: {_SPEC_HELP}")


__all__ = ["AlphaPolicy", "Clamp", "HitBalancePolicy", "StaticPolicy", "parse_policy"]
