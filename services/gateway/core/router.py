"""The gateway's routing decision: rank every routable worker for one request (pure, no I/O).

The router scores each routable worker with the cost model and orders them, best first; the gateway tries
them in that order. The pieces, each a module of this package:

- ``routing_view.py``: ``RoutingView``, what the router reads of the cluster;
- ``cost.py``: the cost model, estimated milliseconds per worker (queue + compute + EMB misses);
- ``table.py``: ``WorkerTable``, each worker's figures as arrays, built once per view version;
- ``emb_misses.py``: ``EmbMissCounter``, how many needed items each worker's EMB lacks;
- here: the policies, the guards, the order and what the caller gets back (``RouteDecision``), with why
  the first-ranked worker came first (``route_reason``: ``single``, ``tie``, ``kv``, ``compute``, ``emb``,
  ``load`` or ``override``).

The names callers use (``RoutingView`` included) are importable from here.

- Hard overload guard: a worker with ``max(view in_flight, own in-flight) >= max_queue``, the limit it
  reports itself on its in_flight (queued + running; ``LoadInfo.max_queue``; 0: none known), is *full*:
  ranked after every other worker (still ranked, by cost among the full ones), whatever the policy. When
  every routable worker is full, ``route`` raises ``Saturated``: the gateway sheds the request at its door
  instead of sending it to a worker that would refuse it.
- Budget: ``route(..., budget_ms=B)`` raises ``Saturated`` when even the cheapest worker that is neither
  full nor demoted (the first-ranked when all are) has an estimate over B (round-robin's turn is skipped
  for a worker over B): under overload queues grow until the estimate passes the budget, and from then on
  the excess is refused at once instead of being queued to time out (which would also waste the worker's
  time).
- Demotion: a worker that failed to answer (no responders, timeout: ``on_failure``) is ranked after every
  healthy and every full worker for a back-off that starts at ``DEMOTE_BASE_S`` and doubles on each further
  failure up to ``DEMOTE_MAX_S``; an answer (``on_success``) ends it. The gateway learns of a dead worker
  from its own attempts at once, without waiting for cachestate to fence it. A demoted worker is still
  tried, last: when every worker is demoted, the best of them is still the best there is.

Policies are variants of the one cost model:
    JOINT         queue + compute + emb
    KV            queue + compute                  (EMB not evaluated: emb_ms = emb_misses = 0)
    EMB           queue + compute with cached = 0 + emb
    LEAST_LOADED  queue                            (compute/emb not scored: 0)
    ROUND_ROBIN   the next worker in rotation (workers in worker-id order) first, the rest by queue_ms
A ScoreBreakdown reports what the policy scored (e.g. EMB reports cached_tokens = 0).

Tie rule: workers are ordered by ``total_ms * (1 + 0.01 * u) + 1e-9 ms * u``, one ``u ~ U[0, 1)`` per
worker from the seeded generator. Equal costs are ordered uniformly at random; costs ``a < b`` keep their
order whenever ``b >= 1.01 * a + 1e-9 ms`` and may swap when closer (the closer, the likelier): costs
within 1% are ties. Randomising near-ties spreads gateways that share the same (stale) view.

Predict-on-route: ``on_dispatch`` remembers (user -> worker, len(history), time) for ``predict_ttl_s``
(LRU-bounded by ``max_predictions``); a later request of that user with a history at least that long
treats the worker as holding that prefix (``predicted`` in the breakdown), so a burst of one user sticks to
one worker before any digest confirms it, until its queue outweighs the saved compute.

Performance: the per-worker table is rebuilt only when the view's ``version`` changes (an unversioned view:
on every call); the EMB misses of all workers come from one pass (``emb_misses.py``); breakdowns are built
lazily (``RankedScores``), since routing usually reads one or two.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, overload

import numpy as np
import numpy.typing as npt

from services.gateway.core.cost import compute_ms, emb_ms, no_kv_compute_ms, queue_ms
from services.gateway.core.emb_misses import EmbMissCounter
from services.gateway.core.routing_view import RoutingView
from services.gateway.core.table import WorkerTable
from shared.errors import ErrorKind, OnepoolError

__all__ = [
    "DEMOTE_BASE_S",
    "DEMOTE_MAX_S",
    "NoWorkers",
    "Policy",
    "RankedScores",
    "RouteDecision",
    "RouteReason",
    "RouteRequest",
    "Router",
    "RoutingView",
    "Saturated",
    "ScoreBreakdown",
    "route_reason",
]

F64 = npt.NDArray[np.float64]

TIE_ABS_MS: Final = 1e-9
TIE_REL: Final = 0.01
OVERLOAD_PENALTY_MS: Final = 1e15  # added to the sort key of a full worker: ranked after the others
DEMOTED_PENALTY_MS: Final = 2e15  # added to the sort key of a demoted worker: ranked after full ones too
# Demotion back-off: long enough that a burst of requests does not each pay a dead worker's timeout, short
# enough that a worker back from a pause (GC, SIGSTOP, a slow start) is tried again within seconds.
DEMOTE_BASE_S: Final = 0.25
DEMOTE_MAX_S: Final = 8.0
_U_BATCH: Final = 256  # tie-break draws per call of the generator


class NoWorkers(OnepoolError):
    """No worker is routable (none live, or all draining): retry later."""

    code = "no_workers"
    kind = ErrorKind.RETRY

    def __init__(self, message: str = "no routable worker") -> None:
        super().__init__(message)


class Saturated(NoWorkers):
    """Every routable worker is at the queue limit it reports, or even the best one would not answer within
    the request's budget: shed the request now, retry later."""

    code = "overloaded"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class Policy(StrEnum):
    JOINT = "joint"
    KV = "kv"
    EMB = "emb"
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


