"""Process and task lifecycle: owned background tasks, signal-driven shutdown, the event loop runner."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import FrameType
from typing import Any, TypeVar

from shared.errors import EXIT_USAGE, UsageError
from shared.telemetry import get_logger

T = TypeVar("T")

_log = get_logger("shared.lifecycle")

_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class ForcedShutdown(Exception):
    """A second stop signal arrived while the service was still draining."""


class TaskOwner:
    """Keeps a reference to every task it spawns (asyncio holds only weak ones), logs and keeps the
    exceptions of tasks that died unexpectedly, and cancels and awaits them all on ``close()``."""

    def __init__(self, name: str = "tasks") -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures: list[tuple[str, BaseException]] = []
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        if self._closed:
            coro.close()  # avoid a "coroutine was never awaited" warning on top of the error
            raise RuntimeError(f"TaskOwner {self.name!r} is closed; cannot spawn {name!r}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved, so asyncio does not warn again
        if exc is not None:
            self._failures.append((task.get_name(), exc))
            _log.error("task failed", owner=self.name, task=task.get_name(), exc_info=exc)

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    @property
    def failures(self) -> list[tuple[str, BaseException]]:
        """(task name, exception) of every owned task that ended by raising."""
        return list(self._failures)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Cancel every owned task and wait for them (at most ``timeout_s``). Idempotent."""
        self._closed = True
        pending = set(self._tasks)
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        if still:
            _log.warning(
                "tasks did not finish after cancellation",
                owner=self.name,
                tasks=sorted(t.get_name() for t in still),
                timeout_s=timeout_s,
            )


async def run_until_signalled(
    main: Callable[[asyncio.Event], Awaitable[None]],
    *,
    signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Run ``main(stop)``; the first of ``signals`` sets ``stop`` (drain and return), a second one
    cancels ``main`` and raises ForcedShutdown. The previous signal handlers are restored afterwards."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.ensure_future(main(stop))
    forced = False

    def on_signal(sig: signal.Signals) -> None:
        nonlocal forced
        if not stop.is_set():
            _log.info("stop signal received; shutting down", signal=sig.name)
            stop.set()
        elif not forced:
            _log.warning("second stop signal received; forcing exit", signal=sig.name)
            forced = True
            task.cancel()

    previous: dict[signal.Signals, _SignalHandler] = {}
    try:
        for sig in signals:
            previous[sig] = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, on_signal, sig)
            except NotImplementedError:  # e.g. Windows: Ctrl-C still raises KeyboardInterrupt
                del previous[sig]
        try:
            await asyncio.shield(task)  # shielded so that our own cancellation is handled below
        except asyncio.CancelledError:
            if forced and task.cancelled():
                raise ForcedShutdown("forced shutdown by a second signal") from None
            # We were cancelled from outside: cancel main too and wait for it to unwind.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            # remove_signal_handler resets to SIG_DFL; put back what was there (e.g. a Python handler).
            if handler is not None:  # None: installed outside Python, cannot be restored from here
                signal.signal(sig, handler)


def run(main_coro_factory: Callable[[], Coroutine[Any, Any, None]], *, use_uvloop: bool = True) -> int:
    """Run a service's async main to completion and return its process exit code:
    0 when it returned, 1 when it raised (the reason is logged), 2 (``EXIT_USAGE``) when it refused its
    operator's input (a ``UsageError``: settings, a missing extra, a model file), 130 on KeyboardInterrupt."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # optional: not built for every platform
            _log.info("uvloop not available; using the default asyncio loop")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main_coro_factory())
    except KeyboardInterrupt:
        _log.warning("interrupted")
        return 130
    except ForcedShutdown as e:
        _log.error("service stopped without draining", reason=str(e))
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UsageError as e:
        _log.error("refused to start", code=e.code, setting=e.field, reason=e.message)
        return EXIT_USAGE
    except Exception as e:
        _log.error("service failed", reason=f"{type(e).__name__}: {e}", exc_info=e)
        return 1
    return 0
