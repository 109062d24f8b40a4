"""Controller settings: env vars `ONEPOOL_CONTROLLER_*` and flags of `onepool controller`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.controller.core.policies import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_ALPHA_MIN,
    DEFAULT_MAX_STEP,
    parse_policy,
)
from shared.schemas import WORKER_ID_RE
from shared.settings import DEFAULT_METRICS_HOST, check_port, doc, host_instance_id

ENV_PREFIX = "ONEPOOL_CONTROLLER_"


@dataclass(frozen=True)
class ControllerSettings:
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    id: str = field(
        default_factory=lambda: f"controller-{host_instance_id('host')}",
        metadata=doc("this controller's instance id, a prefix of its decision ids (default: hostname-pid)"),
    )
    # The adaptive heuristic by default: a controller running a fixed split does nothing a worker's own
    # ONEPOOL_WORKER_ALPHA could not; static:A is the baseline one asks for. HELM replaces it when it lands.
    policy: str = field(
        default="hit-balance",
        metadata=doc(
            "alpha policy: static:A (0<=A<=1), hit-balance[:key=value,...], pi[:key=value,...], "
            "predict-greedy[:key=value,...], helm[:key=value,...]"
        ),
    )
    alpha_min: float = field(default=DEFAULT_ALPHA_MIN, metadata=doc("lowest alpha a decision may set"))
    alpha_max: float = field(default=DEFAULT_ALPHA_MAX, metadata=doc("highest alpha a decision may set"))
    max_step: float = field(default=DEFAULT_MAX_STEP, metadata=doc("largest alpha change per decision"))
    min_change: float = field(
        default=0.01, metadata=doc("send no decision that moves a worker's alpha target less than this")
    )
    resend_s: float = field(
        default=2.0,
        metadata=doc("repeat an unchanged decision a worker has not applied only after this many seconds"),
    )
    latency_samples: int = field(
        default=4096, metadata=doc("decision latencies kept for the p50/p99 figures (most recent)")
    )
    stats_s: float = field(default=60.0, metadata=doc("how often decision statistics are logged (0: never)"))
    metrics_port: int = field(
        default=0, metadata=doc("port of the HTTP server with /metrics and /healthz (0: off)")
    )
    metrics_host: str = field(default=DEFAULT_METRICS_HOST, metadata=doc("address the metrics server binds"))

    def __post_init__(self) -> None:
        if not WORKER_ID_RE.match(self.id):
            raise ValueError(
                f"{ENV_PREFIX}ID={self.id!r} must be 1-64 characters of letters, digits, '-' or '_'"
            )
        try:
            parse_policy(self.policy)
        except ValueError as e:
            raise ValueError(f"{ENV_PREFIX}POLICY: {e}") from None
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise ValueError(
                f"need 0 <= {ENV_PREFIX}ALPHA_MIN <= {ENV_PREFIX}ALPHA_MAX <= 1, "
                f"got {self.alpha_min}, {self.alpha_max}"
            )
        if not self.max_step > 0:
            raise ValueError(f"{ENV_PREFIX}MAX_STEP must be > 0, got {self.max_step}")
        if not 0 <= self.min_change <= self.max_step:
            raise ValueError(
                f"need 0 <= {ENV_PREFIX}MIN_CHANGE <= {ENV_PREFIX}MAX_STEP (or no decision could ever be "
                f"sent), got {self.min_change}, {self.max_step}"
            )
        for name in ("resend_s", "stats_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be >= 0, got {getattr(self, name)}")
        check_port(f"{ENV_PREFIX}METRICS_PORT", self.metrics_port, allow_zero=True)
        if self.latency_samples < 1:
            raise ValueError(f"{ENV_PREFIX}LATENCY_SAMPLES must be >= 1, got {self.latency_samples}")
