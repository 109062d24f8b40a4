"""Wire schemas and NATS subjects: the one place every service agrees on.

Every message is a msgspec Struct encoded as plain msgpack (never pickle). Decoding validates types and
constraints and rejects unknown fields, so a malformed message fails at the edge with a path that names the
offending field. Each message carries `v`, the schema version; a receiver rejects versions it does not know.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from shared.errors import ErrorKind, OnepoolError

SCHEMA_VERSION: Final = 1

# ---------------------------------------------------------------------------------------------------------
# Subjects. Worker ids are single NATS tokens so that wildcards (`onepool.digest.*`) work.
# ---------------------------------------------------------------------------------------------------------
SUBJECT_PREFIX: Final = "onepool"
WORKER_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_worker_id(worker_id: str) -> str:
    """Return `worker_id` if it is a valid single NATS token, else raise ValueError."""
    if not WORKER_ID_RE.match(worker_id):
        raise ValueError(
            f"worker id {worker_id!r} must be 1-64 characters of letters, digits, '-' or '_' "
            "(it becomes a NATS subject token)"
        )
    return worker_id


def infer_subject(worker_id: str) -> str:
    """Request/reply: InferenceRequest -> InferenceReply, answered by that worker only."""
    return f"{SUBJECT_PREFIX}.worker.{worker_id}.infer"


def alpha_subject(worker_id: str) -> str:
    """Publish: AlphaDecision for that worker (from the controller)."""
    return f"{SUBJECT_PREFIX}.worker.{worker_id}.alpha"


def snapshot_request_subject(worker_id: str) -> str:
    """Request/reply: SnapshotRequest -> SnapshotAck; the worker then publishes a snapshot digest."""
    return f"{SUBJECT_PREFIX}.worker.{worker_id}.snapshot"


def digest_subject(worker_id: str) -> str:
    """Publish: WorkerDigest (residency deltas/snapshots, load, alpha, cost coefficients)."""
    return f"{SUBJECT_PREFIX}.digest.{worker_id}"


DIGEST_WILDCARD: Final = f"{SUBJECT_PREFIX}.digest.*"

# cachestate -> gateways: the routing view (ViewUpdate deltas and snapshot parts).
VIEW_SUBJECT: Final = f"{SUBJECT_PREFIX}.view"
# gateway -> cachestate, request/reply: ViewSnapshotRequest -> ViewSnapshotAck; the snapshot itself is
# published on VIEW_SUBJECT (so every gateway may use it).
VIEW_SNAPSHOT_SUBJECT: Final = f"{SUBJECT_PREFIX}.view.snapshot"


def echo_subject(token: str) -> str:
    """Publish and subscribe by one process, to itself (an empty payload): its own round trip through the
    server. cachestate judges workers' silence only while its echo comes back."""
    return f"{SUBJECT_PREFIX}.echo.{token}"


# cachestate -> controller: per-worker windowed workload features (FeatureReport).
FEATURES_SUBJECT: Final = f"{SUBJECT_PREFIX}.features"

# Replies go to the requester's own inbox (shared.bus): `_INBOX.<user>.<random>.<counter>` for a client that
# authenticates with a user name (NATS permissions then let each user subscribe `_INBOX.<user>.>` only, so
# that no client can read another's replies: deploy/compose/gen_workers.py), else `_INBOX.<random>.<counter>`.
# A temporary subject either way.
INBOX_PREFIX: Final = "_INBOX"
# One subject token as NATS reads it: not empty, no separator (`.`), no wildcard (`*`, `>`), no whitespace
# or control character (nats-server refuses whitespace in a subject; the rest would split or widen it).
_SUBJECT_TOKEN_RE: Final = re.compile(r"[^.*>\s\x00-\x1f\x7f]+")


def inbox_prefix(user: str | None) -> str:
    """The reply inbox prefix of a client authenticated as `user` (None: no user name, e.g. a token):
    `_INBOX.<user>`, or `_INBOX`. Its replies arrive under `<prefix>.>`, which is what the NATS permissions
    let that user subscribe. ValueError if `user` is not one subject token."""
    if user is None:
        return INBOX_PREFIX
    if not _SUBJECT_TOKEN_RE.fullmatch(user):
        raise ValueError(
            f"user name {user!r} must be one NATS subject token: not empty, without '.', '*', '>', "
            f"whitespace or control characters (replies go to its inbox, {INBOX_PREFIX}.<user>.>)"
        )
    return f"{INBOX_PREFIX}.{user}"


