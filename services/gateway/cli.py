"""The `onepool gateway` subcommand."""

from __future__ import annotations

from typing import Any

from services.gateway.settings import ENV_PREFIX, GatewaySettings
from shared.runner import service_command
from shared.settings import add_settings_arguments


def _load_main() -> Any:
    from services.gateway.main import run_gateway

    return run_gateway


_run = service_command(GatewaySettings, ENV_PREFIX, _load_main)


def add_gateway_command(sub: Any) -> None:
    parser = sub.add_parser(
        "gateway",
        help="run the HTTP gateway (routing by KV residency, embedding locality and load)",
        description="Run one gateway replica. Every setting is a flag or an ONEPOOL_GATEWAY_* environment "
        "variable; flags win.",
    )
    add_settings_arguments(parser, GatewaySettings, prefix=ENV_PREFIX)
    parser.set_defaults(func=_run)
