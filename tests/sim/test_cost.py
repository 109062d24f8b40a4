"""Cost profiles: parsing, and each request's overhead drawn from a measured distribution."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sim.cluster import SimConfig
from sim.cost import CostProfile, QuantileSampler, load_profile
from sim.run import geometry_for, run_policy
from workloads.presets import get_preset
from workloads.sources import open_source

A100 = load_profile("a100")


def test_a_profile_without_quantiles_adds_its_constant_overhead() -> None:
    assert A100.overhead_quantiles_ms == ()
    draw = QuantileSampler.overhead(A100, seed=0)
    assert [draw() for _ in range(3)] == [A100.overhead_ms] * 3


def test_draws_follow_the_quantiles_and_the_seed() -> None:
    # percentiles 0, 50, 100 of a distribution uniform on [1, 3]: the inverse CDF is 1 + 2u
    cost = replace(A100, overhead_ms=2.0, overhead_quantiles_ms=(1.0, 2.0, 3.0))
    first = QuantileSampler.overhead(cost, seed=5)()
    draw = QuantileSampler.overhead(cost, seed=5)
    xs = np.array([draw() for _ in range(20_000)])  # across blocks of draws
    assert xs[0] == first  # the same seed, the same draws
    assert xs.min() >= 1.0 and xs.max() <= 3.0
    assert np.percentile(xs, [10, 50, 90]) == pytest.approx([1.2, 2.0, 2.8], abs=0.03)
    other = QuantileSampler.overhead(cost, seed=6)
    assert [other() for _ in range(5)] != xs[:5].tolist()


def test_the_simulator_adds_each_request_its_own_draw() -> None:
    small = get_preset("local").with_workload(num_items=50_000, hot_users=40, cold_users=2_000, rate=60.0)
    source = open_source(preset=small, regime="steady", duration_s=5, seed=1)
    cfg = SimConfig(workers=2, geometry=geometry_for(small, pool_mib=4), cost=A100)
    flat = run_policy(cfg, source, "static:0.5", warmup_s=0).result
    q = tuple(np.linspace(0.0, 20.0, 101))
    spread = replace(cfg, cost=replace(A100, overhead_quantiles_ms=q))
    drawn = run_policy(spread, source, "static:0.5", warmup_s=0).result
    # the same trajectory inside the workers; only the time outside moves
    assert np.array_equal(flat.worker, drawn.worker) and np.array_equal(flat.cached, drawn.cached)
    extra = drawn.latency_ms - (flat.latency_ms - A100.overhead_ms)
    assert extra.min() >= 0 and extra.max() <= 20.0
    assert np.mean(extra) == pytest.approx(10.0, abs=1.0)


@pytest.mark.parametrize(
    ("quantiles", "message"),
    [
        ([1.0], "two or more"),
        ([2.0, 1.0], "non-decreasing"),
        ([-1.0, 1.0], ">= 0"),
        ("many", "a list of numbers"),
        ([1.0, "x"], "a list of numbers"),
    ],
)
def test_bad_quantiles_are_named(tmp_path: Path, quantiles: object, message: str) -> None:
    raw = {**A100.to_json(), "overhead_quantiles_ms": quantiles}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="overhead_quantiles_ms") as err:
        load_profile(str(path))
    assert message in str(err.value)


def test_in_cluster_draws_each_batch_factor_from_the_measured_scale() -> None:
    assert A100.cluster_scale_quantiles == () and A100.in_cluster() is A100
    assert QuantileSampler.batch_factor(A100, seed=0)() == 1.0
    cost = replace(A100, cluster_scale_quantiles=(1.0, 1.5, 2.0), overhead_quantiles_ms=(0.5, 1.0))
    k = cost.in_cluster()
    assert k.name == "a100@cluster" and k.cluster_scale_quantiles == ()
    assert k.batch_factor_quantiles == (1.0, 1.5, 2.0)
    # the coefficients and what lies outside the model are unchanged
    assert (k.ms_per_new_token, k.batch_fixed_ms, k.overhead_quantiles_ms) == (
        cost.ms_per_new_token,
        cost.batch_fixed_ms,
        cost.overhead_quantiles_ms,
    )
    draw = QuantileSampler.batch_factor(k, seed=1)
    xs = [draw() for _ in range(5000)]
    assert min(xs) >= 1.0 and max(xs) <= 2.0 and np.median(xs) == pytest.approx(1.5, abs=0.03)


def test_the_simulator_multiplies_each_batch_by_its_factor() -> None:
    small = get_preset("local").with_workload(num_items=50_000, hot_users=40, cold_users=2_000, rate=20.0)
    source = open_source(preset=small, regime="steady", duration_s=5, seed=1)
    cfg = SimConfig(workers=2, geometry=geometry_for(small, pool_mib=4), cost=A100)
    base = run_policy(cfg, source, "static:0.5", warmup_s=0).result
    doubled = replace(cfg, cost=replace(A100, batch_factor_quantiles=(2.0, 2.0)))
    slow = run_policy(doubled, source, "static:0.5", warmup_s=0).result
    assert sum(slow.busy_ms) == pytest.approx(2 * sum(base.busy_ms), rel=0.05)  # ticks are not scaled
    assert np.median(slow.latency_ms) > np.median(base.latency_ms)


def test_a_profile_round_trips_through_json() -> None:
    cost = replace(A100, overhead_quantiles_ms=(0.5, 1.0, 4.0), cluster_scale_quantiles=(0.9, 1.2))
    assert CostProfile.from_json(json.loads(json.dumps(cost.to_json()))) == cost
    assert CostProfile.from_json(A100.to_json()) == A100
