"""The `onepool cachestate` subcommand (registered by services/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from services.cachestate.settings import ENV_PREFIX, CacheStateSettings
from shared.settings import add_settings_arguments, load_settings, overrides_from_args


def _run(args: argparse.Namespace) -> int:
    from services.cachestate.main import run_cachestate
    from shared.lifecycle import run, run_until_signalled

    settings = load_settings(
        CacheStateSettings, prefix=ENV_PREFIX, overrides=overrides_from_args(args, CacheStateSettings)
    )

    async def main() -> None:
        await run_until_signalled(lambda stop: run_cachestate(settings, stop))

    return run(main)


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
