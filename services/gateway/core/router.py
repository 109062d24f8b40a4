"""The gateway's routing core: pick a worker for one request by estimated milliseconds (pure, no I/O).

Every routable worker gets one score in one unit, estimated milliseconds, built from the worker's own
digest (no hand-tuned weights):

    total_ms   = queue_ms + compute_ms + emb_ms
    compute_ms = fixed + ms_per_new_token * new + ms_per_cached_token * cached + ms_per_candidate * K
    emb_ms     = ms_per_emb_miss * misses

- ``cached`` is the prefix of the user's history whose KV the worker holds: the view's covered length if it
  is <= len(history) (a longer one does not match this history: 0), raised by predict-on-route (below).
  ``new = len(history) - cached``.
- ``misses`` counts the distinct items the worker would look up that its EMB hot cache lacks: the unique
  items of ``history[cached:]`` together with the unique candidates (K = len(candidates), duplicates
  included, since every candidate is scored).
- ``queue_ms = ahead * service_ms`` (anti-herding):
    ahead      = max(view queue_depth, this gateway's own in-flight count to the worker)
    service_ms = ewma_service_ms                        if the worker reports it (model time per request),
                 else ewma_latency_ms / (1 + queue_depth)   if the worker reports a latency,
                 else the request's compute_ms on that worker with no KV credit (fixed + new-token cost of
                 the whole history + candidates).
  The view's ``queue_depth`` (requests waiting at the worker, from every gateway) lags by up to one digest;
  each of this gateway's requests answered by the worker since the view changed counts one off it (the queue
  has moved on by at least that much), so a queue that drains is seen draining before the next digest;
  its ``in_flight`` is not used because it also counts the request running when the digest was cut, often
  one of ours long finished, and that stale count flips users away from their KV. The own count is exact
  now but covers this gateway only: their maximum is a lower bound of the work ahead. The worker's
  ``ewma_service_ms`` is the service time itself. Without it, ``ewma_latency_ms`` (receipt-to-reply,
  queueing included) divided by ``1 + queue_depth`` stands for it (a FIFO arrival that found ``q`` waiting
  spends about ``(q + 1) * service``), but only in a steady state: when a long queue has just drained, the
  latency still remembers the queue while the depth does not, and the quotient overestimates the service
  time many times over (an admission rule built on it sheds everything until the next digest). The
  fallback uses the no-cache compute on purpose: requests ahead of us are other users', so this user's KV
  credit must not shrink the wait (that would herd a hot user's burst).
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

Policies are variants of this one scorer:
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

Performance: per-worker arrays (coefficients, loads, EMB bits) are rebuilt only when the view's
``version`` changes (see ``RoutingView``); an unversioned view has them rebuilt on every call. The EMB
misses of all workers come from one sort of history + candidates (each distinct item kept at its last
position), one ``emb_masks`` call on the distinct items, a 0/1 bit matrix (items x worker bits, one table
gather per mask byte) and one matrix-vector product for the per-bit counts; a worker with a cached prefix c
then counts its own bit over the items whose last position is >= c (one count per such worker).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, overload

import numpy as np
import numpy.typing as npt

from shared.errors import ErrorKind, OnepoolError
from shared.schemas import WorkerState

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

TIE_ABS_MS: Final = 1e-9
TIE_REL: Final = 0.01
OVERLOAD_PENALTY_MS: Final = 1e15  # added to the sort key of a full worker: ranked after the others
DEMOTED_PENALTY_MS: Final = 2e15  # added to the sort key of a demoted worker: ranked after full ones too
# Demotion back-off: long enough that a burst of requests does not each pay a dead worker's timeout, short
# enough that a worker back from a pause (GC, SIGSTOP, a slow start) is tried again within seconds.
DEMOTE_BASE_S: Final = 0.25
DEMOTE_MAX_S: Final = 8.0
_MASK64: Final = (1 << 64) - 1
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


class RoutingView(ABC):
    """What the router reads of the cluster (the gateway's replica of the routing view). Subclass it.

    Optional parts, with defaults:
    - ``version``: an int changed whenever ``routable_workers()`` (the set or any field) or ``worker_bit()``
      answers change: the router then reuses its per-worker arrays while it holds. None (the default): the
      arrays are rebuilt on every call.
    - ``emb_masks_array(items: NDArray[int64])``: the same answer as ``emb_masks``, as a uint64 array, for
      a view that keeps masks in numpy (the router asks only while every bit index is below 64): saves the
      list round trip (~10 us for 500 items). None (the default): not offered, the router asks
      ``emb_masks``.
    ``emb_masks`` may also return a numpy uint64 array instead of a list when every bit index is below 64.
    Keeping ``emb_masks`` fast matters: one Python dict lookup per item costs more than the rest of route().
    """

    version: int | None = None

    @abstractmethod
    def routable_workers(self) -> Sequence[WorkerState]:
        """Live, not draining workers."""

    @abstractmethod
    def kv_workers(self, user_id: str) -> Mapping[str, int]:
        """worker_id -> history length that worker's KV of this user covers."""

    @abstractmethod
    def worker_bit(self, worker_id: str) -> int | None:
        """Bit index of that worker in EMB masks (None: it has none yet, it holds nothing)."""

    @abstractmethod
    def emb_masks(self, items: Sequence[int]) -> Sequence[int] | npt.NDArray[np.uint64]:
        """Per item: bitmask of the workers whose EMB holds it (0 if none)."""

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        """The fast path of ``emb_masks`` (see the class docstring); None: not offered."""
        return None


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
    def worker_ids(self) -> list[str]:
        """The ranked worker ids, without building every breakdown."""
        if isinstance(self.ranked, RankedScores):
            return self.ranked.worker_ids
        return [sb.worker_id for sb in self.ranked]


class _Table:
    """Per-worker arrays for one view version (index i = position in routable_workers()).

    The load-derived arrays (own in-flight, ahead, queue terms, overload flags) are kept current by the
    router's on_dispatch/on_done with O(1) scalar updates, so route() never rebuilds them.
    """

    __slots__ = (
        "a0",
        "ahead",
        "any_without_bit",
        "bit_cols",
        "bit_identity",
        "bitidx",
        "bitlist",
        "fixed",
        "full",
        "full_key",
        "ids",
        "index",
        "limit",
        "mcached_minus_new",
        "mcand",
        "miss",
        "mnew",
        "n",
        "n_over",
        "no_ewma",
        "over",
        "own",
        "q0",
        "rr_order",
        "svc_known",
        "version",
        "view",
        "view_busy",
        "view_inflight",
        "zeros",
    )

    def __init__(self, view: RoutingView, version: int | None, own: Mapping[str, int]) -> None:
        self.view = view
        self.version = version
        ids: list[str] = []
        index: dict[str, int] = {}
        rows: list[WorkerState] = []
        for w in view.routable_workers():
            if w.worker_id not in index:  # a view listing a worker twice: the first record counts
                index[w.worker_id] = len(ids)
                ids.append(w.worker_id)
                rows.append(w)
        self.ids = ids
        self.index = index
        self.n = n = len(ids)
        # one pass over the records, then whole-array arithmetic (this runs on every call of an
        # unversioned view)
        m = np.array(
            [
                (
                    c.fixed_ms,
                    c.ms_per_new_token,
                    c.ms_per_candidate,
                    c.ms_per_cached_token,
                    c.ms_per_emb_miss,
                    ld.in_flight,
                    ld.queue_depth,
                    ld.ewma_latency_ms,
                    own.get(w.worker_id, 0),
                    ld.max_queue if ld.max_queue > 0 else math.inf,
                    ld.ewma_service_ms,
                )
                for w in rows
                for c, ld in ((w.cost, w.load),)
            ],
            dtype=np.float64,
        ).reshape(n, 11)
        cols = np.ascontiguousarray(m.T)
        self.fixed, self.mnew, self.mcand = cols[0], cols[1], cols[2]
        self.mcached_minus_new = (cols[3] - cols[1]).tolist()
        self.miss = cols[4]
        # service time per request: reported, else latency / (1 + depth), else 0 (then: own compute)
        svc = np.where(cols[10] > 0.0, cols[10], cols[7] / (1.0 + cols[6]))
        # What the view says is ahead: requests *waiting* at the worker (all gateways). Not its in_flight:
        # that also counts the request running when the digest was cut, often one of ours that has long
        # finished, and a stale "1 running" would be enough to flip a user away from the worker holding
        # its KV. Our own in-flight requests are counted exactly below.
        self.view_inflight: list[float] = cols[6].tolist()
        self.svc_known: list[float] = svc.tolist()
        self.no_ewma: list[float] = (svc <= 0.0).astype(np.float64).tolist()
        self.own: list[float] = cols[8].tolist()
        self.ahead = np.maximum(cols[6], cols[8])
        self.q0 = self.ahead * svc  # ahead * known service time
        self.a0 = self.ahead * (svc <= 0.0)  # ahead where the service time falls back to compute
        self.limit: list[float] = cols[9].tolist()  # each worker's own queue limit (inf: none reported)
        # Full: the worker's in_flight (queued + running, what its max_queue bounds) as the view reported it,
        # or our own in-flight count to it, whichever is more, at its limit.
        self.view_busy: list[float] = cols[5].tolist()
        self.over = np.maximum(cols[5], cols[8]) >= cols[9]
        self.n_over = int(np.count_nonzero(self.over))
        bits = [view.worker_bit(i) for i in ids]
        known = [b for b in bits if b is not None and b >= 0]
        top = max(known, default=0)
        self.bit_cols = 32 if top < 32 else 64 * (top // 64 + 1)
        # a worker with no bit reads column bit_cols, a zero column appended when some worker has none
        self.bitlist = [b if b is not None and b >= 0 else self.bit_cols for b in bits]
        self.bitidx = np.array(self.bitlist, dtype=np.intp)
        self.any_without_bit = any(b == self.bit_cols for b in self.bitlist)
        self.bit_identity = self.bitlist == list(range(self.bit_cols))  # worker i reads bit i, every bit
        self.rr_order = sorted(range(n), key=ids.__getitem__)
        self.zeros = np.zeros(n, dtype=np.float64)  # shared, never written
        # compute with no KV credit (fixed + new-token cost of the whole history + candidates) for the
        # last (history length, candidates) asked: shared, never written
        self.full_key = (-1, -1)
        self.full = self.zeros

    def set_own(self, i: int, own: float, *, completed: bool = False) -> None:
        """This gateway's in-flight count to worker i is now `own`; `completed`: one of its requests there
        was answered, so the queue the view reported has moved on by at least one."""
        self.own[i] = own
        if completed:
            if self.view_inflight[i] > 0:
                self.view_inflight[i] -= 1.0
            if self.view_busy[i] > 0:
                self.view_busy[i] -= 1.0
        ahead = max(self.view_inflight[i], own)
        self.ahead[i] = ahead
        self.q0[i] = ahead * self.svc_known[i]
        self.a0[i] = ahead * self.no_ewma[i]
        over = max(self.view_busy[i], own) >= self.limit[i]
        if over != self.over[i]:
            self.over[i] = over
            self.n_over += 1 if over else -1


def _as_int64(x: Sequence[int] | npt.NDArray[np.integer[Any]]) -> I64:
    out: I64 = np.asarray(x, dtype=np.int64)
    return out


# row v: the 8 bits of byte value v (little-endian bit order) as 0.0/1.0, the EMB bit matrix's building block
_BYTE_BITS: Final = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(
    np.float32
)


def _bit_matrix(masks: Sequence[int] | npt.NDArray[np.uint64], cols: int) -> npt.NDArray[np.float32]:
    """(U, cols) float32 0/1 matrix: column b = bit b of each item's mask (one table gather per byte)."""
    u = len(masks)
    if cols <= 64:
        if isinstance(masks, np.ndarray) and masks.dtype != np.object_:
            m = masks.astype(np.uint64, copy=False)
        else:
            try:
                m = np.array(masks, dtype=np.uint64)
            except OverflowError:  # bits >= 64 of workers that are not routable now
                m = np.array([int(x) & _MASK64 for x in masks], dtype=np.uint64)
        raw = m.astype("<u4") if cols == 32 else m.astype("<u8", copy=False)
    else:
        words = cols // 64
        raw = np.array(
            [[(int(x) >> (64 * k)) & _MASK64 for k in range(words)] for x in masks], dtype="<u8"
        ).reshape(u, words)
    out: npt.NDArray[np.float32] = _BYTE_BITS.take(raw.view(np.uint8).reshape(-1), axis=0).reshape(u, cols)
    return out


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
        self._table: _Table | None = None
        self._rr = 0
        # the tie-break draws, taken n at a time from batches of the seeded generator's stream
        self._ubuf: F64 = np.empty(0, dtype=np.float64)
        self._upos = 0
        self._arange: I64 = np.arange(1024, dtype=np.int64)
        self._ones_buf: npt.NDArray[np.float32] = np.ones(1024, dtype=np.float32)

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
    def _table_for(self, view: RoutingView) -> _Table:
        version = view.version
        t = self._table
        if version is not None and t is not None and t.view is view and t.version == version:
            return t
        t = _Table(view, version, self._own)
        # without a version the arrays cannot be trusted past this call: rebuilt on the next one
        self._table = t if t.version is not None else None
        return t

    def _cached_prefixes(
        self, view: RoutingView, t: _Table, req: RouteRequest, hist_len: int, now: float
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

    def _positions(self, n: int) -> I64:
        if len(self._arange) < n:
            self._arange = np.arange(max(n, 2 * len(self._arange)), dtype=np.int64)
        return self._arange[:n]

    def _ones(self, n: int) -> npt.NDArray[np.float32]:
        if len(self._ones_buf) < n:
            self._ones_buf = np.ones(max(n, 2 * len(self._ones_buf)), dtype=np.float32)
        return self._ones_buf[:n]

    def _emb_misses(self, view: RoutingView, t: _Table, req: RouteRequest, cached: Mapping[int, int]) -> F64:
        """Per worker: distinct needed items (history[cached:] + candidates) whose mask lacks its bit."""
        hist = _as_int64(req.history)
        cand = _as_int64(req.candidates)
        allv = np.concatenate((hist, cand)) if len(cand) else hist
        nv = len(allv)
        if nv == 0:
            return t.zeros
        # Each distinct item, represented by its last position in history + candidates: a worker whose
        # cached prefix is c needs exactly the items whose last position is >= c (candidates: always).
        # Sort (item, position) pairs packed in one int64 (SIMD sort, ~4x a stable argsort) when the ids
        # leave room for the position bits; the last of each run of equal items is its last position.
        shift = nv.bit_length()
        last = np.empty(nv, dtype=np.bool_)
        last[-1] = True
        if 0 <= int(np.bitwise_or.reduce(allv)) < 1 << (62 - shift):
            packed = allv << shift
            packed |= self._positions(nv)
            packed.sort()
            vals = packed >> shift
            np.not_equal(vals[1:], vals[:-1], out=last[:-1])
            reps = packed[last]
            reps &= (1 << shift) - 1
        else:  # negative or huge ids: the general (slower) way
            order = np.argsort(allv, kind="stable")
            s = allv[order]
            np.not_equal(s[1:], s[:-1], out=last[:-1])
            reps = order[last]
        reps.sort()  # the last positions of the distinct items, ascending
        items = allv[reps]
        u = len(items)
        cols = t.bit_cols
        fast = view.emb_masks_array(items) if cols <= 64 else None
        masks = fast if fast is not None else view.emb_masks(items.tolist())
        bits = _bit_matrix(masks, cols)
        hits = self._ones(u) @ bits  # per bit: how many distinct items hold it (exact in float32)
        if t.bit_identity:
            misses: F64 = np.subtract(float(u), hits, dtype=np.float64)
        else:
            if t.any_without_bit:
                hits = np.append(hits, np.float32(0.0))
            misses = np.subtract(float(u), hits[t.bitidx], dtype=np.float64)
        bitlist = t.bitlist
        for i, c in cached.items():
            # the items a worker with prefix c needs: those whose last position is >= c
            f = int(reps.searchsorted(c))
            b = bitlist[i]
            misses[i] = (u - f) - (int(np.count_nonzero(bits[f:, b])) if b < cols else 0)
        return misses

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

        if t.full_key == (hist_len, k):
            full = t.full  # never written: a cached-prefix compute is a copy
        else:
            full = t.mcand * float(k)  # compute with no KV credit
            full += t.fixed
            full += t.mnew * float(hist_len)
            t.full_key = (hist_len, k)
            t.full = full
        queue = t.a0 * full
        queue += t.q0
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
            if cached:
                compute = full.copy()
                mcm = t.mcached_minus_new
                for i, c in cached.items():
                    compute[i] += mcm[i] * c
            else:
                compute = full
            total = queue + compute
            if policy is Policy.JOINT:
                misses = self._emb_misses(view, t, req, cached)
                emb = t.miss * misses
                total += emb
            else:
                emb = t.zeros
        elif policy is Policy.EMB:
            compute = full
            misses = self._emb_misses(view, t, req, cached)
            emb = t.miss * misses
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
        order: list[int] = np.argsort(key).tolist()
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
        return RouteDecision(ranked=RankedScores(scores, order), policy=policy)