# The subjects above that carry a per-worker or per-process token, as templates (OTel's
# `messaging.destination.template`), so that span names stay few however many workers there are.
_SUBJECT_TEMPLATES: Final = tuple(
    (template, tuple(template.split(".")))
    for template in (
        infer_subject("{worker}"),
        alpha_subject("{worker}"),
        snapshot_request_subject("{worker}"),
        digest_subject("{worker}"),
        echo_subject("{token}"),
    )
)


@functools.lru_cache(maxsize=1024)  # on every traced message: a few subjects, looked up again and again
def subject_template(subject: str) -> str | None:
    """The template of a subject built above with a variable token (`onepool.worker.w3.infer` ->
    `onepool.worker.{worker}.infer`; a wildcard pattern such as `onepool.digest.*` too); None for a fixed
    subject or one that is not ours."""
    tokens = subject.split(".")
    for template, parts in _SUBJECT_TEMPLATES:
        if len(parts) == len(tokens) and all(
            part == token or part.startswith("{") for part, token in zip(parts, tokens, strict=True)
        ):
            return template
    return None


def is_reply_subject(subject: str) -> bool:
    """True for a reply inbox, any user's or none's (`inbox_prefix`: `_INBOX.…`), a temporary subject with a
    random token."""
    return subject.startswith(inbox_prefix(None) + ".")


