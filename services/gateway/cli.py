"""The `onepool gateway` subcommand (registered by services/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from services.gateway.settings import ENV_PREFIX, GatewaySettings
from shared.runner import add_service_command


def _load_main() -> Any:
    from services.gateway.main import run_gateway

    return run_gateway


def add_gateway_command(sub: Any) -> argparse.ArgumentParser:
    """Register `gateway` on the subparsers action `sub` of the `onepool` parser."""
    return add_service_command(
        sub,
        "gateway",
        GatewaySettings,
        ENV_PREFIX,
        _load_main,
        help="run the HTTP gateway (routing by KV residency, embedding locality and load)",
        description="Run one gateway replica.",
    )
