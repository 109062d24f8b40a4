"""cachestate settings: env vars `ONEPOOL_CACHESTATE_*` and flags of `onepool cachestate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.cachestate.core.tracker import DEFAULT_DEAD_AFTER_PERIODS, DEFAULT_MAX_PERIOD_S, MIN_PERIOD_S
from shared.residency import DEFAULT_MAX_ENTRIES
from shared.settings import DEFAULT_METRICS_HOST, check_port, doc, host_instance_id

ENV_PREFIX = "ONEPOOL_CACHESTATE_"


@dataclass(frozen=True)
class CacheStateSettings:
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    id: str = field(
        default_factory=lambda: host_instance_id("cachestate"),
        metadata=doc("this instance's id, for logs and the view source (default: hostname-pid)"),
    )
    dead_after_periods: float = field(
        default=DEFAULT_DEAD_AFTER_PERIODS,
        metadata=doc("a worker silent for this many of its digest periods is fenced and purged"),
    )
    max_period_ms: float = field(
        default=DEFAULT_MAX_PERIOD_S * 1e3,
        metadata=doc(
            "the longest digest period a worker may claim: a digest saying more is judged by this one, so no "
            "message can keep a silent worker in the view for longer than dead_after_periods of it"
        ),
    )
    reconnect_grace_ms: float = field(
        default=2000.0,
        metadata=doc(
            "after cachestate's own bus connection comes back, every worker has this long (on top of its "
            "period) to be heard from again before it can be fenced: the silence was cachestate's"
        ),
    )
    expire_check_ms: float = field(default=100.0, metadata=doc("how often liveness is checked"))
    view_delta_ms: float = field(
        default=50.0, metadata=doc("view changes are batched into one delta to gateways this often")
    )
    view_heartbeat_ms: float = field(
        default=1000.0,
        metadata=doc(
            "with nothing to say, an empty view delta goes out this often, so gateways can tell a quiet "
            "cluster from a silent cachestate (their GATEWAY_VIEW_MAX_AGE_MS must be larger)"
        ),
    )
    view_snapshot_gather_ms: float = field(
        default=10.0,
        metadata=doc(
            "a view snapshot request waits this long for others (gateways resyncing together), "
            "then one snapshot answers them all"
        ),
    )
    view_warmup_ms: float = field(
        default=1000.0,
        metadata=doc(
            "after a start, view snapshots wait until this long since it, so that they list every worker "
            "(each is heard from within a digest period) rather than the few heard so far; gateways keep "
            "their last good view meanwhile"
        ),
    )
    features_window_ms: float = field(
        default=1000.0, metadata=doc("controller feature window: one FeatureReport per window")
    )
    max_entries: int = field(
        default=DEFAULT_MAX_ENTRIES,
        metadata=doc("memory cap of the residency index: KV placements + EMB entries together"),
    )
    snapshot_timeout_ms: float = field(
        default=1000.0,
        metadata=doc("a worker's snapshot request: wait this long for the ack, then for the snapshot"),
    )
    snapshot_backoff_ms: float = field(
        default=100.0, metadata=doc("first pause before asking a worker for a snapshot again (doubles)")
    )
    snapshot_backoff_max_ms: float = field(
        default=5000.0, metadata=doc("longest pause between snapshot requests to one worker")
    )
    metrics_port: int = field(
        default=0, metadata=doc("port of the HTTP server with /metrics and /healthz (0: off)")
    )
    metrics_host: str = field(default=DEFAULT_METRICS_HOST, metadata=doc("address the metrics server binds"))

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 128:
            raise ValueError(f"{ENV_PREFIX}ID must be 1-128 characters, got {self.id!r}")
        positive = {
            "dead_after_periods": self.dead_after_periods,
            "max_period_ms": self.max_period_ms,
            "expire_check_ms": self.expire_check_ms,
            "view_delta_ms": self.view_delta_ms,
            "view_heartbeat_ms": self.view_heartbeat_ms,
            "features_window_ms": self.features_window_ms,
            "max_entries": self.max_entries,
            "snapshot_timeout_ms": self.snapshot_timeout_ms,
            "snapshot_backoff_ms": self.snapshot_backoff_ms,
            "snapshot_backoff_max_ms": self.snapshot_backoff_max_ms,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be > 0, got {value}")
        if self.max_period_ms < MIN_PERIOD_S * 1e3:
            raise ValueError(
                f"{ENV_PREFIX}MAX_PERIOD_MS must be >= {MIN_PERIOD_S * 1e3:g} (the shortest period "
                f"believed), got {self.max_period_ms}"
            )
        for name, value in {
            "reconnect_grace_ms": self.reconnect_grace_ms,
            "view_snapshot_gather_ms": self.view_snapshot_gather_ms,
            "view_warmup_ms": self.view_warmup_ms,
        }.items():
            if not value >= 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be >= 0, got {value}")
        check_port(f"{ENV_PREFIX}METRICS_PORT", self.metrics_port, allow_zero=True)
