"""The synthetic generator: seeded, and its statistics follow its parameters (within sampling tolerance)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from workloads.presets import PRESETS, ratios
from workloads.synthetic import Burst, Regime, WorkloadParams, conditions_at, generate, zipf_ranks

P = WorkloadParams(num_items=200_000, hot_users=200, cold_users=50_000, rate=400.0, candidates=16)


def _run(
    regime: Regime = Regime.STEADY, p: WorkloadParams = P, duration: float = 60.0, seed: int = 1
) -> list:
    return list(generate(regime, p, duration_s=duration, seed=seed))


def _kind(user: str) -> str:
    return user[0]


def test_same_seed_same_requests_other_seed_others() -> None:
    a, b, c = _run(duration=5), _run(duration=5), _run(duration=5, seed=2)
    assert [(r.t, r.user_id, r.history.tolist(), r.candidates.tolist()) for r in a] == [
        (r.t, r.user_id, r.history.tolist(), r.candidates.tolist()) for r in b
    ]
    assert [r.user_id for r in a] != [r.user_id for r in c]


def test_rate_shares_and_sizes_follow_the_parameters() -> None:
    reqs = _run()
    n = len(reqs)
    assert abs(n / 60.0 - P.rate) < 4 * math.sqrt(P.rate * 60) / 60  # Poisson count within 4 sigma
    assert all(b.t >= a.t for a, b in itertools.pairwise(reqs))
    kinds = [_kind(r.user_id) for r in reqs]
    assert abs(kinds.count("h") / n - P.hot_share) < 0.02
    assert abs(kinds.count("n") / n - P.new_user_share) < 0.01
    assert all(len(r.candidates) == P.candidates for r in reqs)
    assert all(int(r.history.max(initial=0)) < P.num_items for r in reqs)
    # first visits of cold users: log-normal around history_median
    first: dict[str, int] = {}
    for r in reqs:
        if r.user_id[0] == "c":
            first.setdefault(r.user_id, len(r.history))
    median = float(np.median(list(first.values())))
    assert abs(median / P.history_median - 1) < 0.1
    new = [len(r.history) for r in reqs if r.user_id[0] == "n"]
    assert abs(float(np.median(new)) / P.new_user_history_median - 1) < 0.25


def test_a_returning_users_history_extends_the_previous_one() -> None:
    seen: dict[str, tuple[list[int], list[int]]] = {}
    grew = []
    for r in _run(duration=30):
        h, ts = r.history.tolist(), (r.timestamps.tolist() if r.timestamps is not None else [])
        if r.user_id in seen:
            old_h, old_ts = seen[r.user_id]
            assert h[: len(old_h)] == old_h and ts[: len(old_ts)] == old_ts
            grew.append(len(h) - len(old_h))
        seen[r.user_id] = (h, ts)
    assert grew
    assert abs(float(np.mean(grew)) - P.new_events_mean) < 0.5


@pytest.mark.parametrize("s", [0.8, 1.0, 1.2])
def test_item_popularity_is_zipf_with_the_exponent(s: float) -> None:
    n = 100_000
    ranks = zipf_ranks(np.random.default_rng(0).random(2_000_000), n, s)
    counts = np.bincount(ranks, minlength=n)[:1000].astype(float)
    r = np.arange(1, 1001)
    slope = np.polyfit(np.log(r[9:]), np.log(counts[9:]), 1)[
        0
    ]  # ranks 10..1000, away from the continuum's head
    assert abs(-slope - s) < 0.05


def test_trend_drifts_hot_share_and_history() -> None:
    p = replace(P, rate=300.0)
    reqs = _run(Regime.TREND, p, duration=100)
    early = [r for r in reqs if r.t < 10]
    late = [r for r in reqs if r.t >= 90]

    def hot(rs: list) -> float:
        return sum(r.user_id[0] == "h" for r in rs) / len(rs)

    assert abs(hot(early) - (p.trend_hot_from + 0.05 * (p.trend_hot_to - p.trend_hot_from))) < 0.06
    assert abs(hot(late) - (p.trend_hot_from + 0.95 * (p.trend_hot_to - p.trend_hot_from))) < 0.06
    cold_early = np.median([len(r.history) for r in early if r.user_id[0] == "c"])
    cold_late = np.median([len(r.history) for r in late if r.user_id[0] == "c"])
    expected = (p.trend_history_from + 0.95 * (p.trend_history_to - p.trend_history_from)) / (
        p.trend_history_from + 0.05 * (p.trend_history_to - p.trend_history_from)
    )
    assert abs(cold_late / cold_early / expected - 1) < 0.15  # first visits follow the history factor


def test_burst_episodes_spike_then_recover() -> None:
    p = replace(P, bursts=(Burst("new_users", 0.2, 0.2, 0.6), Burst("rate", 0.6, 0.2, 2.0)))
    reqs = _run(Regime.BURST, p, duration=100)

    def share_new(lo: float, hi: float) -> float:
        rs = [r for r in reqs if lo <= r.t < hi]
        return sum(r.user_id[0] == "n" for r in rs) / len(rs)

    def rate(lo: float, hi: float) -> float:
        return sum(lo <= r.t < hi for r in reqs) / (hi - lo)

    assert abs(share_new(20, 40) - 0.6) < 0.04
    assert abs(share_new(42, 58) - p.new_user_share) < 0.02
    assert abs(rate(60, 80) / rate(82, 100) - 2.0) < 0.2
    assert conditions_at(Regime.BURST, p, 0.3).new_user_share == 0.6
    assert conditions_at(Regime.STEADY, p, 0.3).new_user_share == p.new_user_share


def test_bad_parameters_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="hot_share"):
        WorkloadParams(hot_share=1.5)
    with pytest.raises(ValueError, match="rate"):
        WorkloadParams(rate=0)
    with pytest.raises(ValueError, match="duration"):
        generate("steady", P, duration_s=0, seed=0)


def test_presets_keep_designs_ratios() -> None:
    for preset in PRESETS.values():
        r = ratios(preset)
        assert r["table_over_pool"] >= 5  # the table is far larger than a pool
        assert r["hot_users_kv_over_cluster_pool"] >= 1  # hot users' KV does not all fit
        assert 10 <= r["users_fitting_in_half_a_pool"] <= 5000  # users' KV is large next to the pool
