"""The CPU-safe parts of the GPU check (scripts/gpu_check.py, scripts/gpu-*.sh), so that they cannot rot
between the rare runs on a GPU host: the requirement list, the pytest parsers, the verdict and the JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onepool_gpu_check", SCRIPTS / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gc = _load()

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="2.0">
<testcase classname="tests.worker.test_storage" name="test_a" time="0.5"/>
<testcase classname="tests.worker.test_engine" name="test_b" time="0.1">
  <skipped type="pytest.skip" message="needs CUDA">tests/worker/test_engine.py:225: needs CUDA</skipped>
</testcase>
<testcase classname="tests.worker.test_hstu" name="test_c" time="1.2">
  <failure message="AssertionError: assert 0.02 &lt;= 0.01">trace</failure>
</testcase>
</testsuite></testsuites>
"""


def _junit(path: Path, passed: int, skipped: int = 0) -> Path:
    cases = [f'<testcase classname="tests.t" name="p{i}" time="0.1"/>' for i in range(passed)]
    cases += [
        f'<testcase classname="tests.t" name="s{i}" time="0"><skipped message="needs CUDA"/></testcase>'
        for i in range(skipped)
    ]
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    return path


def _tests_dir(tmp_path: Path, marked: int) -> Path:
    tests = tmp_path / "tests"
    tests.mkdir()
    lines = ["import pytest", ""]
    for i in range(marked):
        lines += ["@pytest.mark.cuda", f"def test_{i}() -> None: ...", ""]
    lines += ['NOT_A_MARK = "@pytest.mark.cuda"']
    (tests / "test_x.py").write_text("\n".join(lines))
    return tests


def _work(tmp_path: Path, *, cuda: bool, passed: int, skipped: int = 0) -> Path:
    """A work folder as gpu-check.sh leaves it after a full run."""
    work = tmp_path / "work"
    work.mkdir()
    probe: dict[str, Any] = {
        "python": "3.11.9",
        "torch_version": "2.6.0+cu124",
        "torch_file": "/usr/lib/torch",
    }
    probe |= {"cuda_build": "12.4", "cuda_available": cuda, "devices": []}
    if not cuda:
        probe["message"] = "no CUDA device: torch.cuda.is_available() is False"
    gc.write_json(work / "probe.json", probe)
    gc.write_json(work / "probe-venv.json", probe)
    steps = "".join(f"{name}\t0\t3\t60\n" for name in gc.STEPS)
    (work / "steps.tsv").write_text(steps)
    _junit(work / "pytest.xml", passed, skipped)
    (work / "pytest.log").write_text(
        f"===== {passed} passed, {skipped} skipped, 438 deselected in 9.1s =====\n"
    )
    checks = [{"name": "pool_arena_on_cuda", "ok": cuda, "detail": {}}]
    gc.write_json(work / "cuda-paths.json", {"device": "cuda:0", "checks": checks})
    gc.write_json(work / "bench-cli.json", {"device": "cpu", "kv_speedup": 2.5, "realloc_runs": [1, 2]})
    engine = {"device": "cuda:0", "arena": "cuda", "pinned": True, "emulated_link": False}
    gc.write_json(work / "bench-cuda.json", {"device": "cuda:0", "kv_speedup": 7.0, "engines": [engine]})
    return work


def test_requirements_leave_torch_out_and_take_the_dev_extra() -> None:
    reqs = gc.requirements(ROOT / "pyproject.toml", ["dev"], build=True)
    names = {gc._requirement_name(r) for r in reqs}
    assert "torch" not in names
    assert {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "numpy", "setuptools"} <= names
    assert any(r.startswith("uvloop") and "sys_platform" in r for r in reqs)  # markers kept for pip
    with pytest.raises(KeyError, match="nope"):
        gc.requirements(ROOT / "pyproject.toml", ["nope"])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("=== 3 passed, 438 deselected in 4.21s ===", {"passed": 3, "deselected": 438}),
        ("== 1 failed, 2 passed, 1 skipped, 2 warnings in 65.2s (0:01:05) ==", {"failed": 1, "skipped": 1}),
        ("===== 3 skipped, 438 deselected in 10.02s =====", {"passed": 0, "skipped": 3}),
        ("==== 1 passed, 2 errors in 1.00s ====", {"errors": 2}),
        ("============ no tests ran in 0.50s ============", {"passed": 0}),
    ],
)
def test_pytest_summary_line(line: str, expected: dict[str, int]) -> None:
    text = f"tests/worker/test_hstu.py s\nsome output 7 passed in 1.0s from a test\n{line}\n"
    counts = gc.parse_pytest_summary(text)
    assert counts is not None
    assert {k: counts[k] for k in expected} == expected


