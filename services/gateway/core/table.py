"""The router's per-view worker table: every routable worker's figures as arrays, built once per view version.

Index i is the worker's position in ``RoutingView.routable_workers()`` (a worker listed twice counts once,
its first record). What is here:

- the cost coefficients of each worker (``fixed``, ``mnew``, ``mcand``, ``mcached_minus_new``, ``miss``) and
  the queue terms of the cost model (``ahead``, ``q0 = ahead * service_ms``, ``a0 = ahead`` where the service
  time is unknown; ``cost.py`` says how they combine);
- the overload guard's inputs: each worker's own queue limit (``limit``; inf: none reported) and whether it
  is full (``over``, ``n_over``);
- the EMB bit of each worker (``bitlist``, ``bitidx``) and the width of the bit matrix (``bit_cols``) that
  ``emb_misses.py`` counts over;
- the round-robin order (worker ids sorted) and the no-KV compute of the last request shape (``full``; its
  candidate part ``fixed + mcand * K`` of the last K: ``cand_part``).

The router builds a table when the view's ``version`` changes (an unversioned view: on every call) and keeps
its load-derived arrays current between versions: ``set_own`` updates one worker after each of this
gateway's dispatches and answers (queue aging: an answered request counts one off the view's queue depth and
in-flight count for that worker, not below 0), so ``route()`` never rebuilds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from services.gateway.core.cost import service_ms
from services.gateway.core.routing_view import RoutingView
from shared.schemas import WorkerState

__all__ = ["WorkerTable"]


class WorkerTable:
    """Per-worker arrays for one view version (index i = position in routable_workers()).

    The load-derived arrays (own in-flight, ahead, queue terms, overload flags) are kept current by the
    router's on_dispatch/on_done through ``set_own`` with O(1) scalar updates, so route() never rebuilds
    them.
    """

    __slots__ = (
        "a0",
        "ahead",
        "any_without_bit",
        "bit_cols",
        "bit_identity",
        "bitidx",
        "bitlist",
        "cand_k",
        "cand_part",
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
        svc = service_ms(cols[10], cols[7], cols[6])
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
        self.cand_k = -1
        self.cand_part = self.zeros

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
