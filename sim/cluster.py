"""The discrete-event simulation of a cluster, on the serving cores themselves.

Reused, not re-implemented: each worker's :class:`~services.worker.core.pool.Pool` (both caches, the
reallocation tick, prefetch, naive refill) driven through :mod:`services.worker.core.batch` (the engine's
order of cache calls); the gateway's :class:`~services.gateway.core.router.Router` (every policy); the
residency index the gateway's view is built on; cachestate's :class:`FeatureWindow`; the controller's
policies and :class:`Clamp`. What is modelled instead of run:

- **Time.** A worker's model thread is FIFO and serves what is queued, up to ``max_batch`` requests, in
  one batch (never waiting to fill one), as the engine does. A batch takes the cost profile's time
  (:mod:`sim.cost`) for what the real caches said about its requests; a due reallocation tick runs before
  it and its chunk moves (and, in naive mode, the synchronous refill) delay it. Every request answered by
  a batch completes when the batch ends; its latency adds its time outside the model, the profile's
  ``overhead_ms`` or a seeded draw from its measured distribution; a profile with
  ``batch_factor_quantiles`` multiplies each batch's time by a seeded draw too
  (:class:`~sim.cost.QuantileSampler`).
- **Ticks.** A real worker ticks every ``tick_ms`` (deferring while busy). Here the ticks due since the
  last one run when a batch starts: those that fell in idle time cost no request anything; the last one
  is charged to the batch. Prefetch planned by a tick is installed at the next (a background transfer).
- **Digests and the view.** Every ``digest_ms`` (staggered per worker) a worker's residency delta and load
  reach the index and the routing view ``digest_delay_ms`` later; the cost coefficients the view carries
  are the profile's (a real worker fits them online). The same digests feed the feature window.
- **Controller.** Every ``window_ms``: the window's features, the policy's decision, the clamp, and
  ``min_change``, as the controller does; a decision reaches its worker ``decision_delay_ms`` later.

The simulation is deterministic for a given input and seed. :meth:`Simulation.advance` runs it up to a
time on the requests handed in, so a caller can copy the whole state (``copy.deepcopy``) and branch, which
is how :mod:`sim.sweep` finds the offline-optimal alpha.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from services.cachestate.core.features import FeatureWindow
from services.controller.core.policies import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_ALPHA_MIN,
    DEFAULT_MAX_STEP,
    AlphaPolicy,
    Clamp,
    StaticPolicy,
)
from services.gateway.core.router import NoWorkers, Policy, Router, RouteRequest
from services.gateway.core.routing_view import IndexView
from services.worker.core.batch import BatchFormer, PrefixHasher, RoundCaches, RoundRequest, rounds
from services.worker.core.geometry import PoolGeometry
from services.worker.core.pool import Pool, RefillMode
from shared import schemas as s
from shared.residency import ResidencyIndex
from shared.slo import DEFAULT_SLO_MS
from sim.cost import CostProfile, QuantileSampler
from workloads.trace import TraceRequest

__all__ = ["SimConfig", "SimResult", "Simulation", "WorkerTimeline"]

I64 = npt.NDArray[np.int64]

_DONE, _DIGEST, _APPLY_DIGEST, _WINDOW, _APPLY_ALPHA = range(5)
SERVICE_EWMA = 0.1  # as the engine's: weight of the newest batch's per-request share


@dataclass(frozen=True)
class SimConfig:
    """Geometry, costs and the control loop's periods (defaults: the services' own defaults)."""

    workers: int
    geometry: PoolGeometry
    cost: CostProfile
    alpha0: float = 0.5
    max_batch: int = 8
    max_chunks_per_tick: int = 2
    tick_ms: float = 10.0
    prefetch_bytes_per_tick: int = 64 * 1024
    refill_mode: RefillMode = RefillMode.INCREMENTAL
    max_queue: int = 256
    slo_ms: float = DEFAULT_SLO_MS
    digest_ms: float = 500.0
    digest_delay_ms: float = 2.0
    window_ms: float = 1000.0
    decision_delay_ms: float = 2.0
    routing: Policy = Policy.JOINT
    alpha_min: float = DEFAULT_ALPHA_MIN
    alpha_max: float = DEFAULT_ALPHA_MAX
    max_step: float = DEFAULT_MAX_STEP
    min_change: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError(f"alpha0 must be in [0, 1], got {self.alpha0}")
        for name in ("tick_ms", "digest_ms", "window_ms", "slo_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "workers": self.workers,
            "pool_bytes": g.budget_bytes,
            "chunk_bytes": g.chunk_bytes,
            "emb_entry_bytes": g.emb_entry_bytes,
            "kv_page_bytes": g.kv_page_bytes,
            "kv_page_tokens": g.kv_page_tokens,
            "emb_slots_at_alpha_1": g.emb_slot_count,
            "cost": self.cost.to_json(),
            "alpha0": self.alpha0,
            "max_batch": self.max_batch,
            "max_chunks_per_tick": self.max_chunks_per_tick,
            "tick_ms": self.tick_ms,
            "prefetch_bytes_per_tick": self.prefetch_bytes_per_tick,
            "refill_mode": self.refill_mode.value,
            "max_queue": self.max_queue,
            "slo_ms": self.slo_ms,
            "digest_ms": self.digest_ms,
            "digest_delay_ms": self.digest_delay_ms,
            "window_ms": self.window_ms,
            "decision_delay_ms": self.decision_delay_ms,
            "routing": self.routing.value,
            "clamp": [self.alpha_min, self.alpha_max],
            "max_step": self.max_step,
            "min_change": self.min_change,
            "seed": self.seed,
            "index_max_entries": index_capacity(self),
        }


@dataclass(slots=True)
class _Window:
    """A worker's digest window (what WindowStats reports)."""

    start: float = 0.0
    requests: int = 0
    kv_hit_requests: int = 0
    history_tokens: int = 0
    max_history: int = 0
    new_tokens: int = 0
    cached_tokens: int = 0
    emb_hits: int = 0
    emb_misses: int = 0
    slo_violations: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class _Worker:
    index: int
    id: str
    pool: Pool
    queue: deque[int] = field(default_factory=deque)
    busy: bool = False
    in_flight: int = 0
    last_tick: float = 0.0
    prefetch: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    service_ms: float = 0.0
    mean_batch: float = 0.0
    busy_ms: float = 0.0  # model-thread time charged so far (batches and ticks)
    seq: int = 0
    window: _Window = field(default_factory=_Window)


