"""`onepool trace gen`, `onepool sim` and `onepool calibrate` through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workloads.trace import read_trace

ROOT = Path(__file__).resolve().parents[2]
ONEPOOL = str(Path(sys.executable).parent / "onepool")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ONEPOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_trace_gen_then_sim_replays_it_and_reports(tmp_path: Path) -> None:
    trace = tmp_path / "burst.jsonl"
    gen = _run(
        "trace",
        "gen",
        "--regime",
        "burst",
        "--duration",
        "8",
        "--rate",
        "50",
        "--seed",
        "2",
        "--out",
        str(trace),
    )
    assert gen.returncode == 0, gen.stderr
    t = read_trace(trace)
    assert t.header.extra["generator"]["regime"] == "burst"
    n = sum(1 for _ in t)
    assert 300 < n < 500
    out = tmp_path / "sim.json"
    report = tmp_path / "report"
    sim = _run(
        "sim",
        "--trace",
        str(trace),
        "--cost",
        "a100",
        "--pool-mib",
        "4",
        "--workers",
        "3",
        "--alpha-policy",
        "static:0.4",
        "--alpha-policy",
        "hit-balance",
        "--json",
        str(out),
        "--report",
        str(report),
    )
    assert sim.returncode == 0, sim.stderr
    r = json.loads(out.read_text())
    for key in (
        "p50_ms",
        "p99_ms",
        "slo_satisfaction",
        "throughput_rps",
        "emb_hit_rate",
        "kv_hit_rate",
        "critical_refill_bytes",
        "sim_requests_per_s",
    ):
        assert isinstance(r[key], (int, float)), key
    assert set(r["policies"]) == {"static:0.4", "hit-balance"}
    assert r["setup"]["sim"]["pool_bytes"] == 4 * 1024 * 1024
    # the preset's shape and ratios are those of the cluster simulated
    shape = r["setup"]["preset"]["shape"]
    assert (shape["workers"], shape["pool_mib"], r["setup"]["sim"]["workers"]) == (3, 4, 3)
    w = r["setup"]["preset"]["workload"]
    ratios = r["setup"]["preset"]["ratios"]
    hot_kv = w["hot_users"] * ratios["mean_first_history"] * shape["kv_bytes_per_token"]
    assert ratios["hot_users_kv_over_cluster_pool"] == pytest.approx(hot_kv / (3 * 4 * 1024 * 1024))
    assert r["setup"]["input"]["trace"] == str(trace)
    assert r["policies"]["static:0.4"]["requests"] + 0 <= n
    assert "machine_ref" in r
    assert (report / "report.md").is_file() and (report / "latency_cdf.png").is_file()


def test_sim_sweep_and_motivation_keys(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    sim = _run(
        "sim",
        "--regime",
        "trend",
        "--duration",
        "6",
        "--rate",
        "40",
        "--num-items",
        "20000",
        "--pool-mib",
        "2",
        "--cost",
        "a100",
        "--sweep",
        "--window",
        "2",
        "--json",
        str(out),
    )
    assert sim.returncode == 0, sim.stderr
    r = json.loads(out.read_text())
    assert set(r["static"]) == {f"{a / 10:g}" for a in range(1, 10)}
    assert len(r["alpha_star"]) == 3
    for key in ("best_static_alpha", "best_static_p99_ms", "alpha_star_mean", "oracle_p99_ms"):
        assert isinstance(r[key], float), key


def test_sim_motivation_keys(tmp_path: Path) -> None:
    out = tmp_path / "motivation.json"
    common = ["--duration", "3", "--rate", "30", "--num-items", "20000", "--pool-mib", "2", "--cost", "a100"]
    sim = _run("sim", "--motivation", *common, "--json", str(out), "--report", str(tmp_path / "r"))
    assert sim.returncode == 0, sim.stderr
    r = json.loads(out.read_text())
    grid = {f"{a / 10:g}" for a in range(1, 10)}
    regimes = {"steady", "trend", "burst"}
    assert set(r["p99_ms"]) == set(r["normalised_p99"]) == set(r["static"]) == regimes
    for regime in regimes:
        p99 = r["p99_ms"][regime]
        assert set(p99) == set(r["static"][regime]) == grid
        best = min(p99, key=lambda a: p99[a])
        assert r["best_static_alpha"][regime] == float(best)
        assert r["normalised_p99"][regime][best] == 1.0
        for alpha, row in r["static"][regime].items():
            assert row["p99_ms"] == p99[alpha]
            assert 0 <= row["kv_hit_rate"] <= 1 and 0 <= row["emb_hit_rate"] <= 1 and row["utilisation"] > 0
    shift = max(r["best_static_alpha"].values()) - min(r["best_static_alpha"].values())
    assert r["best_static_shift"] == pytest.approx(shift)
    overall = f"{r['overall_static_alpha']:g}"
    assert r["fixed_split_penalty"] == max(r["normalised_p99"][g][overall] for g in regimes) >= 1.0
    assert (tmp_path / "r" / "motivation.png").is_file()


def test_sim_compare_keys(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    common = ["--duration", "4", "--rate", "30", "--num-items", "20000", "--pool-mib", "2", "--cost", "a100"]
    policies = ["--alpha-policy", "helm", "--alpha-policy", "hit-balance", "--window", "2", "--warmup", "1"]
    sim = _run("sim", "--compare", *common, *policies, "--json", str(out), "--report", str(tmp_path / "r"))
    assert sim.returncode == 0, sim.stderr
    r = json.loads(out.read_text())
    regimes = {"steady", "trend", "burst"}
    rows = {f"static:{a / 10:g}" for a in range(1, 10)} | {"best-static", "oracle", "helm", "hit-balance"}
    rows |= {f"helm+{p}" for p in ("kv", "emb", "least-loaded", "round-robin")}
    for key in ("opt_gap", "p99_ms", "slo_satisfaction", "throughput_rps"):
        assert set(r[key]) == regimes, key
        for regime in regimes:
            assert set(r[key][regime]) == rows, (key, regime)
    for regime in regimes:
        star = r["alpha_star"][regime]
        assert len(star) == 2
        best = r["best_static_alpha"][regime]
        assert r["p99_ms"][regime]["best-static"] == r["p99_ms"][regime][f"static:{best:g}"]
        # a static split's gap: its mean distance to alpha* at the decision times after the 1-s warm-up,
        # each in the 2-s alpha* window that holds it
        times = [t for t in r["alpha_series"][regime]["t"] if 1.0 < t <= 4.0 + 1e-9]
        gap = sum(abs(0.5 - star[min(int((t - 1e-9) // 2), 1)]) for t in times) / len(times)
        assert r["opt_gap"][regime]["static:0.5"] == pytest.approx(gap)
        helm, oracle = r["p99_ms"][regime]["helm"], r["p99_ms"][regime]["oracle"]
        assert r["p99_ratio_to_oracle"][regime] == pytest.approx(helm / oracle)
        assert r["p99_reduction_vs_best_static"][regime] == pytest.approx(
            1 - helm / r["p99_ms"][regime]["best-static"]
        )
        assert set(r["refill_bytes"][regime]) == {"incremental", "naive"}
        assert len(r["alpha_series"][regime]["t"]) == len(r["alpha_series"][regime]["alpha_star"]) > 0
    assert (tmp_path / "r" / "alpha_vs_star.png").is_file() and (tmp_path / "r" / "refill.png").is_file()
    assert "opt_gap" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "{bad}"], ":2: field 't'"),
        (["--regime", "steady", "--cost", "nope"], "shipped profiles"),
        (["--regime", "movielens", "--cost", "a100", "--motivation"], "three synthetic regimes"),
        (["--cost", "a100"], "exactly one of --regime and --trace"),
        (["--regime", "steady", "--workload", "hot=1"], "KEY=VALUE with KEY one of"),
        (["--regime", "steady", "--workload", "hot_users=many"], "hot_users must be an integer"),
        (["--regime", "steady", "--alpha-policy", "static:2"], "static alpha must be in [0, 1]"),
        (["--regime", "steady", "--compare"], "--compare runs the three synthetic regimes"),
        (["--compare", "--motivation"], "give one of --motivation and --compare"),
        (["--regime", "steady", "--alpha-policy", "helm:bogus=1"], "'bogus=1' is not key=value"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"onepool_trace": 1, "num_items": 10}\n'
        '{"t": "soon", "user_id": "u", "history": [], "candidates": [1]}\n'
    )
    args = [str(bad) if a == "{bad}" else a for a in args]
    run = _run("sim", *args, "--duration", "1", "--json", str(tmp_path / "x.json"))
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_calibrate_rejects_a_negative_overhead(tmp_path: Path) -> None:
    run = _run("calibrate", "--quick", "--overhead-ms", "-1", "--json", str(tmp_path / "cal.json"))
    assert run.returncode == 2
    assert "--overhead-ms must be >= 0" in run.stderr
    assert not (tmp_path / "cal.json").exists()


def test_calibrate_quick_writes_a_profile_the_simulator_loads(tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    cal = _run("calibrate", "--quick", "--json", str(out))
    assert cal.returncode == 0, cal.stderr
    report = json.loads(out.read_text())
    profile = report["profile"]
    # 60 batches on a machine others may load: which coefficient takes the cost varies, not that one does
    coefficients = (
        "batch_fixed_ms",
        "request_ms",
        "ms_per_new_token",
        "ms_per_cached_token",
        "ms_per_candidate",
    )
    assert all(profile[k] >= 0 for k in coefficients) and sum(profile[k] for k in coefficients) > 0
    assert report["fit"]["batches"] == 60 and report["fit"]["mean_batch_ms"] > 0
    # the overhead outside the workers, measured on a real local cluster
    overhead = report["overhead"]
    assert overhead["requests"] > 0 and overhead["failed_requests"] == 0
    assert overhead["p50_ms"] > overhead["worker_p50_ms"] > 0 and overhead["worker_compute_p50_ms"] > 0
    q = profile["overhead_quantiles_ms"]
    assert q == overhead["overhead_quantiles_ms"] and len(q) == 101 and q == sorted(q)
    assert profile["overhead_ms"] == overhead["overhead_ms"] == q[50]
    assert 0 < overhead["overhead_ms"] < overhead["p50_ms"]
    # the model's slow-down inside the cluster, from the requests served alone
    scales = profile["cluster_scale_quantiles"]
    assert scales == overhead["cluster_scale_quantiles"] and len(scales) == 101 and scales == sorted(scales)
    assert scales[50] == overhead["cluster_scale"] > 0 and overhead["requests_alone"] >= 20
    sim = _run(
        "sim",
        "--regime",
        "steady",
        "--duration",
        "3",
        "--rate",
        "20",
        "--num-items",
        "20000",
        "--pool-mib",
        "2",
        "--cost",
        str(out),
        "--json",
        str(tmp_path / "s.json"),
    )
    assert sim.returncode == 0, sim.stderr
    assert json.loads((tmp_path / "s.json").read_text())["setup"]["sim"]["cost"]["name"] == "calibrated-tiny"
