from __future__ import annotations

import asyncio
import os
import signal

import pytest

from shared.errors import EXIT_USAGE, SettingsError
from shared.lifecycle import ForcedShutdown, TaskOwner, run, run_until_signalled
from tests.helpers import eventually


async def test_task_owner_cancels_and_awaits_everything() -> None:
    owner = TaskOwner("test")
    cancelled: list[str] = []
    started: list[str] = []

    async def forever(name: str) -> None:
        started.append(name)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            cancelled.append(name)
            raise

    tasks = [owner.spawn(forever(f"t{i}"), name=f"t{i}") for i in range(3)]
    await eventually(lambda: len(started) == 3)  # each is inside its try when cancelled
    assert len(owner) == 3 and owner.tasks == frozenset(tasks)
    await owner.close(timeout_s=2)
    assert sorted(cancelled) == ["t0", "t1", "t2"]
    assert all(t.done() for t in tasks) and len(owner) == 0
    await owner.close()  # idempotent
    coro = forever("late")
    with pytest.raises(RuntimeError, match="closed"):
        owner.spawn(coro, name="late")


async def test_task_owner_keeps_and_exposes_failures() -> None:
    owner = TaskOwner("test")

    async def boom() -> None:
        raise ValueError("boom")

    async def fine() -> int:
        return 1

    failing = owner.spawn(boom(), name="boom")
    ok = owner.spawn(fine(), name="fine")
    await asyncio.wait([failing, ok])
    await eventually(lambda: len(owner) == 0)  # the owner's done callbacks have run
    [(name, exc)] = owner.failures
    assert name == "boom" and isinstance(exc, ValueError)
    assert ok.result() == 1 and len(owner) == 0
    await owner.close()


async def test_task_owner_close_is_bounded_for_stubborn_tasks() -> None:
    owner = TaskOwner("test")
    release = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> None:
        running.set()
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue  # ignores cancellation until released

    task = owner.spawn(stubborn(), name="stubborn")
    await asyncio.wait_for(running.wait(), 5)  # inside its loop, where it shrugs off cancellation
    await owner.close(timeout_s=0.05)
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert task.done()


async def test_run_until_signalled_stops_on_real_sigterm_and_restores_handlers() -> None:
    before_term = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def main(stop: asyncio.Event) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handlers are installed before main runs
        await asyncio.wait_for(stop.wait(), timeout=5)
        seen.append("drained")

    await run_until_signalled(main)
    assert seen == ["drained"]
    assert signal.getsignal(signal.SIGTERM) == before_term
    assert signal.getsignal(signal.SIGINT) == before_int
    assert not loop.remove_signal_handler(signal.SIGTERM)  # nothing of ours is left on the loop


async def test_second_signal_forces_exit_via_cancellation() -> None:
    cancelled = asyncio.Event()

    async def main(stop: asyncio.Event) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await stop.wait()
        try:  # a drain that would take too long
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ForcedShutdown):
        await asyncio.wait_for(run_until_signalled(main), timeout=5)
    assert cancelled.is_set()


async def test_run_until_signalled_propagates_main_errors_and_outer_cancellation() -> None:
    async def failing(stop: asyncio.Event) -> None:
        raise RuntimeError("startup failed")

    with pytest.raises(RuntimeError, match="startup failed"):
        await run_until_signalled(failing)

    inner_cancelled = asyncio.Event()
    inner_running = asyncio.Event()

    async def waits(stop: asyncio.Event) -> None:
        inner_running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            inner_cancelled.set()
            raise

    outer = asyncio.create_task(run_until_signalled(waits))
    await asyncio.wait_for(inner_running.wait(), 5)  # main is running under run_until_signalled
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert inner_cancelled.is_set()


def test_run_returns_exit_codes() -> None:
    async def ok() -> None:
        await asyncio.sleep(0)

    async def fails() -> None:
        raise RuntimeError("no config")

    async def exits() -> None:
        raise SystemExit(3)

    async def refuses_its_settings() -> None:
        raise SettingsError("ONEPOOL_NATS_USER", "ONEPOOL_NATS_USER is set but neither ...")

    assert run(ok) == 0
    assert run(ok, use_uvloop=False) == 0
    assert run(fails) == 1
    assert run(exits) == 3
    assert run(refuses_its_settings) == EXIT_USAGE == 2


def test_run_uses_uvloop_when_available() -> None:
    uvloop = pytest.importorskip("uvloop")
    kinds: list[type] = []

    async def which() -> None:
        kinds.append(type(asyncio.get_running_loop()))

    assert run(which) == 0
    assert run(which, use_uvloop=False) == 0
    assert kinds[0] is uvloop.Loop and kinds[1] is not uvloop.Loop
