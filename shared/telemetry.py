"""Tracing and logging setup shared by every service.

One call per process, from the service shell: :func:`setup_telemetry`. It installs an
OpenTelemetry SDK TracerProvider (exporting over OTLP/HTTP when the standard
``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables are set, sampling as the standard
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` say, checked here) and routes structlog and
stdlib logging into one stream of JSON lines (console rendering on a tty) at the level
``ONEPOOL_LOG_LEVEL`` names, each line carrying the ``trace_id``/``span_id`` of the span
current when it was logged.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any, Literal

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from structlog.typing import EventDict, Processor, WrappedLogger

from shared.errors import SettingsError
from shared.version import onepool_version

LogFormat = Literal["auto", "json", "console"]

_log = structlog.stdlib.get_logger("shared.telemetry")
_lock = threading.Lock()  # setup may race with itself in threaded tests; the global provider is set once


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger routed through stdlib logging (configured by setup_telemetry)."""
    return structlog.stdlib.get_logger(name)


class Telemetry:
    """What setup_telemetry configured; ``shutdown()`` flushes the spans it owns."""

    def __init__(
        self,
        service_name: str,
        provider: trace.TracerProvider,
        *,
        owns_provider: bool,
        traces_endpoint: str | None,
    ) -> None:
        self.service_name = service_name
        self.provider = provider
        self.owns_provider = owns_provider  # False: another provider was already global; we reuse it
        self.traces_endpoint = traces_endpoint
        self._shut_down = False

    def tracer(self, name: str) -> trace.Tracer:
        return self.provider.get_tracer(name)

    def force_flush(self, timeout_ms: int = 5_000) -> bool:
        flush = getattr(self.provider, "force_flush", None)  # only SDK providers can flush
        return bool(flush(timeout_ms)) if callable(flush) else True

    def shutdown(self) -> None:
        """Flush and shut down the provider this Telemetry created (never a reused one). Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.owns_provider and isinstance(self.provider, TracerProvider):
            self.provider.shutdown()  # BatchSpanProcessor.shutdown exports what is queued


def traces_endpoint_from_env(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL per the OTel exporter spec: the per-signal variable is used as is,
    the generic one gets ``/v1/traces`` appended (its conventional port is 4318)."""
    specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


LOG_LEVEL_VAR = "ONEPOOL_LOG_LEVEL"
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
SAMPLER_VAR = "OTEL_TRACES_SAMPLER"
SAMPLER_ARG_VAR = "OTEL_TRACES_SAMPLER_ARG"
# The OTel SDK's sampler names (sdk-environment-variables spec), with the spec's default first.
_SAMPLERS = (
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
    "always_on",
    "always_off",
    "traceidratio",
)


def log_level_from_env(env: Mapping[str, str]) -> int:
    """``ONEPOOL_LOG_LEVEL`` (debug, info, warning, error, critical; any case), INFO when unset."""
    raw = env.get(LOG_LEVEL_VAR, "").strip()
    if not raw:
        return logging.INFO
    level = _LOG_LEVELS.get(raw.lower())
    if level is None:
        raise SettingsError(
            LOG_LEVEL_VAR,
            f"{LOG_LEVEL_VAR}={raw!r} is not a log level: expected one of {', '.join(_LOG_LEVELS)}",
        )
    return level


def sampler_from_env(env: Mapping[str, str]) -> Sampler:
    """The sampler the standard variables name, as the OTel SDK reads them, except that a name or a ratio it
    does not know is an error here (the SDK would warn and sample everything)."""
    name = env.get(SAMPLER_VAR, "").strip().lower() or _SAMPLERS[0]
    if name not in _SAMPLERS:
        raise SettingsError(
            SAMPLER_VAR, f"{SAMPLER_VAR}={name!r} is not a sampler: expected one of {', '.join(_SAMPLERS)}"
        )
    if name.endswith("traceidratio"):
        raw = env.get(SAMPLER_ARG_VAR, "").strip()
        try:
            ratio = float(raw) if raw else 1.0  # the spec's default ratio
        except ValueError:
            ratio = math.nan
        if not 0.0 <= ratio <= 1.0:
            raise SettingsError(
                SAMPLER_ARG_VAR, f"{SAMPLER_ARG_VAR}={raw!r} is not a ratio: expected a number in [0, 1]"
            )
        return ParentBasedTraceIdRatio(ratio) if name.startswith("parentbased") else TraceIdRatioBased(ratio)
    return {
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
    }[name]


