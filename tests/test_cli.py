"""The `onepool` console script as a user runs it: real child processes, real nats-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from services.worker.settings import WorkerSettings
from tests.helpers import free_port

ONEPOOL = [sys.executable, "-m", "services.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _processes() -> list[str]:
    """Command line plus environment of every process we may read: enough to find a cluster's children
    (workers carry their NATS URL in the environment, nats-server its port on the command line)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                blob = (entry / "cmdline").read_bytes() + b" " + (entry / "environ").read_bytes()
            except OSError:
                continue
            out.append(blob.replace(b"\0", b" ").decode(errors="replace"))
    return out


def test_worker_help_names_every_setting() -> None:
    out = subprocess.run([*ONEPOOL, "worker", "--help"], capture_output=True, text=True, check=True, cwd=ROOT)
    for name in WorkerSettings.__dataclass_fields__:
        assert f"ONEPOOL_WORKER_{name.upper()}" in out.stdout.replace("\n", " ").replace("  ", ""), name


def test_bad_setting_is_a_clear_error() -> None:
    env = {**os.environ, "ONEPOOL_WORKER_BUDGET_MIB": "lots"}
    out = subprocess.run([*ONEPOOL, "worker"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "ONEPOOL_WORKER_BUDGET_MIB" in out.stderr


def test_configuration_doc_is_current() -> None:
    from services.config_doc import DOC, render

    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `python -m services.config_doc`"
    for name in WorkerSettings.__dataclass_fields__:
        assert f"`ONEPOOL_WORKER_{name.upper()}`" in DOC.read_text(), name


def _start_cluster(port: int, workers: int) -> tuple[subprocess.Popen[str], list[str]]:
    """`onepool up` as a child; returns once it printed its banner (the lines read so far)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [*ONEPOOL, "up", "--workers", str(workers), "--nats-port", str(port), "--port", str(free_port())]
        + ["--worker-env", "ONEPOOL_WORKER_BUDGET_MIB=4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    assert launcher.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = launcher.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "local cluster is up" in line:
            return launcher, lines
    launcher.kill()
    launcher.wait()
    launcher.stdout.close()
    raise AssertionError("no banner from `onepool up`:\n" + "".join(lines[-40:]))


def assert_nothing_left(port: int, timeout_s: float = 10.0) -> None:
    """Within `timeout_s`, no process of that cluster runs any more."""
    deadline = time.monotonic() + timeout_s
    while _leftovers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(port) == []


def _leftovers(port: int) -> list[str]:
    return [
        p[:200]
        for p in _processes()
        if f"-p {port} " in p or f"ONEPOOL_WORKER_NATS_URL=nats://127.0.0.1:{port} " in p
    ]


@pytest.mark.slow
def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    launcher, lines = _start_cluster(port, workers=2)
    try:
        assert any(line.startswith("[w0] ") for line in lines) and any(
            line.startswith("[w1] ") for line in lines
        )
        for worker in ("w0", "w1"):
            reply = subprocess.run(
                [*ONEPOOL, "infer", "--nats-url", f"nats://127.0.0.1:{port}", "--worker", worker]
                + ["--history", "1,2,3", "--candidates", "7,8,9", "--k", "2"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            assert reply.returncode == 0, reply.stderr
            body = json.loads(reply.stdout)
            assert body["worker_id"] == worker and len(body["ok"]["items"]) == 2
        launcher.send_signal(signal.SIGTERM)
        rest, _ = launcher.communicate(timeout=60)
        lines.append(rest)
        assert launcher.returncode == 0, "".join(lines[-40:])
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()
    assert _leftovers(port) == []
    # The workers drained: each said goodbye before NATS went away.
    assert "worker stopping" in "".join(lines)


@pytest.mark.slow
def test_a_second_signal_stops_everything_at_once() -> None:
    port = free_port()
    launcher, _ = _start_cluster(port, workers=1)
    try:
        launcher.send_signal(signal.SIGINT)
        time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()
    assert_nothing_left(port)


@pytest.mark.slow
def test_killed_launcher_takes_its_children_along() -> None:
    port = free_port()
    launcher, _ = _start_cluster(port, workers=1)
    launcher.kill()  # SIGKILL: no handler runs; the children's parent-death signal must do the job
    launcher.wait()
    if launcher.stdout is not None:
        launcher.stdout.close()
    assert_nothing_left(port)


def _quick_bench(name: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """Run `onepool bench <name> --quick`; its printed summary and its JSON report."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [*ONEPOOL, "bench", name, "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_worker_quick_writes_every_key(tmp_path: Path) -> None:
    stdout, report = _quick_bench("worker", tmp_path)
    for key in (
        "kv_speedup",
        "emb_miss_cost_us",
        "realloc_p99_ratio",
        "realloc_critical_path_refill_bytes",
        "naive_realloc_p99_ratio",
        "naive_realloc_critical_path_refill_bytes",
    ):
        assert isinstance(report[key], int | float), key
    assert report["kv_speedup"] > 1.0  # even the smoke sizes reuse KV
    assert report["realloc_critical_path_refill_bytes"] == 0
    assert report["naive_realloc_critical_path_refill_bytes"] > 0
    assert "emulated" in report["host_link"]
    assert "kv_speedup" in stdout


@pytest.mark.slow
def test_bench_routing_quick_writes_every_key(tmp_path: Path) -> None:
    stdout, report = _quick_bench("routing", tmp_path)
    for key in ("route_p50_us", "route_p99_us", "gateway_p99_ms", "direct_p99_ms", "gateway_overhead_p50_ms"):
        assert report[key] > 0, key
    assert isinstance(report["gateway_overhead_p99_ms"], float)  # a difference: may be < 0 on a quiet run
    assert len(report["gateway_overhead_p99_runs_ms"]) == 1
    assert report["gateway_overhead_setup"]["requests_per_arm"] == 200
    assert report["gateway_overhead_setup"]["http_client"] == "lean"
    assert "gateway_overhead_p99_ms" in stdout


def test_bench_arguments_are_checked_before_anything_starts() -> None:
    for bad in (["--requests", "5"], ["--repeats", "0"], ["--rate", "fast"]):
        run = subprocess.run(
            [*ONEPOOL, "bench", "routing", "--json", "unused.json", *bad],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert run.returncode == 2, bad
        assert bad[0] in run.stderr
