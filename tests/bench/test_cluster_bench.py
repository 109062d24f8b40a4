"""`onepool bench cluster`: the open-loop replay against a real aiohttp server, bad input through the console
script, and a short run of two policies on real local clusters (real nats-server, real workers)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from bench.cluster_report import TABLE_KEYS
from bench.replay import read_records, replay, write_records
from tests.helpers import free_port
from workloads.trace import TraceRequest

ONEPOOL = [sys.executable, "-m", "services.cli"]
ROOT = Path(__file__).resolve().parents[2]
ANSWER = {
    "items": [1],
    "scores": [0.5],
    "worker": "w7",
    "cached_tokens": 3,
    "computed_tokens": 5,
    "emb_hits": 2,
    "emb_misses": 1,
    "worker_queue_ms": 0.25,
    "worker_compute_ms": 0.75,
    "batch_size": 2,
    "latency_ms": 1.5,
}


def _req(t: float, user: str) -> TraceRequest:
    return TraceRequest(t, user, np.array([1, 2, 3]), np.array([4, 5]))


@pytest.fixture
async def held_server() -> AsyncIterator[tuple[int, asyncio.Event, list[float]]]:
    """A real aiohttp server on a free port: /v1/recommend holds every request until `release` is set
    (then answers at once), except user "busy", answered 503; `arrivals` gets each request's arrival time
    (perf_counter)."""
    release = asyncio.Event()
    arrivals: list[float] = []

    async def recommend(request: web.Request) -> web.Response:
        arrivals.append(time.perf_counter())
        body = await request.json()
        if body["user_id"] == "busy":
            return web.json_response(
                {"error": {"code": "overloaded", "message": "no", "field": None}}, status=503
            )
        await release.wait()
        return web.json_response(ANSWER)

    app = web.Application()
    app.router.add_post("/v1/recommend", recommend)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port, release, arrivals
    finally:
        release.set()
        await runner.cleanup()


async def test_replay_is_open_loop_and_times_from_the_schedule(
    held_server: tuple[int, asyncio.Event, list[float]], tmp_path: Path
) -> None:
    """The server holds everything until 0.5 s: every request is still sent at its time (open loop), and
    each latency runs from its own scheduled time, not from when an earlier answer came."""
    port, release, arrivals = held_server
    trace = [_req(0.0, "a"), _req(0.2, "b"), _req(0.3, "busy"), _req(0.4, "c")]

    async def release_at(t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + 0.5 - time.perf_counter()))
        release.set()

    t0 = time.perf_counter()
    releaser = asyncio.create_task(release_at(t0))
    out = io.StringIO()
    records = await replay(trace, "127.0.0.1", port, duration_s=0.4, progress_out=out, progress_period_s=0.1)
    await releaser

    assert [r.t for r in records] == [0.0, 0.2, 0.3, 0.4]
    # sent on time although nothing had been answered yet
    assert len(arrivals) == 4
    for got, want in zip(arrivals, (0.0, 0.2, 0.3, 0.4), strict=True):
        assert got - t0 == pytest.approx(want, abs=0.05)
    a, b, busy, c = records
    # held until 0.5 s: latency = 500 - scheduled time (ms), within scheduling noise
    assert a.latency_ms == pytest.approx(500, abs=60)
    assert b.latency_ms == pytest.approx(300, abs=60)
    assert c.latency_ms == pytest.approx(100, abs=60)
    assert (a.status, a.worker, a.cached_tokens, a.computed_tokens, a.emb_hits, a.emb_misses) == (
        200,
        "w7",
        3,
        5,
        2,
        1,
    )
    assert (a.gateway_ms, a.worker_queue_ms, a.worker_compute_ms, a.batch_size) == (1.5, 0.25, 0.75, 2)
    assert (busy.status, busy.code, busy.worker) == (503, "overloaded", "")
    assert busy.latency_ms < 100
    assert "sent 4  answered 3  failed 1" in out.getvalue()

    path = tmp_path / "r.jsonl"
    assert write_records(path, records) == 4
    assert read_records(path) == records


async def test_replay_records_no_answer_as_status_0() -> None:
    port = free_port()  # nothing listens there
    records = await replay(
        [_req(0.0, "a")], "127.0.0.1", port, duration_s=0.0, timeout_s=1.0, progress_out=io.StringIO()
    )
    assert [(r.status, r.code) for r in records] == [(0, "no_answer")]


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ONEPOOL, "bench", "cluster", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_bad_trace_line_is_exit_2_naming_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"onepool_trace": 1, "num_items": 100}\n'
        '{"t": 0.0, "user_id": "u", "history": [1], "candidates": [2]}\n'
        '{"t": 0.1, "user_id": "u", "history": [1], "candidates": "many"}\n'
    )
    out = _bench("--trace", str(trace), "--json", str(tmp_path / "r.json"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"{trace}:3" in lines[0] and "candidates" in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_url_with_two_policies_is_refused(tmp_path: Path) -> None:
    out = _bench(
        "--regime",
        "steady",
        "--duration",
        "5",
        "--url",
        "http://127.0.0.1:1",
        "--alpha-policies",
        "static:0.3,static:0.7",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 2
    assert "cannot be switched from outside" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_policies_on_local_clusters(tmp_path: Path) -> None:
    """2 workers, a 10 s steady trace at 8 req/s, static:0.3 and hit-balance, each on a cluster of its own."""
    trace = tmp_path / "steady.jsonl"
    gen = subprocess.run(
        [
            *ONEPOOL,
            "trace",
            "gen",
            "--regime",
            "steady",
            "--duration",
            "10",
            "--rate",
            "8",
            "--out",
            str(trace),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert "wrote" in gen.stdout
    n = sum(1 for line in trace.read_text().splitlines()[1:] if line.strip())
    out = _bench(
        "--trace",
        str(trace),
        "--workers",
        "2",
        "--alpha-policies",
        "static:0.3,hit-balance",
        "--warmup",
        "2",
        "--json",
        str(tmp_path / "cluster.json"),
        "--report",
        str(tmp_path / "report"),
        timeout=150,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "answered" in out.stdout  # the progress line
    report = json.loads((tmp_path / "cluster.json").read_text())
    assert set(report["policies"]) == {"static:0.3", "hit-balance"}
    assert report["setup"]["preset"]["ratios"]["table_over_pool"] > 1
    assert report["setup"]["input"]["onepool_trace"] == 1
    assert report["setup"]["worker_env"]["ONEPOOL_WORKER_LINK_GBPS"] == "0.01"
    assert "np_unique_600_us" in report["machine_ref"] or "unavailable" in report["machine_ref"]
    for key, row in report["policies"].items():
        for name in TABLE_KEYS:
            assert row[name] is not None, (key, name)
        assert row["answered"] >= 0.9 * row["requests"] > 0, row
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert 0 <= row["slo_satisfaction"] <= 1
        assert 0 <= row["emb_hit_rate"] <= 1 and 0 <= row["kv_hit_rate"] <= 1
        assert row["critical_refill_bytes"] >= 0
        assert set(row["alpha_timeline"]) == {"w0", "w1"}
        assert all(len(tl) >= 10 for tl in row["alpha_timeline"].values())  # a digest every 0.5 s
        records = read_records(Path(row["records"]))
        assert len(records) == n
        assert sum(r.ok for r in records) >= 0.9 * n
    # a static policy starts the workers at its split and keeps it
    static = report["policies"]["static:0.3"]["alpha_timeline"]
    assert all(abs(a - 0.3) < 0.02 for tl in static.values() for _, a, _ in tl)
    for name in ("report.md", "latency_cdf.png", "p99_over_time.png", "alpha_over_time.png", "hit_rates.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--workers", "8"], "2-4 local workers"), (["--sweep"], "compares one policy")],
)
def test_sim_validate_refuses_what_it_cannot_compare(tmp_path: Path, extra: list[str], message: str) -> None:
    out = subprocess.run(
        [*ONEPOOL, "sim", "--validate", "--regime", "steady", "--duration", "5", "--cost", "a100", *extra]
        + ["--json", str(tmp_path / "v.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sim_validate_compares_a_real_cluster_with_the_simulator(tmp_path: Path) -> None:
    """The user's path: one short steady workload on a real 2-worker cluster and in the simulator, the same
    requests on both sides; the report has both summaries, the errors computed from them, and notes."""
    out = tmp_path / "validate.json"
    run = subprocess.run(
        [
            *ONEPOOL,
            "sim",
            "--validate",
            "--regime",
            "steady",
            "--duration",
            "8",
            "--rate",
            "15",
            "--alpha-policy",
            "static:0.5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    real, sim = r["real"], r["sim"]
    assert real["failed_requests"] == 0 and real["requests"] == sim["requests"] > 50
    for key in ("p50", "p99"):
        expected = abs(sim[f"{key}_ms"] - real[f"{key}_ms"]) / real[f"{key}_ms"]
        assert r[f"validation_{key}_error"] == pytest.approx(expected)
    assert abs(real["emb_hit_rate"] - sim["emb_hit_rate"]) < 0.1  # the same requests meet the same caches
    assert isinstance(r["differences"]["notes"], list)
