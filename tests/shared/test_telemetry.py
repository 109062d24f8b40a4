from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    TraceIdRatioBased,
)

from shared.errors import SettingsError
from shared.telemetry import (
    get_logger,
    log_level_from_env,
    sampler_from_env,
    setup_telemetry,
    traces_endpoint_from_env,
)
from shared.version import onepool_version

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    # setup_telemetry configures process-wide logging (as a service shell wants); give it back afterwards.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_setup_twice_does_not_raise_and_reuses_the_global_provider() -> None:
    first = setup_telemetry("svc-a", service_instance_id="a-1", env={}, stream=io.StringIO())
    second = setup_telemetry("svc-b", env={}, stream=io.StringIO())
    assert not second.owns_provider  # the global provider can be set once per process
    assert second.provider is trace.get_tracer_provider()
    with second.tracer("t").start_as_current_span("s") as span:
        assert span.get_span_context().is_valid
    for t in (first, second, first, second):
        t.shutdown()  # idempotent, and never shuts down a provider it merely reused


def test_json_lines_carry_trace_ids_inside_a_span() -> None:
    buf = io.StringIO()
    setup_telemetry("svc-json", env={}, stream=buf, log_format="json")
    log = get_logger("tests.telemetry")
    tracer = TracerProvider().get_tracer("t")  # a private provider: log correlation needs only the context

    log.info("outside", n=1)
    with tracer.start_as_current_span("work") as span:
        log.info("inside", n=2)
        logging.getLogger("some.library").warning("stdlib %s", "inside")
        logging.getLogger("some.library").debug("below INFO")
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("failed")
    ctx = span.get_span_context()

    by_event = {line["event"]: line for line in _lines(buf)}
    assert "below INFO" not in by_event
    outside, inside, stdlib, failed = (by_event[k] for k in ("outside", "inside", "stdlib inside", "failed"))
    assert "trace_id" not in outside and "span_id" not in outside
    for line in (inside, stdlib, failed):
        assert line["trace_id"] == format(ctx.trace_id, "032x")
        assert line["span_id"] == format(ctx.span_id, "016x")
        assert line["service"] == "svc-json" and "timestamp" in line
    assert inside["level"] == "info" and inside["logger"] == "tests.telemetry" and inside["n"] == 2
    assert stdlib["level"] == "warning" and stdlib["logger"] == "some.library"
    assert failed["level"] == "error" and failed["exception"][0]["exc_type"] == "ValueError"


def test_second_setup_replaces_the_handler_instead_of_doubling_lines() -> None:
    old, new = io.StringIO(), io.StringIO()
    setup_telemetry("svc", env={}, stream=old, log_format="json")
    setup_telemetry("svc", env={}, stream=new, log_format="json")
    get_logger("x").info("once")
    assert "once" not in old.getvalue()
    assert [line["event"] for line in _lines(new)].count("once") == 1


def test_console_format() -> None:
    buf = io.StringIO()
    setup_telemetry("svc", env={}, stream=buf, log_format="console")
    get_logger("x").info("hello console", k="v")
    text = buf.getvalue()
    assert "hello console" in text and "k=v" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[-1])


def test_traces_endpoint_from_env() -> None:
    assert traces_endpoint_from_env({}) is None
    assert (
        traces_endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
        == "http://c:4318/v1/traces"
    )
    assert (
        traces_endpoint_from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x",
            }
        )
        == "http://t:1/x"
    )


_EXPORT_SCRIPT = """
import sys
from shared.telemetry import setup_telemetry
t = setup_telemetry("svc-otlp", service_instance_id="i-7", env={"OTEL_EXPORTER_OTLP_ENDPOINT": sys.argv[1]})
assert t.owns_provider
with t.tracer("probe").start_as_current_span("exported span"):
    pass
t.shutdown()
"""


def test_spans_are_exported_over_otlp_http(tmp_path: Path) -> None:
    # A fresh process (the global provider is set once per process) exporting to a local receiver.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    bodies: list[tuple[str, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        proc = subprocess.run(
            [sys.executable, "-c", _EXPORT_SCRIPT, endpoint],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    [(path, body)] = bodies
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "svc-otlp" and resource["service.instance.id"] == "i-7"
    assert resource["service.version"] == onepool_version() != ""
    assert [s.name for ss in resource_spans.scope_spans for s in ss.spans] == ["exported span"]


def test_log_level_comes_from_onepool_log_level() -> None:
    assert log_level_from_env({}) == logging.INFO
    assert log_level_from_env({"ONEPOOL_LOG_LEVEL": " Debug "}) == logging.DEBUG
    assert log_level_from_env({"ONEPOOL_LOG_LEVEL": "ERROR"}) == logging.ERROR
    with pytest.raises(SettingsError, match="ONEPOOL_LOG_LEVEL='verbose'") as err:
        log_level_from_env({"ONEPOOL_LOG_LEVEL": "verbose"})
    assert err.value.field == "ONEPOOL_LOG_LEVEL"
    buf = io.StringIO()
    setup_telemetry("svc-level", env={"ONEPOOL_LOG_LEVEL": "warning"}, log_format="json", stream=buf)
    get_logger("probe").info("hidden")
    get_logger("probe").warning("shown")
    assert [line["event"] for line in _lines(buf)] == ["shown"]


def test_the_sampler_follows_the_standard_variables_and_refuses_what_it_does_not_know() -> None:
    default = sampler_from_env({})
    assert (
        isinstance(default, ParentBased)
        and default.get_description() == ParentBased(ALWAYS_ON).get_description()
    )
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"}) is ALWAYS_OFF
    ratio = sampler_from_env(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    )
    assert isinstance(ratio, ParentBasedTraceIdRatio)
    assert ratio.get_description() == ParentBasedTraceIdRatio(0.1).get_description()
    plain = sampler_from_env({"OTEL_TRACES_SAMPLER": "TraceIdRatio"})  # names are case-insensitive
    assert isinstance(plain, TraceIdRatioBased) and plain.rate == 1.0  # the spec's default ratio
    with pytest.raises(SettingsError) as err:
        sampler_from_env({"OTEL_TRACES_SAMPLER": "sometimes"})
    assert err.value.field == "OTEL_TRACES_SAMPLER"
    for bad in ("1.5", "-0.1", "half", "nan"):
        with pytest.raises(SettingsError) as err:
            sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": bad})
        assert err.value.field == "OTEL_TRACES_SAMPLER_ARG"
