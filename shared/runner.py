"""The one shape of every service's entry: the `onepool <service>` command, and its main (telemetry, a NATS
connection, build the service, start, wait for the stop signal, stop, close), shared by all four."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import structlog
from opentelemetry.trace import Tracer

from shared.bus import Bus
from shared.bus_auth import load_bus_auth
from shared.lifecycle import run, run_until_signalled
from shared.settings import add_settings_arguments, load_settings, overrides_from_args
from shared.telemetry import check_telemetry_env, setup_telemetry

S = TypeVar("S")


class BusService(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_bus_service(
    name: str,
    *,
    instance_id: str,
    nats_url: str,
    build: Callable[[Bus, Tracer], Awaitable[BusService]],
    stop: asyncio.Event,
) -> None:
    """Run the service `build` makes until `stop` is set; everything is closed in reverse order, also on
    failure. `name` is the short service name ("cachestate"): `onepool-<name>` in traces and on the bus.
    `build` may take its time (a worker builds and warms up its model): the bus is connected meanwhile,
    but the service subscribes to nothing before its start(). NATS credentials and TLS files come from the
    `ONEPOOL_NATS_*` environment (`shared.bus_auth`); a bad one is a SettingsError (exit code 2)."""
    telemetry = setup_telemetry(f"onepool-{name}", service_instance_id=instance_id)
    log = structlog.get_logger(f"onepool.{name}")
    try:
        auth = load_bus_auth()
        tracer = telemetry.tracer(f"onepool.{name}")
        bus = await Bus.connect(nats_url, name=f"onepool-{name}-{instance_id}", tracer=tracer, auth=auth)
        try:
            service = await build(bus, tracer)
            try:
                if not stop.is_set():  # a stop signal during a long build: never start serving
                    await service.start()
                    await stop.wait()
                log.info(f"{name} stopping", instance=instance_id)
            finally:
                await service.stop()
        finally:
            await bus.close()
    finally:
        telemetry.shutdown()


def service_command(
    cls: type[S],
    prefix: str,
    load_main: Callable[[], Callable[[S, asyncio.Event], Awaitable[None]]],
) -> Callable[[argparse.Namespace], int]:
    """The body of `onepool <service>`: settings from env + flags, then the service's main until a signal.

    `load_main` imports the service lazily, so that `onepool --help` does not pay for torch and friends."""

    def command(args: argparse.Namespace) -> int:
        settings = load_settings(cls, prefix=prefix, overrides=overrides_from_args(args, cls))
        # Every setting the service will read, checked before anything slow (torch's import) or half-started:
        # a mistake is a usage error at once (run_bus_service reads the credentials again when it connects).
        check_telemetry_env(os.environ)
        load_bus_auth()
        service_main = load_main()

        async def main() -> None:
            await run_until_signalled(lambda stop: service_main(settings, stop))

        return run(main)

    return command


def add_service_command(
    sub: Any,
    name: str,
    cls: type[S],
    prefix: str,
    load_main: Callable[[], Callable[[S, asyncio.Event], Awaitable[None]]],
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """Register `onepool <name>` on `sub` (what `parser.add_subparsers()` returned): one flag per setting
    of `cls` (each also a `<prefix>*` environment variable), running `service_command`."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=f"{description} Every setting is a flag or an {prefix}* environment variable; flags win.",
    )
    add_settings_arguments(parser, cls, prefix=prefix)
    parser.set_defaults(func=service_command(cls, prefix, load_main))
    return parser
