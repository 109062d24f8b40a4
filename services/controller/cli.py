"""The `onepool controller` subcommand (registered by services/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from services.controller.settings import ENV_PREFIX, ControllerSettings
from shared.runner import add_service_command


def _load_main() -> Any:
    from services.controller.main import run_controller

    return run_controller


def add_controller_command(sub: Any) -> argparse.ArgumentParser:
    """Register `controller` on the subparsers action `sub` of the `onepool` parser."""
    return add_service_command(
        sub,
        "controller",
        ControllerSettings,
        ENV_PREFIX,
        _load_main,
        help="run the alpha controller: feature reports in, per-worker EMB/KV split decisions out",
        description="Run the controller. It turns the FeatureReports of cachestate into AlphaDecisions for "
        "each worker (policy, then clamp to a range and a maximum step).",
    )
