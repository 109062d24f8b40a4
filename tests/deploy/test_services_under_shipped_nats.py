"""The four services, run as `onepool` commands with the credentials compose gives them (a user and a password
file per service), serve through the shipped NATS configuration, and the server refuses nothing they do: the
permissions are complete for what the code really does at run time, not only for what a reading of the code
finds (tests/deploy/test_nats_permissions.py checks that nothing more is allowed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.files import ROOT, gen_workers
from tests.deploy.test_nats_permissions import ShippedNats
from tests.helpers import free_port

HOST = "127.0.0.1"
WORKER = "worker-0"


def _post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return 0, {}


def _metric(port: int, name: str) -> float:
    """The unlabelled sample `name` of a service's /metrics (-1 when absent or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return -1.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


@pytest.mark.slow
def test_the_services_serve_with_their_own_credentials(main_nats: ShippedNats, tmp_path: Path) -> None:
    gen = gen_workers()
    port, cs_metrics, ctl_metrics, w_metrics = (free_port(HOST) for _ in range(4))
    url = main_nats.url
    commands = {
        "cachestate": {
            "ONEPOOL_CACHESTATE_NATS_URL": url,
            "ONEPOOL_CACHESTATE_METRICS_PORT": str(cs_metrics),
            "ONEPOOL_CACHESTATE_FEATURES_WINDOW_MS": "500",
        },
        "controller": {
            "ONEPOOL_CONTROLLER_NATS_URL": url,
            "ONEPOOL_CONTROLLER_METRICS_PORT": str(ctl_metrics),
            # A fixed target away from the worker's start: a decision must be sent, and applied.
            "ONEPOOL_CONTROLLER_POLICY": "static:0.3",
        },
        WORKER: {
            "ONEPOOL_WORKER_NATS_URL": url,
            "ONEPOOL_WORKER_ID": WORKER,
            "ONEPOOL_WORKER_DEVICE": "cpu",
            "ONEPOOL_WORKER_DIGEST_MS": "100",
            "ONEPOOL_WORKER_METRICS_PORT": str(w_metrics),
        },
        "gateway": {"ONEPOOL_GATEWAY_NATS_URL": url, "ONEPOOL_GATEWAY_PORT": str(port)},
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ONEPOOL_", "OTEL_"))}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for user, settings in commands.items():
            secret = main_nats.workdir / "secrets" / gen.password_var(user)
            assert secret.is_file(), secret
            env = {**base, **settings, "ONEPOOL_NATS_USER": user, "ONEPOOL_NATS_PASSWORD_FILE": str(secret)}
            with (logs / f"{user}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "services.cli", "worker" if user == WORKER else user],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        body = json.dumps({"user_id": 7, "history": [1, 2, 3], "candidates": [4, 5, 6]}).encode()
        deadline = time.monotonic() + 90
        status, answer = 0, {}
        while time.monotonic() < deadline and status != 200:
            assert all(p.poll() is None for p in procs), "a service exited"
            status, answer = _post(f"http://{HOST}:{port}/v1/recommend", body)
            if status != 200:
                time.sleep(0.5)
        assert status == 200, answer
        assert answer["worker"] == WORKER
        # Every other hop of the bus, each under its own user: worker -> cachestate (digests), cachestate ->
        # controller (features), controller -> worker (the decision, applied: the target moves to 0.3).
        wanted = (
            (cs_metrics, "onepool_cachestate_digests_applied_total", None),
            (ctl_metrics, "onepool_controller_reports_total", None),
            (w_metrics, "onepool_worker_alpha_target", 0.3),
        )
        deadline = time.monotonic() + 60
        seen: dict[str, float] = {}
        while time.monotonic() < deadline:
            seen = {name: _metric(mport, name) for mport, name, _ in wanted}
            if all(
                abs(seen[name] - value) < 1e-9 if value is not None else seen[name] > 0
                for _, name, value in wanted
            ):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the bus did not carry every hop: {seen}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for log in sorted(logs.iterdir()):
            print(f"---- {log.name} ----\n{log.read_text(errors='replace')[-3000:]}")
    server_log = main_nats.log.read_text()
    assert "Permissions Violation" not in server_log, server_log[-4000:]
    assert "Authorization Violation" not in server_log, server_log[-4000:]
