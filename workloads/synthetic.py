"""Synthetic, production-like workloads: seeded request streams in the paper's three regimes.

The model (each parameter of :class:`WorkloadParams` says where its value comes from, and
docs/workloads.md describes the model for users):

* **Items.** Popularity is Zipf over ranks (exponent ``item_zipf``), sampled with the continuous inverse
  CDF of a power law (exact enough at catalogue sizes of 10^5 and more; the tests check the exponent).
  Rank ``r`` is item ``perm(r + shift(t))``: ``perm`` scatters ranks over the id space (a fixed stride
  coprime with ``num_items``), and ``shift(t) = drift_items_per_s * t`` slides new items into the head
  over time (popularity drift; 0 by default).
* **Users.** Three kinds, chosen per request: a *hot* user (probability ``hot_share``; one of
  ``hot_users``, Zipf(``user_zipf``) activity, so some come back very often), a *new* user
  (``new_user_share``; a fresh id with a short history, never seen again), otherwise a *cold* user
  (uniform over ``cold_users``: returns rarely, long after its KV is gone).
* **Histories.** A user's history is a deterministic function of (seed, user, length): its items are the
  first ``length`` draws of the user's own random stream (mapped by the popularity at the user's first
  visit: a user's taste is fixed when first seen), its timestamps one minute apart. A history therefore
  only ever grows, as in production: a user's first visit draws a length (log-normal around
  ``history_median`` x the regime's history factor, capped at ``max_history``); every return visit adds
  Poisson(``new_events_mean``) events, and at least enough to follow the regime's history factor
  (Trend). At ``max_history`` a history stops growing (the request then recomputes only candidates).
* **Candidates.** ``candidates`` items drawn from the current popularity (what retrieval hands ranking).
* **Arrivals.** Open-loop Poisson at ``rate`` x the regime's rate factor (exact, by thinning).

Regimes (:class:`Regime`): ``steady`` (stationary), ``trend`` (hot-user share and history length drift
linearly over the run), ``burst`` (three sudden episodes on a steady base, each followed by recovery: new
users, hot users, rate). :func:`generate` yields :class:`TraceRequest` in time order.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from workloads.trace import TraceHeader, TraceRequest

__all__ = [
    "Burst",
    "Conditions",
    "Regime",
    "WorkloadParams",
    "conditions_at",
    "generate",
    "header_for",
    "zipf_ranks",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

EVENT_SPACING_S = 60  # a history's timestamps: one event a minute along the user's own timeline
TIMESTAMP_BASE = 1_700_000_000  # epoch seconds of a user's first event (any fixed value works)
USER_CACHE = 4096  # histories kept as arrays; others are regenerated from their seed when they return


class Regime(StrEnum):
    STEADY = "steady"
    TREND = "trend"
    BURST = "burst"


@dataclass(frozen=True)
class Burst:
    """One burst episode: from ``start`` to ``start + length`` (fractions of the run)."""

    kind: str  # "new_users" | "hot_users" | "rate"
    start: float
    length: float
    level: float  # new-user share, hot-user share, or rate factor during the episode


@dataclass(frozen=True)
class WorkloadParams:
    """Every knob of the synthetic workload. Defaults are the `local` preset's (workloads/presets.py)."""

    num_items: int = 1_000_000
    # Zipf exponent of item popularity: DESIGN's 0.95-1.05 (web and catalogue popularity is near 1).
    item_zipf: float = 1.0
    drift_items_per_s: float = 0.0  # items entering the popularity head per second (0: no drift)
    # Users whose KV can be worth keeping; sized against the cluster's KV capacity (presets).
    hot_users: int = 300
    user_zipf: float = 0.8  # activity skew among hot users (a few users return very often)
    cold_users: int = 200_000  # a population large enough that a cold user's return finds no KV
    hot_share: float = 0.6  # share of requests from hot users (Trend drifts it)
    new_user_share: float = 0.05  # share of requests from first-time users (Burst spikes it)
    # History length at a user's first visit: log-normal (heavy right tail, as observed for activity
    # sequences); the median and cap are the preset's (tiny model: max_history 1024).
    history_median: float = 150.0
    history_sigma: float = 0.7
    max_history: int = 1024
    # A user new to the cluster still brings a history (their activity before it was served here): the same
    # first-visit distribution; only their KV is nowhere.
    new_user_history_median: float = 150.0
    # Events a user adds between visits (Poisson mean): a short session's worth.
    new_events_mean: float = 4.0
    candidates: int = 64  # items ranked per request (retrieval's output)
    rate: float = 300.0  # requests per second (Poisson); a preset sizes it for utilisation 0.5-0.9
    # Trend: hot-user share and history factor move linearly from *_from to *_to over the run.
    trend_hot_from: float = 0.5
    trend_hot_to: float = 0.95
    trend_history_from: float = 1.0
    trend_history_to: float = 1.5
    # Burst: episodes on the steady base.
    bursts: tuple[Burst, ...] = (
        Burst("new_users", 0.15, 0.15, 0.7),
        Burst("hot_users", 0.45, 0.1, 0.95),
        Burst("rate", 0.75, 0.1, 1.3),
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_items", "hot_users", "cold_users", "max_history", "candidates"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("hot_share", "new_user_share", "trend_hot_from", "trend_hot_to"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if self.hot_share + self.new_user_share > 1.0:
            problems.append("hot_share + new_user_share must be <= 1")
        for name in ("rate", "history_median", "new_user_history_median"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        for name in ("item_zipf", "user_zipf", "history_sigma", "new_events_mean", "drift_items_per_s"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0")
        for b in self.bursts:
            if b.kind not in ("new_users", "hot_users", "rate") or b.level < 0 or b.length <= 0:
                problems.append(f"bad burst {b}")
        if problems:
            raise ValueError("bad workload parameters: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Conditions:
    """The regime's knobs at one moment."""

    rate_factor: float
    hot_share: float
    new_user_share: float
    history_factor: float


def conditions_at(regime: Regime, p: WorkloadParams, frac: float) -> Conditions:
    """The knobs at ``frac`` (0..1) of the run."""
    if regime is Regime.TREND:
        hot = p.trend_hot_from + (p.trend_hot_to - p.trend_hot_from) * frac
        hist = p.trend_history_from + (p.trend_history_to - p.trend_history_from) * frac
        return Conditions(1.0, min(hot, 1.0 - p.new_user_share), p.new_user_share, hist)
    rate, hot, new = 1.0, p.hot_share, p.new_user_share
    if regime is Regime.BURST:
        for b in p.bursts:
            if b.start <= frac < b.start + b.length:
                if b.kind == "rate":
                    rate = b.level
                elif b.kind == "new_users":
                    new = b.level
                    hot = min(hot, 1.0 - new)
                else:
                    hot = b.level
                    new = min(new, 1.0 - hot)
    return Conditions(rate, hot, new, 1.0)


def zipf_ranks(u: F64, n: int, s: float) -> I64:
    """Ranks in [0, n) for uniforms ``u``: the inverse CDF of the continuous power law x^-s on [1, n+1)."""
    if s == 1.0:
        x = np.exp(u * math.log(n + 1.0))
    elif s == 0.0:
        x = 1.0 + u * n
    else:
        a = 1.0 - s
        x = (1.0 + u * ((n + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def _stride(n: int) -> int:
    """A multiplier coprime with n near n * golden ratio: ranks land far apart in the id space."""
    s = max(1, int(n * 0.6180339887)) | 1
    while math.gcd(s, n) != 1:
        s += 2
    return s % n if n > 1 else 0


@dataclass
class _UserState:
    length: int
    shift: int  # popularity offset at the first visit
    scale: float  # the user's own history scale (first length / history factor then)


@dataclass
class _Generator:
    regime: Regime
    p: WorkloadParams
    duration_s: float
    seed: int
    _hot: dict[int, _UserState] = field(default_factory=dict)
    _cold: dict[int, _UserState] = field(default_factory=dict)
    _arrays: OrderedDict[str, I64] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng([self.seed, 0])
        self.stride = _stride(self.p.num_items)
        self.new_users = 0

    def items(self, ranks: I64, shift: int) -> I64:
        return ((ranks + shift) % self.p.num_items * self.stride) % self.p.num_items

    def shift_at(self, t: float) -> int:
        return int(self.p.drift_items_per_s * t)

    def history(self, user: str, key: tuple[int, int], length: int, shift: int) -> I64:
        """The user's first ``length`` items (regenerated from the seed unless cached)."""
        cached = self._arrays.get(user)
        if cached is not None and len(cached) >= length:
            self._arrays.move_to_end(user)
            return cached[:length]
        stream = np.random.default_rng([self.seed, 1, key[0], key[1]])
        grow = max(length, 2 * len(cached) if cached is not None else length)
        grow = min(grow, self.p.max_history)
        arr = self.items(zipf_ranks(stream.random(grow), self.p.num_items, self.p.item_zipf), shift)
        self._arrays[user] = arr
        self._arrays.move_to_end(user)
        if len(self._arrays) > USER_CACHE:
            self._arrays.popitem(last=False)
        return arr[:length]

    def first_length(self, median: float) -> int:
        n = round(median * math.exp(self.p.history_sigma * self.rng.standard_normal()))
        return max(1, min(n, self.p.max_history))

    def visit(self, states: dict[int, _UserState], idx: int, t: float, cond: Conditions) -> _UserState:
        state = states.get(idx)
        if state is None:
            length = self.first_length(self.p.history_median * cond.history_factor)
            state = _UserState(length, self.shift_at(t), length / cond.history_factor)
            states[idx] = state
            return state
        grown = state.length + int(self.rng.poisson(self.p.new_events_mean))
        follow = round(state.scale * cond.history_factor)  # the regime's history drift
        state.length = min(max(grown, follow), self.p.max_history)
        return state

    def request(self, t: float, cond: Conditions) -> TraceRequest:
        u = self.rng.random()
        if u < cond.new_user_share:
            self.new_users += 1
            user = f"n{self.new_users}"
            key = (2, self.new_users)
            length = self.first_length(self.p.new_user_history_median)
            shift = self.shift_at(t)
        elif u < cond.new_user_share + cond.hot_share:
            idx = int(zipf_ranks(self.rng.random(1), self.p.hot_users, self.p.user_zipf)[0])
            user, key = f"h{idx}", (0, idx)
            state = self.visit(self._hot, idx, t, cond)
            length, shift = state.length, state.shift
        else:
            idx = int(self.rng.integers(self.p.cold_users))
            user, key = f"c{idx}", (1, idx)
            state = self.visit(self._cold, idx, t, cond)
            length, shift = state.length, state.shift
        history = self.history(user, key, length, shift)
        timestamps = TIMESTAMP_BASE + EVENT_SPACING_S * np.arange(length, dtype=np.int64)
        ranks = zipf_ranks(self.rng.random(self.p.candidates), self.p.num_items, self.p.item_zipf)
        candidates = self.items(ranks, self.shift_at(t))
        return TraceRequest(t, user, history, candidates, timestamps)

    def __iter__(self) -> Iterator[TraceRequest]:
        peak = self.p.rate * max([1.0] + [b.level for b in self.p.bursts if b.kind == "rate"])
        t = 0.0
        while True:
            t += float(self.rng.exponential(1.0 / peak))
            if t >= self.duration_s:
                return
            cond = conditions_at(self.regime, self.p, t / self.duration_s)
            if self.rng.random() * peak > self.p.rate * cond.rate_factor:
                continue  # thinning: an arrival of the peak process the current rate does not take
            yield self.request(t, cond)


def generate(
    regime: Regime | str, params: WorkloadParams, *, duration_s: float, seed: int
) -> Iterator[TraceRequest]:
    """The requests of one run, in time order (seeded: the same arguments give the same requests)."""
    if not duration_s > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration_s}")
    return iter(_Generator(Regime(regime), params, duration_s, seed))


def header_for(
    regime: Regime | str, params: WorkloadParams, *, duration_s: float, seed: int, preset: str
) -> TraceHeader:
    return TraceHeader(
        num_items=params.num_items,
        description=(
            f"synthetic {Regime(regime).value} workload, preset {preset}, seed {seed}, {duration_s:g} s"
        ),
        extra={
            "generator": {
                "regime": Regime(regime).value,
                "preset": preset,
                "seed": seed,
                "duration_s": duration_s,
                "params": params.to_json(),
            }
        },
    )
