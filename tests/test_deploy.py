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


def test_compose_worker_settings_are_real_settings() -> None:
    from services.worker.settings import ENV_PREFIX, WorkerSettings

    spec = yaml.safe_load(COMPOSE.read_text())
    env = spec["services"]["worker"]["environment"]
    known = {f"{ENV_PREFIX}{name.upper()}" for name in WorkerSettings.__dataclass_fields__}
    onepool_vars = {k for k in env if k.startswith("ONEPOOL_")}
    assert onepool_vars and onepool_vars <= known, onepool_vars - known
    dockerfile = (ROOT / "deploy" / "compose" / "Dockerfile").read_text()
    assert spec["services"]["worker"]["build"]["dockerfile"] == "deploy/compose/Dockerfile"
    assert 'ENTRYPOINT ["onepool"]' in dockerfile
