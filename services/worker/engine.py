"""The worker's engine: HSTU + the partitioned pool, driven by one model thread.

Everything that touches the pool (bookkeeping and bytes) runs on that thread, so the pure core needs no
locks: requests, reallocation ticks, prefetch installs and digest snapshots are serialised there, and ticks
run *between* requests. The asyncio shell talks to it through `submit()` (requests) and `call()` (control),
both thread-safe and non-blocking, so the event loop never waits on the model.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import structlog
import torch

from services.worker.core.costfit import CostEstimate, CostFitter
from services.worker.core.geometry import PoolGeometry
from services.worker.core.pool import Pool, RefillMode, ResidencyDelta, ResidencySnapshot
from services.worker.errors import DeadlineExceeded, Draining, InternalError, WorkerError
from services.worker.hstu import HSTU, HSTUConfig
from services.worker.storage import HostEmbeddingTable, HostLink, LinkSpec, PoolStorage, PrefetchChannel
from services.worker.validation import PreparedRequest, RequestLimits

log = structlog.get_logger("onepool.worker.engine")

R = TypeVar("R")
SERVICE_EWMA = 0.1  # weight of the newest sample in `Engine.service_ms` (about the last 10-20 requests)


def ewma(current: float, sample: float, weight: float) -> float:
    """An exponentially weighted mean; the first sample (current 0: none yet) is taken as it is."""
    return sample if current == 0.0 else weight * sample + (1.0 - weight) * current


@dataclass(frozen=True)
class EngineConfig:
    """Plain numbers; the service builds this from its settings."""

    model: HSTUConfig
    num_items: int
    budget_bytes: int
    chunk_bytes: int
    page_tokens: int
    alpha: float
    max_chunks_per_tick: int = 2
    tick_s: float = 0.010
    tick_defer_s: float = 0.100  # longest a due tick waits for an idle moment
    refill_mode: RefillMode = RefillMode.INCREMENTAL
    prefetch_bytes_per_tick: int = 64 * 1024
    link: LinkSpec = field(default_factory=LinkSpec)
    device: str = "cpu"
    seed: int = 0
    checkpoint: str | None = None
    max_candidates: int = 512
    # Prior of the cost fit, used until requests teach it better (rough CPU figures for the tiny model).
    cost_prior: CostEstimate = field(
        default_factory=lambda: CostEstimate(
            fixed_ms=1.0,
            ms_per_new_token=0.01,
            ms_per_cached_token=0.001,
            ms_per_candidate=0.01,
            ms_per_emb_miss=0.001,
            samples=0,
        )
    )


@dataclass(frozen=True)
class ServeResult:
    items: list[int]
    scores: list[float]
    cached_tokens: int
    computed_tokens: int
    emb_hits: int
    emb_misses: int
    queue_ms: float
    compute_ms: float


@dataclass
class Job:
    """One request travelling to the model thread; `done` is called there with the result or an error."""

    request: PreparedRequest
    deadline: float  # time.perf_counter() value after which the model must not start
    done: Callable[[ServeResult | WorkerError], None]
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass(frozen=True)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


_PRIO_CALL, _PRIO_JOB, _PRIO_STOP = 0, 1, 2


def _finish(job: Job, result: ServeResult | WorkerError) -> None:
    """Hand the result over; a failing callback (e.g. its event loop is gone) must not kill the thread."""
    try:
        job.done(result)
    except Exception:
        log.exception("could not deliver a result", request_id=job.request.request_id)


def _request(
    user: str, history: np.ndarray, timestamps: np.ndarray, candidates: np.ndarray
) -> PreparedRequest:
    return PreparedRequest(
        request_id=user, user_id=user, history=history, timestamps=timestamps, candidates=candidates, k=1
    )


class PrefixHasher:
    """Hash of the first n history tokens (items and timestamps): what a KV entry's prefix is checked by."""

    def __init__(self, history: np.ndarray, timestamps: np.ndarray) -> None:
        self._history = history
        self._timestamps = timestamps

    def __call__(self, n: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(self._history[:n].tobytes())
        h.update(self._timestamps[:n].tobytes())
        return h.digest()


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model, self.model_source = HSTU.create(
            cfg.model, checkpoint=cfg.checkpoint, seed=cfg.seed, device=self.device
        )
        emb_entry_bytes = PoolStorage.emb_entry_bytes_for(cfg.model.item_dim)
        kv_page_bytes = PoolStorage.kv_page_bytes_for(cfg.model.n_layers, cfg.page_tokens, cfg.model.kv_width)
        usable = (cfg.budget_bytes // cfg.chunk_bytes) * cfg.chunk_bytes
        self.geometry = PoolGeometry(
            budget_bytes=usable,
            chunk_bytes=cfg.chunk_bytes,
            emb_entry_bytes=emb_entry_bytes,
            kv_page_bytes=kv_page_bytes,
            kv_page_tokens=cfg.page_tokens,
        )
        self.pool = Pool(
            self.geometry,
            alpha=cfg.alpha,
            max_chunks_per_tick=cfg.max_chunks_per_tick,
            refill_mode=cfg.refill_mode,
        )
        self.storage = PoolStorage(
            budget_bytes=usable,
            emb_dim=cfg.model.item_dim,
            n_layers=cfg.model.n_layers,
            page_tokens=cfg.page_tokens,
            kv_width=cfg.model.kv_width,
            device=self.device,
        )
        self.table = HostEmbeddingTable(
            cfg.num_items, cfg.model.item_dim, seed=cfg.seed, pin=self.device.type == "cuda"
        )
        self.link = HostLink(self.table, self.device, cfg.link)
        self._prefetch = (
            PrefetchChannel(self.link)
            if cfg.refill_mode == RefillMode.INCREMENTAL and cfg.prefetch_bytes_per_tick > 0
            else None
        )
        self.limits = RequestLimits(
            num_items=cfg.num_items, max_history=cfg.model.max_history, max_candidates=cfg.max_candidates
        )
        self._costs = CostFitter(cfg.cost_prior)
        # Control calls (digests, alpha targets) go before queued requests: a loaded worker must still
        # report on time. Entries: (priority, sequence, payload); the sequence keeps FIFO within a class.
        self._queue: queue.PriorityQueue[tuple[int, int, Job | _Call | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._accepting = True
        self._accept_lock = threading.Lock()
        self._jobs_queued = 0
        self._thread: threading.Thread | None = None
        self._next_tick = 0.0
        self.ticks = 0
        self.tick_seconds = 0.0  # model-thread time spent in ticks (reallocation, refill, prefetch installs)
        # What each queued request costs the model thread, as an EWMA in ms: while requests wait, the time
        # between two completions (everything the thread does per request: the model, the bookkeeping,
        # waits for the GIL); for a request that found the thread idle, its own start to end.
        self.service_ms = 0.0
        self._last_job_end = -math.inf

    def warm_up(self) -> None:
        """Before serving: serve a few made-up requests end to end, then start from an empty pool.

        The first real request then does not pay for lazy initialisation, and the cost fit (which the
        router trusts) starts from measurements of this model on this device, taken the way requests are
        timed, with shapes that tell new tokens, cached tokens and candidates apart. Fitted from a handful
        of real requests only, workers' estimates differ by more noise than a short KV prefix is worth."""
        rng = np.random.default_rng(0)
        limit = self.cfg.model.max_history
        shapes = [(16, 0, 8), (128, 0, 8), (128, 112, 8), (16, 0, 64), (128, 112, 64)]
        for i, (want_len, want_cached, cands) in enumerate(shapes):
            length = min(want_len, limit)
            cached = min(want_cached, length - 1)
            history = rng.integers(0, self.cfg.num_items, length).astype(np.int64)
            timestamps = np.arange(length, dtype=np.int64)
            candidates = rng.integers(0, self.cfg.num_items, cands).astype(np.int64)
            for repeat in range(2):
                user = f"warm-up-{i}-{repeat}"
                if cached:
                    self.serve(_request(user, history[:cached], timestamps[:cached], candidates))
                self.serve(_request(user, history, timestamps, candidates))
        # What warm-up put in the caches is made up: start serving from an empty pool (same split).
        self.pool = Pool(
            self.geometry,
            alpha=self.pool.target_alpha,
            max_chunks_per_tick=self.cfg.max_chunks_per_tick,
            refill_mode=self.cfg.refill_mode,
        )

    # ---------------------------------------------------------------------------------------------------
    # Thread-safe API for the shell.
    # ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="onepool-model", daemon=False)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Answer what is queued, stop the thread and release the prefetch side channel. Idempotent.

        Work submitted after this fails at once (`Draining` for jobs, RuntimeError for calls) instead of
        waiting for a thread that is gone.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._put(_PRIO_STOP, None)
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("model thread did not stop in time", timeout_s=timeout_s)
        else:
            with self._accept_lock:
                self._accepting = False
            self._fail_queued()
        if self._prefetch is not None:
            self._prefetch.close()

    def submit(self, job: Job) -> None:
        with self._accept_lock:
            if self._accepting:
                self._jobs_queued += 1
                self._put(_PRIO_JOB, job)
                return
        _finish(job, Draining())

    def call(self, fn: Callable[[], R]) -> Future[R]:
        """Run `fn` on the model thread between requests, before queued requests; returns its future."""
        fut: Future[R] = Future()
        with self._accept_lock:
            if self._accepting:
                self._put(_PRIO_CALL, _Call(fn, fut))
                return fut
        fut.set_exception(RuntimeError("the engine has stopped"))
        return fut

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model thread."""
        return self._jobs_queued

    def _job_dequeued(self) -> None:
        with self._accept_lock:
            self._jobs_queued -= 1

    def _put(self, priority: int, item: Job | _Call | None) -> None:
        self._queue.put((priority, next(self._seq), item))

    # ---------------------------------------------------------------------------------------------------
    # Model-thread side. Everything below runs on the model thread (or in tests/benchmarks that own it).
    # ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        self._next_tick = time.perf_counter()
        while True:
            due_in = self._next_tick - time.perf_counter()
            try:
                entry = self._queue.get(timeout=due_in) if due_in > 0 else self._queue.get_nowait()
            except queue.Empty:
                entry = None
            # Ticks go into idle gaps: a due tick waits while requests are queued, unless it has waited
            # `tick_defer_s` already (so that a saturated worker still reaches its target).
            overdue = time.perf_counter() - self._next_tick
            if overdue >= 0 and (entry is None or overdue >= self.cfg.tick_defer_s):
                self._safe_tick()
                self._next_tick = time.perf_counter() + self.cfg.tick_s
            if entry is None:
                continue
            priority, _, item = entry
            if priority == _PRIO_STOP:
                # The stop marker sorts after every job queued before it; refuse new work, then answer
                # whatever slipped in meanwhile.
                with self._accept_lock:
                    self._accepting = False
                self._fail_queued()
                return
            if isinstance(item, _Call):
                self._run_call(item)
            elif isinstance(item, Job):
                self._job_dequeued()
                self._run_job(item)

    def _fail_queued(self) -> None:
        while True:
            try:
                _, _, item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(RuntimeError("the engine has stopped"))
            elif isinstance(item, Job):
                self._job_dequeued()
                _finish(item, Draining())

    @staticmethod
    def _run_call(call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # handed to the caller, who decides
            call.future.set_exception(exc)

    def _run_job(self, job: Job) -> None:
        if job.cancelled:
            return
        start = time.perf_counter()
        if start > job.deadline:
            _finish(job, DeadlineExceeded((start - job.enqueued) * 1e3, (job.deadline - job.enqueued) * 1e3))
            return
        try:
            result: ServeResult | WorkerError = self.serve(job.request, queue_ms=(start - job.enqueued) * 1e3)
        except WorkerError as exc:
            result = exc
        except Exception as exc:
            log.exception("inference failed", request_id=job.request.request_id)
            result = InternalError(f"{type(exc).__name__}: {exc}")
        _finish(job, result)
        end = time.perf_counter()
        # it waited for the previous one: the whole interval since that one ended was spent on it
        sample = end - (self._last_job_end if self._last_job_end >= job.enqueued else start)
        self._last_job_end = end
        self.service_ms = ewma(self.service_ms, sample * 1e3, SERVICE_EWMA)

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:
            log.exception("reallocation tick failed")

    def tick(self) -> None:
        """One reallocation step plus prefetch housekeeping. Runs between requests."""
        started = time.perf_counter()
        try:
            self._tick()
        finally:
            self.ticks += 1
            self.tick_seconds += time.perf_counter() - started

    def _tick(self) -> None:
        plan = self.pool.tick()
        if plan.emb_relocations:
            self.storage.copy_emb([(r.src, r.dst) for r in plan.emb_relocations])
        if plan.kv_relocations:
            self.storage.copy_kv([(r.src, r.dst) for r in plan.kv_relocations])
        if len(plan.refill):
            # Naive mode: a synchronous bulk refill of the grown region, in front of the next request.
            rows = self.link.fetch(torch.from_numpy(plan.refill.items))
            self.storage.write_emb(torch.from_numpy(plan.refill.slots), rows)
        if self._prefetch is not None:
            self._install_prefetched()
            if not self._prefetch.busy:
                wanted = self.pool.prefetch_plan(self.cfg.prefetch_bytes_per_tick)
                if len(wanted):
                    self._prefetch.submit(wanted.tolist())

    def _install_prefetched(self) -> None:
        assert self._prefetch is not None
        for items, rows in self._prefetch.poll():
            placed = self.pool.install_prefetched(items)
            if not len(placed):
                continue
            picks = torch.from_numpy(placed.positions).to(rows.device)
            self.storage.write_emb(torch.from_numpy(placed.slots), rows.index_select(0, picks))

    def serve(self, req: PreparedRequest, *, queue_ms: float = 0.0) -> ServeResult:
        """Rank one request's candidates. Model thread only."""
        t0 = time.perf_counter()
        n = int(req.history.shape[0])
        hasher = PrefixHasher(req.history, req.timestamps)
        hit = self.pool.kv_lookup(req.user_id, n, hasher)
        cached = hit.cached_len
        new_items = req.history[cached:]
        n_new = int(new_items.shape[0])

        # Embeddings of the new history tokens and the candidates: hot cache first, host link for misses.
        wanted = np.concatenate([new_items, req.candidates])
        unique, inverse = np.unique(wanted, return_inverse=True)
        emb, misses = self.embeddings(unique.tolist())
        tokens = emb.index_select(0, torch.from_numpy(inverse.astype(np.int64)).to(emb.device))
        hist_emb, cand_emb = tokens[:n_new], tokens[n_new:]

        past_k: list[torch.Tensor] | None = None
        past_v: list[torch.Tensor] | None = None
        if cached:
            past_k, past_v = self.storage.read_kv(hit.pages, cached)
        ts = torch.from_numpy(req.timestamps).to(self.device)
        out = self.model(hist_emb, ts, cached, cand_emb, past_k, past_v)

        if n_new:
            commit = self.pool.kv_commit(req.user_id, n, hasher(n))
            if commit is not None:
                if commit.write_from != cached:
                    raise InternalError(f"KV commit writes from {commit.write_from}, expected {cached}")
                self.storage.write_kv(commit.pages, cached, out.new_k, out.new_v)

        scores = out.scores
        top = torch.topk(scores, req.k)
        items = req.candidates[top.indices.cpu().numpy()].tolist()
        top_scores = top.values.float().cpu().tolist()
        compute_ms = (time.perf_counter() - t0) * 1e3
        self._costs.observe(
            new_tokens=n_new,
            cached_tokens=cached,
            candidates=int(req.candidates.shape[0]),
            emb_misses=misses,
            ms=compute_ms,
        )
        return ServeResult(
            items=items,
            scores=top_scores,
            cached_tokens=cached,
            computed_tokens=n_new + int(req.candidates.shape[0]),
            emb_hits=int(unique.shape[0]) - misses,
            emb_misses=misses,
            queue_ms=queue_ms,
            compute_ms=compute_ms,
        )

    def embeddings(self, items: list[int]) -> tuple[torch.Tensor, int]:
        """Rows for unique `items` and how many missed the hot cache (misses are fetched and offered to
        the cache). Model thread only."""
        lookup = self.pool.emb_lookup(items)
        rows = torch.empty((len(items), self.cfg.model.item_dim), dtype=torch.float32, device=self.device)
        if lookup.hits:
            pos = torch.from_numpy(lookup.hit_positions).to(self.device)
            rows[pos] = self.storage.read_emb(torch.from_numpy(lookup.hit_slots))
        if lookup.misses:
            fetched = self.link.fetch(torch.from_numpy(lookup.miss_items))
            rows[torch.from_numpy(lookup.miss_positions).to(self.device)] = fetched
            # Admission runs after the hit rows were read: a victim may be one of this request's hits.
            # Handing over the lookup's own miss array lets the pool reuse the estimates it computed.
            placed = self.pool.emb_admit(lookup.miss_items)
            if len(placed):
                picks = torch.from_numpy(placed.positions).to(fetched.device)
                self.storage.write_emb(torch.from_numpy(placed.slots), fetched.index_select(0, picks))
        return rows, lookup.misses

    # Digest material (model thread).
    def drain_deltas(self) -> ResidencyDelta:
        return self.pool.drain_deltas()

    def snapshot(self) -> ResidencySnapshot:
        return self.pool.snapshot()

    def cost_estimate(self) -> CostEstimate:
        return self._costs.estimate()
