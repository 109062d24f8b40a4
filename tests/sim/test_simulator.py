"""The simulator: deterministic, and its cache outcomes are the real engine's on the same requests."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.worker.engine import Engine, EngineConfig
from services.worker.hstu import PRESETS as MODELS
from services.worker.validation import PreparedRequest
from sim.cluster import SimConfig, Simulation
from sim.cost import load_profile
from sim.run import geometry_for, run_policy, sweep
from workloads.presets import get_preset
from workloads.sources import open_source
from workloads.synthetic import WorkloadParams, generate

LOCAL = get_preset("local")
SMALL = LOCAL.with_workload(num_items=50_000, hot_users=40, cold_users=2_000, rate=80.0)


def _cfg(**changes: object) -> SimConfig:
    base = SimConfig(workers=2, geometry=geometry_for(SMALL, pool_mib=4), cost=load_profile("a100"))
    return replace(base, **changes)  # type: ignore[arg-type]


def test_same_input_same_seed_same_result() -> None:
    source = open_source(preset=SMALL, regime="burst", duration_s=10, seed=3)
    a = run_policy(_cfg(), source, "hit-balance", warmup_s=2)
    b = run_policy(_cfg(), source, "hit-balance", warmup_s=2)
    assert np.array_equal(a.result.latency_ms, b.result.latency_ms, equal_nan=True)
    assert np.array_equal(a.result.worker, b.result.worker)
    assert a.result.timeline.alpha == b.result.timeline.alpha
    assert a.summary == b.summary
    c = run_policy(_cfg(seed=4), source, "hit-balance", warmup_s=2)
    assert not np.array_equal(a.result.worker, c.result.worker)  # the router's tie-breaks follow the seed


def test_every_request_is_answered_and_the_figures_are_consistent() -> None:
    source = open_source(preset=SMALL, regime="steady", duration_s=10, seed=1)
    o = run_policy(_cfg(), source, "static:0.5", warmup_s=0)
    r = o.result
    assert len(r.arrival) > 600 and r.shed == 0 and not np.isnan(r.latency_ms).any()
    assert (r.latency_ms >= load_profile("a100").overhead_ms).all()
    assert set(r.worker.tolist()) == {0, 1}
    s = o.summary
    assert s["p50_ms"] <= s["p99_ms"]
    assert 0 < s["emb_hit_rate"] < 1 and 0 < s["kv_hit_rate"] < 1
    assert s["slo_satisfaction"] == 1.0
    assert s["critical_refill_bytes"] == 0


def test_static_alpha_sets_the_split_and_the_controller_moves_it() -> None:
    source = open_source(preset=SMALL, regime="steady", duration_s=6, seed=1)
    static = run_policy(_cfg(), source, "static:0.8", warmup_s=0)
    assert all(abs(a - 0.8) < 0.02 for row in static.result.timeline.alpha for a in row)
    moved = run_policy(_cfg(alpha0=0.5), source, "static:0.2", warmup_s=0)  # starts at 0.2: no ramp
    assert moved.result.timeline.alpha[-1] == pytest.approx([0.2, 0.2], abs=0.02)


def test_naive_refill_puts_bytes_on_the_critical_path_incremental_does_not() -> None:
    source = open_source(preset=SMALL, regime="steady", duration_s=8, seed=1)
    for mode, critical in (("naive", True), ("incremental", False)):
        cfg = _cfg(refill_mode=mode, alpha0=0.2)
        sim = Simulation(cfg)
        reqs = list(source.open())
        sim.advance([r for r in reqs if r.t < 4], until=4)
        sim.set_targets(0.8)
        sim.advance([r for r in reqs if r.t >= 4])
        assert (sim.result().critical_refill_bytes > 0) is critical


def test_sweep_finds_alpha_star_and_runs_the_oracle() -> None:
    source = open_source(preset=SMALL, regime="trend", duration_s=12, seed=1)
    out = sweep(_cfg(), source, warmup_s=2, window_s=3, grid=(0.2, 0.5, 0.8))
    j = out.to_json()
    assert set(j["static"]) == {"0.2", "0.5", "0.8"}
    assert j["best_static_alpha"] in (0.2, 0.5, 0.8)
    assert j["best_static_p99_ms"] == min(v["p99_ms"] for v in j["static"].values())
    assert len(j["alpha_star"]) == 4 and set(j["alpha_star"]) <= {0.2, 0.5, 0.8}
    assert j["alpha_star_mean"] == pytest.approx(float(np.mean(j["alpha_star"])))
    assert j["oracle_p99_ms"] > 0


def test_the_simulator_sees_what_the_engine_sees() -> None:
    """One worker, one request at a time, no prefetch: every request's cached tokens and EMB hits/misses in
    the simulator equal those the real engine reports on the same requests in the same order."""
    params = WorkloadParams(
        num_items=5_000,
        hot_users=20,
        cold_users=200,
        rate=50.0,
        history_median=60.0,
        max_history=1024,
        candidates=24,
    )
    reqs = list(generate("steady", params, duration_s=8, seed=5))
    model = MODELS["tiny"]
    engine = Engine(
        EngineConfig(
            model=model,
            num_items=params.num_items,
            budget_bytes=2 * 1024 * 1024,
            chunk_bytes=64 * 1024,
            page_tokens=16,
            alpha=0.5,
            prefetch_bytes_per_tick=0,
            max_batch=1,
        )
    )
    try:
        real = [
            engine.serve(
                PreparedRequest(
                    request_id=str(i),
                    user_id=r.user_id,
                    history=r.history,
                    candidates=r.candidates,
                    timestamps=r.timestamps
                    if r.timestamps is not None
                    else np.zeros(len(r.history), np.int64),
                    k=5,
                )
            )
            for i, r in enumerate(reqs)
        ]
    finally:
        engine.stop()
    geo = engine.pool.geometry
    cfg = SimConfig(
        workers=1,
        geometry=geo,
        cost=load_profile("a100"),
        max_batch=1,
        prefetch_bytes_per_tick=0,
        tick_ms=1e9,
    )
    spaced = [replace(r, t=i * 10.0) for i, r in enumerate(reqs)]  # never two in a batch
    sim = Simulation(cfg)
    sim.advance(spaced)
    out = sim.result()
    assert out.cached.tolist() == [x.cached_tokens for x in real]
    assert out.emb_hits.tolist() == [x.emb_hits for x in real]
    assert out.emb_misses.tolist() == [x.emb_misses for x in real]
    assert out.computed.tolist() == [x.computed_tokens for x in real]
    assert sum(out.cached) > 0 and sum(out.emb_hits) > 0  # the comparison covers hits of both caches