# ---------------------------------------------------------------------------------------------------------
# Constrained scalar types.
# ---------------------------------------------------------------------------------------------------------
# int64 range: ids and timestamps become numpy int64 arrays.
NonNegInt = Annotated[int, Meta(ge=0, le=2**63 - 1)]
PosInt = Annotated[int, Meta(ge=1)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
UserId = Annotated[str, Meta(min_length=1, max_length=256)]
RequestId = Annotated[str, Meta(min_length=1, max_length=128)]


class _Msg(Struct, forbid_unknown_fields=True):
    """Common base: unknown fields are an error (a typo must not be silently ignored)."""


# ---------------------------------------------------------------------------------------------------------
# Inference (gateway -> worker).
# ---------------------------------------------------------------------------------------------------------
class InferenceRequest(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    history: list[NonNegInt]
    timestamps: list[NonNegInt] | None = None
    candidates: list[NonNegInt]
    k: PosInt | None = None
    # Time budget left when the request was sent, in ms (a relative deadline, immune to clock skew).
    deadline_ms: Annotated[float, Meta(gt=0.0)] = 1000.0


# What the caller does with an error, as a string so other languages can read it.
ErrorClass = Literal["retry", "client", "bug"]

# The error code of a worker that is shutting down: a gateway retries elsewhere and keeps off it.
DRAINING: Final = "draining"


class ErrorBody(_Msg, kw_only=True):
    code: str
    message: str
    field: str | None = None
    # What the caller does: "retry" elsewhere/later, "client" (caller's fault), "bug".
    kind: ErrorClass = "bug"


class InferenceResult(_Msg, kw_only=True):
    items: list[int]
    scores: list[float]
    cached_tokens: NonNegInt
    computed_tokens: NonNegInt
    emb_hits: NonNegInt
    emb_misses: NonNegInt
    queue_ms: NonNegFloat
    compute_ms: NonNegFloat  # the requests served together with it (itself included), start to end
    total_ms: NonNegFloat
    batch_size: Annotated[int, Meta(ge=1, le=2**31 - 1)] = (
        1  # requests served together with it, itself included
    )


class InferenceReply(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    request_id: str
    worker_id: str
    ok: InferenceResult | None = None
    error: ErrorBody | None = None


# ---------------------------------------------------------------------------------------------------------
# Alpha decisions (controller -> worker) and snapshot requests (cachestate -> worker).
# ---------------------------------------------------------------------------------------------------------
class AlphaDecision(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    decision_id: Annotated[str, Meta(min_length=1, max_length=128)]
    worker_id: str
    target_alpha: float  # range-checked by the worker, which logs and drops out-of-range values
    issued_at_ms: NonNegFloat = 0.0


class SnapshotRequest(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    reason: str = ""


class SnapshotAck(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    worker_id: str
    incarnation: str
    seq: NonNegInt


# ---------------------------------------------------------------------------------------------------------
# Digests (worker -> cachestate).
# ---------------------------------------------------------------------------------------------------------
class LoadInfo(_Msg, kw_only=True):
    in_flight: NonNegInt = 0  # accepted and not yet answered (queued + running)
    queue_depth: NonNegInt = 0  # waiting for the model thread
    ewma_latency_ms: NonNegFloat = 0.0  # receipt to reply, queueing included
    # What each request ahead in the queue costs the model thread, in ms (no queueing). 0: unknown.
    ewma_service_ms: NonNegFloat = 0.0
    requests_total: NonNegInt = 0
    errors_total: NonNegInt = 0
    # The worker's own limit on in_flight (its max_queue setting): beyond it, it refuses with "overloaded".
    # Gateways shed at their door when every worker is at its limit. 0: not reported (no limit known).
    max_queue: NonNegInt = 0
    # Requests its model serves together, on average (EWMA over batches; 0: none served yet).
    mean_batch_size: NonNegFloat = 0.0


class CostCoefficients(_Msg, kw_only=True):
    """The worker's own fitted service-time model: ms = fixed + sum(coefficient * count)."""

    fixed_ms: NonNegFloat = 0.0
    ms_per_new_token: NonNegFloat = 0.0
    ms_per_cached_token: NonNegFloat = 0.0
    ms_per_candidate: NonNegFloat = 0.0
    ms_per_emb_miss: NonNegFloat = 0.0
    samples: NonNegInt = 0  # requests the fit has seen (0: the documented prior)


class KvEntry(_Msg, array_like=True):
    """One KV residency record: user and how many history tokens its cached prefix covers."""

    user_id: str
    length: NonNegInt


class PoolStats(_Msg, kw_only=True):
    """Cumulative pool counters (monotonic within an incarnation)."""

    emb_hits: NonNegInt = 0
    emb_misses: NonNegInt = 0
    kv_hits: NonNegInt = 0
    kv_misses: NonNegInt = 0
    emb_evictions: NonNegInt = 0
    kv_evictions: NonNegInt = 0
    chunks_moved: NonNegInt = 0
    emb_miss_bytes: NonNegInt = 0
    prefetch_bytes: NonNegInt = 0
    critical_refill_bytes: NonNegInt = 0
    emb_capacity: NonNegInt = 0
    emb_size: NonNegInt = 0
    kv_users: NonNegInt = 0


class WindowStats(_Msg, kw_only=True):
    """What the worker served since its previous digest (one digest period): the controller's raw input."""

    window_ms: NonNegFloat = 0.0
    requests: NonNegInt = 0
    kv_hit_requests: NonNegInt = 0  # requests that found their user's KV (cached_tokens > 0)
    history_tokens: NonNegInt = 0  # sum over requests of the history length
    max_history_tokens: NonNegInt = 0
    new_tokens: NonNegInt = 0  # history tokens computed (not served from the KV cache)
    cached_tokens: NonNegInt = 0
    emb_hits: NonNegInt = 0
    emb_misses: NonNegInt = 0
    latency_p50_ms: NonNegFloat = 0.0  # receipt to reply, in the worker
    latency_p99_ms: NonNegFloat = 0.0
    slo_violations: NonNegInt = 0  # requests slower than the worker's SLO setting
    slo_ms: NonNegFloat = 0.0


class WorkerDigest(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    worker_id: str
    incarnation: str  # changes on every process start
    seq: NonNegInt  # consecutive per incarnation, snapshots included; a gap means a lost digest
    kind: Literal["delta", "snapshot"]
    # A large digest travels as `parts` messages with consecutive `seq`, parts 0..parts-1. The residency
    # of a snapshot is complete once every part has arrived; each part of a delta is a delta by itself.
    part: NonNegInt = 0
    parts: PosInt = 1
    sent_at_ms: NonNegFloat
    period_ms: NonNegFloat  # how often this worker sends; liveness is judged in periods
    # Residency. In a delta: upserts (created/extended entries) and removals since the previous digest.
    # In a snapshot: kv_upserts/emb_added are the whole resident sets and the removal lists are empty.
    kv_upserts: list[KvEntry] = []
    kv_removed: list[str] = []
    emb_added: list[int] = []
    emb_removed: list[int] = []
    load: LoadInfo = msgspec.field(default_factory=LoadInfo)
    alpha: Fraction = 0.0
    alpha_target: Fraction = 0.0
    applied_decision_id: str | None = None
    cost: CostCoefficients = msgspec.field(default_factory=CostCoefficients)
    stats: PoolStats = msgspec.field(default_factory=PoolStats)
    window: WindowStats = msgspec.field(default_factory=WindowStats)
    draining: bool = False  # the worker is shutting down: route nothing new to it


# ---------------------------------------------------------------------------------------------------------
# Routing view (cachestate -> gateways).
# ---------------------------------------------------------------------------------------------------------
class WorkerState(_Msg, kw_only=True):
    """What a gateway needs to know about one live worker besides residency."""

    worker_id: str
    incarnation: str
    draining: bool = False
    load: LoadInfo = msgspec.field(default_factory=LoadInfo)
    alpha: Fraction = 0.0
    alpha_target: Fraction = 0.0
    cost: CostCoefficients = msgspec.field(default_factory=CostCoefficients)
    # When its last digest arrived, on cachestate's monotonic clock (ms): compare only with other values
    # from the same source (e.g. to see which worker was heard from last), never with wall time.
    last_seen_ms: NonNegFloat = 0.0


class KvPlacement(_Msg, array_like=True):
    user_id: str
    worker_id: str
    length: NonNegInt


class KvRemoval(_Msg, array_like=True):
    user_id: str
    worker_id: str


class EmbChange(_Msg, array_like=True):
    worker_id: str
    items: list[NonNegInt]


class ViewUpdate(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    source: str  # the cachestate incarnation; a new one means: resync from a snapshot
    seq: NonNegInt  # consecutive per source, snapshot parts included
    kind: Literal["delta", "snapshot"]
    part: NonNegInt = 0
    parts: PosInt = 1
    sent_at_ms: NonNegFloat = 0.0
    # Snapshot: every live worker and all residency (across its parts). Delta: changed worker records,
    # workers fenced or gone (drop all their residency), and residency changes.
    workers: list[WorkerState] = []
    workers_removed: list[str] = []
    kv_upserts: list[KvPlacement] = []
    kv_removed: list[KvRemoval] = []
    emb_added: list[EmbChange] = []
    emb_removed: list[EmbChange] = []


class ViewSnapshotRequest(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    requester: str = ""


class ViewSnapshotAck(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    source: str
    seq: NonNegInt  # the first part of the snapshot published on VIEW_SUBJECT
    parts: PosInt


# ---------------------------------------------------------------------------------------------------------
# Controller input (cachestate -> controller).
# ---------------------------------------------------------------------------------------------------------
class WorkerFeatures(_Msg, kw_only=True):
    worker_id: str
    window_ms: NonNegFloat
    request_rate: NonNegFloat  # requests per second in the window
    request_rate_delta: float  # change of the rate since the previous window, per second
    hot_user_share: Fraction  # share of requests whose user's KV was resident
    mean_history: NonNegFloat
    max_history: NonNegInt
    new_token_fraction: Fraction  # computed history tokens / all history tokens
    emb_hit_rate: Fraction
    kv_hit_rate: Fraction
    miss_bytes: NonNegInt  # EMB miss bytes in the window
    emb_misses_per_request: NonNegFloat = 0.0  # EMB misses counted in the window's requests, per request
    p99_latency_ms: NonNegFloat
    slo_violation_rate: Fraction
    alpha: Fraction
    alpha_target: Fraction
    # The worker's own fitted service-time model at the window's end (samples 0: it has none yet).
    cost: CostCoefficients = msgspec.field(default_factory=CostCoefficients)


class FeatureReport(_Msg, kw_only=True):
    v: int = SCHEMA_VERSION
    source: str
    seq: NonNegInt
    sent_at_ms: NonNegFloat
    workers: list[WorkerFeatures] = []


# ---------------------------------------------------------------------------------------------------------
# Codec helpers.
# ---------------------------------------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


class DecodeError(OnepoolError):
    """A message that does not decode or validate; `field` is the dotted path of the culprit, if known.

    The sender's fault: a handler of a request subject that raises it gets an error reply from the bus
    (shared.bus), one of a publish subject is counted and dropped with one warning line."""

    code = "bad_message"
    kind = ErrorKind.CLIENT

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message, field=field)


_PATH_RE = re.compile(r"at `\$(?P<path>[^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `(?P<name>[^`]+)`")
_MISSING_RE = re.compile(r"missing required field `(?P<name>[^`]+)`")


def field_from_error(message: str) -> str | None:
    """Turn msgspec's '... - at `$.history[3]`' into 'history[3]' so errors name the field."""
    path_match = _PATH_RE.search(message)
    path = path_match.group("path").lstrip(".") if path_match else ""
    for pattern in (_UNKNOWN_RE, _MISSING_RE):
        name_match = pattern.search(message)
        if name_match:
            name = name_match.group("name")
            return f"{path}.{name}" if path else name
    return path or None


T = TypeVar("T", bound=Struct)


def decoder(cls: type[T]) -> msgspec.msgpack.Decoder[T]:
    return msgspec.msgpack.Decoder(cls)


def decode(dec: msgspec.msgpack.Decoder[T], data: bytes) -> T:
    """Decode and validate, raising DecodeError naming the field; also checks the schema version."""
    try:
        msg = dec.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(str(exc), field_from_error(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"undecodable message: {exc}", None) from None
    except UnicodeDecodeError as exc:  # msgspec lets it through for a str that is not UTF-8
        raise DecodeError(
            f"a string is not valid UTF-8: {exc.reason} at byte {exc.start} of it", None
        ) from None
    version = getattr(msg, "v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {version} (this build speaks {SCHEMA_VERSION})", "v")
    return msg