@dataclass(frozen=True)
class RouteRequest:
    user_id: str
    history: Sequence[int] | npt.NDArray[np.integer[Any]]  # an int64 array is fastest
    candidates: Sequence[int] | npt.NDArray[np.integer[Any]]


@dataclass(frozen=True)
class ScoreBreakdown:
    worker_id: str
    total_ms: float
    queue_ms: float
    compute_ms: float
    emb_ms: float
    cached_tokens: int
    new_tokens: int
    emb_misses: int
    in_flight: int  # work ahead: max(view queue_depth, this gateway's own in-flight count)
    predicted: bool  # cached_tokens came from predict-on-route, not (yet) from the view


class RouteReason(StrEnum):
    """Why the first-ranked worker came first (``route_reason``): a label of a metric, kept to a handful."""

    SINGLE = "single"
    TIE = "tie"
    KV = "kv"
    COMPUTE = "compute"
    EMB = "emb"
    LOAD = "load"
    OVERRIDE = "override"


def route_reason(chosen: ScoreBreakdown, runner_up: ScoreBreakdown | None) -> RouteReason:
    """Why ``chosen`` was ranked before ``runner_up`` (the second-ranked worker; None when it was the only
    one), from their breakdowns alone.

    The rule, in order:

    - ``single``: no runner-up, nothing to choose between;
    - ``tie``: their totals are within the router's tie band (the larger below ``1.01 x`` the smaller
      ``+ 1e-9 ms``: ``TIE_REL``, ``TIE_ABS_MS``): the random tie-break ordered them, not their costs;
    - ``override``: the chosen worker's total is the larger (beyond the band): it came first for another
      reason than its estimate: round-robin's turn, or a runner-up that is full or demoted (ranked after
      the others whatever it costs);
    - otherwise the chosen worker is cheaper, and its lead, ``runner_up.total_ms - chosen.total_ms``, is
      the sum of three advantages, ``runner_up.x - chosen.x`` for x in ``compute_ms``, ``emb_ms`` and
      ``queue_ms``. The largest names the reason (equal ones: the first in that order):

      - compute: ``kv`` when the chosen worker counts a longer prefix of the user's history as cached
        (``cached_tokens``, a predict-on-route prefix included): its KV spares the recomputation. A
        longer prefix also spares the EMB lookups of its items (misses are counted on the history past
        the prefix): up to one of the runner-up's misses per extra cached token, at the runner-up's cost
        per miss (``emb_ms / emb_misses``), of the EMB advantage is moved to the compute one. Without a
        longer prefix: ``compute``, the chosen worker's cost model is just faster for this request;
      - emb: ``emb``, fewer (or cheaper) EMB misses;
      - queue: ``load``, less work queued ahead.

    A term the policy does not score is 0 on both workers and names no reason: least-loaded and round-robin
    give ``single``, ``tie``, ``override`` or ``load`` only, and the EMB policy (no KV credit) never ``kv``.
    """
    if runner_up is None:
        return RouteReason.SINGLE
    a = chosen.total_ms
    b = runner_up.total_ms
    if abs(b - a) < TIE_REL * min(a, b) + TIE_ABS_MS:
        return RouteReason.TIE
    if not b > a:
        return RouteReason.OVERRIDE
    compute = runner_up.compute_ms - chosen.compute_ms
    emb = runner_up.emb_ms - chosen.emb_ms
    queue = runner_up.queue_ms - chosen.queue_ms
    extra = chosen.cached_tokens - runner_up.cached_tokens
    if extra > 0 and emb > 0.0 and runner_up.emb_misses > 0:
        spared = min(emb, extra * runner_up.emb_ms / runner_up.emb_misses)
        compute += spared
        emb -= spared
    if compute >= emb and compute >= queue:
        return RouteReason.KV if extra > 0 else RouteReason.COMPUTE
    return RouteReason.EMB if emb >= queue else RouteReason.LOAD


