"""`onepool bench worker`: what one worker's pool and model buy, measured on this machine.

Figures (each the median of `repeats` runs):
- kv_speedup: latency of a 1024-token history computed from scratch over the same request served from a
  cached 1008-token prefix (16 new tokens), 64 candidates both times, embeddings warm both times.
- emb_miss_cost_us: extra latency per embedding row that misses the hot cache (request of 64 candidates
  whose rows all miss, minus the same request with all rows hot, divided by 64).
- realloc_p99_ratio: P99 latency of requests arriving while the split swings 0.2 -> 0.8 -> 0.2 over P99 of
  the same open-loop Poisson load at a steady 0.2 (windows of the same length before and after the swing),
  with incremental reallocation; critical-path refill bytes during the swing. The swing window lasts at
  least W seconds in both modes, the pool holding 0.8 until W/2. The naive_* keys repeat both figures for the
  naive mode (the pool jumps to the target in one tick and refills the grown embedding region synchronously
  before serving continues). The workload is sized so that both caches' working sets fit at either end of
  the swing: the ratio measures what moving memory costs, not what a smaller cache costs.
CPU mode: the host->device link is emulated (real wall time); every report says so.
"""

from __future__ import annotations

import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from bench.report import write_report
from services.worker.core.pool import RefillMode
from services.worker.engine import Engine, EngineConfig, Job, ServeResult
from services.worker.errors import WorkerError
from services.worker.hstu import PRESETS, HSTUConfig
from services.worker.storage import LinkSpec
from services.worker.validation import PreparedRequest

MIB = 1024 * 1024


@dataclass(frozen=True)
class BenchOptions:
    json_path: str
    quick: bool = False
    repeats: int = 3
    device: str = "cpu"  # torch device of every engine: "cpu" (emulated host link) or "cuda[:N]" (real H2D)


@dataclass(frozen=True)
class RegimeSizes:
    """Sizes of the reallocation run; the report prints the ratios DESIGN asks for."""

    model: str
    num_items: int
    budget_mib: int
    chunk_kib: int
    page_tokens: int
    users: int
    base_history: tuple[int, int]
    max_history: int
    growth: tuple[int, int]
    candidates: int
    item_zipf: float
    user_zipf: float
    utilisation: float
    steady_s: float
    warmup_s: float


# Both caches' working sets fit at either end of the swing (users' KV < 20% of the pool, the EMB Zipf head in
# 20%), so the swing measures what moving memory costs, not what a smaller cache costs.
FULL = RegimeSizes(
    model="bench",
    num_items=1_000_000,
    budget_mib=64,
    chunk_kib=256,
    page_tokens=16,
    users=16,
    base_history=(32, 128),
    max_history=256,
    growth=(4, 16),
    candidates=64,
    item_zipf=1.0,
    user_zipf=1.0,
    utilisation=0.5,
    steady_s=8.0,
    warmup_s=4.0,
)
QUICK = replace(FULL, model="tiny", num_items=50_000, budget_mib=8, steady_s=1.0, warmup_s=0.5)


def _engine(
    sizes: RegimeSizes, *, alpha: float, mode: RefillMode, device: str, model: HSTUConfig | None = None
) -> Engine:
    cfg = model or PRESETS[sizes.model]
    chunk_bytes = sizes.chunk_kib * 1024
    total_chunks = sizes.budget_mib * MIB // chunk_bytes
    return Engine(
        EngineConfig(
            model=cfg,
            num_items=sizes.num_items,
            budget_bytes=sizes.budget_mib * MIB,
            chunk_bytes=chunk_bytes,
            page_tokens=sizes.page_tokens,
            alpha=alpha,
            # Incremental: one chunk per tick, in idle gaps. Naive: the whole move in one tick.
            max_chunks_per_tick=1 if mode == RefillMode.INCREMENTAL else total_chunks,
            tick_s=0.005,
            refill_mode=mode,
            prefetch_bytes_per_tick=64 * 1024 if mode == RefillMode.INCREMENTAL else 0,
            link=LinkSpec(),
            device=device,
        )
    )


def _request(
    rid: str, user: str, history: np.ndarray, timestamps: np.ndarray, cands: np.ndarray
) -> PreparedRequest:
    return PreparedRequest(
        request_id=rid, user_id=user, history=history, timestamps=timestamps, candidates=cands, k=10
    )


