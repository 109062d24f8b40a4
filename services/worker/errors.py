"""Errors of the worker package. Each carries its wire code, the offending field and what the caller does:
request errors (`WorkerError`, on the wire) and model input files refused at start-up (`ModelInputError`)."""

from __future__ import annotations

from pathlib import Path

from services.worker.settings import ENV_PREFIX
from shared.errors import ErrorKind, OnepoolError, UsageError
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


class ModelInputError(UsageError):
    """A model input file the worker refuses at start-up, before it serves: `path`, the `problem`, and what
    was `found` against what was `expected` where a comparison says it; `field` names the setting."""

    code = "bad_model_input"
    kind = ErrorKind.CLIENT
    what = "model input"
    setting = ""

    def __init__(
        self, path: str | Path, problem: str, *, found: str | None = None, expected: str | None = None
    ) -> None:
        text = f"{self.what} {path}: {problem}"
        if found is not None or expected is not None:
            text += f" (found {found or '?'}, expected {expected or '?'})"
        super().__init__(text, field=f"{ENV_PREFIX}{self.setting.upper()}" if self.setting else None)
        self.path = str(path)
        self.problem = problem
        self.found = found
        self.expected = expected


class EmbeddingTableError(ModelInputError):
    """The host embedding table file (`ONEPOOL_WORKER_EMBEDDING_TABLE`) cannot serve this model."""

    code = "bad_embedding_table"
    what = "embedding table"
    setting = "embedding_table"


class CheckpointError(ModelInputError):
    """The HSTU checkpoint (`ONEPOOL_WORKER_CHECKPOINT`) cannot be read or does not fit the model preset."""

    code = "bad_checkpoint"
    what = "HSTU checkpoint"
    setting = "checkpoint"
