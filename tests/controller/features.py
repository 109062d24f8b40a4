"""One window's WorkerFeatures for the controller's tests: a common base, each file's overrides on top."""

from __future__ import annotations

from typing import Any

from shared.schemas import WorkerFeatures

# 100 requests in a 1-s window at alpha 0.5, half of them with their KV resident, 100-token histories.
BASE: dict[str, Any] = {
    "worker_id": "w1",
    "window_ms": 1000.0,
    "request_rate": 100.0,
    "request_rate_delta": 0.0,
    "hot_user_share": 0.5,
    "mean_history": 100.0,
    "max_history": 400,
    "new_token_fraction": 0.0,
    "emb_hit_rate": 0.5,
    "kv_hit_rate": 0.5,
    "miss_bytes": 0,
    "p99_latency_ms": 20.0,
    "slo_violation_rate": 0.05,
    "alpha": 0.5,
    "alpha_target": 0.5,
}


def worker_features(**overrides: Any) -> WorkerFeatures:
    return WorkerFeatures(**{**BASE, **overrides})
