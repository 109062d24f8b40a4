"""FeatureWindow: per-worker controller features from digest window stats."""

from __future__ import annotations

from typing import Any

import pytest

from services.cachestate.core.features import FeatureWindow
from shared import schemas as s

COST = s.CostCoefficients(fixed_ms=1.0, ms_per_new_token=0.02, ms_per_emb_miss=0.003, samples=12)


def digest(seq: int, *, wid: str = "w0", inc: str = "i1", **fields: Any) -> s.WorkerDigest:
    return s.WorkerDigest(
        worker_id=wid, incarnation=inc, seq=seq, kind="delta", sent_at_ms=0.0, period_ms=500.0, **fields
    )


def win(**fields: Any) -> s.WindowStats:
    return s.WindowStats(window_ms=500.0, **fields)


def test_two_windows_of_one_worker() -> None:
    fw = FeatureWindow(1.0, start=0.0)
    assert not fw.due(0.5) and fw.due(1.0)
    fw.observe(
        digest(
            0,
            window=win(
                requests=10,
                kv_hit_requests=4,
                history_tokens=200,
                max_history_tokens=40,
                new_tokens=50,
                emb_hits=30,
                emb_misses=10,
                latency_p99_ms=12.0,
                slo_violations=1,
            ),
            stats=s.PoolStats(kv_hits=4, kv_misses=6, emb_miss_bytes=1000),
            alpha=0.5,
            alpha_target=0.6,
        )
    )
    fw.observe(
        digest(
            1,
            window=win(
                requests=10,
                kv_hit_requests=6,
                history_tokens=200,
                max_history_tokens=30,
                new_tokens=50,
                emb_hits=50,
                emb_misses=10,
                latency_p99_ms=20.0,
                slo_violations=0,
            ),
            stats=s.PoolStats(kv_hits=10, kv_misses=10, emb_miss_bytes=3000),
            alpha=0.55,
            alpha_target=0.6,
            cost=COST,
        )
    )
    (f,) = fw.close(1.0)
    assert f == s.WorkerFeatures(
        worker_id="w0",
        window_ms=1000.0,
        request_rate=20.0,
        request_rate_delta=0.0,  # first window
        hot_user_share=0.5,
        mean_history=20.0,
        max_history=40,
        new_token_fraction=0.25,
        emb_hit_rate=0.8,
        kv_hit_rate=0.5,  # (10 hits, 10 misses) since the start of the incarnation (seq 0)
        miss_bytes=3000,
        emb_misses_per_request=1.0,  # 20 misses counted in 20 requests
        p99_latency_ms=20.0,
        slo_violation_rate=0.05,
        alpha=0.55,
        alpha_target=0.6,
        cost=COST,  # the last digest's
    )
    fw.observe(
        digest(2, window=win(requests=25), stats=s.PoolStats(kv_hits=13, kv_misses=11, emb_miss_bytes=3500))
    )
    fw.observe(
        digest(3, window=win(requests=25), stats=s.PoolStats(kv_hits=16, kv_misses=12, emb_miss_bytes=4000))
    )
    (f,) = fw.close(2.0)
    assert f.request_rate == 50.0 and f.request_rate_delta == 30.0
    assert f.miss_bytes == 1000
    assert f.kv_hit_rate == 0.75  # 6 hits / 8 lookups in this window
    assert (f.hot_user_share, f.mean_history, f.new_token_fraction, f.emb_hit_rate) == (0.0, 0.0, 0.0, 0.0)
    assert fw.close(3.0) == []  # nobody spoke


def test_a_late_join_takes_the_first_digest_as_baseline_and_a_restart_resets_it() -> None:
    fw = FeatureWindow(1.0, start=0.0)
    fw.observe(digest(40, stats=s.PoolStats(emb_miss_bytes=10_000)))
    fw.observe(digest(41, stats=s.PoolStats(emb_miss_bytes=10_500)))
    (f,) = fw.close(1.0)
    assert f.miss_bytes == 500
    fw.observe(digest(0, inc="i2", stats=s.PoolStats(emb_miss_bytes=300)))
    (f,) = fw.close(2.0)
    assert f.miss_bytes == 300


def test_no_window_ms_falls_back_to_the_controller_window() -> None:
    fw = FeatureWindow(2.0, start=10.0)
    fw.observe(digest(0, window=s.WindowStats(requests=8)))
    fw.observe(digest(0, wid="w1", window=s.WindowStats(requests=2)))
    fw.forget("w1")
    (f,) = fw.close(12.0)
    assert (f.worker_id, f.window_ms, f.request_rate) == ("w0", 2000.0, 4.0)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        FeatureWindow(0.0, start=0.0)