def _timed(engine: Engine, req: PreparedRequest) -> float:
    t0 = time.perf_counter()
    engine.serve(req)
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------------------------------------
def measure_kv_speedup(quick: bool, repeats: int, device: str) -> dict[str, Any]:
    model = PRESETS["tiny" if quick else "bench"]
    history_len, new_tokens, n_cands = (256, 16, 64) if quick else (1024, 16, 64)
    if history_len > model.max_history:
        model = replace(model, max_history=history_len)
    sizes = replace(QUICK if quick else FULL, num_items=100_000, budget_mib=64)
    engine = _engine(sizes, alpha=0.5, mode=RefillMode.INCREMENTAL, device=device, model=model)
    rng = np.random.default_rng(1)
    history = rng.integers(0, sizes.num_items, history_len).astype(np.int64)
    ts = np.cumsum(rng.integers(1, 3600, history_len)).astype(np.int64)
    cands = rng.integers(0, sizes.num_items, n_cands).astype(np.int64)
    prefix = history_len - new_tokens
    engine.serve(_request("warm", "warm", history, ts, cands))  # embeddings hot for both paths
    uncached, cached = [], []
    rounds = max(5, repeats * 5)
    for i in range(rounds):
        uncached.append(_timed(engine, _request(f"u{i}", f"fresh-{i}", history, ts, cands)))
        engine.serve(_request(f"p{i}", f"returning-{i}", history[:prefix], ts[:prefix], cands))
        cached.append(_timed(engine, _request(f"c{i}", f"returning-{i}", history, ts, cands)))
    u, c = statistics.median(uncached), statistics.median(cached)
    return {
        "kv_speedup": u / c,
        "kv_uncached_ms": u,
        "kv_cached_ms": c,
        "kv_setup": {
            "model": asdict(model),
            "history_len": history_len,
            "new_tokens": new_tokens,
            "candidates": n_cands,
            "rounds": rounds,
        },
    }


def measure_emb_miss_cost(quick: bool, repeats: int, device: str) -> dict[str, Any]:
    sizes = replace(QUICK if quick else FULL, num_items=200_000, budget_mib=64)
    engine = _engine(sizes, alpha=0.5, mode=RefillMode.INCREMENTAL, device=device)
    n_cands = 64
    empty = np.zeros(0, dtype=np.int64)
    hot = np.arange(n_cands, dtype=np.int64)
    engine.serve(_request("warm", "u", empty, empty, hot))
    hits, misses = [], []
    rounds = max(10, repeats * 10)
    for i in range(rounds):
        hits.append(_timed(engine, _request(f"h{i}", "u", empty, empty, hot)))
        fresh = np.arange(n_cands * (i + 1), n_cands * (i + 2), dtype=np.int64) + 1000
        misses.append(_timed(engine, _request(f"m{i}", "u", empty, empty, fresh)))
    per_row_us = (statistics.median(misses) - statistics.median(hits)) * 1e3 / n_cands
    # The link alone: one transfer of 1 row and of 256 rows.
    one = statistics.median(_fetch_ms(engine, 1) for _ in range(rounds))
    many = statistics.median(_fetch_ms(engine, 256) for _ in range(rounds))
    return {
        "emb_miss_cost_us": per_row_us,
        "emb_hit_request_ms": statistics.median(hits),
        "emb_miss_request_ms": statistics.median(misses),
        "link_transfer_1_row_us": one * 1e3,
        "link_transfer_256_rows_us": many * 1e3,
        "link": engine.link.describe(),
    }


