"""The `onepool cachestate` subcommand (registered by services/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from services.cachestate.settings import ENV_PREFIX, CacheStateSettings
from shared.runner import add_service_command


def _load_main() -> Any:
    from services.cachestate.main import run_cachestate

    return run_cachestate


def add_cachestate_command(sub: Any) -> argparse.ArgumentParser:
    """Register `cachestate` on the subparsers action `sub` of the `onepool` parser."""
    return add_service_command(
        sub,
        "cachestate",
        CacheStateSettings,
        ENV_PREFIX,
        _load_main,
        help="run the cache-state service (residency index, liveness, routing view, controller features)",
        description="Run the cache-state service: aggregates worker digests into the routing view for "
        "gateways and windowed features for the controller.",
    )
