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
  first ``length`` draws of the user's own random stream (a counter-based SplitMix64 stream keyed by seed
  and user; mapped by the popularity at the user's first visit: a user's taste is fixed when first seen),
  its timestamps one minute apart. A history therefore
  only ever grows, as in production: a user's first visit draws a length (log-normal around
  ``history_median`` x the regime's history factor, capped at ``max_history``); every return visit adds
  Poisson(``new_events_mean``) events, and at least enough to follow the regime's history factor
  (Trend). At ``max_history`` a history stops growing (the request then recomputes only candidates).
* **Candidates.** ``candidates`` items drawn from the current popularity (what retrieval hands ranking).
* **Arrivals.** Open-loop Poisson at ``rate`` x the regime's rate factor (exact, by thinning).

Regimes (:class:`Regime`): ``steady`` (stationary), ``trend`` (hot-user share and history length drift
linearly over the run), ``burst`` (three sudden episodes on a steady base, each followed by recovery: new
users, hot users, rate). :func:`generate` yields :class:`TraceRequest` in time order; it draws a block of
arrivals at a time (every draw vectorised over the block: users, lengths, histories, candidates) and hands
the block's requests out one by one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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
U64 = npt.NDArray[np.uint64]

EVENT_SPACING_S = 60  # a history's timestamps: one event a minute along the user's own timeline
TIMESTAMP_BASE = 1_700_000_000  # epoch seconds of a user's first event (any fixed value works)
BLOCK = 512  # arrivals of the peak process drawn at once: a block's requests are made together
CHUNK = 16_384  # items per vectorised pass (its scratch buffers stay in the CPU's cache)
HISTORY_CACHE_ITEMS = 1 << 23  # hot users' histories kept as arrays (64 MiB); others are redrawn
_HOT, _COLD, _NEW = 0, 1, 2  # user kinds (a user's stream key is its kind and id)
_PREFIX = ("h", "c", "n")  # user_id = prefix + id
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment and mixing constants
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


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
        for name in (
            "rate",
            "history_median",
            "new_user_history_median",
            "trend_history_from",
            "trend_history_to",
        ):
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


def _conditions(regime: Regime, p: WorkloadParams, frac: F64) -> tuple[F64, F64, F64, F64]:
    """The knobs at each of ``frac`` (0..1 of the run): rate factor, hot share, new share, history factor."""
    ones = np.ones_like(frac)
    if regime is Regime.TREND:
        hot = p.trend_hot_from + (p.trend_hot_to - p.trend_hot_from) * frac
        hist = p.trend_history_from + (p.trend_history_to - p.trend_history_from) * frac
        new = p.new_user_share * ones
        return ones, np.minimum(hot, 1.0 - new), new, hist
    rate, hot, new = ones.copy(), p.hot_share * ones, p.new_user_share * ones
    if regime is Regime.BURST:
        for b in p.bursts:
            on = (b.start <= frac) & (frac < b.start + b.length)
            if b.kind == "rate":
                rate = np.where(on, b.level, rate)
            elif b.kind == "new_users":
                new = np.where(on, b.level, new)
                hot = np.where(on, np.minimum(hot, 1.0 - new), hot)
            else:
                hot = np.where(on, b.level, hot)
                new = np.where(on, np.minimum(new, 1.0 - hot), new)
    return rate, hot, new, ones


def conditions_at(regime: Regime, p: WorkloadParams, frac: float) -> Conditions:
    """The knobs at ``frac`` (0..1) of the run."""
    rate, hot, new, hist = _conditions(regime, p, np.array([frac], dtype=np.float64))
    return Conditions(float(rate[0]), float(hot[0]), float(new[0]), float(hist[0]))


def _ranks_into(u: F64, n: int, s: float, x: F64, out: I64) -> None:
    """``out`` = ranks in [0, n) for uniforms ``u`` (``x``: scratch of the same size)."""
    if s == 1.0:
        np.multiply(u, math.log(n + 1.0), out=x)
        np.exp(x, out=x)
    elif s == 0.0:
        np.multiply(u, float(n), out=x)
        x += 1.0
    else:  # (1 + u ((n+1)^a - 1))^(1/a), through log1p and exp (several times faster than a power)
        a = 1.0 - s
        np.multiply(u, (n + 1.0) ** a - 1.0, out=x)
        np.log1p(x, out=x)
        np.multiply(x, 1.0 / a, out=x)
        np.exp(x, out=x)
    np.copyto(out, x, casting="unsafe")  # truncation: x >= 1
    out -= 1
    np.minimum(out, n - 1, out=out)


