"""Presets: a cluster's geometry and the workload sized against it, by DESIGN's ratios.

The best split only moves when the table is far larger than the pool, users' KV is large next to the
pool, and utilisation is 0.5-0.9 (DESIGN, "Where the trade-off lives"). A preset keeps those ratios at a
size its target can run, and :func:`ratios` computes them for every report:

- ``local``: the CPU cluster of this machine (2 workers, the `tiny` model, 16 MiB pools).
- ``paper``: 32 workers with paper-like proportions, scaled down (DESIGN: 200M rows, 8 GiB pools,
  1000-token histories at 8 KiB per token) by keeping table/pool, users' KV/pool and rows per token;
  priced with the ``a100`` cost profile.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.worker.model_config import PRESETS as MODELS
from services.worker.model_config import emb_entry_bytes, kv_bytes_per_token
from workloads.synthetic import WorkloadParams

__all__ = ["PRESETS", "ClusterShape", "Preset", "get_preset", "ratios"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class ClusterShape:
    """What the workload is sized against (the simulator builds its pools from it)."""

    workers: int
    pool_mib: float
    chunk_kib: int
    emb_entry_bytes: int  # bytes one item's rows take in the pool (all its rows per token)
    kv_bytes_per_token: int  # K and V of every layer
    page_tokens: int
    model: str  # HSTU preset of the real workers
    link_gbps: float  # the (emulated, on CPU) host link the real workers run with
    cost: str  # cost profile the simulator prices with by default

    @property
    def pool_bytes(self) -> int:
        return int(self.pool_mib * MIB)

    @property
    def kv_page_bytes(self) -> int:
        return self.kv_bytes_per_token * self.page_tokens


@dataclass(frozen=True)
class Preset:
    name: str
    shape: ClusterShape
    workload: WorkloadParams
    source: str

    def with_workload(self, **changes: Any) -> Preset:
        return replace(self, workload=replace(self.workload, **changes))

    def with_shape(self, **changes: Any) -> Preset:
        return replace(self, shape=replace(self.shape, **changes))

    def with_model(self, model: str) -> Preset:
        """The same preset with the byte sizes of an HSTU model preset (tiny, bench, paper)."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
        cfg = MODELS[model]
        return self.with_shape(
            model=model, emb_entry_bytes=emb_entry_bytes(cfg), kv_bytes_per_token=kv_bytes_per_token(cfg)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "shape": asdict(self.shape),
            "workload": self.workload.to_json(),
            "ratios": ratios(self),
        }


def _mean_lognormal(median: float, sigma: float, cap: int) -> float:
    # E[min(X, cap)] ~ E[X] = median * exp(sigma^2 / 2) while the cap is far in the tail
    return min(median * math.exp(sigma * sigma / 2.0), float(cap))


def ratios(preset: Preset) -> dict[str, float]:
    """DESIGN's sizing ratios for this preset (written into every report)."""
    s, w = preset.shape, preset.workload
    cluster_pool = s.workers * s.pool_bytes
    mean_history = _mean_lognormal(w.history_median, w.history_sigma, w.max_history)
    hot_kv = w.hot_users * mean_history * s.kv_bytes_per_token
    return {
        "table_over_pool": w.num_items * s.emb_entry_bytes / s.pool_bytes,
        "hot_users_kv_over_cluster_pool": hot_kv / cluster_pool,
        "mean_user_kv_over_pool": mean_history * s.kv_bytes_per_token / s.pool_bytes,
        "users_fitting_in_half_a_pool": 0.5 * s.pool_bytes / (mean_history * s.kv_bytes_per_token),
        "mean_first_history": mean_history,
    }


# The CPU computes ~30x slower than an A100 (tiny model: ~13 us per token here vs ~0.45 us, sim/profiles),
# while the emulated link is as fast as PCIe: an EMB miss would cost nothing and the best split would be
# "all KV" whatever the workload. The local cluster runs its workers with a link slowed by the same factor
# (128-byte rows at 0.01 GB/s: ~13 us per miss, like a token), keeping the A100's ratio of miss cost to
# compute cost, which is what the split trades.
LOCAL_LINK_GBPS = 0.01

# The local CPU cluster: `onepool up` with 2 workers of the tiny model (item_dim 32 -> 128-byte rows;
# 2 layers x K,V x 64 floats -> 1 KiB per token), 16 MiB pools. Table 1M items (8x a pool), hot users'
# KV ~2x the cluster's pools, ~40 users in half a pool; rate for utilisation ~0.7 at the calibrated cost.
LOCAL = Preset(
    name="local",
    shape=ClusterShape(
        workers=2,
        pool_mib=16.0,
        chunk_kib=256,
        emb_entry_bytes=emb_entry_bytes(MODELS["tiny"]),
        kv_bytes_per_token=kv_bytes_per_token(MODELS["tiny"]),
        page_tokens=16,
        model="tiny",
        link_gbps=LOCAL_LINK_GBPS,
        cost="cpu",
    ),
    workload=WorkloadParams(),
    source="DESIGN ratios at the size of this machine's CPU cluster (tiny model)",
)

# 32 workers with DESIGN's production proportions (8 GiB pools, 8 KiB of KV per token, 1000-token
# histories, items of 8 rows), shrunk so that 32 simulated pools and the residency index over them fit this
# machine: 64 MiB pools of 512 KiB chunks, 512 B of KV per token (~70 users in half a pool: each user's KV is
# ~1.5% of a pool, DESIGN's "hundreds of users fit"), 512-byte items (128k item slots per pool), 1.6M items
# (a table 12x a pool). Hot users' KV is ~4.5x the cluster's half pools. 512 candidates (DLRMv3 ranks
# 2048; our worker accepts 512). Costs stay per real token and item (the a100 profile); the rate gives
# utilisation ~0.6 at those costs.
PAPER = Preset(
    name="paper",
    shape=ClusterShape(
        workers=32,
        pool_mib=64.0,
        chunk_kib=512,
        emb_entry_bytes=512,
        kv_bytes_per_token=512,
        page_tokens=16,
        model="paper",
        link_gbps=25.0,
        cost="a100",
    ),
    workload=WorkloadParams(
        num_items=1_600_000,
        hot_users=10_000,
        cold_users=2_000_000,
        history_median=800.0,
        history_sigma=0.6,
        max_history=4096,
        new_user_history_median=800.0,
        new_events_mean=8.0,
        candidates=512,
        rate=24_000.0,
    ),
    source="DESIGN's production proportions (8 GiB pools, 8 KiB of KV per token, 1000-token histories), "
    "shrunk to fit 32 simulated workers on one machine; the ratios are in the report",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (LOCAL, PAPER)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