def test_pytest_summary_absent_when_pytest_was_killed() -> None:
    assert gc.parse_pytest_summary("collected 441 items / 438 deselected / 3 selected\nTerminated\n") is None


def test_junit_counts_and_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    out = gc.parse_junit(path)
    assert (out["passed"], out["failed"], out["errors"], out["skipped"]) == (1, 1, 0, 1)
    by_name = {t["test"]: t for t in out["tests"]}
    assert by_name["tests/worker/test_engine::test_b"]["message"] == "needs CUDA"
    assert "0.02" in by_name["tests/worker/test_hstu::test_c"]["message"]


def test_cuda_marks_are_counted_in_the_real_tests() -> None:
    assert gc.count_cuda_marked(ROOT / "tests") >= 3  # storage, engine and HSTU


def test_checks_record_exceptions_as_failures() -> None:
    checks = gc.Checks()
    assert checks.run("fine", lambda: (True, {"x": 1})) == {"x": 1}
    assert checks.run("broken", lambda: 1 / 0) is None
    assert not checks.ok
    assert checks.as_list()[1] == {
        "name": "broken",
        "ok": False,
        "detail": "ZeroDivisionError: division by zero",
    }


def test_report_passes_a_full_cuda_run(tmp_path: Path) -> None:
    report = gc.build_report(_work(tmp_path, cuda=True, passed=2), _tests_dir(tmp_path, marked=2))
    assert report["ok"], report["failures"]
    assert report["failures"] == [] and report["not_run"] == []
    assert report["pytest"]["passed"] == 2 and report["pytest"]["deselected"] == 438
    assert report["bench_cuda"]["kv_speedup"] == 7.0 and "realloc_runs" not in report["bench_cli"]


def test_report_fails_when_cuda_tests_skip(tmp_path: Path) -> None:
    report = gc.build_report(_work(tmp_path, cuda=False, passed=0, skipped=3), _tests_dir(tmp_path, marked=3))
    assert not report["ok"]
    text = "\n".join(report["failures"])
    assert "no CUDA device" in report["failures"][0]
    assert "3 cuda test(s) skipped: needs CUDA" in text
    assert "only 0 cuda test(s) passed; the sources mark 3" in text
    assert "pool_arena_on_cuda" in text


def test_report_fails_when_fewer_tests_pass_than_are_marked(tmp_path: Path) -> None:
    report = gc.build_report(_work(tmp_path, cuda=True, passed=2), _tests_dir(tmp_path, marked=3))
    assert not report["ok"] and any("only 2 cuda test(s) passed" in f for f in report["failures"])


def test_report_fails_on_a_timeout_and_on_engines_off_the_device(tmp_path: Path) -> None:
    work = _work(tmp_path, cuda=True, passed=2)
    (work / "steps.tsv").write_text(
        (work / "steps.tsv").read_text().replace("bench-cli\t0\t3", "bench-cli\t124\t150")
    )
    engine = {"device": "cpu", "arena": "cpu", "pinned": False, "emulated_link": True}
    gc.write_json(work / "bench-cuda.json", {"device": "cpu", "engines": [engine]})
    report = gc.build_report(work, _tests_dir(tmp_path, marked=2))
    text = "\n".join(report["failures"])
    assert "step bench-cli timed out after 150 s (limit 60 s)" in text
    assert "engines off the device" in text


def test_report_cli_without_any_step_writes_a_failing_json(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out" / "gpu-check.json"
    work.mkdir()
    (work / "shell-failures.txt").write_text("no wheels in /nowhere: run scripts/gpu-wheels.sh\n")
    assert gc.main(["report", "--work", str(work), "--out", str(out), "--tests", str(ROOT / "tests")]) == 1
    report = json.loads(out.read_text())
    assert report["schema"] == gc.SCHEMA and report["ok"] is False
    assert report["failures"][0].startswith("no wheels in /nowhere")
    assert report["not_run"] == list(gc.STEPS)


def test_write_json_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    gc.write_json(path, {"x": 1})
    gc.write_json(path, {"x": 2, "p": Path("/p")})
    assert json.loads(path.read_text()) == {"x": 2, "p": "/p"}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]
    assert gc.read_json(tmp_path / "missing.json") is None


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", ["gpu-check.sh", "gpu-wheels.sh"])
def test_shell_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