def zipf_ranks(u: F64, n: int, s: float) -> I64:
    """Ranks in [0, n) for uniforms ``u``: the inverse CDF of the continuous power law x^-s on [1, n+1)."""
    out = np.empty(len(u), dtype=np.int64)
    _ranks_into(u, n, s, np.empty(len(u), dtype=np.float64), out)
    return out


def _stride(n: int) -> int:
    """A multiplier coprime with n near n * golden ratio: ranks land far apart in the id space."""
    s = max(1, int(n * 0.6180339887)) | 1
    while math.gcd(s, n) != 1:
        s += 2
    return s % n if n > 1 else 0


def _mix64(z: U64) -> None:
    """SplitMix64's finaliser, in place: a counter (``key + i * GAMMA``) becomes 64 random bits."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)


class _Items:
    """Item ids for uniforms: Zipf rank, plus the popularity shift, through the fixed permutation.

    Works in chunks of :data:`CHUNK` over scratch buffers, so that the temporaries stay in cache.
    """

    def __init__(self, p: WorkloadParams) -> None:
        self.n, self.s, self.stride = p.num_items, p.item_zipf, _stride(p.num_items)
        self.x = np.empty(CHUNK, dtype=np.float64)
        self.u = np.empty(CHUNK, dtype=np.float64)
        self.q = np.empty(CHUNK, dtype=np.int64)

    def fill(self, u: F64, out: I64, shift: I64 | None) -> None:
        """``out[i]`` = the item of uniform ``u[i]`` at popularity shift ``shift[i]`` (None: no shift)."""
        n = self.n
        for lo in range(0, len(out), CHUNK):
            hi = min(lo + CHUNK, len(out))
            o = out[lo:hi]
            _ranks_into(u[lo:hi], n, self.s, self.x[: hi - lo], o)
            if shift is not None:
                o += shift[lo:hi]
                o %= n
            o *= self.stride
            q = self.q[: hi - lo]  # o %= n, through a floor division (numpy divides by a constant faster)
            np.floor_divide(o, n, out=q)
            q *= n
            o -= q

    def from_bits(self, z: U64, out: I64, shift: I64 | None) -> None:
        """As :meth:`fill`, from random 64-bit words (mixed in place) instead of uniforms."""
        for lo in range(0, len(out), CHUNK):
            hi = min(lo + CHUNK, len(out))
            bits = z[lo:hi]
            _mix64(bits)
            bits >>= np.uint64(11)
            u = self.u[: hi - lo]
            np.multiply(bits, 2.0**-53, out=u)
            self.fill(u, out[lo:hi], None if shift is None else shift[lo:hi])


class _Users:
    """One population's state (hot or cold), in arrays indexed by user id; length 0: not seen yet."""

    def __init__(self, count: int, cap: int, drift: bool) -> None:
        self.cap = cap  # max_history
        # a user's length and scale (first length / history factor then) side by side: a visit touches one
        # page of memory (millions of cold users; the arrays are only touched where visited)
        state = np.zeros(count, dtype=[("length", np.int32), ("scale", np.float32)])
        self.length: npt.NDArray[np.int32] = state["length"]
        self.scale: npt.NDArray[np.float32] = state["scale"]
        # popularity offset at the first visit (always 0 without drift)
        self.shift = np.zeros(count if drift else 0, dtype=np.int64)

    def visit(self, idx: I64, first: I64, factor: F64, grow: I64, shift: I64) -> tuple[I64, I64]:
        """The visits ``idx`` (in time order, repeats allowed): each visit's history length and shift.

        A first visit takes ``first``; a return takes ``min(max(previous + grow, round(scale * factor)),
        cap)``. That recurrence is solved for all visits at once: per user, with ``G`` the running sum of
        ``grow`` and ``F`` the follow term (capped: that changes no result), the uncapped length is
        ``G + max(previous, running max of F - G)``, and capping once at the end is the same as capping at
        every step (``grow >= 0``).
        """
        m, cap = len(idx), self.cap
        order = np.argsort(idx, kind="stable")
        users_s = idx[order]
        head = np.empty(m, dtype=bool)
        head[:1] = True
        np.not_equal(users_s[1:], users_s[:-1], out=head[1:])
        group = np.cumsum(head) - 1
        heads = np.flatnonzero(head)
        users = users_s[heads]
        previous = self.length[users]
        seen = previous > 0
        factor_s, first_s = factor[order], first[order]
        scale = np.where(seen, self.scale[users], first_s[heads] / factor_s[heads])
        user_shift = np.where(seen, self.shift[users], shift[order][heads]) if len(self.shift) else shift[:0]
        follow = np.minimum(np.rint(scale[group] * factor_s), cap).astype(np.int64)
        g = grow[order]
        fresh = heads[~seen]
        g[fresh] = 0
        follow[fresh] = first_s[fresh]
        total = np.cumsum(g)
        total -= (total[heads] - g[heads])[group]  # G: the running sum within each user
        level = follow - total
        big = cap + int(total.max()) + 1  # offsets keep the running max from crossing users
        level += group * big
        np.maximum.accumulate(level, out=level)
        level -= group * big
        np.maximum(level, previous[group], out=level)
        level += total
        np.minimum(level, cap, out=level)
        last = np.append(heads[1:] - 1, m - 1)
        self.length[users] = level[last]
        self.scale[users] = scale
        lengths = np.empty(m, dtype=np.int64)
        lengths[order] = level
        if not len(self.shift):
            return lengths, np.zeros(m, dtype=np.int64)
        self.shift[users] = user_shift
        shifts = np.empty(m, dtype=np.int64)
        shifts[order] = user_shift[group]
        return lengths, shifts


