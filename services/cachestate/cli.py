"""The `onepool cachestate` subcommand (registered by services/cli.py)."""

from __future__ import annotations

from typing import Any

from services.cachestate.settings import ENV_PREFIX, CacheStateSettings
from shared.runner import service_command
from shared.settings import add_settings_arguments


def _load_main() -> Any:
    from services.cachestate.main import run_cachestate

    return run_cachestate


_run = service_command(CacheStateSettings, ENV_PREFIX, _load_main)


def add_cachestate_command(sub: Any) -> None:
    """Register `cachestate` on the subparsers action `sub` of the `onepool` parser."""
    parser = sub.add_parser(
        "cachestate",
        help="run the cache-state service (residency index, liveness, routing view, controller features)",
        description="Run the cache-state service: aggregates worker digests into the routing view for "
        "gateways and windowed features for the controller. Every setting is a flag or an "
        "ONEPOOL_CACHESTATE_* environment variable; flags win.",
    )
    add_settings_arguments(parser, CacheStateSettings, prefix=ENV_PREFIX)
    parser.set_defaults(func=_run)