class _View(IndexView):
    """The gateway's view: worker records from digests, residency in the shared index."""

    def __init__(self, index: ResidencyIndex) -> None:
        super().__init__(index)
        self.states: dict[str, s.WorkerState] = {}
        self._routable: list[s.WorkerState] = []
        self.version: int | None = 0
        self._version = 0

    def set_state(self, state: s.WorkerState) -> None:
        self.states[state.worker_id] = state
        self._routable = [w for w in self.states.values() if not w.draining]
        self._version += 1
        self.version = self._version

    def routable_workers(self) -> Sequence[s.WorkerState]:
        return self._routable


@dataclass
class WorkerTimeline:
    """Per controller window: time, and per worker alpha and target."""

    t: list[float] = field(default_factory=list)
    alpha: list[list[float]] = field(default_factory=list)
    target: list[list[float]] = field(default_factory=list)


class _Records:
    """Per request outcomes, in arrival order (numpy growth by doubling)."""

    FIELDS = ("arrival", "latency_ms", "worker", "cached", "computed", "emb_hits", "emb_misses")

    def __init__(self) -> None:
        self.n = 0
        self.arrival = np.zeros(1024)
        self.latency_ms = np.full(1024, np.nan)
        self.worker = np.full(1024, -1, dtype=np.int64)
        self.cached = np.zeros(1024, dtype=np.int64)
        self.computed = np.zeros(1024, dtype=np.int64)
        self.emb_hits = np.zeros(1024, dtype=np.int64)
        self.emb_misses = np.zeros(1024, dtype=np.int64)

    def add(self, arrival: float) -> int:
        if self.n == len(self.arrival):
            for name in self.FIELDS:
                old = getattr(self, name)
                fill = np.nan if name == "latency_ms" else (-1 if name == "worker" else 0)
                new = np.full(2 * len(old), fill, dtype=old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)
        i = self.n
        self.arrival[i] = arrival
        self.n += 1
        return i

    def view(self, name: str) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = getattr(self, name)[: self.n]
        return out