class _Generator:
    def __init__(self, regime: Regime, p: WorkloadParams, duration_s: float, seed: int) -> None:
        self.regime, self.p, self.duration_s = regime, p, duration_s
        self.rng = np.random.default_rng([seed, 0])
        # a user's history stream: SplitMix64 over the counters key + (i + 1) * GAMMA, with the user's key
        # drawn from (seed, kind, id)
        self.kind_keys: U64 = np.random.SeedSequence([seed, 1]).generate_state(3, np.uint64).astype(np.uint64)
        self.items = _Items(p)
        self.hot = _Users(p.hot_users, p.max_history, p.drift_items_per_s > 0)
        self.cold = _Users(p.cold_users, p.max_history, p.drift_items_per_s > 0)
        self.new_users = 0
        self.cache: OrderedDict[int, I64] = OrderedDict()  # hot users' histories (the longest drawn)
        self.cached_items = 0
        self.bits = np.empty(0, dtype=np.uint64)  # scratch: the counters of a block's history draws
        self.drawn = np.empty(0, dtype=np.int64)  # scratch: hot users' new history items
        self.timestamps = TIMESTAMP_BASE + EVENT_SPACING_S * np.arange(p.max_history, dtype=np.int64)

    def __iter__(self) -> Iterator[TraceRequest]:
        p, rng = self.p, self.rng
        peak = p.rate * max([1.0] + [b.level for b in p.bursts if b.kind == "rate"])
        t = 0.0
        while True:
            times = t + np.cumsum(rng.exponential(1.0 / peak, BLOCK))
            thin = rng.random(BLOCK)
            t = float(times[-1])
            end = int(np.searchsorted(times, self.duration_s))  # the first arrival at or past the end
            times, thin = times[:end], thin[:end]
            rate, hot, new, hist = _conditions(self.regime, p, times / self.duration_s)
            # thinning: an arrival of the peak process is taken with probability rate(t) / peak
            take = thin * peak <= p.rate * rate
            if take.any():
                yield from self._requests(times[take], hot[take], new[take], hist[take])
            if end < BLOCK:
                return

    def _requests(self, times: F64, hot_share: F64, new_share: F64, factor: F64) -> list[TraceRequest]:
        """One block of requests (arrival times and the regime's knobs at each)."""
        p, rng, n = self.p, self.rng, len(times)
        u = rng.random(n)
        kind = np.where(u < new_share, _NEW, np.where(u < new_share + hot_share, _HOT, _COLD))
        hot_idx = zipf_ranks(rng.random(n), p.hot_users, p.user_zipf)
        idx = rng.integers(p.cold_users, size=n)
        median = np.where(kind == _NEW, p.new_user_history_median, p.history_median * factor)
        first = np.clip(np.rint(median * np.exp(p.history_sigma * rng.standard_normal(n))), 1, p.max_history)
        lengths = first.astype(np.int64)
        grow = rng.poisson(p.new_events_mean, n)
        drift = p.drift_items_per_s > 0
        shifts = (p.drift_items_per_s * times).astype(np.int64) if drift else np.zeros(n, dtype=np.int64)
        candidate_shift = np.repeat(shifts, p.candidates) if drift else None
        hot = kind == _HOT
        cold = kind == _COLD
        idx[hot] = hot_idx[hot]
        for mask, users in ((hot, self.hot), (cold, self.cold)):
            if mask.any():
                lengths[mask], shifts[mask] = users.visit(
                    idx[mask], lengths[mask], factor[mask], grow[mask], shifts[mask]
                )
        new = kind == _NEW
        idx[new] = self.new_users + np.arange(1, int(new.sum()) + 1)
        self.new_users += int(new.sum())

        candidates = np.empty((n, p.candidates), dtype=np.int64)
        flat = candidates.reshape(-1)
        for lo in range(0, len(flat), CHUNK):
            hi = min(lo + CHUNK, len(flat))
            self.items.fill(
                rng.random(hi - lo, out=self.items.u[: hi - lo]),
                flat[lo:hi],
                None if candidate_shift is None else candidate_shift[lo:hi],
            )

        # cold and new users: each request's history drawn whole (a user twice in a block draws it twice)
        other = ~hot
        sizes = lengths[other]
        ends = np.cumsum(sizes)
        drawn = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        if len(drawn):
            zero = np.zeros(len(sizes), dtype=np.int64)
            self._draw(
                kind[other], idx[other], zero, sizes, shift=shifts[other] if drift else None, out=drawn
            )
        other_histories = iter([drawn[e - s : e] for s, e in zip(sizes.tolist(), ends.tolist(), strict=True)])
        hot_histories = iter(
            self._hot_histories(idx[hot].tolist(), lengths[hot].tolist(), shifts[hot].tolist())
        )
        ts = self.timestamps
        return [
            TraceRequest(
                t,
                f"{_PREFIX[k]}{i}",
                next(hot_histories) if k == _HOT else next(other_histories),
                row,
                ts[:size],
            )
            for t, k, i, size, row in zip(
                times.tolist(), kind.tolist(), idx.tolist(), lengths.tolist(), candidates, strict=True
            )
        ]

    def _hot_histories(self, users: list[int], sizes: list[int], shifts: list[int]) -> list[I64]:
        """Hot users' histories from the cache, grown first where a visit needs more than it holds."""
        need: dict[int, int] = {}
        shift_of: dict[int, int] = {}
        for user, size, shift in zip(users, sizes, shifts, strict=True):
            if need.get(user, 0) < size:
                need[user] = size
                shift_of[user] = shift
        cache, cap = self.cache, self.p.max_history
        grown: list[int] = []
        starts: list[int] = []
        stops: list[int] = []
        for user, size in need.items():
            cached = cache.get(user)
            if cached is not None:
                cache.move_to_end(user)
                if len(cached) >= size:
                    continue
            grown.append(user)
            starts.append(0 if cached is None else len(cached))
            stops.append(min(cap, size + size // 8 + 64))  # headroom: the user's next visits grow it
        if grown:
            start_a, stop_a = np.array(starts, dtype=np.int64), np.array(stops, dtype=np.int64)
            total = int((stop_a - start_a).sum())
            if len(self.drawn) < total:
                self.drawn = np.empty(2 * total, dtype=np.int64)
            job_shift = None
            if self.p.drift_items_per_s > 0:
                job_shift = np.array([shift_of[user] for user in grown], dtype=np.int64)
            users_a = np.array(grown, dtype=np.int64)
            self._draw(
                np.full(len(grown), _HOT), users_a, start_a, stop_a, shift=job_shift, out=self.drawn[:total]
            )
            at = 0
            for user, start, stop in zip(grown, starts, stops, strict=True):
                new = self.drawn[at : at + stop - start]
                at += stop - start
                cached = cache.get(user)
                cache[user] = new.copy() if cached is None else np.concatenate((cached, new))
                cache.move_to_end(user)
                self.cached_items += stop - start
        out = [cache[user][:size] for user, size in zip(users, sizes, strict=True)]
        while self.cached_items > HISTORY_CACHE_ITEMS and len(cache) > 1:
            self.cached_items -= len(cache.popitem(last=False)[1])
        return out

    def _draw(self, kinds: I64, users: I64, starts: I64, stops: I64, *, shift: I64 | None, out: I64) -> None:
        """``out`` = positions ``starts[j]:stops[j]`` of each user's history stream, one job after another
        (``shift[j]``: the job's popularity shift, None: none)."""
        keys = self.kind_keys[kinds] + users.astype(np.uint64)
        _mix64(keys)
        # consecutive counters differ by GAMMA: the counters of all jobs are one running sum (uint64 wraps,
        # as the counters do), from each job's first counter on
        counts = stops - starts
        first = keys + (starts.astype(np.uint64) + np.uint64(1)) * _GAMMA
        last = keys + stops.astype(np.uint64) * _GAMMA
        total = len(out)
        if len(self.bits) < total:
            self.bits = np.empty(2 * total, dtype=np.uint64)
        bits = self.bits[:total]
        bits.fill(_GAMMA)
        steps = first.copy()
        steps[1:] -= last[:-1]
        bits[np.cumsum(counts) - counts] = steps
        np.cumsum(bits, out=bits)
        self.items.from_bits(bits, out, None if shift is None else np.repeat(shift, counts))


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
