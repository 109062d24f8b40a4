"""Errors of the worker package. Each carries its wire code, the offending field and what the caller does."""

from __future__ import annotations

from shared.errors import ErrorKind, OnepoolError
from shared.schemas import DRAINING, ErrorBody


class WorkerError(OnepoolError):
    """Base of the worker's request errors; `to_body()` is what goes on the wire."""

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, field=self.field, kind=self.kind.value)


class InvalidRequest(WorkerError):
    code = "invalid_request"
    kind = ErrorKind.CLIENT

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message, field=field)


class Overloaded(WorkerError):
    code = "overloaded"
    kind = ErrorKind.RETRY

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} requests in flight (limit {limit})")
        self.queued = queued
        self.limit = limit


class DeadlineExceeded(WorkerError):
    code = "deadline_exceeded"
    kind = ErrorKind.RETRY

    def __init__(self, waited_ms: float, deadline_ms: float) -> None:
        super().__init__(
            f"waited {waited_ms:.1f} ms of a {deadline_ms:.1f} ms budget before the model could start"
        )
        self.waited_ms = waited_ms
        self.deadline_ms = deadline_ms


class Draining(WorkerError):
    code = DRAINING
    kind = ErrorKind.RETRY

    def __init__(self) -> None:
        super().__init__("worker is shutting down")


class InternalError(WorkerError):
    code = "internal"
    kind = ErrorKind.BUG

    def __init__(self, message: str) -> None:
        super().__init__(message)