class Simulation:
    def __init__(self, cfg: SimConfig, policy: AlphaPolicy | None = None) -> None:
        self.cfg = cfg
        self.policy: AlphaPolicy = policy if policy is not None else StaticPolicy(cfg.alpha0)
        self.clamp = Clamp(cfg.alpha_min, cfg.alpha_max, cfg.max_step)
        self.now = 0.0
        self.workers = [
            _Worker(
                i,
                f"w{i}",
                Pool(
                    cfg.geometry,
                    alpha=cfg.alpha0,
                    max_chunks_per_tick=cfg.max_chunks_per_tick,
                    refill_mode=cfg.refill_mode,
                ),
            )
            for i in range(cfg.workers)
        ]
        self.by_id = {w.id: w for w in self.workers}
        # The view holds every worker's whole residency (a gateway configured for this cluster's size):
        # with the default cap, 32 paper-preset pools would overflow it and the view would lose entries.
        self.index = ResidencyIndex(max_entries=index_capacity(cfg))
        self.view = _View(self.index)
        self.router = Router(cfg.routing, rng_seed=cfg.seed)
        self.features = FeatureWindow(cfg.window_ms / 1e3, start=0.0)
        self.records = _Records()
        self._overhead = QuantileSampler.overhead(cfg.cost, cfg.seed)
        self._batch_factor = QuantileSampler.batch_factor(cfg.cost, cfg.seed)
        self.requests: dict[int, TraceRequest] = {}  # in flight
        self.shed = 0
        self.timeline = WorkerTimeline()
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        cost = cfg.cost
        self._coefficients = s.CostCoefficients(
            fixed_ms=cost.request_ms + cost.batch_fixed_ms,
            ms_per_new_token=cost.ms_per_new_token,
            ms_per_cached_token=cost.ms_per_cached_token,
            ms_per_candidate=cost.ms_per_candidate,
            ms_per_emb_miss=cost.ms_per_emb_miss,
            samples=1,
        )
        for w in self.workers:
            self.index.add_worker(w.id)
            self.view.set_state(self._state(w))
            phase = cfg.digest_ms / 1e3 * (w.index + 1) / cfg.workers
            self._push(phase, _DIGEST, w.index)
        self._push(cfg.window_ms / 1e3, _WINDOW, None)

    # ------------------------------------------------------------------------------------------ driving
    def advance(self, requests: Iterable[TraceRequest], until: float = math.inf) -> None:
        """Feed ``requests`` (time-ordered, all before ``until``) and run every event before ``until``.
        With ``until`` infinite, runs until every request is answered."""
        arrivals: Iterator[TraceRequest] = iter(requests)
        nxt = next(arrivals, None)
        events = self._events
        while True:
            if nxt is not None and (not events or nxt.t < events[0][0]):
                if nxt.t >= until:
                    raise ValueError(f"request at t={nxt.t} is not before until={until}")
                self.now = max(self.now, nxt.t)
                self._arrive(nxt)
                nxt = next(arrivals, None)
                continue
            if not events or events[0][0] >= until:
                break
            if nxt is None and until == math.inf and not self.requests:
                break  # everything answered: the periodic events would run forever
            t, _, kind, arg = heapq.heappop(events)
            self.now = t
            self._handle(kind, arg)
        if until != math.inf:
            self.now = max(self.now, until)

    def _push(self, t: float, kind: int, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, arg))

    def _handle(self, kind: int, arg: Any) -> None:
        if kind == _DONE:
            self._done(*arg)
        elif kind == _DIGEST:
            self._digest(self.workers[arg])
        elif kind == _APPLY_DIGEST:
            self._apply_digest(*arg)
        elif kind == _WINDOW:
            self._window()
        elif kind == _APPLY_ALPHA:
            w, target = arg
            self.workers[w].pool.set_target(target)

    # ------------------------------------------------------------------------------------------ gateway
    def _arrive(self, req: TraceRequest) -> None:
        rid = self.records.add(req.t)
        route_req = RouteRequest(req.user_id, req.history, req.candidates)
        try:
            decision = self.router.route(self.view, route_req, self.now)
        except NoWorkers:  # Saturated included: shed at the door
            self.shed += 1
            return
        w = self.by_id[decision.best.worker_id]
        self.router.on_dispatch(w.id, route_req, self.now)
        self.requests[rid] = req
        w.queue.append(rid)
        w.in_flight += 1
        self.records.worker[rid] = w.index
        if not w.busy:
            self._start_batch(w)

    # ------------------------------------------------------------------------------------------ worker
    def _tick(self, w: _Worker) -> float:
        """The reallocation ticks due since the last; returns the milliseconds charged to the next batch."""
        tick_s = self.cfg.tick_ms / 1e3
        due = int((self.now - w.last_tick) / tick_s)
        if due < 1:
            return 0.0
        w.last_tick = self.now
        pool, cost = w.pool, self.cfg.cost
        charged = 0.0
        for _ in range(min(due, 1 + pool.geometry.total_chunks)):
            if len(w.prefetch):
                pool.install_prefetched(w.prefetch)
                w.prefetch = np.zeros(0, dtype=np.int64)
            plan = pool.tick()
            charged = plan.chunks_moved * cost.tick_ms_per_chunk
            if len(plan.refill):
                charged += cost.transfer_ms(len(plan.refill) * pool.geometry.emb_entry_bytes)
            if self.cfg.prefetch_bytes_per_tick > 0:
                w.prefetch = pool.prefetch_plan(self.cfg.prefetch_bytes_per_tick)
            if plan.chunks_moved == 0 and not len(w.prefetch) and pool.emb_chunks == pool.target_emb_chunks:
                break  # nothing left for the remaining idle ticks to do
        return charged

    def _take(self, w: _Worker) -> list[int]:
        """The head of the queue and the requests the engine's rule lets join it (distinct users)."""
        queue = w.queue
        first = queue.popleft()
        take = [first]
        if not queue or self.cfg.max_batch == 1:
            return take
        former = BatchFormer(self.requests[first].user_id, self.cfg.max_batch)
        kept: list[int] = []
        while queue and not former.done:
            rid = queue.popleft()
            (take if former.offer(self.requests[rid].user_id) else kept).append(rid)
        queue.extendleft(reversed(kept))
        return take

    def _start_batch(self, w: _Worker) -> None:
        extra_ms = self._tick(w)
        take = self._take(w)
        cost, pool, rec, win = self.cfg.cost, w.pool, self.records, w.window
        service_ms = cost.batch_fixed_ms
        reqs = [self.requests[rid] for rid in take]
        for members in rounds([r.user_id for r in reqs]):
            batch = [reqs[i] for i in members]
            round_reqs = [
                RoundRequest(
                    r.user_id,
                    r.history,
                    r.candidates,
                    PrefixHasher(
                        r.history, r.timestamps if r.timestamps is not None else _zeros(len(r.history))
                    ),
                )
                for r in batch
            ]
            caches = RoundCaches.lookup(pool, round_reqs)
            caches.admit(pool)
            hits, misses = caches.per_request_emb()
            for j, (i, rr) in enumerate(zip(members, round_reqs, strict=True)):
                n = int(rr.history.shape[0])
                c = caches.cached[j]
                m = int(rr.candidates.shape[0])
                if n > c:
                    RoundCaches.commit(pool, rr)
                rid = take[i]
                rec.cached[rid] = c
                rec.computed[rid] = n - c + m
                h, mi = int(hits[j]), int(misses[j])
                rec.emb_hits[rid] = h
                rec.emb_misses[rid] = mi
                service_ms += cost.request_cost_ms(n - c, c, m, mi)
                win.requests += 1
                win.kv_hit_requests += c > 0
                win.history_tokens += n
                win.max_history = max(win.max_history, n)
                win.new_tokens += n - c
                win.cached_tokens += c
                win.emb_hits += h
                win.emb_misses += mi
        service_ms *= self._batch_factor()
        share = service_ms / len(take)
        w.service_ms = share if w.service_ms == 0 else w.service_ms + SERVICE_EWMA * (share - w.service_ms)
        w.mean_batch = (
            len(take) if w.mean_batch == 0 else w.mean_batch + SERVICE_EWMA * (len(take) - w.mean_batch)
        )
        w.busy = True
        w.busy_ms += extra_ms + service_ms
        self._push(self.now + (extra_ms + service_ms) / 1e3, _DONE, (w.index, take))

    def _done(self, index: int, take: list[int]) -> None:
        w = self.workers[index]
        rec, win = self.records, w.window
        overhead = self._overhead
        for rid in take:
            in_worker = (self.now - rec.arrival[rid]) * 1e3
            rec.latency_ms[rid] = in_worker + overhead()
            win.latencies.append(in_worker)
            win.slo_violations += in_worker > self.cfg.slo_ms
            del self.requests[rid]
            self.router.on_done(w.id)
        w.in_flight -= len(take)
        w.busy = False
        if w.queue:
            self._start_batch(w)

    # ------------------------------------------------------------------------------------------ digests
    def _state(self, w: _Worker) -> s.WorkerState:
        return s.WorkerState(
            worker_id=w.id,
            incarnation="sim",
            load=s.LoadInfo(
                in_flight=w.in_flight,
                queue_depth=len(w.queue),
                ewma_service_ms=w.service_ms,
                max_queue=self.cfg.max_queue,
                mean_batch_size=w.mean_batch,
            ),
            alpha=w.pool.alpha,
            alpha_target=w.pool.target_alpha,
            cost=self._coefficients,
        )

    def _digest(self, w: _Worker) -> None:
        pool, win = w.pool, w.window
        c = pool.counters
        lat = np.asarray(win.latencies) if win.latencies else np.zeros(1)
        digest = s.WorkerDigest(
            worker_id=w.id,
            incarnation="sim",
            seq=w.seq,
            kind="delta",
            sent_at_ms=self.now * 1e3,
            period_ms=self.cfg.digest_ms,
            alpha=pool.alpha,
            alpha_target=pool.target_alpha,
            cost=self._coefficients,
            stats=s.PoolStats(
                emb_hits=c.emb_hits,
                emb_misses=c.emb_misses,
                kv_hits=c.kv_hits,
                kv_misses=c.kv_misses,
                emb_miss_bytes=c.emb_miss_bytes,
                prefetch_bytes=c.prefetch_bytes,
                critical_refill_bytes=c.critical_refill_bytes,
                chunks_moved=c.chunks_moved,
            ),
            window=s.WindowStats(
                window_ms=(self.now - win.start) * 1e3,
                requests=win.requests,
                kv_hit_requests=win.kv_hit_requests,
                history_tokens=win.history_tokens,
                max_history_tokens=win.max_history,
                new_tokens=win.new_tokens,
                cached_tokens=win.cached_tokens,
                emb_hits=win.emb_hits,
                emb_misses=win.emb_misses,
                latency_p50_ms=float(np.percentile(lat, 50)),
                latency_p99_ms=float(np.percentile(lat, 99)),
                slo_violations=win.slo_violations,
                slo_ms=self.cfg.slo_ms,
            ),
        )
        w.seq += 1
        w.window = _Window(start=self.now)
        delta = pool.drain_deltas()
        self._push(
            self.now + self.cfg.digest_delay_ms / 1e3, _APPLY_DIGEST, (w.index, delta, digest, self._state(w))
        )
        self._push(self.now + self.cfg.digest_ms / 1e3, _DIGEST, w.index)

    def _apply_digest(self, index: int, delta: Any, digest: s.WorkerDigest, state: s.WorkerState) -> None:
        wid = self.workers[index].id
        ix = self.index
        for user, length in delta.kv_upserts.items():
            ix.upsert_kv(user, wid, length)
        for user in delta.kv_removed:
            ix.remove_kv(user, wid)
        if delta.emb_removed:
            ix.remove_emb(wid, delta.emb_removed)
        if delta.emb_added:
            ix.add_emb(wid, delta.emb_added)
        self.view.set_state(state)
        self.features.observe(digest)

    # ------------------------------------------------------------------------------------------ controller
    def _window(self) -> None:
        for f in self.features.close(self.now):
            self.propose(f.worker_id, self.policy.decide(f, f.alpha_target), f.alpha_target)
        tl = self.timeline
        tl.t.append(self.now)
        tl.alpha.append([w.pool.alpha for w in self.workers])
        tl.target.append([w.pool.target_alpha for w in self.workers])
        self._push(self.now + self.cfg.window_ms / 1e3, _WINDOW, None)

    def propose(self, worker_id: str, proposal: float, current: float) -> float:
        """The controller's rule for one proposal: the clamp around ``current`` (the worker's target as its
        features reported it), then sent unless it moves the target less than ``min_change``; it reaches
        the worker ``decision_delay_ms`` later. Returns the target the worker will have: the clamped one if
        it was sent, ``current`` if not. The training environment (:mod:`sim.env`) calls it with its agent's
        action after a window closes."""
        target = self.clamp(proposal, current)
        if abs(target - current) < max(self.cfg.min_change, 1e-12):
            return current
        w = self.by_id[worker_id]
        self._push(self.now + self.cfg.decision_delay_ms / 1e3, _APPLY_ALPHA, (w.index, target))
        return target

    # ------------------------------------------------------------------------------------------ results
    def set_targets(self, alpha: float) -> None:
        """Aim every worker's split at ``alpha`` now (the oracle's branches)."""
        for w in self.workers:
            w.pool.set_target(alpha)

    def result(self) -> SimResult:
        return SimResult.of(self)


