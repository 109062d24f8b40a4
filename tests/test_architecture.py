"""Architecture rules, checked on the source: what may import what.

- A service package (`services/<a>/`) imports only `shared`, its own package, the standard library and
  third-party packages, never another service (`services.<b>`): services talk over the bus, and what two
  need lives in `shared/` (the residency protocol in `shared/residency/`).
- The pure code, the cores (`services/*/core/`) and the residency protocol (`shared/residency/`), imports no
  asyncio, nats, aiohttp or torch, not even through a module of this repository it imports: it takes
  numbers and returns results, and runs unchanged in the simulator.
- `shared/` imports no service.
- The simulator (`sim/`, but for its CLI module, whose `calibrate` handler runs the real engine) and the
  workloads (`workloads/`) are pure too: a simulation on the cores needs no torch and no event loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
SHARED = ROOT / "shared"
PURE_SHARED = (SHARED / "residency",)
IMPURE = ("asyncio", "nats", "aiohttp", "torch", "uvloop")
OURS = ("services", "shared", "sim", "workloads", "bench")
PURE_TOOLS = (ROOT / "sim", ROOT / "workloads")
# The simulator's CLI shell, and HELM's PPO training: torch by design (the serving side, helm.py, is numpy).
TOOL_SHELLS = (ROOT / "sim" / "cli.py", ROOT / "sim" / "ppo.py")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _source(module: str) -> list[Path]:
    """The files importing `module` runs: its own (module or package) and every parent package's
    `__init__.py`; [] when it is not ours or does not exist."""
    parts = module.split(".")
    if parts[0] not in OURS:
        return []
    out = [ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
    base = ROOT.joinpath(*parts)
    out.append(base / "__init__.py" if base.is_dir() else base.with_suffix(".py"))
    return [p for p in out if p.is_file()]


def _label(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def _impure_imports(path: Path) -> list[str]:
    """Impure modules that importing `path` loads, directly or through modules of this repository."""
    bad: list[str] = []
    seen: set[Path] = set()
    todo = [(path, _label(path))]
    while todo:
        current, chain = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in _imports(current):
            if name.split(".")[0] in IMPURE:
                bad.append(f"{chain} imports {name}")
            todo.extend((dep, f"{chain} -> {_label(dep)}") for dep in _source(name))
    return bad


def _service_packages() -> list[Path]:
    return sorted(p for p in SERVICES.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def _pure_dirs() -> list[Path]:
    return [p / "core" for p in _service_packages() if (p / "core").is_dir()] + list(PURE_SHARED)


def test_there_are_service_packages_to_check() -> None:
    assert {p.name for p in _service_packages()} >= {"gateway", "worker", "cachestate", "controller"}
    assert all((d / "__init__.py").is_file() for d in PURE_SHARED)


def test_a_service_imports_no_other_service() -> None:
    bad = []
    for package in _service_packages():
        for path in package.rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] != "services" or len(parts) < 2:
                    continue
                if parts[1] != package.name:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_the_pure_code_is_pure() -> None:
    dirs = _pure_dirs()
    assert len(dirs) >= 5
    bad = [line for d in dirs for path in sorted(d.rglob("*.py")) for line in _impure_imports(path)]
    assert bad == []


def test_the_simulator_and_the_workloads_are_pure() -> None:
    files = [p for d in PURE_TOOLS for p in sorted(d.rglob("*.py")) if p not in TOOL_SHELLS]
    assert len(files) >= 8
    bad = [line for path in files for line in _impure_imports(path)]
    assert bad == []


def test_shared_imports_no_service() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in SHARED.rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] == "services"
    ]
    assert bad == []


def test_the_rule_would_catch_a_violation(tmp_path: Path) -> None:
    fake = tmp_path / "m.py"
    fake.write_text("import asyncio\nfrom services.worker.engine import Engine\nfrom . import x\n")
    assert _imports(fake) == ["asyncio", "services.worker.engine"]


def test_the_purity_rule_follows_imports_of_this_repository(tmp_path: Path) -> None:
    assert _source("shared.bus") == [SHARED / "__init__.py", SHARED / "bus.py"]
    assert _source("shared.residency") == [SHARED / "__init__.py", SHARED / "residency" / "__init__.py"]
    assert _source("numpy") == [] and _source("shared.nothing_here") == [SHARED / "__init__.py"]
    fake = tmp_path / "m.py"
    fake.write_text("import numpy\nfrom shared.bus import Bus\n")  # shared.bus imports nats
    assert "m.py -> shared/bus.py imports nats.errors" in _impure_imports(fake)