_new_object: Final = object.__new__
_set_attr: Final = object.__setattr__


class _Scores:
    """Per-call arrays (indexed like the worker table) a ranked list is built from, lazily."""

    __slots__ = (
        "cached",
        "compute",
        "emb",
        "ids",
        "inflight",
        "misses",
        "new",
        "predicted",
        "queue",
        "total",
    )

    def __init__(
        self,
        *,
        ids: list[str],
        total: F64,
        queue: F64,
        compute: F64,
        emb: F64,
        cached: dict[int, int],
        misses: F64 | None,
        inflight: F64,
        new_full: int,
        predicted: int,
    ) -> None:
        self.ids = ids
        self.total = total
        self.queue = queue
        self.compute = compute
        self.emb = emb
        self.cached = cached
        self.misses = misses
        self.inflight = inflight
        self.new = new_full
        self.predicted = predicted

    def make(self, i: int) -> ScoreBreakdown:
        cached = self.cached.get(i, 0)
        # the frozen dataclass's generated __init__ sets each field through object.__setattr__ (~1 us);
        # filling the instance dict directly builds the same object (equality, repr, asdict) in half that
        sb: ScoreBreakdown = _new_object(ScoreBreakdown)
        _set_attr(
            sb,
            "__dict__",
            {
                "worker_id": self.ids[i],
                "total_ms": self.total.item(i),
                "queue_ms": self.queue.item(i),
                "compute_ms": self.compute.item(i),
                "emb_ms": self.emb.item(i),
                "cached_tokens": cached,
                "new_tokens": self.new - cached,
                "emb_misses": 0 if self.misses is None else round(self.misses.item(i)),
                "in_flight": round(self.inflight.item(i)),
                "predicted": i == self.predicted,
            },
        )
        return sb


class RankedScores(Sequence[ScoreBreakdown]):
    """The ranked breakdowns, best first, built on first access (routing usually reads one or two)."""

    __slots__ = ("_built", "_order", "_scores")

    def __init__(self, scores: _Scores, order: list[int]) -> None:
        self._scores = scores
        self._order = order
        self._built: list[ScoreBreakdown | None] = [None] * len(order)

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, index: int) -> ScoreBreakdown: ...
    @overload
    def __getitem__(self, index: slice) -> list[ScoreBreakdown]: ...
    def __getitem__(self, index: int | slice) -> ScoreBreakdown | list[ScoreBreakdown]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._order)))]
        sb = self._built[index]
        if sb is None:
            sb = self._scores.make(self._order[index])
            self._built[index] = sb
        return sb

    def __iter__(self) -> Iterator[ScoreBreakdown]:
        for i in range(len(self._order)):
            yield self[i]

    @property
    def worker_ids(self) -> list[str]:
        ids = self._scores.ids
        return [ids[i] for i in self._order]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RankedScores({list(self)!r})"


@dataclass(frozen=True)
class RouteDecision:
    """Every routable worker exactly once, best first: the gateway tries them in order on failure.

    ``ranked`` is a read-only sequence (a RankedScores from the router: lazily built breakdowns).
    """

    ranked: Sequence[ScoreBreakdown]
    policy: Policy

    @property
    def best(self) -> ScoreBreakdown:
        return self.ranked[0]

    @property
    def runner_up(self) -> ScoreBreakdown | None:
        return self.ranked[1] if len(self.ranked) > 1 else None

    @property
    def reason(self) -> RouteReason:
        """Why the best worker came first (``route_reason`` of it and the runner-up)."""
        return route_reason(self.best, self.runner_up)

    @property
    def worker_ids(self) -> list[str]:
        """The ranked worker ids, without building every breakdown."""
        if isinstance(self.ranked, RankedScores):
            return self.ranked.worker_ids
        return [sb.worker_id for sb in self.ranked]