def check_telemetry_env(env: Mapping[str, str]) -> None:
    """Raise SettingsError for a bad ``ONEPOOL_LOG_LEVEL`` or ``OTEL_TRACES_SAMPLER*``: commands call it
    before they start anything, so that the mistake is a usage error, not a service failing later."""
    log_level_from_env(env)
    sampler_from_env(env)


def setup_telemetry(
    service_name: str,
    *,
    service_instance_id: str | None = None,
    env: Mapping[str, str] | None = None,
    log_level: int | str | None = None,
    log_format: LogFormat = "auto",
    stream: IO[str] | None = None,
) -> Telemetry:
    """Configure tracing and logging for this process; safe to call more than once (tests do).

    ``log_level`` defaults to ``ONEPOOL_LOG_LEVEL`` from ``env``. ``stream`` defaults to whatever
    ``sys.stderr`` is at write time; ``log_format="auto"`` renders JSON lines unless that stream is a tty.
    A bad ``ONEPOOL_LOG_LEVEL`` or ``OTEL_TRACES_SAMPLER*`` raises SettingsError before anything is set up.
    """
    env = os.environ if env is None else env
    level = log_level_from_env(env) if log_level is None else log_level
    endpoint = traces_endpoint_from_env(env)
    sampler = sampler_from_env(env)  # checked with or without an exporter: one rule for every command
    if not endpoint:
        # Nothing would read a recorded span: make spans non-recording (they still carry valid trace ids, so
        # logs, x-trace-id and propagation work) and spare every request their cost.
        sampler = ALWAYS_OFF
    _configure_logging(service_name, log_level=level, log_format=log_format, stream=stream)
    with _lock:
        current = trace.get_tracer_provider()
        if not isinstance(current, trace.ProxyTracerProvider):
            # OTel lets the global provider be set once per process: reuse it rather than fail.
            _log.info(
                "tracer provider already installed; reusing it",
                service=service_name,
                provider=type(current).__name__,
                ignored_endpoint=endpoint,
            )
            return Telemetry(service_name, current, owns_provider=False, traces_endpoint=None)
        attributes: dict[str, str] = {SERVICE_NAME: service_name, SERVICE_VERSION: onepool_version()}
        if service_instance_id:
            attributes[SERVICE_INSTANCE_ID] = service_instance_id
        provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        if endpoint:
            # Imported lazily: the exporter pulls in requests/protobuf, unneeded without an endpoint.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
    _log.info(
        "telemetry configured",
        traces_endpoint=endpoint or "none (spans are not exported)",
        sampler=sampler.get_description(),
        version=onepool_version(),
    )
    return Telemetry(service_name, provider, owns_provider=True, traces_endpoint=endpoint)


def in_unsampled_trace() -> bool:
    """True when the current span belongs to a trace that is not sampled (a valid context whose sampled
    flag is off: no exporter, or sampled out). Under the parent-based samplers we use, no child of it
    would be recorded either, so a hot path may skip making child spans and let the current context
    propagate as is (its trace id still reaches logs and downstream services)."""
    ctx = trace.get_current_span().get_span_context()
    return ctx.is_valid and not ctx.trace_flags.sampled


# ---- logging ----


def add_trace_ids(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the current span's ids, hex as in W3C traceparent, when there is one."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict["span_id"] = format(ctx.span_id, "016x")
    return event_dict


class _StderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever sys.stderr is at emit time, so a swapped stderr (pytest capture) is honoured."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_HANDLER_MARK = "_onepool_handler"


def _configure_logging(
    service_name: str, *, log_level: int | str, log_format: LogFormat, stream: IO[str] | None
) -> None:
    def add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service_name)
        return event_dict

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_service,
        add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    target = stream if stream is not None else sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not _isatty(target))
    render: list[Processor] = (
        # Tracebacks as data, without locals (they can hold secrets and make lines huge).
        [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
        if as_json
        else [structlog.dev.ConsoleRenderer(colors=_isatty(target))]
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,  # stdlib records get the same keys as structlog events
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)  # a second setup replaces ours instead of doubling every line
    root.addHandler(handler)
    root.setLevel(log_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: setup may run after module-level get_logger() calls and again in tests.
        cache_logger_on_first_use=False,
    )


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
