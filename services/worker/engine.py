"""The worker's engine: HSTU + the partitioned pool, driven by one model thread.

Everything that touches the pool (bookkeeping and bytes) runs on that thread, so the pure core needs no
locks: batches of requests, reallocation ticks, prefetch installs and digest reports are serialised there,
and ticks run *between* batches. The asyncio shell talks to it through thread-safe, non-blocking named
methods (`submit`, `set_alpha_target`, `split_state`, `report`, `pause_until`, `check_pool`) that return
futures, so the event loop never waits on the model.

Batching: the model thread takes what is queued, up to `max_batch` requests of distinct users (it never
waits for more; a user's next queued request stays in the queue and leads the next batch), and serves
them together (`serve_batch`): one KV lookup per user, one EMB lookup, admission and host transfer for the
union of the batch's items, one HSTU pass, one KV commit per user, one answer each. Given a user twice
(`serve_batch` called directly), the second request is served in a later sub-batch, after the first's KV
is committed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import structlog
import torch

from services.worker.core.batch import BatchFormer, PrefixHasher, RoundCaches, RoundRequest, rounds
from services.worker.core.costfit import CostEstimate, CostFitter
from services.worker.core.counters import PoolCounters
from services.worker.core.emb_cache import EmbLookup, EmbPlacement
from services.worker.core.geometry import PoolGeometry
from services.worker.core.pool import Pool, RefillMode, ResidencyDelta, ResidencySnapshot
from services.worker.errors import DeadlineExceeded, Draining, InternalError, WorkerError
from services.worker.hstu import HSTU, HSTUBatchOutput, HSTUConfig, HSTUInput
from services.worker.metrics import BATCH_SECONDS_BUCKETS, BATCH_SIZE_BUCKETS
from services.worker.model_config import preset_name
from services.worker.settings import DEFAULT_MAX_BATCH
from services.worker.storage import HostEmbeddingTable, LinkSpec, PoolStorage, PrefetchChannel, open_host_link
from services.worker.validation import PreparedRequest, RequestLimits
from shared.metrics import Buckets

log = structlog.get_logger("onepool.worker.engine")

R = TypeVar("R")
SERVICE_EWMA = 0.1  # weight of the newest sample in `Engine.service_ms` (about the last 10-20 requests)
BATCH_EWMA = 0.1  # weight of the newest batch in `Engine.mean_batch_size`


def ewma(current: float, sample: float, weight: float, count: int = 1) -> float:
    """An exponentially weighted mean after `count` equal samples; the first sample (current 0: none yet)
    is taken as it is."""
    if current == 0.0:
        return sample
    keep = (1.0 - weight) ** count
    return keep * current + (1.0 - keep) * sample


@dataclass(frozen=True)
class EngineConfig:
    """Plain numbers; the service builds this from its settings."""

    model: HSTUConfig
    # Items in the catalogue. With an `embedding_table` file: None takes the file's row count, any other
    # count than the file's is refused. Without one it is required: the rows of the synthetic table.
    num_items: int | None
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
    embedding_table: str | None = None  # host table file (docs/model-inputs.md); None: seeded synthetic rows
    max_candidates: int = 512
    max_batch: int = DEFAULT_MAX_BATCH  # requests served together at most (1: no batching)
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
    # The requests served together with it (one HSTU pass; a user's second request of a batch goes in a
    # later pass), start to end, and how many they were.
    compute_ms: float
    batch_size: int = 1


@dataclass(frozen=True)
class SplitState:
    alpha: float
    target_alpha: float
    settled: bool  # the split has reached its target (to the chunk)


@dataclass(frozen=True)
class EngineReport:
    """One consistent cut of the engine's state, taken on the model thread for a digest."""

    residency: ResidencyDelta | ResidencySnapshot
    counters: PoolCounters  # a copy
    alpha: float
    alpha_target: float
    emb_capacity: int
    emb_size: int
    kv_users: int
    cost: CostEstimate
    tick_seconds: float  # model-thread time spent in ticks so far


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


