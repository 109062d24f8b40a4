"""The deploy/compose files as the tests read them: the generator as a module, compose files loaded and
merged the way `docker compose -f A -f B` merges ours."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
NATS_DIR = COMPOSE_DIR / "nats"

# Every compose file shipped, and the stacks operators run (COMPOSE_FILE in .env.example).
COMPOSE_FILES = (
    "compose.yaml",
    "compose.workers.yaml",
    "compose.cpu.yaml",
    "compose.hub.yaml",
    "compose.worker-host.yaml",
)
STACKS = {
    "gpu": ("compose.yaml", "compose.workers.yaml"),
    "cpu": ("compose.yaml", "compose.cpu.yaml"),
    "hub": ("compose.yaml", "compose.workers.yaml", "compose.hub.yaml"),
    "worker-host": ("compose.worker-host.yaml", "compose.workers.yaml"),
}
ONEPOOL_SERVICES = ("gateway", "cachestate", "controller")


def gen_workers() -> ModuleType:
    """deploy/compose/gen_workers.py (a script, not a package) as a module."""
    name = "onepool_gen_workers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, COMPOSE_DIR / "gen_workers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE_DIR / name).read_text())
    assert isinstance(data, dict), name
    return data


# Service attributes that are lists of things merged by value (compose merges these by their key; for our
# files, a union in order is the same).
_UNION_LISTS = {"secrets", "ports", "volumes"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list) and key in _UNION_LISTS:
        return base + [x for x in override if x not in base]
    return override


def stack(files: tuple[str, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in files:
        merged = merge(merged, load(name))
    return merged


def worker_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in spec["services"].items() if name.startswith("worker-")}
