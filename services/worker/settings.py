"""Worker settings: env vars `ONEPOOL_WORKER_*` and flags of `onepool worker`. Only the shell reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.worker.core.pool import RefillMode
from shared.schemas import check_worker_id
from shared.settings import DEFAULT_METRICS_HOST, check_port, doc, host_instance_id
from shared.slo import DEFAULT_SLO_MS

ENV_PREFIX = "ONEPOOL_WORKER_"
# Requests the model serves together at most, by default: as NVIDIA's HSTU inference example batches.
DEFAULT_MAX_BATCH = 8
# The catalogue of the seeded synthetic host table when neither NUM_ITEMS nor a table file says otherwise.
DEFAULT_NUM_ITEMS = 100_000


@dataclass(frozen=True)
class WorkerSettings:
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    id: str = field(
        default_factory=lambda: host_instance_id("worker"),
        metadata=doc("this worker's id, a NATS subject token (default: hostname-pid)"),
    )
    device: str = field(
        default="auto", metadata=doc("torch device for the pool and model: auto|cpu|cuda|cuda:N")
    )
    model: Literal["tiny", "bench", "paper"] = field(
        default="tiny", metadata=doc("HSTU size preset: tiny (CPU tests), bench (CPU), paper (GPU)")
    )
    checkpoint: str = field(
        default="",
        metadata=doc(
            "HSTU checkpoint file of the MODEL preset (docs/model-inputs.md); empty: seeded random weights"
        ),
    )
    embedding_table: str = field(
        default="",
        metadata=doc(
            "host embedding table file, .npy (or .pt) [num_items, item_dim] float32/float16 "
            "(docs/model-inputs.md); empty: a seeded synthetic table"
        ),
    )
    seed: int = field(
        default=0, metadata=doc("seed for random weights and the synthetic host embedding table")
    )
    num_items: int | None = field(
        default=None,
        metadata=doc(
            "item catalogue size (rows of the host table); empty: the table file's row count, or "
            f"{DEFAULT_NUM_ITEMS} for the synthetic table. With a table file, another value is refused"
        ),
    )
    budget_mib: float = field(default=16.0, metadata=doc("pool size in MiB (one device allocation)"))
    chunk_kib: int = field(default=256, metadata=doc("chunk size in KiB: the unit the split moves by"))
    page_tokens: int = field(default=16, metadata=doc("history tokens per KV page"))
    alpha: float = field(default=0.5, metadata=doc("initial EMB share of the pool"))
    alpha_min: float = field(default=0.05, metadata=doc("lowest alpha a decision may set"))
    alpha_max: float = field(default=0.95, metadata=doc("highest alpha a decision may set"))
    max_chunks_per_tick: int = field(default=2, metadata=doc("chunks moved per reallocation tick at most"))
    tick_ms: float = field(default=10.0, metadata=doc("reallocation tick period (runs between requests)"))
    tick_defer_ms: float = field(
        default=100.0,
        metadata=doc("a due tick waits at most this long for an idle moment (no request queued)"),
    )
    refill_mode: RefillMode = field(
        default=RefillMode.INCREMENTAL,
        metadata=doc(
            "incremental (misses + throttled background prefetch) or naive (synchronous bulk refill)"
        ),
    )
    prefetch_kib_per_tick: int = field(
        default=64, metadata=doc("background prefetch budget per tick in KiB (0: off; incremental mode only)")
    )
    # Emulated host link for CPU mode: the same defaults as storage.LinkSpec, whose comments give the
    # sources (PCIe Gen4 x16 pinned H2D ~25 GB/s measured with nvbandwidth; ~10 us per transfer assumed).
    link_gbps: float = field(default=25.0, metadata=doc("CPU mode: emulated host->device bandwidth, GB/s"))
    link_latency_us: float = field(default=10.0, metadata=doc("CPU mode: emulated per-transfer latency, us"))
    max_candidates: int = field(default=512, metadata=doc("largest candidate list accepted"))
    max_queue: int = field(default=256, metadata=doc("requests accepted and not yet answered, at most"))
    max_batch: int = field(
        default=DEFAULT_MAX_BATCH,
        metadata=doc("requests the model serves together at most (1: one at a time); never waits to fill"),
    )
    digest_ms: float = field(default=500.0, metadata=doc("digest period"))
    slo_ms: float = field(
        default=DEFAULT_SLO_MS,
        metadata=doc("latency SLO in ms (receipt to reply): digests count the requests slower"),
    )
    torch_threads: int = field(default=1, metadata=doc("torch intra-op threads (0: torch's default)"))
    drain_s: float = field(default=5.0, metadata=doc("on shutdown, time allowed for in-flight requests"))
    metrics_port: int = field(
        default=0, metadata=doc("port of the HTTP server with /metrics and /healthz (0: off)")
    )
    metrics_host: str = field(default=DEFAULT_METRICS_HOST, metadata=doc("address the metrics server binds"))

    def __post_init__(self) -> None:
        # Checked here so that a bad variable fails at start-up with its name, not deep in the engine.
        check_worker_id(self.id)
        positive = {
            "budget_mib": self.budget_mib,
            "chunk_kib": self.chunk_kib,
            "page_tokens": self.page_tokens,
            "max_chunks_per_tick": self.max_chunks_per_tick,
            "tick_ms": self.tick_ms,
            "tick_defer_ms": self.tick_defer_ms,
            "link_gbps": self.link_gbps,
            "max_candidates": self.max_candidates,
            "max_queue": self.max_queue,
            "max_batch": self.max_batch,
            "digest_ms": self.digest_ms,
            "slo_ms": self.slo_ms,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be > 0, got {value}")
        if self.num_items is not None and self.num_items <= 0:
            raise ValueError(f"{ENV_PREFIX}NUM_ITEMS must be > 0 (or empty), got {self.num_items}")
        for name, value in {
            "link_latency_us": self.link_latency_us,
            "prefetch_kib_per_tick": self.prefetch_kib_per_tick,
            "torch_threads": self.torch_threads,
            "drain_s": self.drain_s,
        }.items():
            if value < 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be >= 0, got {value}")
        check_port(f"{ENV_PREFIX}METRICS_PORT", self.metrics_port, allow_zero=True)
        if not 0.0 <= self.alpha_min <= self.alpha <= self.alpha_max <= 1.0:
            raise ValueError(
                f"need 0 <= {ENV_PREFIX}ALPHA_MIN <= {ENV_PREFIX}ALPHA <= {ENV_PREFIX}ALPHA_MAX <= 1, "
                f"got {self.alpha_min}, {self.alpha}, {self.alpha_max}"
            )
