"""Deployment files are valid without a Docker engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"


def test_compose_file_matches_the_compose_spec() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_settings_are_real_settings() -> None:
    from services.cachestate.settings import CacheStateSettings
    from services.controller.settings import ControllerSettings
    from services.gateway.settings import GatewaySettings
    from services.worker.settings import WorkerSettings

    spec = yaml.safe_load(COMPOSE.read_text())
    known = {
        f"{prefix}{name.upper()}"
        for prefix, cls in (
            ("ONEPOOL_WORKER_", WorkerSettings),
            ("ONEPOOL_GATEWAY_", GatewaySettings),
            ("ONEPOOL_CACHESTATE_", CacheStateSettings),
            ("ONEPOOL_CONTROLLER_", ControllerSettings),
        )
        for name in cls.__dataclass_fields__
    }
    for service in ("worker", "gateway", "cachestate", "controller"):
        env = spec["services"][service]["environment"]
        onepool_vars = {k for k in env if k.startswith("ONEPOOL_")}
        assert onepool_vars and onepool_vars <= known, (service, onepool_vars - known)
        assert spec["services"][service]["command"] == [service]
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["onepool"]' in dockerfile