def _top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The `k` best candidates and their scores, best first (ties: the earlier candidate first)."""
    if k < scores.shape[0]:
        best = np.argpartition(-scores, k - 1)[:k]
        order = best[np.lexsort((best, -scores[best]))]
    else:
        order = np.argsort(-scores, kind="stable")
    return candidates[order].tolist(), scores[order].tolist()


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        if cfg.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {cfg.max_batch}")
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
        self.pool = self._new_pool(cfg.alpha)
        self.storage = PoolStorage(
            budget_bytes=usable,
            emb_dim=cfg.model.item_dim,
            n_layers=cfg.model.n_layers,
            page_tokens=cfg.page_tokens,
            kv_width=cfg.model.kv_width,
            device=self.device,
        )
        self.table = self._load_table()
        self.num_items = self.table.num_items
        self.table_source = (
            f"file {cfg.embedding_table}"
            if cfg.embedding_table is not None
            else f"seeded synthetic rows (seed={cfg.seed}): no table file given"
        )
        self.link = open_host_link(self.table, self.device, cfg.link)
        self._prefetch = (
            PrefetchChannel(self.link)
            if cfg.refill_mode == RefillMode.INCREMENTAL and cfg.prefetch_bytes_per_tick > 0
            else None
        )
        self.limits = RequestLimits(
            num_items=self.num_items, max_history=cfg.model.max_history, max_candidates=cfg.max_candidates
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
        self.model_seconds = 0.0  # model-thread time spent in the HSTU forward passes
        # What each queued request costs the model thread, as an EWMA in ms: while requests wait, the time
        # between two completed batches (everything the thread does for them: the model, the bookkeeping,
        # waits for the GIL) divided among the batch; for a batch that found the thread idle, its own start
        # to end. With batching this is a request's share of its batch, which is what a queued request
        # ahead of a new one costs it.
        self.service_ms = 0.0
        self.mean_batch_size = 0.0  # EWMA over batches (0: none served yet)
        self.batches = 0
        # Per batch (size, and model-thread time from its start to its last answer), for the metrics.
        self.batch_sizes = Buckets(BATCH_SIZE_BUCKETS)
        self.batch_seconds = Buckets(BATCH_SECONDS_BUCKETS)
        self._last_batch_end = -math.inf

    def _load_table(self) -> HostEmbeddingTable:
        """The host table: the file's (checked against the model, see `HostEmbeddingTable.from_file`) or
        seeded synthetic rows; page-locked when the pool is on CUDA."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        if cfg.embedding_table is not None:
            return HostEmbeddingTable.from_file(
                cfg.embedding_table,
                pin=pin,
                emb_dim=cfg.model.item_dim,
                num_items=cfg.num_items,
                model=preset_name(cfg.model),
            )
        if cfg.num_items is None:
            raise ValueError("num_items is required without an embedding table file")
        return HostEmbeddingTable(cfg.num_items, cfg.model.item_dim, seed=cfg.seed, pin=pin)

    def _new_pool(self, alpha: float) -> Pool:
        return Pool(
            self.geometry,
            alpha=alpha,
            max_chunks_per_tick=self.cfg.max_chunks_per_tick,
            refill_mode=self.cfg.refill_mode,
        )

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
            history = rng.integers(0, self.num_items, length).astype(np.int64)
            timestamps = np.arange(length, dtype=np.int64)
            candidates = rng.integers(0, self.num_items, cands).astype(np.int64)
            for repeat in range(2):
                user = f"warm-up-{i}-{repeat}"
                if cached:
                    self.serve(_request(user, history[:cached], timestamps[:cached], candidates))
                self.serve(_request(user, history, timestamps, candidates))
        # What warm-up put in the caches is made up: start serving from an empty pool (same split).
        self.pool = self._new_pool(self.pool.target_alpha)

    # ---------------------------------------------------------------------------------------------------
    # Thread-safe API for the shell: none of these waits for the model thread.
    # ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="onepool-model", daemon=False)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Answer what is queued, stop the thread and release the host link's transfers. Idempotent.

        Work submitted after this fails at once (`Draining` for jobs, RuntimeError for the futures of the
        other methods) instead of waiting for a thread that is gone.
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
        self.link.close()

    def submit(self, job: Job) -> None:
        """Queue a request; `job.done` is called on the model thread with its result or error."""
        with self._accept_lock:
            if self._accepting:
                self._jobs_queued += 1
                self._put(_PRIO_JOB, job)
                return
        _finish(job, Draining())

    def set_alpha_target(self, alpha: float) -> Future[None]:
        """Aim the split at `alpha` (ticks then move it there a bounded step at a time)."""
        return self._call(lambda: self.pool.set_target(alpha))

    def split_state(self) -> Future[SplitState]:
        return self._call(
            lambda: SplitState(
                self.pool.alpha, self.pool.target_alpha, self.pool.emb_chunks == self.pool.target_emb_chunks
            )
        )

    def check_pool(self) -> Future[None]:
        """Check every invariant of the pool on the model thread (O(capacity); tests and debugging)."""
        return self._call(self.pool.check_invariants)

    def report(self, kind: Literal["delta", "snapshot"]) -> Future[EngineReport]:
        """A consistent cut for a digest: residency changes since the last report (`delta`) or all of it
        (`snapshot`, which also restarts the deltas), counters, the split and the cost fit."""
        return self._call(lambda: self._report(kind))

    def pause_until(self, release: threading.Event, parked: threading.Event | None = None) -> Future[bool]:
        """Occupy the model thread until `release` is set (requests meanwhile wait in the queue); for
        maintenance and tests. `parked` is set once the thread is held: from then on, and until `release`,
        nothing else touches the pool."""

        def hold() -> bool:
            if parked is not None:
                parked.set()
            return release.wait()

        return self._call(hold)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model thread."""
        return self._jobs_queued

    def _call(self, fn: Callable[[], R]) -> Future[R]:
        """Run `fn` on the model thread between batches, before queued requests; returns its future."""
        fut: Future[R] = Future()
        with self._accept_lock:
            if self._accepting:
                self._put(_PRIO_CALL, _Call(fn, fut))
                return fut
        fut.set_exception(RuntimeError("the engine has stopped"))
        return fut

    def _put(self, priority: int, item: Job | _Call | None, seq: int | None = None) -> None:
        self._queue.put((priority, next(self._seq) if seq is None else seq, item))

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
                self._run_batch(self._take_batch(item))

    def _take_batch(self, first: Job) -> list[Job]:
        """`first` and what else is queued that `BatchFormer` (core/batch.py) lets join it: up to `max_batch`
        jobs of distinct users; never waits. A job it leaves stays queued, in its place. Control calls found
        on the way run at once (they go before requests); the stop marker is put back for the loop."""
        jobs = [first]
        former = BatchFormer(first.request.user_id, self.cfg.max_batch)
        kept: list[tuple[int, int, Job]] = []
        while not former.done:
            try:
                priority, seq, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                if not former.offer(item.request.user_id):
                    kept.append((priority, seq, item))
                    continue
                self._job_dequeued()
                jobs.append(item)
            elif isinstance(item, _Call):
                self._run_call(item)
            else:
                self._put(priority, item, seq)
                break
        for priority, seq, item in kept:
            self._put(priority, item, seq)
        return jobs

    def _job_dequeued(self) -> None:
        with self._accept_lock:
            self._jobs_queued -= 1

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

    def _run_batch(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        live: list[Job] = []
        for job in jobs:
            if job.cancelled:
                continue
            if start > job.deadline:
                waited, allowed = (start - job.enqueued) * 1e3, (job.deadline - job.enqueued) * 1e3
                _finish(job, DeadlineExceeded(waited, allowed))
                continue
            live.append(job)
        if not live:
            return
        results = self._serve_jobs(live, start)
        for job, result in zip(live, results, strict=True):
            _finish(job, result)
        end = time.perf_counter()
        # The batch waited for the previous one: the whole interval since that one ended was spent on it.
        earliest = min(job.enqueued for job in live)
        sample = end - (self._last_batch_end if self._last_batch_end >= earliest else start)
        self._last_batch_end = end
        self.service_ms = ewma(self.service_ms, sample * 1e3 / len(live), SERVICE_EWMA, len(live))
        self.mean_batch_size = ewma(self.mean_batch_size, float(len(live)), BATCH_EWMA)
        self.batches += 1
        self.batch_sizes.observe(len(live))
        self.batch_seconds.observe(end - start)

    def _serve_jobs(self, jobs: list[Job], start: float) -> list[ServeResult | WorkerError]:
        """Serve the batch; if it fails as a whole, serve its requests one by one so that only the one at
        fault gets the error (what the others committed meanwhile is reused: the pool stays consistent)."""
        queue_ms = [(start - job.enqueued) * 1e3 for job in jobs]
        try:
            return list(self.serve_batch([job.request for job in jobs], queue_ms=queue_ms))
        except Exception as exc:
            if len(jobs) == 1:
                return [self._as_error(jobs[0], exc)]
        results: list[ServeResult | WorkerError] = []
        for job, waited in zip(jobs, queue_ms, strict=True):
            try:
                results.append(self.serve(job.request, queue_ms=waited))
            except Exception as exc:
                results.append(self._as_error(job, exc))
        return results

    @staticmethod
    def _as_error(job: Job, exc: Exception) -> WorkerError:
        if isinstance(exc, WorkerError):
            return exc
        log.exception("inference failed", request_id=job.request.request_id, exc_info=exc)
        return InternalError(f"{type(exc).__name__}: {exc}")

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:
            log.exception("reallocation tick failed")

    def tick(self) -> None:
        """One reallocation step plus prefetch housekeeping. Runs between batches."""
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
            rows = self.link.fetch(plan.refill.items)
            self.storage.write_emb(plan.refill.slots, rows)
        if self._prefetch is not None:
            self._install_prefetched()
            if not self._prefetch.busy:
                wanted = self.pool.prefetch_plan(self.cfg.prefetch_bytes_per_tick)
                if len(wanted):
                    self._prefetch.submit(wanted)

    def _install_prefetched(self) -> None:
        assert self._prefetch is not None
        for items, rows in self._prefetch.poll():
            placed = self.pool.install_prefetched(np.asarray(items, dtype=np.int64))
            if len(placed):
                picks = torch.from_numpy(placed.positions).to(rows.device)
                self.storage.write_emb(placed.slots, rows.index_select(0, picks))

    def serve(self, req: PreparedRequest, *, queue_ms: float = 0.0) -> ServeResult:
        """Rank one request's candidates. Model thread only."""
        return self.serve_batch([req], queue_ms=[queue_ms])[0]

    def serve_batch(
        self, reqs: Sequence[PreparedRequest], *, queue_ms: Sequence[float] = ()
    ) -> list[ServeResult]:
        """Rank several requests' candidates together (see the module docstring); results in order.
        A user's second request goes in a second sub-batch, after the first is committed (the k-th
        request of every user in the k-th). Model thread only."""
        waits = list(queue_ms) if queue_ms else [0.0] * len(reqs)
        results: list[ServeResult | None] = [None] * len(reqs)
        for members in rounds([r.user_id for r in reqs]):
            served = self._serve_distinct([reqs[i] for i in members], [waits[i] for i in members])
            for i, result in zip(members, served, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _serve_distinct(
        self, reqs: Sequence[PreparedRequest], queue_ms: Sequence[float]
    ) -> list[ServeResult]:
        t0 = time.perf_counter()
        # The cache calls in core/batch.py's order (the simulator makes the same ones): every KV lookup and
        # one EMB lookup for the union of the round's new history items and candidates.
        round_reqs = [
            RoundRequest(r.user_id, r.history, r.candidates, PrefixHasher(r.history, r.timestamps))
            for r in reqs
        ]
        caches = RoundCaches.lookup(self.pool, round_reqs)
        cached = caches.cached
        # Read now, before any commit of this batch can evict or move these pages.
        past = [
            self.storage.read_kv(hit.pages, hit.cached_len) if hit.cached_len else None for hit in caches.kv
        ]
        rows = self._rows(caches)
        tokens = rows.index_select(0, torch.from_numpy(caches.inverse).to(rows.device))

        inputs = []
        bounds = []  # (first token, new history tokens, candidates) per request
        offset = 0
        for r, c, kv in zip(reqs, cached, past, strict=True):
            n_new, m = int(r.history.shape[0]) - c, int(r.candidates.shape[0])
            bounds.append((offset, n_new, m))
            hist_emb = tokens[offset : offset + n_new]
            cand_emb = tokens[offset + n_new : offset + n_new + m]
            offset += n_new + m
            inputs.append(
                HSTUInput(hist_emb, r.timestamps, c, cand_emb, kv[0] if kv else None, kv[1] if kv else None)
            )
        t_model = time.perf_counter()
        batch = self.model.forward_batch(inputs)
        if self.device.type == "cuda":  # the scores are read right after: waiting here costs nothing
            torch.cuda.synchronize(self.device)
        self.model_seconds += time.perf_counter() - t_model

        self._commit(round_reqs, cached, past, batch)

        # Ranking on the host: one copy of every score, then a partial sort per request.
        all_scores = batch.scores.cpu().numpy()
        hits, misses = caches.per_request_emb()
        totals = [0, 0, 0, int(misses.sum())]  # new tokens, cached tokens, candidates, misses
        ranked: list[tuple[list[int], list[float]]] = []
        cand = 0
        for r, c, (_, n_new, m) in zip(reqs, cached, bounds, strict=True):
            ranked.append(_top_k(all_scores[cand : cand + m], r.candidates, r.k))
            cand += m
            totals[0] += n_new
            totals[1] += c
            totals[2] += m
        compute_ms = (time.perf_counter() - t0) * 1e3
        self._costs.observe(
            requests=len(reqs),
            new_tokens=totals[0],
            cached_tokens=totals[1],
            candidates=totals[2],
            emb_misses=totals[3],
            ms=compute_ms,
        )
        return [
            ServeResult(
                items=items,
                scores=scores,
                cached_tokens=c,
                computed_tokens=n_new + m,
                emb_hits=int(hit),
                emb_misses=int(miss),
                queue_ms=waited,
                compute_ms=compute_ms,
                batch_size=len(reqs),
            )
            for (items, scores), c, (_, n_new, m), hit, miss, waited in zip(
                ranked, cached, bounds, hits, misses, queue_ms, strict=True
            )
        ]

    def _commit(
        self,
        reqs: Sequence[RoundRequest],
        cached: Sequence[int],
        past: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]] | None],
        batch: HSTUBatchOutput,
    ) -> None:
        """Commit every user's new history tokens and write their K/V, in one scatter for the batch.

        A later commit of the batch may evict an entry committed earlier in it (and reuse its pages):
        the scatter writes only the entries still held once every commit is done. If anything fails
        before the bytes are written, the entries committed here are forgotten, never served unwritten."""
        committed: list[str] = []
        try:
            self._commit_and_write(reqs, cached, past, batch, committed)
        except BaseException:
            for user in committed:
                self.pool.kv_discard(user)
            raise

    def _commit_and_write(
        self,
        reqs: Sequence[RoundRequest],
        cached: Sequence[int],
        past: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]] | None],
        batch: HSTUBatchOutput,
        committed: list[str],
    ) -> None:
        t = self.cfg.page_tokens
        deferred: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # user, pages, rows, K/V rows
        first = 0
        for i, (r, c, kv) in enumerate(zip(reqs, cached, past, strict=True)):
            n = int(r.history.shape[0])
            n_new = n - c
            start, first = first, first + n_new
            if n_new == 0:
                continue
            commit = RoundCaches.commit(self.pool, r)
            if commit is None:
                continue
            committed.append(r.user_id)
            if commit.write_from == c:
                tokens = np.arange(c, n)
                pages = np.asarray(commit.pages, dtype=np.int64)[tokens // t]
                deferred.append((r.user_id, pages, tokens % t, np.arange(start, start + n_new)))
            elif commit.write_from < c and kv is not None:
                # An earlier commit of this batch evicted the entry this request read: write it back whole.
                w, out = commit.write_from, batch.output(i)
                k = [torch.cat((p[w:], new)) for p, new in zip(kv[0], out.new_k, strict=True)]
                v = [torch.cat((p[w:], new)) for p, new in zip(kv[1], out.new_v, strict=True)]
                self.storage.write_kv(commit.pages, w, k, v)
            else:
                raise InternalError(f"KV commit writes from {commit.write_from}, expected {c}")
        held = [d for d in deferred if self.pool.kv.get(d[0]) is not None]
        if not held:
            return
        picks = np.concatenate([d[3] for d in held])
        k_rows, v_rows = batch.history_k, batch.history_v
        if picks.shape[0] != k_rows[0].shape[0]:  # some entries are not held: write the others'
            index = torch.from_numpy(picks).to(k_rows[0].device)
            k_rows = [k.index_select(0, index) for k in k_rows]
            v_rows = [v.index_select(0, index) for v in v_rows]
        pages = np.concatenate([d[1] for d in held])
        self.storage.write_kv_tokens(pages, np.concatenate([d[2] for d in held]), k_rows, v_rows)

    def embeddings(self, items: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Rows for unique `items` and which of them missed the hot cache (misses are fetched in one
        host transfer and offered to the cache). Model thread only."""
        lookup = self.pool.emb_lookup(items)
        rows = self._gather(len(items), lookup)
        missed = np.zeros(len(items), dtype=np.bool_)
        missed[lookup.miss_positions] = True
        return rows, missed

    def _rows(self, caches: RoundCaches) -> torch.Tensor:
        """The round's distinct items' rows (`caches.unique` order), admitting its misses."""
        return self._gather(len(caches.unique), caches.emb, lambda: caches.admit(self.pool))

    def _gather(
        self, n: int, lookup: EmbLookup, admit: Callable[[], EmbPlacement] | None = None
    ) -> torch.Tensor:
        """Hit rows from the pool, misses over the host link in one transfer, then admission (after the
        hit rows were read: a victim may be one of these hits); admitted rows are written to the pool."""
        dev = self.device
        rows = torch.empty((n, self.cfg.model.item_dim), dtype=torch.float32, device=dev)
        if lookup.hits:
            rows[torch.from_numpy(lookup.hit_positions).to(dev)] = self.storage.read_emb(lookup.hit_slots)
        if lookup.misses:
            fetched = self.link.fetch(lookup.miss_items)
            rows[torch.from_numpy(lookup.miss_positions).to(dev)] = fetched
            # Handing over the lookup's own miss array lets the pool reuse the estimates it computed.
            placed = admit() if admit is not None else self.pool.emb_admit(lookup.miss_items)
            if len(placed):
                picks = torch.from_numpy(placed.positions).to(fetched.device)
                self.storage.write_emb(placed.slots, fetched.index_select(0, picks))
        return rows

    # Digest material (model thread).
    def _report(self, kind: Literal["delta", "snapshot"]) -> EngineReport:
        pool = self.pool
        return EngineReport(
            residency=pool.snapshot() if kind == "snapshot" else pool.drain_deltas(),
            counters=dataclasses.replace(pool.counters),
            alpha=pool.alpha,
            alpha_target=pool.target_alpha,
            emb_capacity=pool.emb.capacity,
            emb_size=pool.emb.size,
            kv_users=pool.kv.size,
            cost=self._costs.estimate(),
            tick_seconds=self.tick_seconds,
        )

    def cost_estimate(self) -> CostEstimate:
        return self._costs.estimate()
