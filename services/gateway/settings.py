"""Gateway settings: env vars `ONEPOOL_GATEWAY_*` and flags of `onepool gateway` (read by the shell only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.settings import doc, host_instance_id

ENV_PREFIX = "ONEPOOL_GATEWAY_"


@dataclass(frozen=True)
class GatewaySettings:
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    host: str = field(default="127.0.0.1", metadata=doc("HTTP listen address (0.0.0.0 in containers)"))
    port: int = field(default=8080, metadata=doc("HTTP listen port"))
    instance: str = field(
        default_factory=lambda: host_instance_id("gateway"),
        metadata=doc("this replica's name (logs, traces)"),
    )
    routing: Literal["joint", "kv", "emb", "least-loaded", "round-robin"] = field(
        default="joint", metadata=doc("routing policy")
    )
    request_timeout_ms: float = field(
        default=2000.0, metadata=doc("deadline of one HTTP request, retries included")
    )
    attempt_timeout_ms: float = field(
        default=1000.0, metadata=doc("longest wait for one worker before retrying on the next")
    )
    max_attempts: int = field(default=3, metadata=doc("workers tried per request at most"))
    max_queue_wait_ms: float = field(
        default=300.0,
        metadata=doc(
            "a request whose best worker is estimated to answer later than this (the work queued ahead of it "
            "plus its own compute, from the workers' digests and this gateway's in-flight counts) is refused "
            "at once with 503 overloaded instead of being queued to miss its deadline"
        ),
    )
    max_concurrent: int = field(
        default=512,
        metadata=doc(
            "recommend requests handled at once; beyond it a request is answered 503 overloaded at once "
            "(each worker also reports its own queue limit: when every worker is full, requests are shed too)"
        ),
    )
    max_connections: int = field(
        default=2048,
        metadata=doc("open HTTP connections at most; a connection beyond it is answered 503 and closed"),
    )
    idle_timeout_ms: float = field(
        default=15000.0,
        metadata=doc(
            "a connection idle between requests, or still sending its request headers, is closed after "
            "this long"
        ),
    )
    body_timeout_ms: float = field(
        default=1000.0,
        metadata=doc("the whole request body must arrive within this long after its headers (408 otherwise)"),
    )
    view_max_age_ms: float = field(
        default=5000.0,
        metadata=doc(
            "/readyz says 503 when nothing came from cachestate for this long (it sends at least a heartbeat "
            "every CACHESTATE_VIEW_HEARTBEAT_MS); requests are still routed on the last view meanwhile"
        ),
    )
    max_body_kib: int = field(default=1024, metadata=doc("largest request body accepted, KiB (413 beyond)"))
    max_history: int = field(default=8192, metadata=doc("longest history accepted (workers may accept less)"))
    max_candidates: int = field(default=2048, metadata=doc("most candidates accepted"))
    predict_ttl_s: float = field(
        default=5.0, metadata=doc("how long the gateway remembers where it sent a user (predict-on-route)")
    )
    retry_after_s: int = field(default=1, metadata=doc("Retry-After (seconds) of every 503 answer"))
    snapshot_retry_ms: float = field(
        default=500.0, metadata=doc("wait between view snapshot requests while out of sync")
    )

    def __post_init__(self) -> None:
        positive = {
            "port": self.port,
            "request_timeout_ms": self.request_timeout_ms,
            "attempt_timeout_ms": self.attempt_timeout_ms,
            "max_attempts": self.max_attempts,
            "max_queue_wait_ms": self.max_queue_wait_ms,
            "max_concurrent": self.max_concurrent,
            "max_connections": self.max_connections,
            "idle_timeout_ms": self.idle_timeout_ms,
            "body_timeout_ms": self.body_timeout_ms,
            "view_max_age_ms": self.view_max_age_ms,
            "max_body_kib": self.max_body_kib,
            "max_history": self.max_history,
            "max_candidates": self.max_candidates,
            "snapshot_retry_ms": self.snapshot_retry_ms,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be > 0, got {value}")
        if self.port > 65535:
            raise ValueError(f"{ENV_PREFIX}PORT must be <= 65535, got {self.port}")
        if self.predict_ttl_s < 0 or self.retry_after_s < 0:
            raise ValueError(f"{ENV_PREFIX}PREDICT_TTL_S and {ENV_PREFIX}RETRY_AFTER_S must be >= 0")