def index_capacity(cfg: SimConfig) -> int:
    """Entries the residency index needs to never evict: every worker's pool all EMB slots or all KV
    pages (a placement covers at least one page)."""
    g = cfg.geometry
    return max(1, cfg.workers * (g.emb_slot_count + g.kv_page_count))


_ZEROS: dict[int, I64] = {}


def _zeros(n: int) -> I64:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = np.zeros(n, dtype=np.int64)
    return z


@dataclass
class SimResult:
    """What a run produced: per-request outcomes and the pools' counters."""

    arrival: npt.NDArray[np.float64]
    latency_ms: npt.NDArray[np.float64]  # NaN: shed or unanswered
    worker: I64
    cached: I64
    computed: I64
    emb_hits: I64
    emb_misses: I64
    shed: int
    kv_hits: int
    kv_misses: int
    critical_refill_bytes: int
    prefetch_bytes: int
    chunks_moved: int
    busy_ms: list[float]  # per worker, over the whole run
    end_s: float  # when the last event ran
    timeline: WorkerTimeline

    @classmethod
    def of(cls, sim: Simulation) -> SimResult:
        r = sim.records
        counters = [w.pool.counters for w in sim.workers]
        return cls(
            arrival=r.view("arrival").copy(),
            latency_ms=r.view("latency_ms").copy(),
            worker=r.view("worker").copy(),
            cached=r.view("cached").copy(),
            computed=r.view("computed").copy(),
            emb_hits=r.view("emb_hits").copy(),
            emb_misses=r.view("emb_misses").copy(),
            shed=sim.shed,
            kv_hits=sum(c.kv_hits for c in counters),
            kv_misses=sum(c.kv_misses for c in counters),
            critical_refill_bytes=sum(c.critical_refill_bytes for c in counters),
            prefetch_bytes=sum(c.prefetch_bytes for c in counters),
            chunks_moved=sum(c.chunks_moved for c in counters),
            busy_ms=[w.busy_ms for w in sim.workers],
            end_s=sim.now,
            timeline=sim.timeline,
        )

    def summary(self, slo_ms: float, *, since: float = 0.0) -> dict[str, float]:
        """The report's keys over requests that arrived at ``since`` or later (a warm-up left out)."""
        keep = self.arrival >= since
        lat = self.latency_ms[keep]
        answered = lat[~np.isnan(lat)]
        n = int(keep.sum())
        hits, misses = int(self.emb_hits[keep].sum()), int(self.emb_misses[keep].sum())
        span = float(self.arrival[keep].max() - self.arrival[keep].min()) if n > 1 else 0.0
        return {
            "requests": n,
            "shed": n - len(answered),
            "p50_ms": float(np.percentile(answered, 50)) if len(answered) else math.nan,
            "p99_ms": float(np.percentile(answered, 99)) if len(answered) else math.nan,
            "slo_satisfaction": float((answered <= slo_ms).sum() / n) if n else math.nan,
            "throughput_rps": len(answered) / span if span > 0 else math.nan,
            "emb_hit_rate": hits / (hits + misses) if hits + misses else math.nan,
            "kv_hit_rate": float((self.cached[keep] > 0).mean()) if n else math.nan,
            "critical_refill_bytes": self.critical_refill_bytes,
            # the model threads' busy share over the whole run (warm-up included): the load's level
            "utilisation": sum(self.busy_ms) / len(self.busy_ms) / 1e3 / self.end_s
            if self.end_s > 0
            else math.nan,
        }
