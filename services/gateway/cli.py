"""The `onepool gateway` subcommand."""

from __future__ import annotations

import argparse
from typing import Any

from services.gateway.settings import ENV_PREFIX, GatewaySettings
from shared.settings import add_settings_arguments, load_settings, overrides_from_args


def _run(args: argparse.Namespace) -> int:
    from services.gateway.main import run_gateway
    from shared.lifecycle import run, run_until_signalled

    settings = load_settings(
        GatewaySettings, prefix=ENV_PREFIX, overrides=overrides_from_args(args, GatewaySettings)
    )

    async def main() -> None:
        await run_until_signalled(lambda stop: run_gateway(settings, stop))

    return run(main)


def add_gateway_command(sub: Any) -> None:
    parser = sub.add_parser(
        "gateway",
        help="run the HTTP gateway (routing by KV residency, embedding locality and load)",
        description="Run one gateway replica. Every setting is a flag or an ONEPOOL_GATEWAY_* environment "
        "variable; flags win.",
    )
    add_settings_arguments(parser, GatewaySettings, prefix=ENV_PREFIX)
    parser.set_defaults(func=_run)
