"""Architecture rules, checked on the source: what may import what.

- A service package (`services/<a>/`) imports only `shared`, its own package, the standard library and
  third-party packages, never another service (`services.<b>`): services talk over the bus, and what two
  need lives in `shared/`. Known exception, until the residency core moves to `shared/` (the simulator issue):
  the gateway reuses cachestate's `ResidencyIndex` for its replica of the view.
- The pure cores (`services/*/core/`) import no asyncio, nats, aiohttp or torch: they take numbers and
  return results, and run unchanged in the simulator.
- `shared/` imports no service.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
ALLOWED_CROSS_IMPORTS = {
    ("gateway", "services.cachestate.core.residency"),
}
IMPURE = ("asyncio", "nats", "aiohttp", "torch", "uvloop")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _service_packages() -> list[Path]:
    return sorted(p for p in SERVICES.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def test_there_are_service_packages_to_check() -> None:
    assert {p.name for p in _service_packages()} >= {"gateway", "worker", "cachestate", "controller"}


def test_a_service_imports_no_other_service() -> None:
    bad = []
    for package in _service_packages():
        for path in package.rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] != "services" or len(parts) < 2:
                    continue
                if parts[1] != package.name and (package.name, name) not in ALLOWED_CROSS_IMPORTS:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_the_cores_are_pure() -> None:
    cores = [p / "core" for p in _service_packages() if (p / "core").is_dir()]
    assert cores
    bad = []
    for core in cores:
        for path in core.rglob("*.py"):
            for name in _imports(path):
                if name.split(".")[0] in IMPURE:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_shared_imports_no_service() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "shared").rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] == "services"
    ]
    assert bad == []


def test_the_rule_would_catch_a_violation(tmp_path: Path) -> None:
    fake = tmp_path / "m.py"
    fake.write_text("import asyncio\nfrom services.worker.engine import Engine\nfrom . import x\n")
    assert _imports(fake) == ["asyncio", "services.worker.engine"]
