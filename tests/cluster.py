"""A real local cluster for end-to-end tests: every service its own process on a test-owned nats-server.

Unlike `onepool up`, the test holds each process, so it can kill a worker and start it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ONEPOOL = [sys.executable, "-m", "services.cli"]

# Small and quick: tiny model, small pool, fast digests so that liveness and affinity show within seconds.
WORKER_ENV = {
    "ONEPOOL_WORKER_MODEL": "tiny",
    "ONEPOOL_WORKER_NUM_ITEMS": "20000",
    "ONEPOOL_WORKER_BUDGET_MIB": "8",
    "ONEPOOL_WORKER_CHUNK_KIB": "64",
    "ONEPOOL_WORKER_DIGEST_MS": "100",
    "ONEPOOL_WORKER_LINK_LATENCY_US": "1",
}


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    expected_exit: bool = False  # killed on purpose by the test

    def start(self) -> None:
        self.expected_exit = False
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )
        handle.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Cluster:
    nats_url: str
    workdir: Path
    workers: int = 2
    gateways: dict[str, str] = field(default_factory=lambda: {"g0": "joint"})  # name -> routing policy
    controller_policy: str | None = "static:0.5"  # None: no controller process
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def _env(self, **values: str) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env, **values}

    def _add(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.workdir / f"{name}.log")
        self.procs[name] = proc
        proc.start()
        return proc

    def start(self, timeout_s: float = 120.0) -> None:
        url = self.nats_url
        self._add(
            "cachestate",
            [*ONEPOOL, "cachestate"],
            self._env(ONEPOOL_CACHESTATE_NATS_URL=url, ONEPOOL_CACHESTATE_DEAD_AFTER_PERIODS="3"),
        )
        if self.controller_policy is not None:
            self._add(
                "controller",
                [*ONEPOOL, "controller"],
                self._env(ONEPOOL_CONTROLLER_NATS_URL=url, ONEPOOL_CONTROLLER_POLICY=self.controller_policy),
            )
        for i in range(self.workers):
            self.start_worker(f"w{i}")
        for name, routing in self.gateways.items():
            port = free_port()
            self.ports[name] = port
            self._add(
                name,
                [*ONEPOOL, "gateway"],
                self._env(
                    ONEPOOL_GATEWAY_NATS_URL=url,
                    ONEPOOL_GATEWAY_PORT=str(port),
                    ONEPOOL_GATEWAY_ROUTING=routing,
                    ONEPOOL_GATEWAY_INSTANCE=name,
                ),
            )
        deadline = time.monotonic() + timeout_s
        for name in self.gateways:
            while self.routable(name) < self.workers:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise AssertionError(f"cluster not ready in {timeout_s} s:\n{self.logs()}")
                time.sleep(0.2)

    def start_worker(self, worker_id: str) -> Proc:
        env = self._env(ONEPOOL_WORKER_NATS_URL=self.nats_url, ONEPOOL_WORKER_ID=worker_id, **WORKER_ENV)
        if worker_id in self.procs:
            proc = self.procs[worker_id]
            proc.env = env
            proc.start()
            return proc
        return self._add(worker_id, [*ONEPOOL, "worker"], env)

    def url(self, gateway: str = "g0") -> str:
        return f"http://127.0.0.1:{self.ports[gateway]}"

    def readyz(self, gateway: str = "g0") -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url(gateway) + "/readyz", timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, {}

    def routable(self, gateway: str = "g0") -> int:
        return int(self.readyz(gateway)[1].get("routable_workers", 0))

    def check_alive(self) -> None:
        unexpected = [p.name for p in self.procs.values() if not p.alive and not p.expected_exit]
        if unexpected:
            raise AssertionError(f"{unexpected} exited:\n{self.logs()}")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.expected_exit = True
        proc.stop(signal.SIGKILL)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for proc in self.procs.values():
            text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
            out.append(f"---- {proc.name} ----\n{text[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        order = [n for n in self.procs if n.startswith("g")] + [n for n in self.procs if n.startswith("w")]
        order += [n for n in self.procs if n not in order]
        for name in order:
            self.procs[name].stop()
