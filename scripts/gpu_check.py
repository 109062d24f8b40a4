"""Helper of `scripts/gpu-check.sh`: probes torch/CUDA, checks that the worker's CUDA paths really run, runs
the worker bench on the device, and assembles the one JSON report.

Subcommands (the shell script calls each under `timeout`):

* ``requirements`` - the project's dependencies and the given extras from pyproject.toml (by default the
  ones the test suite needs), torch left out (the GPU host brings its own CUDA build); ``--build-system``
  adds the build requirements.
* ``probe`` - torch version, CUDA build, devices; exit 0 only when ``torch.cuda.is_available()``.
* ``cuda-paths`` - the real classes on the device: `PoolStorage` arena on CUDA, `HostEmbeddingTable` pinned,
  `CudaLink` H2D (timed with CUDA events), `PrefetchChannel` on its side stream, an `Engine` serving.
* ``bench`` - `onepool bench worker --quick --device D` in-process (`bench.worker.run_bench`), recording where
  every `Engine` it builds put its pool, host table and link.
* ``report`` - reads what the steps left in the work folder, decides pass/fail, writes the JSON.

Module level imports are stdlib only, so ``requirements`` and ``report`` run with any Python 3.11, with or
without torch; torch and the project are imported inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA = "onepool-gpu-check/1"
DESCRIPTION = (
    "GPU check helper: probe, CUDA path checks, bench on the device, JSON report (see scripts/gpu-check.sh)"
)
REPO_ROOT = Path(__file__).resolve().parent.parent
# The extras the test suite needs (the Makefile's `make venv` installs the same ones).
TEST_EXTRAS = ("dev", "worker", "train", "plots")
GIB = 1024**3
MIB = 1024**2

# Exit codes of `probe` (the shell script prints the probe's message; the report reads probe.json).
PROBE_OK, PROBE_NO_TORCH, PROBE_CPU_BUILD, PROBE_NO_DEVICE = 0, 3, 4, 5

# Steps the shell script runs, in order; the report lists the ones that did not run.
STEPS = (
    "probe",
    "venv",
    "install",
    "install-project",
    "probe-venv",
    "pytest",
    "cuda-paths",
    "bench-cli",
    "bench-cuda",
)

# Figures of `onepool bench worker` worth a line in the report (the bench's own JSON holds the rest).
BENCH_KEYS = (
    "device",
    "host_link",
    "link",
    "kv_speedup",
    "kv_uncached_ms",
    "kv_cached_ms",
    "emb_miss_cost_us",
    "emb_hit_request_ms",
    "emb_miss_request_ms",
    "link_transfer_1_row_us",
    "link_transfer_256_rows_us",
    "realloc_p99_ratio",
    "naive_realloc_p99_ratio",
    "realloc_critical_path_refill_bytes",
    "naive_realloc_critical_path_refill_bytes",
    "elapsed_s",
    "engines",
)


# -------------------------------------------------------------------------------------------------------
# Small CPU-safe pieces (tested in tests/test_gpu_check.py).
# -------------------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in `path`, or None when the file is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _requirement_name(line: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def requirements(
    pyproject: Path,
    extras: Sequence[str] = TEST_EXTRAS,
    exclude: Sequence[str] = ("torch",),
    build: bool = False,
) -> list[str]:
    """Requirement lines of the project (plus `extras`, plus build-system requires with `build`), without
    the packages named in `exclude`; environment markers are kept for pip to evaluate."""
    import tomllib

    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    lines: list[str] = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"{pyproject} has no optional-dependencies extra {extra!r}")
        lines.extend(optional[extra])
    if build:
        lines.extend(data.get("build-system", {}).get("requires", []))
    skip = {_requirement_name(x) for x in exclude}
    out: list[str] = []
    for line in lines:
        if _requirement_name(line) not in skip and line not in out:
            out.append(line)
    return out


_SUMMARY_WORDS = {
    "passed": "passed",
    "failed": "failed",
    "skipped": "skipped",
    "deselected": "deselected",
    "error": "errors",
    "errors": "errors",
    "xfailed": "xfailed",
    "xpassed": "xpassed",
    "warning": "warnings",
    "warnings": "warnings",
}


def parse_pytest_summary(text: str) -> dict[str, int] | None:
    """Counts from pytest's final line ("=== 3 passed, 1203 deselected in 4.21s ==="), or None when the
    output has none (pytest killed, or it never started)."""
    for line in reversed(text.splitlines()):
        stripped = line.strip().strip("=").strip()
        if not re.search(r"\bin [0-9.]+s\b", stripped) and not stripped.startswith("no tests ran"):
            continue
        counts = dict.fromkeys(sorted(set(_SUMMARY_WORDS.values())), 0)
        found = False
        for number, word in re.findall(r"(\d+) ([a-z]+)", stripped):
            if word in _SUMMARY_WORDS:
                counts[_SUMMARY_WORDS[word]] += int(number)
                found = True
        if found or stripped.startswith("no tests ran"):
            return counts
    return None


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests: list[dict[str, Any]] = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or child.text or "").strip()[:500]
                    break
            name = case.get("classname", "").replace(".", "/") + "::" + case.get("name", "")
            tests.append(
                {
                    "test": name,
                    "outcome": outcome,
                    "seconds": float(case.get("time") or 0),
                    "message": message,
                }
            )
    counts = {
        key: sum(1 for t in tests if t["outcome"] == outcome)
        for key, outcome in (
            ("passed", "passed"),
            ("failed", "failed"),
            ("errors", "error"),
            ("skipped", "skipped"),
        )
    }
    return {**counts, "tests": tests}


_CUDA_MARK = re.compile(r"^\s*@pytest\.mark\.cuda\b", re.MULTILINE)


def count_cuda_marked(tests_dir: Path) -> int:
    """How many ``@pytest.mark.cuda`` decorators the test sources hold: `pytest -m cuda` must pass as many."""
    return sum(
        len(_CUDA_MARK.findall(p.read_text(errors="replace"))) for p in sorted(tests_dir.rglob("*.py"))
    )


@dataclass
class Check:
    name: str
    ok: bool
    detail: Any = None


@dataclass
class Checks:
    """Named checks, each recorded whatever happens: an exception becomes a failed check with its text."""

    items: list[Check] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], tuple[bool, Any]]) -> Any:
        try:
            ok, detail = fn()
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.items.append(Check(name, bool(ok), detail))
        return detail if ok else None

    @property
    def ok(self) -> bool:
        return bool(self.items) and all(c.ok for c in self.items)

    def as_list(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.items]


def read_steps(path: Path) -> list[dict[str, Any]]:
    """Lines "name<TAB>rc<TAB>seconds<TAB>limit" written by the shell script, one per step."""
    steps: list[dict[str, Any]] = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rc = int(parts[1])
        limit = int(parts[3]) if len(parts) > 3 and parts[3] else None
        steps.append(
            {
                "name": parts[0],
                "rc": rc,
                "seconds": int(parts[2]),
                "limit_s": limit,
                "timed_out": rc in (124, 137),
            }
        )
    return steps


def _bench_figures(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {k: report[k] for k in BENCH_KEYS if k in report}


def _probe_failure(probe: dict[str, Any]) -> str | None:
    if probe.get("error"):
        return str(probe["error"])
    if not probe.get("cuda_available"):
        return str(probe.get("message") or "no CUDA device: torch.cuda.is_available() is False")
    return None


def build_report(work: Path, tests_dir: Path, dry_run: bool = False) -> dict[str, Any]:
    """Everything the steps left in `work`, with the verdict: ``ok`` and the ``failures`` that deny it."""
    failures: list[str] = []
    shell_failures = work / "shell-failures.txt"
    if shell_failures.exists():
        failures.extend(x for x in shell_failures.read_text().splitlines() if x.strip())
    steps = read_steps(work / "steps.tsv")
    by_name = {s["name"]: s for s in steps}

    probe = read_json(work / "probe.json")
    probe_venv = read_json(work / "probe-venv.json")
    if probe is None:
        failures.append("the torch probe did not run or wrote nothing (no CUDA check was possible)")
    else:
        reason = _probe_failure(probe)
        if reason:
            failures.append(reason)
    if probe is not None and probe_venv is not None:
        before, after = probe.get("torch_version"), probe_venv.get("torch_version")
        if before != after or probe.get("torch_file") != probe_venv.get("torch_file"):
            failures.append(
                f"the venv does not use the system torch: {before} ({probe.get('torch_file')}) before, "
                f"{after} ({probe_venv.get('torch_file')}) inside"
            )

    for step in steps:
        if step["timed_out"]:
            failures.append(
                f"step {step['name']} timed out after {step['seconds']} s (limit {step['limit_s']} s)"
            )
        elif step["rc"] != 0 and step["name"] != "probe":  # the probe's own message is above
            failures.append(
                f"step {step['name']} failed (exit code {step['rc']}); see {work / step['name']}.log"
            )

    marked = count_cuda_marked(tests_dir) if tests_dir.is_dir() else 0
    pytest_out: dict[str, Any] | None = None
    if "pytest" in by_name:
        log_text = (work / "pytest.log").read_text(errors="replace") if (work / "pytest.log").exists() else ""
        summary = parse_pytest_summary(log_text)
        junit = work / "pytest.xml"
        pytest_out = {
            "exit_code": by_name["pytest"]["rc"],
            "marked_in_source": marked,
            "summary_line": summary,
        }
        if junit.exists():
            try:
                pytest_out.update(parse_junit(junit))
                pytest_out["source"] = "junitxml"
            except ET.ParseError as exc:
                pytest_out["junit_error"] = str(exc)
        if "passed" not in pytest_out and summary is not None:
            pytest_out.update({k: summary[k] for k in ("passed", "failed", "errors", "skipped")})
            pytest_out["source"] = "summary line"
        if summary is not None:
            pytest_out["deselected"] = summary["deselected"]
        if "passed" not in pytest_out:
            failures.append("pytest -m cuda left no result (no junit XML and no summary line)")
        else:
            if pytest_out["skipped"]:
                reasons = sorted(
                    {t["message"] for t in pytest_out.get("tests", []) if t["outcome"] == "skipped"}
                )
                failures.append(f"{pytest_out['skipped']} cuda test(s) skipped: {'; '.join(reasons) or '?'}")
            if pytest_out["failed"] or pytest_out["errors"]:
                failures.append(f"cuda tests: {pytest_out['failed']} failed, {pytest_out['errors']} errors")
            if pytest_out["passed"] < max(marked, 1):
                failures.append(
                    f"only {pytest_out['passed']} cuda test(s) passed; the sources mark {marked} with cuda"
                )

    cuda_paths = read_json(work / "cuda-paths.json")
    if "cuda-paths" in by_name:
        if cuda_paths is None:
            failures.append("the CUDA path checks wrote nothing")
        else:
            failures.extend(
                f"CUDA path check {c['name']} failed: {c['detail']}"
                for c in cuda_paths.get("checks", [])
                if not c["ok"]
            )

    bench_cli = _bench_figures(read_json(work / "bench-cli.json"))
    bench_cuda_full = read_json(work / "bench-cuda.json")
    bench_cuda = _bench_figures(bench_cuda_full)
    if "bench-cuda" in by_name:
        engines = (bench_cuda_full or {}).get("engines") or []
        if not engines:
            failures.append("the bench on the device built no engine (did bench.worker stop using Engine?)")
        elif not all(
            e.get("arena") == "cuda" and e.get("pinned") and not e.get("emulated_link") for e in engines
        ):
            failures.append("the bench ran engines off the device: " + json.dumps(engines))

    ran = {s["name"] for s in steps}
    probe_info = probe_venv or probe or {}
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "ok": not failures and ran >= set(STEPS) and not dry_run,
        "dry_run": dry_run,
        "failures": failures,
        "not_run": [s for s in STEPS if s not in ran],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "git": _git_info(tests_dir.parent),
        "torch": {
            k: probe_info.get(k)
            for k in ("python", "torch_version", "torch_file", "cuda_build", "cudnn", "cuda_available")
        },
        "devices": probe_info.get("devices", []),
        "nvidia_smi": (work / "nvidia-smi.txt").read_text().strip()
        if (work / "nvidia-smi.txt").exists()
        else None,
        "steps": steps,
        "pytest": pytest_out,
        "cuda_paths": cuda_paths,
        "bench_cli": bench_cli,
        "bench_cuda": bench_cuda,
        "work_dir": str(work),
    }
    if dry_run:
        failures.append(
            "dry run (ONEPOOL_GPU_CHECK_DRY_RUN=1): plumbing exercised without CUDA, nothing verified"
        )
    if not failures and not report["ok"]:
        failures.append(f"steps not run: {', '.join(report['not_run'])}")
    return report


def _git_info(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], check=False, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


# -------------------------------------------------------------------------------------------------------
# torch-facing subcommands.
# -------------------------------------------------------------------------------------------------------
def probe(out: Path) -> int:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "devices": [],
    }
    try:
        import torch
    except Exception as exc:
        info["error"] = (
            f"torch is not importable from {sys.executable} ({type(exc).__name__}: {exc}); install a CUDA "
            "build of torch into this Python first (the check never installs torch)"
        )
        write_json(out, info)
        print(f"FAIL: {info['error']}")
        return PROBE_NO_TORCH
    info.update(
        torch_version=torch.__version__,
        torch_file=str(Path(torch.__file__).parent),
        cuda_build=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        cuda_available=torch.cuda.is_available(),
    )
    code = PROBE_OK
    if torch.version.cuda is None:
        code = PROBE_CPU_BUILD
        info["message"] = (
            f"no CUDA device: torch {torch.__version__} in {sys.executable} is a CPU-only build "
            "(torch.version.cuda is None); install a CUDA build of torch into the system Python"
        )
    elif not info["cuda_available"]:
        code = PROBE_NO_DEVICE
        info["message"] = (
            f"no CUDA device: torch {torch.__version__} is built for CUDA {torch.version.cuda} but "
            "torch.cuda.is_available() is False (no GPU visible, driver missing or too old, or "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s})"
        )
    else:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["devices"].append(
                {
                    "index": i,
                    "name": props.name,
                    "total_memory_bytes": int(props.total_memory),
                    "total_memory_gib": round(props.total_memory / GIB, 2),
                    "capability": f"{props.major}.{props.minor}",
                    "multi_processor_count": props.multi_processor_count,
                }
            )
    write_json(out, info)
    print(f"python {info['python']} ({sys.executable})")
    print(f"torch {info['torch_version']}  CUDA build {info['cuda_build']}  cuDNN {info['cudnn']}")
    print(f"torch from {info['torch_file']}")
    for d in info["devices"]:
        print(f"cuda:{d['index']}  {d['name']}  {d['total_memory_gib']} GiB  capability {d['capability']}")
    if code != PROBE_OK:
        print(f"FAIL: {info['message']}")
    return code


def _use_this_checkout() -> None:
    """Import `services`/`bench` from the checkout this script lives in, whatever is installed."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def _timing_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def _h2d_gbps(torch: Any, device: Any, nbytes: int, pinned: bool, repeats: int = 5) -> dict[str, Any]:
    """One host->device copy of `nbytes`, timed with CUDA events on the current stream (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=pinned)  # warm-up
    torch.cuda.synchronize(device)
    times: list[float] = []
    for _ in range(repeats):
        start, end = _timing_event(), _timing_event()
        start.record()
        dst.copy_(src, non_blocking=pinned)
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    ms = statistics.median(times)
    return {"bytes": nbytes, "pinned": pinned, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9, "runs_ms": times}


def cuda_paths(out: Path, device_name: str) -> int:
    """The worker's CUDA paths, through its real classes; every check is recorded even if one fails."""
    _use_this_checkout()
    import numpy as np
    import torch

    from services.worker.core.pool import RefillMode
    from services.worker.engine import Engine, EngineConfig
    from services.worker.hstu import PRESETS
    from services.worker.storage import (
        CudaLink,
        HostEmbeddingTable,
        LinkSpec,
        PoolStorage,
        PrefetchChannel,
        open_host_link,
    )
    from services.worker.validation import PreparedRequest

    checks = Checks()
    timings: dict[str, Any] = {}
    result: dict[str, Any] = {"device": device_name, "checks": [], "timings": timings}
    if not torch.cuda.is_available():
        checks.items.append(Check("cuda_available", False, "torch.cuda.is_available() is False"))
        result["checks"] = checks.as_list()
        write_json(out, result)
        print("FAIL: torch.cuda.is_available() is False: no CUDA path can run")
        return 1
    dev = torch.device(device_name)
    torch.cuda.set_device(dev)
    tiny = replace(PRESETS["tiny"], max_history=256)
    emb_dim, layers, page_tokens, kv_width = tiny.item_dim, tiny.n_layers, 16, tiny.kv_width
    budget = 64 * PoolStorage.kv_page_bytes_for(layers, page_tokens, kv_width)

    def pool_on_device() -> tuple[bool, Any]:
        before = torch.cuda.memory_allocated(dev)
        pool = PoolStorage(
            budget_bytes=budget,
            emb_dim=emb_dim,
            n_layers=layers,
            page_tokens=page_tokens,
            kv_width=kv_width,
            device=dev,
        )
        grown = torch.cuda.memory_allocated(dev) - before
        same = pool.emb_view.data_ptr() == pool.kv_view.data_ptr() == pool.arena.data_ptr()
        detail = {
            "arena_device": str(pool.arena.device),
            "arena_bytes": pool.arena.numel(),
            "allocated_growth_bytes": grown,
            "views_share_arena": same,
        }
        return pool.arena.device.type == "cuda" and pool.emb_view.is_cuda and same and grown >= budget, detail

    checks.run("pool_arena_on_cuda", pool_on_device)

    tables: list[Any] = []

    def pinned_table() -> tuple[bool, Any]:
        t = HostEmbeddingTable(200_000, emb_dim, seed=0, pin=True)
        tables.append(t)
        detail: dict[str, Any] = {
            "rows": t.num_items,
            "table_pinned": t.table.is_pinned(),
            "gather_pinned": t.gather([1, 2]).is_pinned(),
        }
        return bool(detail["table_pinned"] and detail["gather_pinned"]), detail

    checks.run("host_table_pinned", pinned_table)
    table = tables[0] if tables else None
    if table is not None:
        link = open_host_link(table, dev, LinkSpec())

        def fetch_rows() -> tuple[bool, Any]:
            rows = link.fetch(list(range(100, 356)))
            equal = torch.equal(rows.cpu(), table.table[100:356])
            ok = rows.is_cuda and isinstance(link, CudaLink) and not link.emulated and equal
            return ok, {"describe": link.describe(), "equal": equal}

        checks.run("host_link_fetch_h2d", fetch_rows)

        def fetch_timed() -> tuple[bool, Any]:
            times: list[float] = []
            for _ in range(20):
                start, end = _timing_event(), _timing_event()
                start.record()
                link.fetch(list(range(256)))
                end.record()
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
            ms = statistics.median(times)
            timings["link_fetch_256_rows_us_cuda_events"] = ms * 1e3
            return ms > 0, {"median_us": ms * 1e3, "rows": 256, "row_bytes": table.row_bytes}

        checks.run("host_link_fetch_timed", fetch_timed)

        def prefetch_side_stream() -> tuple[bool, Any]:
            n = 100_000
            with PrefetchChannel(link) as chan:
                side = link.side_stream if isinstance(link, CudaLink) else None
                on_side = side is not None and side != torch.cuda.current_stream(dev)
                start = _timing_event()
                start.record(side)
                t0 = time.perf_counter()
                submitted = chan.submit(list(range(n)))
                submit_ms = (time.perf_counter() - t0) * 1e3
                end = _timing_event()
                end.record(side)  # after the channel's copy, on the same stream
                done: list[Any] = []
                deadline = time.perf_counter() + 30
                while not done and time.perf_counter() < deadline:
                    done = chan.poll()
                ready_ms = (time.perf_counter() - t0) * 1e3
                end.synchronize()
                equal = len(done) == 1 and torch.equal(done[0][1].cpu(), table.table[:n])
            detail = {
                "side_stream_is_not_current": on_side,
                "submitted": submitted,
                "rows": n,
                "bytes": n * table.row_bytes,
                # submit gathers rows on the host, then only queues the copy: it returns before the copy ends
                "submit_wall_ms": submit_ms,
                "poll_ready_wall_ms": ready_ms,
                # from before submit to the copy's end on the side stream (includes the host gather)
                "side_stream_span_ms": float(start.elapsed_time(end)),
                "rows_equal": equal,
            }
            return on_side and submitted and equal, detail

        checks.run("prefetch_side_stream", prefetch_side_stream)

    def h2d_bandwidth() -> tuple[bool, Any]:
        pinned = _h2d_gbps(torch, dev, 256 * MIB, pinned=True)
        pageable = _h2d_gbps(torch, dev, 256 * MIB, pinned=False)
        timings["h2d_pinned_gbps"], timings["h2d_pageable_gbps"] = pinned["gbps"], pageable["gbps"]
        return pinned["gbps"] > 0, {"pinned": pinned, "pageable": pageable}

    checks.run("h2d_copy_cuda_events", h2d_bandwidth)

    def engine_serves() -> tuple[bool, Any]:
        engine = Engine(
            EngineConfig(
                model=tiny,
                num_items=20_000,
                budget_bytes=4 * MIB,
                chunk_bytes=64 * 1024,
                page_tokens=page_tokens,
                alpha=0.5,
                max_chunks_per_tick=1,
                refill_mode=RefillMode.INCREMENTAL,
                prefetch_bytes_per_tick=64 * 1024,
                device=device_name,
            )
        )
        try:
            rng = np.random.default_rng(0)
            history = rng.integers(0, 20_000, 200).astype(np.int64)
            ts = np.arange(200, dtype=np.int64) * 60
            cands = rng.permutation(20_000)[:32].astype(np.int64)

            def req(user: str, n: int) -> PreparedRequest:
                return PreparedRequest(
                    request_id=user,
                    user_id=user,
                    history=history[:n],
                    timestamps=ts[:n],
                    candidates=cands,
                    k=5,
                )

            first = engine.serve(req("u", 150))
            again = engine.serve(req("u", 200))
            # A batch of new users whose candidates all miss: one H2D copy for the whole batch.
            before = engine.link.transfers
            batch = engine.serve_batch(
                [
                    PreparedRequest(
                        request_id=f"b{i}",
                        user_id=f"b{i}",
                        history=history[:50],
                        timestamps=ts[:50],
                        candidates=np.arange(1000 + 100 * i, 1032 + 100 * i, dtype=np.int64),
                        k=5,
                    )
                    for i in range(4)
                ]
            )
            batch_transfers = engine.link.transfers - before
            engine.pool.set_target(0.8)
            for _ in range(40):
                engine.tick()
            torch.cuda.synchronize(dev)
            engine.pool.check_invariants()
            prefetch = engine._prefetch
            detail = {
                "model_device": str(next(engine.model.parameters()).device),
                "arena_device": str(engine.storage.arena.device),
                "table_pinned": engine.table.table.is_pinned(),
                "link": engine.link.describe(),
                "prefetch_on_side_stream": prefetch is not None and isinstance(prefetch.link, CudaLink),
                "second_request_cached_tokens": again.cached_tokens,
                "first_request_emb_misses": first.emb_misses,
                "link_transfers": engine.link.transfers,
                "link_bytes_moved": engine.link.bytes_moved,
                "chunks_moved": engine.pool.counters.chunks_moved,
                "batch_sizes": [r.batch_size for r in batch],
                "batch_h2d_transfers": batch_transfers,
            }
            ok = (
                engine.storage.arena.is_cuda
                and next(engine.model.parameters()).is_cuda
                and engine.table.table.is_pinned()
                and not engine.link.emulated
                and detail["prefetch_on_side_stream"]
                and again.cached_tokens > 0
                and engine.link.bytes_moved > 0
                and batch_transfers == 1
                and all(r.batch_size == 4 for r in batch)
            )
            return bool(ok), detail
        finally:
            engine.stop()

    checks.run("engine_serves_on_cuda", engine_serves)
    timings["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    result["checks"] = checks.as_list()
    write_json(out, result)
    for c in checks.items:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {json.dumps(c.detail, default=str)[:300]}")
    return 0 if checks.ok else 1


def bench_on_device(json_path: Path, device_name: str) -> int:
    """`onepool bench worker --quick --device <device_name>`, in-process, recording where each engine it
    builds really put its pool, table and link (an `Engine` subclass in place of the bench's own)."""
    _use_this_checkout()
    import torch

    import bench.worker as bench_worker
    from services.worker.engine import Engine, EngineConfig

    engines: list[dict[str, Any]] = []

    class RecordedEngine(Engine):
        def __init__(self, cfg: EngineConfig) -> None:
            super().__init__(cfg)
            engines.append(
                {
                    "device": str(self.device),
                    "arena": self.storage.arena.device.type,
                    "pinned": self.table.table.is_pinned(),
                    "emulated_link": self.link.emulated,
                }
            )

    original = bench_worker.Engine  # type: ignore[attr-defined]
    bench_worker.Engine = RecordedEngine  # type: ignore[attr-defined]
    try:
        rc = bench_worker.run_bench(
            bench_worker.BenchOptions(json_path=str(json_path), quick=True, device=device_name)
        )
    finally:
        bench_worker.Engine = original  # type: ignore[attr-defined]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report = read_json(json_path) or {}
    report["engines"] = engines
    if torch.cuda.is_available():
        report["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    write_json(json_path, report)
    print(f"engines built: {len(engines)}, on: {sorted({e['device'] for e in engines})}")
    return rc


# -------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requirements", help="print the requirement lines to download/install (no torch)")
    r.add_argument("--pyproject", type=Path, default=REPO_ROOT / "pyproject.toml")
    r.add_argument(
        "--extra", action="append", default=None, help=f"extras to include (default: {','.join(TEST_EXTRAS)})"
    )
    r.add_argument("--build-system", action="store_true", help="also the build-system requires")
    p = sub.add_parser("probe", help="torch/CUDA versions and devices; exit 0 only with a CUDA device")
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cuda-paths", help="check the worker's CUDA paths through its real classes")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--device", default="cuda:0")
    b = sub.add_parser("bench", help="onepool bench worker --quick --device D, recording where engines ran")
    b.add_argument("--json", type=Path, required=True)
    b.add_argument("--device", default="cuda:0")
    rep = sub.add_parser("report", help="assemble the JSON report from the work folder; exit 0 only if ok")
    rep.add_argument("--work", type=Path, required=True)
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--tests", type=Path, default=REPO_ROOT / "tests")
    rep.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    if args.cmd == "requirements":
        print("\n".join(requirements(args.pyproject, args.extra or TEST_EXTRAS, build=args.build_system)))
        return 0
    if args.cmd == "probe":
        return probe(args.out)
    if args.cmd == "cuda-paths":
        return cuda_paths(args.out, args.device)
    if args.cmd == "bench":
        return bench_on_device(args.json, args.device)
    report = build_report(args.work, args.tests, dry_run=args.dry_run)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if report["ok"]:
        print("GPU CHECK PASSED")
        return 0
    print("GPU CHECK FAILED:")
    for failure in report["failures"]:
        print(f"  - {failure}")
    if report["not_run"]:
        print(f"  (steps not run: {', '.join(report['not_run'])})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
