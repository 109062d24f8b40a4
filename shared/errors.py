"""Errors of the onepool package.

Errors carry data (a stable ``code``, the offending ``field`` if any) and are
classified by what the *caller* should do about them (``kind``), so that
handlers can decide to retry, reject or page without string matching.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

# The exit code of a process that refused its operator's input (a UsageError) or its arguments (argparse's
# too): restarting it would not help, and `onepool up` gives such a child up at once.
EXIT_USAGE: Final = 2


class ErrorKind(StrEnum):
    RETRY = "retry"  # transient: try elsewhere or later
    CLIENT = "client"  # the caller's fault: do not retry the same input
    BUG = "bug"  # an invariant broke: report it


class OnepoolError(Exception):
    """Base class: every error this package raises on purpose derives from it."""

    code: str = "onepool_error"
    kind: ErrorKind = ErrorKind.BUG

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        kind: ErrorKind | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if kind is not None:
            self.kind = kind
        self.field = field

    def to_dict(self) -> dict[str, str]:
        """A JSON-friendly view, e.g. for an error reply on the bus or over HTTP."""
        out = {"code": self.code, "kind": str(self.kind), "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code!r}, kind={self.kind.value!r}, message={self.message!r})"


class BusTimeout(OnepoolError):
    code = "bus_timeout"
    kind = ErrorKind.RETRY

    def __init__(self, subject: str, timeout_s: float) -> None:
        super().__init__(f"no reply on {subject!r} within {timeout_s:g}s")
        self.subject = subject
        self.timeout_s = timeout_s


class NoResponders(OnepoolError):
    code = "no_responders"
    kind = ErrorKind.RETRY

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders are subscribed to {subject!r}")
        self.subject = subject


class BusClosed(OnepoolError):
    code = "bus_closed"
    kind = ErrorKind.RETRY

    def __init__(self, message: str = "the bus connection is closed") -> None:
        super().__init__(message)


class BusDisconnected(OnepoolError):
    """The bus connection is down (the client is reconnecting): a request cannot be sent, or its reply
    cannot arrive. Fails at once instead of waiting for a timeout."""

    code = "bus_disconnected"
    kind = ErrorKind.RETRY

    def __init__(self, subject: str) -> None:
        super().__init__(f"not connected to NATS: {subject!r} cannot be used now")
        self.subject = subject


class RemoteError(OnepoolError):
    """The responder answered a request with an error reply (shared.bus): its code, kind and field."""

    def __init__(self, subject: str, *, code: str, kind: ErrorKind, message: str, field: str | None) -> None:
        super().__init__(message, code=code, kind=kind, field=field)
        self.subject = subject


class BusError(OnepoolError):
    """Any other failure of the messaging layer (wraps the nats-py exception as __cause__)."""

    code = "bus_error"
    kind = ErrorKind.RETRY

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(message)
        self.subject = subject


class UsageError(OnepoolError):
    """The operator's input cannot work (a setting, a missing extra, a model file): the process ends with
    EXIT_USAGE, since starting it again would fail the same way. ``field`` names the setting if one."""

    code = "usage_error"
    kind = ErrorKind.CLIENT


class SettingsError(UsageError):
    """An operator's bad environment variable or flag; ``field`` names the variable."""

    code = "bad_setting"
    kind = ErrorKind.CLIENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


class MissingExtra(UsageError):
    """A command needs an optional part of onepool (an extra of pyproject.toml) that is not installed."""

    code = "missing_extra"
    kind = ErrorKind.CLIENT

    def __init__(self, what: str, extra: str, module: str) -> None:
        # Not `pip install 'onepool[...]'`: on PyPI, "onepool" is another project.
        super().__init__(
            f"{what} needs {module}, which is not installed: install onepool[{extra}] "
            f"(in a checkout of onepool: pip install '.[{extra}]')"
        )
        self.extra = extra
        self.module = module
