"""`onepool calibrate`: this machine's worker cost model, measured with the real engine, for the simulator.

Serves a random design of batches (1-8 requests; new users with 8-512-token histories and returning
users extending a cached prefix; 8-256 candidates drawn from a warm head or the whole catalogue, so EMB
misses vary) through ``Engine.serve_batch`` and fits, by least squares with non-negative coefficients,

    batch_ms = batch_fixed_ms + sum over requests (request_ms + ms_per_new_token * new
               + ms_per_cached_token * cached + ms_per_candidate * candidates + ms_per_emb_miss * misses)

with the counts the engine reported. Then times reallocation ticks that move chunks (``tick_ms_per_chunk``).
``link_gbps`` is the emulated link's. ``overhead_ms``, what a request spends outside the worker's model (HTTP,
gateway, bus, the worker's own decoding and reply), is measured on a real local cluster: the `local` preset's
steady workload replayed open loop (the replay of ``onepool bench cluster``): each answered request's latency
less the wait for its worker's model thread and its batch's time (both reported in the answer) is what the
simulator does not model itself. The profile gets the median as ``overhead_ms`` and the percentiles 0-100 as
``overhead_quantiles_ms`` (the simulator draws each request's from them). The same run measures how much
slower the model is inside the cluster than its price: over the requests served in a batch of their own, the
batch's time over what the fit prices it at, as percentiles 0-100 (``cluster_scale_quantiles``; on a small
machine the cluster's other processes share the worker's cores, and batch times vary), which ``onepool sim
--validate`` draws each batch's factor from. ``--overhead-ms`` gives a constant overhead instead and measures
no scale. The JSON holds ``profile`` (what ``onepool sim --cost PATH`` loads), the fit's quality, the overhead
run's figures and the machine's reference timings.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cluster import ClusterBenchOptions, run_async, run_local
from bench.report import write_report
from services.worker.engine import Engine, EngineConfig
from services.worker.hstu import PRESETS
from services.worker.settings import WorkerSettings
from services.worker.storage import LinkSpec
from services.worker.validation import PreparedRequest
from sim.cost import CostProfile
from workloads.presets import get_preset
from workloads.sources import open_source

MIB = 1024 * 1024
OVERHEAD_SEED = 1000  # the overhead run's workload seed: --seed + this
MIN_ALONE = 20  # requests served alone the cluster scale needs
TORCH_THREADS = int(WorkerSettings.__dataclass_fields__["torch_threads"].default)  # type: ignore[arg-type]
COLUMNS = (
    "batch_fixed_ms",
    "request_ms",
    "ms_per_new_token",
    "ms_per_cached_token",
    "ms_per_candidate",
    "ms_per_emb_miss",
)


@dataclass(frozen=True)
class CalibrateOptions:
    json_path: str
    model: str = "tiny"
    batches: int = 400
    pool_mib: int = 16
    num_items: int = 1_000_000
    link_gbps: float = 25.0
    overhead_ms: float | None = None  # None: measured on a local cluster
    overhead_workers: int = 2
    overhead_rate: float = 60.0  # requests/s: what this 2-core machine's local cluster sustains
    overhead_duration_s: float = 30.0
    seed: int = 0
    quick: bool = False


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (drop the most negative column and refit until none is)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _engine(opts: CalibrateOptions) -> Engine:
    return Engine(
        EngineConfig(
            model=PRESETS[opts.model],
            num_items=opts.num_items,
            budget_bytes=opts.pool_mib * MIB,
            chunk_bytes=256 * 1024,
            page_tokens=16,
            alpha=0.5,
            max_chunks_per_tick=1,
            link=LinkSpec(bandwidth_gbps=opts.link_gbps),
            max_batch=8,
            seed=opts.seed,
        )
    )


class _Design:
    """Random batches: new and returning users, warm and cold candidates."""

    def __init__(self, opts: CalibrateOptions) -> None:
        self.rng = np.random.default_rng(opts.seed)
        self.num_items = opts.num_items
        self.max_history = PRESETS[opts.model].max_history
        self.users: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.count = 0

    def request(self) -> PreparedRequest:
        rng = self.rng
        self.count += 1
        warm = rng.random() < 0.5
        m = int(rng.integers(8, 257))
        head = 5_000 if warm else self.num_items
        cands = rng.integers(0, head, size=m).astype(np.int64)
        if self.users and rng.random() < 0.5:
            user = list(self.users)[int(rng.integers(len(self.users)))]
            hist, ts = self.users[user]
            add = int(rng.integers(0, 33))
            if len(hist) + add <= self.max_history:
                hist = np.concatenate((hist, rng.integers(0, self.num_items, size=add)))
                ts = np.concatenate((ts, ts[-1] + 60 * np.arange(1, add + 1))) if len(ts) else ts
        else:
            user = f"u{self.count}"
            n = int(rng.integers(8, 513))
            hist = rng.integers(0, self.num_items, size=n).astype(np.int64)
            ts = 1_700_000_000 + 60 * np.arange(n, dtype=np.int64)
        self.users[user] = (hist, ts)
        if len(self.users) > 200:
            self.users.pop(next(iter(self.users)))
        return PreparedRequest(
            request_id=f"r{self.count}", user_id=user, history=hist, timestamps=ts, candidates=cands, k=10
        )


def measure_costs(opts: CalibrateOptions) -> dict[str, Any]:
    # As a worker runs by default (ONEPOOL_WORKER_TORCH_THREADS): with torch's default of one thread per
    # core, any other busy process makes each small op wait for a scheduling slot, and the fit measures that.
    torch.set_num_threads(TORCH_THREADS)
    engine = _engine(opts)
    design = _Design(opts)
    rows: list[list[float]] = []
    times: list[float] = []
    try:
        for _ in range(20):  # warm-up: torch's first calls, the warm head admitted
            engine.serve_batch([design.request()])
        for _ in range(opts.batches):
            size = int(design.rng.choice([1, 2, 4, 8]))
            reqs = [design.request() for _ in range(size)]
            t0 = time.perf_counter()
            results = engine.serve_batch(reqs)
            times.append((time.perf_counter() - t0) * 1e3)
            m = sum(int(r.candidates.shape[0]) for r in reqs)
            rows.append(
                [
                    1.0,
                    float(size),
                    float(sum(x.computed_tokens for x in results) - m),
                    float(sum(x.cached_tokens for x in results)),
                    float(m),
                    float(sum(x.emb_misses for x in results)),
                ]
            )
        x, y = np.asarray(rows), np.asarray(times)
        coef = _nnls(x, y)
        residual = y - x @ coef
        r2 = 1.0 - float((residual**2).sum() / ((y - y.mean()) ** 2).sum())
        tick = _tick_cost(engine)
    finally:
        engine.stop()
    return {
        "coefficients": dict(zip(COLUMNS, coef.tolist(), strict=True)),
        "fit": {
            "batches": len(y),
            "r2": r2,
            "residual_p50_abs_ms": float(np.percentile(np.abs(residual), 50)),
            "residual_p99_abs_ms": float(np.percentile(np.abs(residual), 99)),
            "mean_batch_ms": float(y.mean()),
        },
        "tick_ms_per_chunk": tick,
    }


def _tick_cost(engine: Engine) -> float:
    """Milliseconds per chunk moved by reallocation ticks (each moves one), both directions."""
    pool = engine.pool
    elapsed, moved = 0.0, 0
    for target in (0.8, 0.2, 0.5):
        pool.set_target(target)
        while pool.emb_chunks != pool.target_emb_chunks:
            before = pool.counters.chunks_moved
            t0 = time.perf_counter()
            engine.tick()
            elapsed += time.perf_counter() - t0
            moved += pool.counters.chunks_moved - before
    return elapsed * 1e3 / max(moved, 1)


def measure_overhead(opts: CalibrateOptions, fitted: CostProfile) -> dict[str, Any]:
    """On a local cluster: what each request spends outside the model (its latency less the worker's wait
    for its model thread and its batch's time), and the model's slow-down there against ``fitted``
    (the fit made alone) over the requests served in a batch of their own (module docstring)."""
    preset = get_preset("local")
    preset = preset.with_workload(rate=opts.overhead_rate)
    preset = replace(preset, shape=replace(preset.shape, link_gbps=opts.link_gbps))
    # another seed than the inputs the simulator is validated on by default (seed 0)
    source = open_source(
        preset=preset, regime="steady", duration_s=opts.overhead_duration_s, seed=opts.seed + OVERHEAD_SEED
    )
    warmup = 0.2 * opts.overhead_duration_s
    bench = ClusterBenchOptions(
        json_path=opts.json_path,
        source=source,
        preset=preset,
        alpha_policies=("static:0.5",),
        workers=opts.overhead_workers,
        warmup_s=warmup,
    )

    async def go() -> Any:
        with tempfile.TemporaryDirectory(prefix="onepool-calibrate-") as logs:
            return await run_local(bench, "static:0.5", "joint", Path(logs))

    run = run_async(go())
    summary = run.summary(bench.slo_ms, warmup)
    answered = [r for r in run.records if r.ok and r.t >= warmup]
    if not answered:
        raise RuntimeError("the overhead run had no answered request after its warm-up")
    outside = np.array([r.latency_ms - r.worker_queue_ms - r.worker_compute_ms for r in answered])
    m = preset.workload.candidates  # every request of the synthetic workload ranks this many
    alone = [r for r in answered if r.batch_size == 1]
    ratios = [  # a batch of one: its fixed cost and its one request's
        r.worker_compute_ms
        / (
            fitted.batch_fixed_ms
            + fitted.request_cost_ms(r.computed_tokens - m, r.cached_tokens, m, r.emb_misses)
        )
        for r in alone
    ]
    if len(ratios) < MIN_ALONE:  # the rate asked for keeps the workers batching
        raise ValueError(
            f"the overhead run served {len(ratios)} requests in a batch of their own, fewer than "
            f"{MIN_ALONE}: lower --overhead-rate"
        )
    return {
        "cluster_scale": float(np.median(ratios)),
        "cluster_scale_quantiles": np.percentile(ratios, np.arange(101)).tolist(),
        "requests_alone": len(ratios),
        "overhead_ms": max(float(np.median(outside)), 0.0),
        "overhead_quantiles_ms": np.maximum(np.percentile(outside, np.arange(101)), 0.0).tolist(),
        "workers": opts.overhead_workers,
        "rate": opts.overhead_rate,
        "duration_s": opts.overhead_duration_s,
        "warmup_s": warmup,
        "requests": summary["requests"],
        "failed_requests": summary["failed_requests"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "worker_queue_p50_ms": float(np.median([r.worker_queue_ms for r in answered])),
        "worker_compute_p50_ms": float(np.median([r.worker_compute_ms for r in answered])),
        "worker_p50_ms": summary["worker_p50_ms"],
        "gateway_p50_ms": summary["gateway_p50_ms"],
    }


def run_calibrate(opts: CalibrateOptions) -> int:
    if opts.model not in PRESETS:
        raise ValueError(f"--model must be one of {', '.join(PRESETS)}, got {opts.model!r}")
    if opts.batches < 20:
        raise ValueError(
            f"--batches must be >= 20 (a fit of six coefficients needs them), got {opts.batches}"
        )
    if opts.overhead_ms is not None and opts.overhead_ms < 0:
        raise ValueError(f"--overhead-ms must be >= 0, got {opts.overhead_ms:g}")
    if opts.quick:
        opts = CalibrateOptions(**{**opts.__dict__, "batches": 60, "overhead_duration_s": 8.0})
    print(f"calibrating the {opts.model} model: {opts.batches} batches through the real engine ...")
    measured = measure_costs(opts)
    profile = {
        "name": f"calibrated-{opts.model}",
        "source": f"onepool calibrate --model {opts.model} --link-gbps {opts.link_gbps:g} (CPU, emulated)",
        **measured["coefficients"],
        "tick_ms_per_chunk": measured["tick_ms_per_chunk"],
        "link_gbps": opts.link_gbps,
        "overhead_ms": 0.0,  # set below: the fit alone prices the overhead run
    }
    overhead: dict[str, Any] | None = None
    if opts.overhead_ms is None:
        print(
            f"measuring the overhead outside the workers: {opts.overhead_workers} local workers, "
            f"{opts.overhead_rate:g} req/s for {opts.overhead_duration_s:g} s ...",
            flush=True,
        )
        overhead = measure_overhead(opts, CostProfile.from_json(profile))
    quantiles = [] if overhead is None else overhead["overhead_quantiles_ms"]
    scales = [] if overhead is None else overhead["cluster_scale_quantiles"]
    profile["overhead_ms"] = opts.overhead_ms if overhead is None else overhead["overhead_ms"]
    profile["overhead_quantiles_ms"] = quantiles
    profile["cluster_scale_quantiles"] = scales
    report = {
        "bench": "calibrate",
        "model": opts.model,
        "pool_mib": opts.pool_mib,
        "num_items": opts.num_items,
        "profile": profile,
        "fit": measured["fit"],
        "overhead": overhead
        if overhead is not None
        else {
            "overhead_ms": profile["overhead_ms"],
            "overhead_quantiles_ms": [],
            "cluster_scale_quantiles": [],
            "given": True,
        },
    }
    fit = measured["fit"]
    summary = "\n".join(
        [f"  {k} = {profile[k]:.6g}" for k in (*COLUMNS, "tick_ms_per_chunk", "overhead_ms")]
        + [f"  fit: r2 {fit['r2']:.3f}, |residual| p50 {fit['residual_p50_abs_ms']:.3f} ms"]
        + (
            [
                f"  overhead percentiles 50/90/99: {quantiles[50]:.2f} / {quantiles[90]:.2f} / "
                f"{quantiles[99]:.2f} ms",
                f"  model in the cluster / its price, percentiles 50/90/99: {scales[50]:.2f} / "
                f"{scales[90]:.2f} / {scales[99]:.2f}",
            ]
            if quantiles
            else []
        )
    )
    write_report(opts.json_path, report, summary)
    return 0
