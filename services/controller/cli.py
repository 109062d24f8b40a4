"""The `controller` subcommand of the `onepool` console script (registered by services/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from services.controller.settings import ENV_PREFIX, ControllerSettings
from shared.runner import service_command
from shared.settings import add_settings_arguments


def _load_main() -> Any:
    from services.controller.main import run_controller

    return run_controller


_controller = service_command(ControllerSettings, ENV_PREFIX, _load_main)


def add_controller_command(sub: Any) -> argparse.ArgumentParser:
    """Register `onepool controller` on ``sub`` (what ``parser.add_subparsers()`` returned)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "controller",
        help="run the alpha controller: feature reports in, per-worker EMB/KV split decisions out",
        description="Run the controller. It turns the FeatureReports of cachestate into AlphaDecisions for "
        "each worker (policy, then clamp to a range and a maximum step). Every setting is a flag or an "
        f"{ENV_PREFIX}* environment variable; flags win.",
    )
    add_settings_arguments(parser, ControllerSettings, prefix=ENV_PREFIX)
    parser.set_defaults(func=_controller)
    return parser