class Router:
    """Scores every routable worker for a request; remembers its own dispatches (in-flight, predictions).

    Not thread-safe: one router per event loop.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        rng_seed: int | None = None,
        predict_ttl_s: float = 5.0,
        max_predictions: int = 100_000,
    ) -> None:
        if predict_ttl_s < 0:
            raise ValueError("predict_ttl_s must be >= 0")
        if max_predictions < 0:
            raise ValueError("max_predictions must be >= 0")
        self.policy = Policy(policy)
        self.predict_ttl_s = float(predict_ttl_s)
        self.max_predictions = int(max_predictions)
        self._rng = np.random.default_rng(rng_seed)
        self._own: dict[str, int] = {}
        # worker -> (demoted until, current back-off); entries outlive their `until` to remember the back-off
        self._demoted: dict[str, tuple[float, float]] = {}
        # user -> (worker_id, history length, dispatch time); insertion order = dispatch order (LRU)
        self._predictions: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self._table: WorkerTable | None = None
        self._rr = 0
        # the tie-break draws, taken n at a time from batches of the seeded generator's stream
        self._ubuf: F64 = np.empty(0, dtype=np.float64)
        self._upos = 0
        self._emb_misses = EmbMissCounter()

    # ------------------------------------------------------------------------------------------------
    # bookkeeping
    # ------------------------------------------------------------------------------------------------
    def in_flight(self, worker_id: str) -> int:
        """This gateway's requests sent to the worker and not yet done."""
        return self._own.get(worker_id, 0)

    @property
    def predictions(self) -> int:
        """How many (user -> worker) predictions are remembered (expired ones may linger until swept)."""
        return len(self._predictions)

    def _set_own(self, worker_id: str, count: int, *, completed: bool = False) -> None:
        if count > 0:
            self._own[worker_id] = count
        else:
            self._own.pop(worker_id, None)
        t = self._table
        if t is not None and (i := t.index.get(worker_id)) is not None:
            t.set_own(i, float(count), completed=completed)

    def on_dispatch(self, worker_id: str, req: RouteRequest, now: float) -> None:
        self._set_own(worker_id, self._own.get(worker_id, 0) + 1)
        if self.max_predictions == 0:
            return
        preds = self._predictions
        preds[req.user_id] = (worker_id, len(req.history), now)
        preds.move_to_end(req.user_id)
        while len(preds) > self.max_predictions:
            preds.popitem(last=False)
        # sweep expired entries from the old end (amortised O(1): each entry is swept once)
        horizon = now - self.predict_ttl_s
        while preds:
            first = next(iter(preds.values()))
            if first[2] >= horizon:
                break
            preds.popitem(last=False)

    def on_done(self, worker_id: str, *, answered: bool = True) -> None:
        """One of ours to that worker is over; `answered`: the worker replied (its queue moved on), rather
        than the attempt timing out or finding nobody."""
        count = self._own.get(worker_id, 0)
        if count > 0:
            self._set_own(worker_id, count - 1, completed=answered)

    def on_failure(self, worker_id: str, now: float) -> float:
        """The worker did not answer (no responders, timeout): demote it; returns the back-off in seconds."""
        prev = self._demoted.get(worker_id)
        backoff = DEMOTE_BASE_S if prev is None else min(prev[1] * 2.0, DEMOTE_MAX_S)
        self._demoted[worker_id] = (now + backoff, backoff)
        return backoff

    def on_success(self, worker_id: str) -> None:
        """The worker answered: no longer demoted, and its next failure starts the back-off afresh."""
        if self._demoted:
            self._demoted.pop(worker_id, None)

    def demoted_until(self, worker_id: str) -> float | None:
        """When the worker's demotion ends (None: it was never demoted, or it answered since)."""
        entry = self._demoted.get(worker_id)
        return None if entry is None else entry[0]

    def forget_worker(self, worker_id: str) -> None:
        """The worker is gone (or restarted): drop its in-flight count, demotion and the predictions
        pointing at it."""
        self._own.pop(worker_id, None)
        self._demoted.pop(worker_id, None)
        stale = [u for u, p in self._predictions.items() if p[0] == worker_id]
        for u in stale:
            del self._predictions[u]
        t = self._table
        if t is not None and worker_id in t.index:
            self._table = None

    # ------------------------------------------------------------------------------------------------
    # routing
    # ------------------------------------------------------------------------------------------------
    def _table_for(self, view: RoutingView) -> WorkerTable:
        version = view.version
        t = self._table
        if version is not None and t is not None and t.view is view and t.version == version:
            return t
        t = WorkerTable(view, version, self._own)
        # without a version the arrays cannot be trusted past this call: rebuilt on the next one
        self._table = t if t.version is not None else None
        return t

    def _cached_prefixes(
        self, view: RoutingView, t: WorkerTable, req: RouteRequest, hist_len: int, now: float
    ) -> tuple[dict[int, int], int]:
        """worker index -> cached prefix length (> 0 only), and the index whose prefix was predicted."""
        out: dict[int, int] = {}
        index = t.index
        for wid, length in view.kv_workers(req.user_id).items():
            if 0 < length <= hist_len and (i := index.get(wid)) is not None:
                out[i] = length
        predicted = -1
        pred = self._predictions.get(req.user_id)
        if pred is not None:
            wid, n_prev, at = pred
            if now - at > self.predict_ttl_s:
                del self._predictions[req.user_id]
            elif 0 < n_prev <= hist_len and (i := index.get(wid)) is not None and n_prev > out.get(i, 0):
                out[i] = n_prev
                predicted = i
        return out, predicted

    def route(
        self, view: RoutingView, req: RouteRequest, now: float, *, budget_ms: float = math.inf
    ) -> RouteDecision:
        """Rank every routable worker for `req`. Raises NoWorkers when there is none, Saturated when every
        one is full or when the best estimate exceeds `budget_ms` (the wait the caller can afford: a request
        that would miss its deadline anyway is better refused now than queued)."""
        t = self._table_for(view)
        n = t.n
        if n == 0:
            raise NoWorkers()
        if t.n_over == n:
            raise Saturated(f"all {n} routable workers are at their queue limit")
        policy = self.policy
        hist_len = len(req.history)
        k = len(req.candidates)

        full = no_kv_compute_ms(t, hist_len, k)
        queue = queue_ms(t, full)
        if budget_ms < math.inf and (least := float(queue.min())) > budget_ms:
            # every worker's queue alone is over budget: refused before the costlier KV and EMB terms
            raise Saturated(
                f"the least busy worker has ~{least:.0f} ms queued, more than the {budget_ms:.0f} ms left"
            )

        cached: dict[int, int] = {}
        misses: F64 | None = None
        predicted = -1
        if policy is Policy.JOINT or policy is Policy.KV:
            cached, predicted = self._cached_prefixes(view, t, req, hist_len, now)
            compute = compute_ms(t, full, cached)
            total = queue + compute
            if policy is Policy.JOINT:
                misses = self._emb_misses.count(view, t, req.history, req.candidates, cached)
                emb = emb_ms(t, misses)
                total += emb
            else:
                emb = t.zeros
        elif policy is Policy.EMB:
            compute = full
            misses = self._emb_misses.count(view, t, req.history, req.candidates, cached)
            emb = emb_ms(t, misses)
            total = queue + compute
            total += emb
        else:  # LEAST_LOADED, ROUND_ROBIN: load only
            compute = emb = t.zeros
            total = queue

        # tie rule: order by total * (1 + TIE_REL * u) + TIE_ABS_MS * u, u ~ U[0, 1) per worker
        p = self._upos
        if p + n > len(self._ubuf):
            self._ubuf = self._rng.random(max(_U_BATCH, n))
            p = 0
        self._upos = p + n
        key = total * TIE_REL
        key += TIE_ABS_MS
        key *= self._ubuf[p : p + n]
        key += total
        if policy is Policy.ROUND_ROBIN:
            start = t.rr_order[self._rr % n]
            self._rr += 1
            if not t.over[start] and total.item(start) <= budget_ms:  # its turn, unless it is too busy
                key[start] = -math.inf
        if t.n_over:
            key[t.over] += OVERLOAD_PENALTY_MS
        if self._demoted:
            index = t.index
            for wid, (until, _) in self._demoted.items():
                if until > now and (d := index.get(wid)) is not None:
                    key[d] += DEMOTED_PENALTY_MS
        order: list[int] = key.argsort().tolist()
        if budget_ms < math.inf:
            # the cheapest worker that is neither full nor demoted decides (the first-ranked when all are)
            eligible = key < OVERLOAD_PENALTY_MS / 2
            best_ms = float(total[eligible].min()) if eligible.any() else total.item(order[0])
            if best_ms > budget_ms:
                raise Saturated(
                    f"the best worker would take ~{best_ms:.0f} ms, more than the {budget_ms:.0f} ms budget"
                )
        scores = _Scores(
            ids=t.ids,
            total=total,
            queue=queue,
            compute=compute,
            emb=emb,
            cached=cached,
            misses=misses,
            inflight=t.ahead.copy(),
            new_full=hist_len,
            predicted=predicted,
        )
        # the frozen dataclass filled directly, as ScoreBreakdown is in _Scores.make (~1 us less per call)
        decision: RouteDecision = _new_object(RouteDecision)
        _set_attr(decision, "__dict__", {"ranked": RankedScores(scores, order), "policy": policy})
        return decision
