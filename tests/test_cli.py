"""The `onepool` console script as a user runs it: real child processes, real nats-server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from services.worker.settings import WorkerSettings
from shared.version import onepool_version
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


def test_version_and_bad_telemetry_variables() -> None:
    out = subprocess.run([*ONEPOOL, "--version"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == f"onepool {onepool_version()}"
    for var, value in (("ONEPOOL_LOG_LEVEL", "chatty"), ("OTEL_TRACES_SAMPLER", "sometimes")):
        env = {**os.environ, var: value}
        out = subprocess.run(
            [*ONEPOOL, "controller"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
        )
        assert out.returncode == 2 and var in out.stderr, out.stderr


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


def _start_cluster(port: int, workers: int, *extra: str) -> tuple[subprocess.Popen[str], list[str], int]:
    """`onepool up` as a child; returns once it printed its banner (the lines read so far) and its gateway
    port. Its output keeps flowing into `lines` from a reader thread."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    http_port = free_port()
    launcher = subprocess.Popen(
        [*ONEPOOL, "up", "--workers", str(workers), "--nats-port", str(port), "--port", str(http_port)]
        + ["--worker-env", "ONEPOOL_WORKER_BUDGET_MIB=4", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    banner = threading.Event()
    assert launcher.stdout is not None
    out = launcher.stdout

    def read() -> None:
        for line in iter(out.readline, ""):
            lines.append(line)
            if "local cluster is up" in line:
                banner.set()

    threading.Thread(target=read, daemon=True).start()
    if not banner.wait(120):
        launcher.kill()
        launcher.wait()
        raise AssertionError("no banner from `onepool up`:\n" + "".join(lines[-40:]))
    return launcher, lines, http_port


def _wait_for(lines: list[str], text: str, timeout_s: float = 60.0, count: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(text in line for line in list(lines)) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in the output:\n" + "".join(lines[-60:])
        time.sleep(0.05)


def _stop(launcher: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
    launcher.send_signal(sig)
    try:
        return launcher.wait(timeout_s)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()


def _recommend(http_port: int, user: str, history: list[int]) -> dict[str, Any]:
    body = json.dumps({"user_id": user, "history": history, "candidates": [7, 8, 9], "k": 2}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/recommend", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        assert resp.status == 200
    return answer


def _child_pid(port: int, worker_id: str) -> int:
    """The pid of the cluster's worker `worker_id` (its environment names it and the cluster's NATS)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"ONEPOOL_WORKER_ID={worker_id}".encode() in environ and any(
            e.endswith(f"NATS_URL=nats://127.0.0.1:{port}".encode()) for e in environ
        ):
            return int(entry.name)
    raise AssertionError(f"no process for {worker_id}")


def assert_nothing_left(port: int, timeout_s: float = 10.0) -> None:
    """Within `timeout_s`, no process of that cluster runs any more."""
    deadline = time.monotonic() + timeout_s
    while _leftovers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(port) == []


def _leftovers(port: int) -> list[str]:
    """Every child of the cluster on that NATS port: nats-server by its command line, each service (worker,
    gateway, cachestate, controller) by the NATS URL in its environment."""
    return [p[:200] for p in _processes() if f"-p {port} " in p or f"_NATS_URL=nats://127.0.0.1:{port} " in p]


@pytest.mark.slow
def test_up_serves_through_its_gateway_with_the_flags_given_and_stops_cleanly() -> None:
    port = free_port()
    launcher, lines, http_port = _start_cluster(
        port, 2, "--routing", "round-robin", "--alpha-policy", "static:0.6"
    )
    try:
        assert len(_leftovers(port)) == 6  # nats, cachestate, controller, w0, w1, gateway: the check sees all
        for name in ("nats", "cachestate", "controller", "w0", "w1", "gateway"):
            assert any(line.startswith(f"[{name}] ") for line in lines), name
        # --routing reached the gateway: one user's visits go round the workers instead of sticking.
        workers = [_recommend(http_port, "rr-user", [1, 2, 3, i])["worker"] for i in range(4)]
        assert set(workers) == {"w0", "w1"}, workers
        # Every service's metrics, where the launcher says they are.
        _wait_for(lines, "onepool metrics (Prometheus text):")
        said = next(line for line in lines if line.startswith("onepool metrics (Prometheus text):"))
        where = dict(re.findall(r"(\S+) (http://\S+/metrics)", said))
        assert set(where) == {"gateway", "cachestate", "controller", "w0", "w1"}, said
        for url in where.values():
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200 and b"process_cpu_seconds_total" in resp.read()
        # --alpha-policy reached the controller: it moves both workers' split to 0.6.
        _wait_for(lines, "alpha target set", count=2)
        assert sum('"target_alpha": 0.6' in line for line in lines if "alpha target set" in line) == 2
        code = _stop(launcher)
        assert code == 0, "".join(lines[-40:])
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert_nothing_left(port)
    # The workers drained: each said goodbye before NATS went away.
    assert sum("worker stopping" in line for line in lines) == 2


@pytest.mark.slow
def test_up_restarts_a_dead_worker_and_gives_up_on_a_crash_loop() -> None:
    port = free_port()
    launcher, lines, http_port = _start_cluster(port, 2)
    try:
        first = _child_pid(port, "w1")
        os.kill(first, signal.SIGKILL)
        _wait_for(lines, "child restarted")
        assert any("child exited unexpectedly" in line and "killed by SIGKILL" in line for line in lines)
        # It is back with a new process and the cluster serves on.
        _wait_for(lines, "worker ready", count=3)
        assert _child_pid(port, "w1") != first
        assert _recommend(http_port, "after-restart", [1, 2])["worker"] in {"w0", "w1"}
        # Four more deaths within a minute: a crash loop, given up; the rest keeps serving.
        for n in range(2, 6):
            _wait_for(lines, "worker ready", count=n + 1)
            os.kill(_child_pid(port, "w1"), signal.SIGKILL)
            _wait_for(lines, "child exited unexpectedly", count=n)
        _wait_for(lines, "child given up")
        assert any("crash-looping: 5 exits within 60 s" in line for line in lines)
        assert _recommend(http_port, "after-give-up", [3, 4])["worker"] == "w0"
        code = _stop(launcher)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert code == 3, "".join(lines[-40:])  # stopped cleanly, but a child had been given up: it says so
    assert any("had been given up: w1" in line for line in lines)
    assert_nothing_left(port)


@pytest.mark.slow
def test_a_second_signal_stops_everything_at_once() -> None:
    port = free_port()
    launcher, lines, _ = _start_cluster(port, 1)
    launcher.send_signal(signal.SIGINT)
    _wait_for(lines, "stop signal received", timeout_s=10)
    t0 = time.monotonic()
    code = _stop(launcher, signal.SIGINT, timeout_s=30)
    assert time.monotonic() - t0 < 10.0  # no draining waited for
    assert code == 1  # forced: says it did not stop cleanly
    assert_nothing_left(port)


@pytest.mark.slow
def test_killed_launcher_takes_its_children_along() -> None:
    port = free_port()
    launcher, _, _ = _start_cluster(port, 1)
    launcher.kill()  # SIGKILL: no handler runs; the children's parent-death signal must do the job
    launcher.wait()
    if launcher.stdout is not None:
        launcher.stdout.close()
    assert_nothing_left(port)


@pytest.mark.slow
def test_up_with_a_bad_worker_setting_fails_fast_and_says_why() -> None:
    port = free_port()
    t0 = time.monotonic()
    run = subprocess.run(
        [*ONEPOOL, "up", "--workers", "1", "--nats-port", str(port), "--port", str(free_port())]
        + ["--worker-env", "ONEPOOL_WORKER_BUDGET_MIB=lots"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout[-3000:]
    assert "w0 exited with code 2 (bad settings" in run.stdout
    assert "ONEPOOL_WORKER_BUDGET_MIB" in run.stdout  # the worker's own message, in its prefixed lines
    assert time.monotonic() - t0 < 60  # not restarted over and over
    assert_nothing_left(port)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--workers", "0"], "--workers"),
        (["--port", "70000"], "--port"),
        (["--nats-port", "x"], "--nats-port"),
        (["--port", "4321", "--nats-port", "4321"], "ports"),
    ],
)
def test_up_arguments_are_checked_before_anything_starts(args: list[str], named: str) -> None:
    run = subprocess.run([*ONEPOOL, "up", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and named in run.stderr, run.stderr


def test_make_inputs_writes_files_a_worker_engine_serves_from(tmp_path: Path) -> None:
    import hashlib
    import re

    import numpy as np

    from services.worker.engine import Engine
    from services.worker.service import engine_config_from

    table, checkpoint = tmp_path / "models" / "table.npy", tmp_path / "models" / "hstu.pt"
    args = ["--out", str(table), "--num-items", "500", "--model", "tiny", "--seed", "7", "--dtype", "float16"]
    run = subprocess.run(
        [*ONEPOOL, "make-inputs", *args, "--checkpoint-out", str(checkpoint)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for path in (table, checkpoint):  # each printed with its size and SHA-256
        line = next(x for x in run.stdout.splitlines() if f" {path}: " in x)
        size, digest = re.search(r"(\d+) bytes, sha256 ([0-9a-f]{64})", line).groups()  # type: ignore[union-attr]
        assert (int(size), digest) == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    assert "shape [500, 32] float16" in run.stdout
    rows = np.load(table)
    assert rows.shape == (500, 32) and rows.dtype == np.float16

    settings = WorkerSettings(
        id="w0", device="cpu", model="tiny", embedding_table=str(table), checkpoint=str(checkpoint)
    )
    engine = Engine(engine_config_from(settings))
    try:
        assert engine.num_items == 500 and engine.model_source == f"checkpoint {checkpoint}"
        items = np.arange(0, 500, 7, dtype=np.int64)
        gathered, _ = engine.embeddings(items)
        assert np.array_equal(gathered.numpy(), rows[items].astype(np.float32))
    finally:
        engine.stop()
    bad = subprocess.run(
        [*ONEPOOL, "make-inputs", "--out", str(tmp_path / "t.bin")], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and ".npy" in bad.stderr


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


@pytest.mark.slow
def test_bench_faults_quick_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    run = subprocess.run(
        [*ONEPOOL, "bench", "faults", "--quick", "--scenarios", "worker_kill,overload", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    kill = report["scenarios"]["worker_kill"]
    assert set(kill) >= {"failed_requests", "total_requests", "recovery_s", "p99_ms_during"}
    assert kill["total_requests"] > 20 and kill["failed_requests"] == 0 and kill["recovery_s"] == 0.0
    overload = report["scenarios"]["overload"]
    assert set(overload) >= {"shed_p99_ms", "goodput_ratio", "healthz_p99_ms", "capacity_per_s"}
    assert overload["shed_requests"] > 0 and overload["goodput_ratio"] > 0 and overload["healthz_p99_ms"] > 0
    assert overload["offered_per_s"] == pytest.approx(3 * overload["capacity_per_s"], rel=0.01)
    assert set(report["scenarios"]) == {"worker_kill", "overload"}
    assert "np_unique_600_us" in report["machine_ref"] or "unavailable" in report["machine_ref"]
    assert "overload: capacity" in run.stdout and "worker_kill: 0 failed" in run.stdout


def test_bench_arguments_are_checked_before_anything_starts() -> None:
    for bench, bad in (
        ("routing", ["--requests", "5"]),
        ("routing", ["--repeats", "0"]),
        ("routing", ["--rate", "fast"]),
        ("faults", ["--scenarios", "worker_kill,meteor"]),
        ("faults", ["--rate", "0"]),
    ):
        run = subprocess.run(
            [*ONEPOOL, "bench", bench, "--json", "unused.json", *bad],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert run.returncode == 2, bad
        assert bad[0] in run.stderr