def _fetch_ms(engine: Engine, rows: int) -> float:
    items = list(range(rows))
    t0 = time.perf_counter()
    engine.link.fetch(items)
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------------------------------------
class Workload:
    """Returning users (Zipf) whose histories grow by a few tokens a visit; Zipf item popularity."""

    def __init__(self, sizes: RegimeSizes, seed: int) -> None:
        self.sizes = sizes
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, sizes.num_items + 1, dtype=np.float64)
        p = ranks ** (-sizes.item_zipf)
        self.item_cdf = np.cumsum(p / p.sum())
        self.item_perm = self.rng.permutation(sizes.num_items)
        up = np.arange(1, sizes.users + 1, dtype=np.float64) ** (-sizes.user_zipf)
        self.user_p = up / up.sum()
        self.histories: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.generation: dict[int, int] = {}
        self.n = 0

    def _items(self, count: int) -> np.ndarray:
        idx = np.searchsorted(self.item_cdf, self.rng.random(count))
        return self.item_perm[np.minimum(idx, self.sizes.num_items - 1)].astype(np.int64)

    def prefill(self, engine: Engine, lookups: int = 400_000, batch: int = 4096) -> None:
        """Bring the EMB region to its steady state (full, with a ghost list of hot non-resident items)
        without minutes of warm-up traffic: the same lookups and admissions requests would make."""
        done = 0
        while done < lookups:
            items = np.unique(self._items(batch))
            engine.embeddings(items.tolist())
            done += batch

    def next(self) -> PreparedRequest:
        s = self.sizes
        user = int(self.rng.choice(s.users, p=self.user_p))
        hist, ts = self.histories.get(user, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        grow = int(self.rng.integers(s.growth[0], s.growth[1] + 1))
        if len(hist) == 0 or len(hist) + grow > s.max_history:
            # A new session: a fresh history (a KV miss), as when a user's history is rewritten.
            self.generation[user] = self.generation.get(user, 0) + 1
            length = int(self.rng.integers(s.base_history[0], s.base_history[1] + 1))
            hist = self._items(length)
            ts = np.cumsum(self.rng.integers(1, 600, length)).astype(np.int64)
        else:
            hist = np.concatenate([hist, self._items(grow)])
            ts = np.concatenate([ts, ts[-1] + np.cumsum(self.rng.integers(1, 600, grow))])
        self.histories[user] = (hist, ts)
        self.n += 1
        return _request(
            f"r{self.n}", f"user-{user}-{self.generation[user]}", hist, ts, self._items(s.candidates)
        )


@dataclass
class Sample:
    arrival: float
    latency_ms: float
    compute_ms: float  # model-thread time of this request (0 for a failed one)
    ok: bool


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def _await(engine: Engine, fn: Any) -> Any:
    return engine.call(fn).result(timeout=120)


def run_realloc(
    sizes: RegimeSizes, mode: RefillMode, seed: int, *, lo: float = 0.2, hi: float = 0.8, device: str = "cpu"
) -> dict[str, Any]:
    """Open-loop Poisson load through the engine thread; steady phase at `lo`, then a swing lo->hi->lo."""
    engine = _engine(sizes, alpha=lo, mode=mode, device=device)
    workload = Workload(sizes, seed)
    workload.prefill(engine)
    # Service time at this regime, to set the arrival rate for the wanted utilisation.
    for _ in range(20):
        engine.serve(workload.next())
    probe = [_timed(engine, workload.next()) for _ in range(40)]
    mean_service_ms = statistics.mean(probe)
    rate = sizes.utilisation / (mean_service_ms / 1e3)

    samples: list[Sample] = []
    lock = threading.Lock()
    stop = threading.Event()

    def generator() -> None:
        rng = np.random.default_rng(seed + 1)
        next_at = time.perf_counter()
        while not stop.is_set():
            next_at += float(rng.exponential(1.0 / rate))
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            arrival = next_at
            req = workload.next()

            def done(result: ServeResult | WorkerError, arrival: float = arrival) -> None:
                latency = (time.perf_counter() - arrival) * 1e3
                compute_ms = 0.0 if isinstance(result, WorkerError) else result.compute_ms
                with lock:
                    samples.append(Sample(arrival, latency, compute_ms, not isinstance(result, WorkerError)))

            engine.submit(Job(request=req, deadline=arrival + 60.0, done=done, enqueued=arrival))

    window_s = sizes.steady_s

    def until_reached(target: float, not_before: float, trace: list[tuple[float, float]], t0: float) -> None:
        _await(engine, lambda: engine.pool.set_target(target))
        while True:
            alpha, reached = _await(
                engine, lambda: (engine.pool.alpha, engine.pool.emb_chunks == engine.pool.target_emb_chunks)
            )
            trace.append((time.perf_counter() - t0, alpha))
            if reached and time.perf_counter() >= not_before:
                return
            time.sleep(0.01)

    engine.start()
    gen = threading.Thread(target=generator, name="bench-load")
    gen.start()
    try:
        time.sleep(sizes.warmup_s)
        before_from = time.perf_counter()
        time.sleep(window_s)
        # The swing window has the same length whatever the mode: the pool holds `hi` until half of it
        # has passed and is back at `lo` at its end at the earliest (later if the move is slower).
        swing_from = time.perf_counter()
        counters_before = _await(engine, lambda: (dict(engine.pool.counters.as_dict()), engine.tick_seconds))
        alphas: list[tuple[float, float]] = []
        until_reached(hi, swing_from + window_s / 2, alphas, swing_from)
        until_reached(lo, swing_from + window_s, alphas, swing_from)
        swing_to = time.perf_counter()
        counters_after = _await(engine, lambda: (dict(engine.pool.counters.as_dict()), engine.tick_seconds))
        # Steady state again at `lo`, so that "steady" is not only the period right after warm-up.
        time.sleep(window_s)
        after_to = time.perf_counter()
        time.sleep(0.5)  # let the last requests finish
    finally:
        stop.set()
        gen.join()
        engine.stop()
    with lock:
        ok = [x for x in samples if x.ok]
        steady = [
            x.latency_ms
            for x in ok
            if before_from <= x.arrival < swing_from or swing_to <= x.arrival < after_to
        ]
        swing_samples = [x for x in ok if swing_from <= x.arrival < swing_to]
        swing = [x.latency_ms for x in swing_samples]
        failed = sum(1 for x in samples if not x.ok)
    swing_s = swing_to - swing_from
    moved = counters_after[0]["chunks_moved"] - counters_before[0]["chunks_moved"]
    refill = counters_after[0]["critical_refill_bytes"] - counters_before[0]["critical_refill_bytes"]
    busy_s = sum(x.compute_ms for x in swing_samples) / 1e3 + (counters_after[1] - counters_before[1])
    geometry = engine.geometry
    kv_bytes_per_token = geometry.kv_page_bytes // geometry.kv_page_tokens
    mean_history = (sizes.base_history[0] + sizes.max_history) / 2
    return {
        "mode": mode.value,
        "steady_p99_ms": _p99(steady),
        "swing_p99_ms": _p99(swing),
        "steady_p50_ms": float(np.percentile(steady, 50)) if steady else float("nan"),
        "swing_p50_ms": float(np.percentile(swing, 50)) if swing else float("nan"),
        "p99_ratio": _p99(swing) / _p99(steady),
        "critical_path_refill_bytes": int(refill),
        "chunks_moved": int(moved),
        "swing_seconds": swing_s,
        "requests_steady": len(steady),
        "requests_swing": len(swing),
        "failed": failed,
        "rate_per_s": rate,
        "mean_service_ms": mean_service_ms,
        # Model-thread busy time during the swing (requests + ticks) over its length.
        "swing_utilisation": busy_s / max(swing_s, 1e-9),
        "tick_seconds_in_swing": counters_after[1] - counters_before[1],
        "ratios": {
            "host_table_over_pool": sizes.num_items * geometry.emb_entry_bytes / geometry.budget_bytes,
            "mean_user_kv_over_kv_region_at_lo": mean_history
            * kv_bytes_per_token
            / (geometry.budget_bytes * (1 - lo)),
            "users_kv_over_pool": sizes.users * mean_history * kv_bytes_per_token / geometry.budget_bytes,
        },
        "alpha_trace": alphas[:: max(1, len(alphas) // 50)],
    }


def measure_realloc(quick: bool, repeats: int, device: str) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    out: dict[str, Any] = {"realloc_setup": asdict(sizes)}
    for mode, prefix in ((RefillMode.INCREMENTAL, ""), (RefillMode.NAIVE, "naive_")):
        runs = [run_realloc(sizes, mode, seed=100 + r, device=device) for r in range(repeats)]
        out[f"{prefix}realloc_p99_ratio"] = statistics.median(r["p99_ratio"] for r in runs)
        out[f"{prefix}realloc_critical_path_refill_bytes"] = int(
            statistics.median(r["critical_path_refill_bytes"] for r in runs)
        )
        out[f"{prefix}realloc_runs"] = runs
    return out


# ---------------------------------------------------------------------------------------------------------
def run_bench(opts: BenchOptions) -> int:
    if opts.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {opts.repeats}")
    torch.set_num_threads(1)
    repeats = 1 if opts.quick else opts.repeats
    started = time.time()
    report: dict[str, Any] = {
        "bench": "worker",
        "quick": opts.quick,
        "repeats": repeats,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "device": opts.device,
        "host_link": (
            f"emulated ({LinkSpec().bandwidth_gbps} GB/s, {LinkSpec().latency_us} us per transfer): "
            "CPU mode, no HBM; misses spend this as real wall time"
            if opts.device == "cpu"
            else f"real H2D copies from a pinned host table to {opts.device}"
        ),
    }
    steps = (
        ("KV reuse", measure_kv_speedup),
        ("EMB miss cost", measure_emb_miss_cost),
        ("reallocation (incremental vs naive)", measure_realloc),
    )
    for i, (name, fn) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name} ...", flush=True)
        report.update(fn(opts.quick, repeats, opts.device))
    report["elapsed_s"] = time.time() - started
    write_report(opts.json_path, report, summary(report))
    return 0


def summary(r: dict[str, Any]) -> str:
    lines = [
        "onepool worker benchmark"
        + (" (QUICK smoke run: sizes too small for figures)" if r["quick"] else ""),
        f"  host link: {r['host_link']}",
        f"  kv_speedup                 {r['kv_speedup']:.2f}x  (uncached {r['kv_uncached_ms']:.2f} ms, "
        f"cached {r['kv_cached_ms']:.2f} ms; target >= 5)",
        f"  emb_miss_cost_us           {r['emb_miss_cost_us']:.2f} us per missed row",
        "                              incremental   naive",
        f"  realloc_p99_ratio          {r['realloc_p99_ratio']:>11.3f}   {r['naive_realloc_p99_ratio']:.3f}"
        "   (target <= 1.10)",
        f"  critical-path refill bytes {r['realloc_critical_path_refill_bytes']:>11d}   "
        f"{r['naive_realloc_critical_path_refill_bytes']:d}   (target 0)",
    ]
    return "\n".join(lines)
