"""`onepool bench controller`: the console script's report and its argument checks, and the feature stream.

No timing is compared with a target here: speed targets live in the benchmark (docs/benchmarks.md)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.controller import FeatureStream, measure_policy
from services.controller.settings import ControllerSettings
from shared import schemas as s

ONEPOOL = [sys.executable, "-m", "services.cli"]
ROOT = Path(__file__).resolve().parents[2]
PER_POLICY = (
    "policy",
    "decision_p50_us",
    "decision_p99_us",
    "decision_mean_us",
    "decision_max_us",
    "decision_32_workers_us",
    "workers",
    "histogram",
    "target_p99_us",
    "met",
)


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ONEPOOL, "bench", "controller", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_bench_controller_writes_every_key_and_the_report(tmp_path: Path) -> None:
    out, report_dir = tmp_path / "controller.json", tmp_path / "report"
    run = _bench(
        "--decisions", "2000", "--workers", "8", "--policy", "hit-balance", "--policy", "static:0.5",
        "--json", str(out), "--report", str(report_dir),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert list(report["policies"]) == ["hit-balance", "static:0.5"]
    for spec, p in report["policies"].items():
        assert set(p) >= set(PER_POLICY), spec
        assert 0 < p["decision_p50_us"] <= p["decision_p99_us"] <= p["decision_max_us"], spec
        assert 0 < p["decision_mean_us"] <= p["decision_max_us"], spec
        assert p["decision_32_workers_us"] > 0, spec
        assert p["workers"] == 8 and p["target_p99_us"] == 10
        assert p["met"] is (p["decision_p99_us"] <= 10)
        edges, counts = p["histogram"]["edges_us"], p["histogram"]["counts"]
        assert sum(counts) == 2000 and len(edges) == len(counts) + 1
        assert edges == sorted(edges) and edges[0] > 0
        assert 0.0 <= p["moved_share"] <= 1.0
    assert report["policies"]["hit-balance"]["policy"] == "hit-balance"
    assert report["policies"]["static:0.5"]["policy"] == "static:0.5"
    assert report["met"] is all(p["met"] for p in report["policies"].values())
    assert report["target_p99_us"] == 10
    setup = report["setup"]
    assert setup["decisions"] == 2000 and setup["seed"] == 0 and setup["workers"] == 8
    assert setup["python"].count(".") == 2
    assert "disabled" in setup["gc"]
    settings = ControllerSettings()
    assert setup["clamp"] == {
        "lo": settings.alpha_min,
        "hi": settings.alpha_max,
        "max_step": settings.max_step,
    }
    assert "np_unique_600_us" in report["machine_ref"] or "unavailable" in report["machine_ref"]
    png = report_dir / "decision_latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report_dir / "controller.md").read_text()
    assert "| `hit-balance` |" in md and "| `static:0.5` |" in md and "decision_latency.png" in md
    assert "hit-balance: decision p50" in run.stdout and "static:0.5: decision p50" in run.stdout


def test_default_policy_is_helm_with_its_figures_at_the_top(tmp_path: Path) -> None:
    out = tmp_path / "controller.json"
    run = _bench("--decisions", "100", "--workers", "2", "--seed", "3", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert list(report["policies"]) == ["helm"] and report["policy"] == "helm"
    helm = report["policies"]["helm"]
    for key in ("decision_p50_us", "decision_p99_us", "decision_32_workers_us", "histogram"):
        assert report[key] == helm[key], key
    assert sum(helm["histogram"]["counts"]) == 100
    assert report["setup"]["seed"] == 3


@pytest.mark.parametrize(
    ("bad", "named", "says"),
    [
        (["--decisions", "0"], "--decisions", "must be >= 100"),
        (["--decisions", "many"], "--decisions", "expected int"),
        (["--workers", "0"], "--workers", "must be >= 1"),
        (["--policy", "fastest"], "--policy", "unknown alpha policy 'fastest'"),
        (["--policy", "static:2"], "--policy", "must be in [0, 1]"),
        (["--policy", "static:0.5", "--policy", "static:0.5"], "--policy", "given twice"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_flag(
    tmp_path: Path, bad: list[str], named: str, says: str
) -> None:
    out = tmp_path / "controller.json"
    run = _bench("--json", str(out), *bad)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"argument {named}" in run.stderr and says in run.stderr, run.stderr
    assert not out.exists()


def test_feature_stream_is_valid_seeded_and_drifts() -> None:
    def windows(seed: int) -> list[s.WorkerFeatures]:
        stream = FeatureStream(4, seed, window_ms=1000.0, min_change=0.01, slo_ms=50.0)
        out = []
        for k in range(400):
            f = stream.next(k % 4)
            stream.commit(k % 4, max(0.05, f.alpha_target - 0.05))  # a policy pushing alpha down
            out.append(f)
        return out

    first = windows(7)
    assert first == windows(7) and first != windows(8)
    report = s.FeatureReport(source="bench", seq=0, sent_at_ms=0.0, workers=first)
    decoded = s.decode(s.decoder(s.FeatureReport), s.encode(report))  # every field inside its schema range
    assert decoded.workers == first
    assert {f.worker_id for f in first} == {"w0", "w1", "w2", "w3"}
    w0 = [f for f in first if f.worker_id == "w0"]
    assert len({round(f.request_rate, 6) for f in w0}) > 90  # rates move every window
    assert len({round(f.mean_history, 3) for f in w0}) > 90
    assert w0[-1].alpha_target < w0[0].alpha_target  # decisions are fed back
    assert w0[-1].alpha < w0[0].alpha  # and alpha follows its target
    assert any(f.cost.samples == 0 for f in w0) and any(f.cost.samples > 0 for f in w0)


def test_measure_policy_turns_gc_back_on() -> None:
    assert gc.isenabled()
    p = measure_policy("static:0.3", workers=3, decisions=200, seed=1)
    assert gc.isenabled()
    assert sum(p["histogram"]["counts"]) == 200 and p["workers"] == 3
