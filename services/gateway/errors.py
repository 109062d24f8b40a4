"""Errors of the gateway package: each maps to an HTTP status and a JSON body naming the field."""

from __future__ import annotations

from shared.errors import ErrorKind, OnepoolError


class GatewayError(OnepoolError):
    status: int = 500

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class InvalidInput(GatewayError):
    code = "invalid_request"
    kind = ErrorKind.CLIENT
    status = 400

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message, field=field)


class BodyTooLarge(GatewayError):
    code = "body_too_large"
    kind = ErrorKind.CLIENT
    status = 413

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"request body larger than {limit_bytes} bytes")


class NoWorkerAvailable(GatewayError):
    code = "no_worker"
    kind = ErrorKind.RETRY
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)


class UpstreamFailed(GatewayError):
    """Every worker tried failed or timed out within the deadline."""

    code = "upstream_failed"
    kind = ErrorKind.RETRY
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)


class UnsupportedMediaType(GatewayError):
    code = "unsupported_media_type"
    kind = ErrorKind.CLIENT
    status = 415

    def __init__(self, message: str) -> None:
        super().__init__(message, field=None)


class BodyTimeout(GatewayError):
    """The body did not arrive within the body read timeout (a slow or stalled upload)."""

    code = "body_timeout"
    kind = ErrorKind.CLIENT
    status = 408

    def __init__(self, timeout_ms: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_ms:.0f} ms")


class Overloaded(GatewayError):
    """Shed at the door: the gateway is at its concurrency limit, or every worker at its queue limit."""

    code = "overloaded"
    kind = ErrorKind.RETRY
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)


class BusUnavailable(GatewayError):
    """The gateway has no NATS connection: nothing can be sent to a worker now."""

    code = "bus_unavailable"
    kind = ErrorKind.RETRY
    status = 503

    def __init__(self) -> None:
        super().__init__("the gateway has no connection to the message bus; retry shortly")


class DeadlineExceeded(GatewayError):
    code = "deadline_exceeded"
    kind = ErrorKind.RETRY
    status = 504

    def __init__(self, message: str) -> None:
        super().__init__(message)
