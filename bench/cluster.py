"""`onepool bench cluster`: alpha policies (and routing policies) side by side on one workload, on a real
cluster under open-loop load.

Without ``--url`` it starts a `LocalCluster` (what `onepool up` runs: nats-server, cachestate, the
controller, N CPU workers, one gateway) per (alpha policy, routing) pair, its workers configured from the
preset (pool, chunk, page, model, the emulated host link) and the trace's catalogue, and replays the same
requests against each (:mod:`bench.replay`: each request leaves at its trace time ``t``, latency from that
moment). A static policy also starts the workers at its alpha (as the simulator starts its pools), so the
run measures the split, not the ramp to it. With ``--url`` it replays once against that gateway (an
operator's cluster; the alpha policy is whatever its controller runs).

Meanwhile a NATS subscriber records every worker's digests (alpha and its target, cumulative pool counters,
critical-path refill bytes, window latencies). The report holds per policy the figures of the requests
sent after the warm-up (first 20% of the run, at most 60 s; ``--warmup``), the alpha timeline per worker,
and the setup (preset ratios, trace header, workers, worker environment); every request's record goes to
``<json stem>.records/<policy>.jsonl``; ``--report DIR`` adds markdown and PNG plots
(:mod:`bench.cluster_report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import numpy as np
from nats.aio.msg import Msg

from bench.replay import ReplayRecord, replay, write_records
from bench.report import json_safe, write_report
from services.controller.core.policies import StaticPolicy, parse_policy
from services.gateway.core.router import Policy
from services.localcluster import ClusterSettings, GatewaySpec, LocalCluster, free_port
from services.worker.settings import WorkerSettings
from shared import schemas as s
from shared.slo import DEFAULT_SLO_MS
from workloads.presets import Preset
from workloads.sources import Source

__all__ = [
    "ClusterBenchOptions",
    "DigestRecorder",
    "PolicyRun",
    "local_worker_env",
    "run_cluster_bench",
    "run_local",
    "summarise",
]

_WORKER_DEFAULTS = WorkerSettings(id="bench")
ROUTINGS = tuple(p.value for p in Policy)  # the gateway's routing policies
WINDOW_S = 5.0  # the report's time series: P99 and hit rates per window of this many seconds


@dataclass(frozen=True)
class ClusterBenchOptions:
    json_path: str
    source: Source
    preset: Preset
    alpha_policies: tuple[str, ...] = ("hit-balance",)
    routings: tuple[str, ...] = ("joint",)
    workers: int = 2
    url: str | None = None
    nats_url: str | None = None
    slo_ms: float = DEFAULT_SLO_MS
    warmup_s: float | None = None
    report_dir: str | None = None
    timeout_s: float = 10.0
    worker_env_extra: Mapping[str, str] = field(default_factory=dict)  # on top of the preset's
    command: str = ""

    @property
    def warmup(self) -> float:
        """Seconds at the start left out of the figures: ``--warmup``, else 20% of the run, at most 60 s."""
        if self.warmup_s is not None:
            return self.warmup_s
        return min(0.2 * self.source.duration_s, 60.0)


def check_options(opts: ClusterBenchOptions) -> None:
    """Raise ValueError (one line) for what cannot run."""
    for spec in opts.alpha_policies:
        parse_policy(spec)
    if not opts.alpha_policies or not opts.routings:
        raise ValueError("give at least one alpha policy and one routing policy")
    for routing in opts.routings:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose from {', '.join(ROUTINGS)}")
    if len(set(opts.alpha_policies)) != len(opts.alpha_policies) or len(set(opts.routings)) != len(
        opts.routings
    ):
        raise ValueError("an alpha policy or routing is named twice")
    if opts.url is not None:
        if len(opts.alpha_policies) > 1 or len(opts.routings) > 1:
            raise ValueError(
                "--url replays once against a running gateway: its alpha and routing policies cannot be "
                "switched from outside (start one cluster per policy, or drop --url to let the bench do it)"
            )
        parts = urlsplit(opts.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url {opts.url!r}: expected http://HOST[:PORT] (no TLS)")
    elif opts.nats_url is not None:
        raise ValueError("--nats-url goes with --url (a local cluster's NATS is the bench's own)")
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {opts.workers}")
    if not opts.slo_ms > 0:
        raise ValueError(f"--slo-ms must be > 0, got {opts.slo_ms}")
    if opts.warmup_s is not None and not 0 <= opts.warmup_s < opts.source.duration_s:
        raise ValueError(f"--warmup must be in [0, {opts.source.duration_s:g}) s, got {opts.warmup_s:g}")


def run_key(policy: str, routing: str, routings: Sequence[str]) -> str:
    """The report's key of a run: the alpha policy, plus ``@routing`` when several routings are compared."""
    return policy if len(routings) == 1 else f"{policy}@{routing}"


def records_name(key: str) -> str:
    """A file name for a run key ("static:0.3" -> "static_0.3")."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)


def local_worker_env(preset: Preset, source: Source, policy: str) -> dict[str, str]:
    """The workers' environment for the preset's geometry and the trace's catalogue; a static policy's
    alpha as their starting split (clamped to the workers' own alpha range)."""
    shape = preset.shape
    env = {
        "ONEPOOL_WORKER_MODEL": shape.model,
        "ONEPOOL_WORKER_NUM_ITEMS": str(source.header.num_items),
        "ONEPOOL_WORKER_BUDGET_MIB": f"{shape.pool_mib:g}",
        "ONEPOOL_WORKER_CHUNK_KIB": str(shape.chunk_kib),
        "ONEPOOL_WORKER_PAGE_TOKENS": str(shape.page_tokens),
        "ONEPOOL_WORKER_LINK_GBPS": f"{shape.link_gbps:g}",
    }
    chosen = parse_policy(policy)
    if isinstance(chosen, StaticPolicy):
        low, high = _WORKER_DEFAULTS.alpha_min, _WORKER_DEFAULTS.alpha_max
        env["ONEPOOL_WORKER_ALPHA"] = f"{min(max(chosen.alpha, low), high):g}"
    return env


# ---------------------------------------------------------------------------------------------- digests
@dataclass(frozen=True, slots=True)
class DigestSample:
    t: float  # seconds since the replay started (negative before it)
    worker: str
    incarnation: str
    alpha: float
    alpha_target: float
    emb_hits: int
    emb_misses: int
    kv_hits: int
    kv_misses: int
    critical_refill_bytes: int
    prefetch_bytes: int
    chunks_moved: int
    window_requests: int
    window_p50_ms: float
    window_p99_ms: float


class DigestRecorder:
    """Subscribes to every worker's digests and keeps one sample per digest (the first part of a split
    one). ``origin`` (a ``time.monotonic()`` moment, the replay's start) sets the clock of ``t``."""

    def __init__(self) -> None:
        self.samples: list[DigestSample] = []
        self.undecodable = 0
        self.origin = time.monotonic()
        self._nc: Any = None
        self._dec = s.decoder(s.WorkerDigest)

    @classmethod
    async def connect(cls, url: str) -> DigestRecorder:
        rec = cls()
        rec._nc = await nats.connect(
            url, name="onepool-bench-cluster", connect_timeout=5, max_reconnect_attempts=-1
        )
        await rec._nc.subscribe(s.DIGEST_WILDCARD, cb=rec._on_digest)
        await rec._nc.flush()
        return rec

    async def _on_digest(self, msg: Msg) -> None:
        try:
            d = s.decode(self._dec, msg.data)
        except s.DecodeError:
            self.undecodable += 1
            return
        if d.part != 0:
            return
        st, w = d.stats, d.window
        self.samples.append(
            DigestSample(
                time.monotonic() - self.origin,
                d.worker_id,
                d.incarnation,
                d.alpha,
                d.alpha_target,
                st.emb_hits,
                st.emb_misses,
                st.kv_hits,
                st.kv_misses,
                st.critical_refill_bytes,
                st.prefetch_bytes,
                st.chunks_moved,
                w.requests,
                w.latency_p50_ms,
                w.latency_p99_ms,
            )
        )

    def set_origin(self, origin: float) -> None:
        """Count `t` from `origin` (a ``time.monotonic()`` moment), samples already taken included."""
        shift = origin - self.origin
        self.samples = [replace(x, t=x.t - shift) for x in self.samples]
        self.origin = origin

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None


def _delta(samples: list[DigestSample], name: str, since_s: float = -math.inf) -> int:
    """A cumulative counter's growth from `since_s` on, summed over workers and their incarnations (each
    incarnation's counters start afresh)."""
    first: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], int] = {}
    for x in samples:
        key = (x.worker, x.incarnation)
        value = int(getattr(x, name))
        if x.t < since_s:
            first[key] = value  # the latest value before the window: the baseline
        else:
            first.setdefault(key, value)
        last[key] = value
    return sum(last[k] - first[k] for k in last)


def alpha_timeline(samples: list[DigestSample]) -> dict[str, list[list[float]]]:
    """Per worker: [t, alpha, alpha_target] per digest."""
    out: dict[str, list[list[float]]] = {}
    for x in samples:
        out.setdefault(x.worker, []).append([round(x.t, 3), round(x.alpha, 4), round(x.alpha_target, 4)])
    return out


def counter_timeline(samples: list[DigestSample]) -> dict[str, list[list[float]]]:
    """Per worker: [t, emb_hits, emb_misses, kv_hits, kv_misses, critical_refill_bytes] (cumulative)."""
    out: dict[str, list[list[float]]] = {}
    for x in samples:
        out.setdefault(x.worker, []).append(
            [round(x.t, 3), x.emb_hits, x.emb_misses, x.kv_hits, x.kv_misses, x.critical_refill_bytes]
        )
    return out


def worker_latency_p50_ms(samples: list[DigestSample], since_s: float) -> float:
    """The workers' own median latency (receipt to reply) over the run, from their window figures:
    the request-weighted mean of the windows' medians."""
    ws = [(x.window_requests, x.window_p50_ms) for x in samples if x.t >= since_s and x.window_requests]
    total = sum(n for n, _ in ws)
    return sum(n * v for n, v in ws) / total if total else math.nan


# ---------------------------------------------------------------------------------------------- figures
def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarise(records: list[ReplayRecord], *, slo_ms: float, since_s: float) -> dict[str, Any]:
    """The report's figures over the requests scheduled at `since_s` or later. Latency percentiles over the
    answered requests (as the simulator's); SLO satisfaction counts every other request as a violation."""
    window = [r for r in records if r.t >= since_s]
    ok = [r for r in window if r.ok]
    lat = np.array([r.latency_ms for r in ok])
    n = len(window)
    hits = sum(r.emb_hits for r in ok)
    misses = sum(r.emb_misses for r in ok)
    span = (window[-1].t - window[0].t) if n > 1 else 0.0
    failures: dict[str, int] = {}
    for r in window:
        if not r.ok:
            key = f"{r.status} {r.code}".strip()
            failures[key] = failures.get(key, 0) + 1
    return {
        "requests": n,
        "answered": len(ok),
        "failed_requests": n - len(ok),
        "failures_by_status": failures,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "slo_satisfaction": float((lat <= slo_ms).sum() / n) if n else math.nan,
        "throughput_rps": len(ok) / span if span > 0 else math.nan,
        "emb_hit_rate": hits / (hits + misses) if hits + misses else math.nan,
        "kv_hit_rate": sum(r.cached_tokens > 0 for r in ok) / len(ok) if ok else math.nan,
        "gateway_p50_ms": _pct(np.array([r.gateway_ms for r in ok]), 50),
        "send_lag_p99_ms": _pct(np.array([r.send_lag_ms for r in window]), 99),
        "requests_per_worker": {w: sum(r.worker == w for r in ok) for w in sorted({r.worker for r in ok})},
    }


@dataclass
class PolicyRun:
    key: str
    policy: str
    routing: str
    records: list[ReplayRecord]
    samples: list[DigestSample] = field(default_factory=list)
    digests: bool = True  # False: no NATS to listen to (--url without --nats-url)

    def summary(self, slo_ms: float, warmup_s: float) -> dict[str, Any]:
        out = summarise(self.records, slo_ms=slo_ms, since_s=warmup_s)
        out["alpha_policy"] = self.policy
        out["routing"] = self.routing
        if not self.digests:
            out["critical_refill_bytes"] = None
            return out
        # Over the whole run, as the simulator counts it: a policy's moves may all fall in the warm-up.
        out["critical_refill_bytes"] = _delta(self.samples, "critical_refill_bytes")
        out["critical_refill_bytes_after_warmup"] = _delta(self.samples, "critical_refill_bytes", warmup_s)
        out["chunks_moved"] = _delta(self.samples, "chunks_moved")
        out["prefetch_bytes"] = _delta(self.samples, "prefetch_bytes")
        out["worker_p50_ms"] = worker_latency_p50_ms(self.samples, warmup_s)
        after = [x for x in self.samples if x.t >= warmup_s]
        out["alpha_mean"] = {
            w: float(np.mean([x.alpha for x in after if x.worker == w]))
            for w in sorted({x.worker for x in after})
        }
        out["alpha_final"] = {x.worker: x.alpha for x in self.samples}
        out["alpha_timeline"] = alpha_timeline(self.samples)
        out["counters_timeline"] = counter_timeline(self.samples)
        out["digests"] = len(self.samples)
        return out


# ---------------------------------------------------------------------------------------------- runs
async def _replay_with_digests(
    source: Source, *, host: str, port: int, nats_url: str | None, label: str, timeout_s: float
) -> tuple[list[ReplayRecord], list[DigestSample]]:
    recorder = await DigestRecorder.connect(nats_url) if nats_url else None
    try:
        records = await replay(
            source.open(),
            host,
            port,
            duration_s=source.duration_s,
            timeout_s=timeout_s,
            label=label,
            on_start=recorder.set_origin if recorder else None,
        )
        if recorder is not None:
            await asyncio.sleep(1.2)  # the digests of the last moments (workers send every 0.5 s)
    finally:
        if recorder is not None:
            await recorder.close()
    return records, (recorder.samples if recorder else [])


async def run_local(
    opts: ClusterBenchOptions, policy: str, routing: str, log_dir: Path, key: str | None = None
) -> PolicyRun:
    """One local cluster running `policy` and `routing`, the source replayed against it."""
    key = key or run_key(policy, routing, opts.routings)
    settings = ClusterSettings(
        workers=opts.workers,
        nats_port=free_port(),
        gateways=(GatewaySpec(port=free_port(), routing=routing),),
        alpha_policy=policy,
        worker_env={**local_worker_env(opts.preset, opts.source, policy), **opts.worker_env_extra},
        log_dir=log_dir / records_name(key),
    )
    print(f"[{key}] starting a local cluster ({opts.workers} workers, routing {routing})", flush=True)
    started = time.perf_counter()
    async with LocalCluster(settings) as cluster:
        print(f"[{key}] ready in {time.perf_counter() - started:.1f} s; replaying", flush=True)
        records, samples = await _replay_with_digests(
            opts.source,
            host=settings.host,
            port=settings.gateways[0].port,
            nats_url=cluster.nats_url,
            label=key,
            timeout_s=opts.timeout_s,
        )
    return PolicyRun(key, policy, routing, records, samples)


async def run_url(opts: ClusterBenchOptions) -> PolicyRun:
    assert opts.url is not None
    parts = urlsplit(opts.url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    key = opts.alpha_policies[0] if opts.alpha_policies else "external"
    records, samples = await _replay_with_digests(
        opts.source, host=host, port=port, nats_url=opts.nats_url, label=key, timeout_s=opts.timeout_s
    )
    return PolicyRun(key, key, opts.routings[0], records, samples, digests=opts.nats_url is not None)


async def measure(opts: ClusterBenchOptions, log_dir: Path) -> list[PolicyRun]:
    if opts.url is not None:
        return [await run_url(opts)]
    runs = []
    for routing in opts.routings:
        for policy in opts.alpha_policies:
            runs.append(await run_local(opts, policy, routing, log_dir))
    return runs


def setup_json(opts: ClusterBenchOptions) -> dict[str, Any]:
    preset, source = opts.preset, opts.source
    env = (
        {**local_worker_env(preset, source, "hit-balance"), **opts.worker_env_extra}
        if opts.url is None
        else None
    )
    return {
        "mode": "local cluster per policy" if opts.url is None else f"running gateway at {opts.url}",
        "preset": preset.to_json(),
        "input": {"name": source.name, "duration_s": source.duration_s, **source.setup},
        "workers": opts.workers if opts.url is None else None,
        "worker_env": env,
        "worker_alpha": "a static policy's alpha as ONEPOOL_WORKER_ALPHA (the starting split)"
        if opts.url is None
        else None,
        "alpha_policies": list(opts.alpha_policies),
        "routings": list(opts.routings),
        "slo_ms": opts.slo_ms,
        "warmup_s": opts.warmup,
        "window_s": WINDOW_S,
        "load": "open loop from the bench process: each request at its trace time, latency from then",
        "host_link": (
            f"emulated on CPU at {preset.shape.link_gbps:g} GB/s (the preset's: it keeps an accelerator's "
            "ratio of EMB miss cost to compute)"
            if opts.url is None
            else "whatever the running cluster's workers use"
        ),
    }


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def summary_text(report: dict[str, Any]) -> str:
    lines = [
        f"onepool bench cluster: {report['setup']['input']['name']} "
        f"({report['setup']['input']['duration_s']:.1f} s), warm-up {report['warmup_s']:.1f} s left out"
    ]
    for key, r in report["policies"].items():
        f = _f
        lines.append(
            f"  {key:>14}: p50 {f(r['p50_ms'])} ms  p99 {f(r['p99_ms'])} ms"
            f"  slo {f(r['slo_satisfaction'], '.3f')}  {f(r['throughput_rps'], '.1f')} req/s"
            f"  emb {f(r['emb_hit_rate'], '.3f')}"
            f"  kv {f(r['kv_hit_rate'], '.3f')}  refill {r['critical_refill_bytes']} B"
            f"  failed {r['failed_requests']}/{r['requests']}"
        )
    return "\n".join(lines)


def build_report(opts: ClusterBenchOptions, runs: list[PolicyRun], records_dir: Path) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for run in runs:
        row = run.summary(opts.slo_ms, opts.warmup)
        row["records"] = str(records_dir / f"{records_name(run.key)}.jsonl")
        policies[run.key] = row
    answered = {k: v for k, v in policies.items() if v["answered"]}
    best = min(answered, key=lambda k: answered[k]["p99_ms"]) if answered else None
    report: dict[str, Any] = json_safe(
        {
            "command": opts.command,
            "policies": policies,
            "best_p99_policy": best,
            "slo_ms": opts.slo_ms,
            "warmup_s": opts.warmup,
            "records_dir": str(records_dir),
            "setup": setup_json(opts),
        }
    )
    return report


def records_dir_for(json_path: str) -> Path:
    path = Path(json_path)
    return path.with_name(f"{path.stem}.records")


async def _bench(opts: ClusterBenchOptions) -> dict[str, Any]:
    records_dir = records_dir_for(opts.json_path)
    with tempfile.TemporaryDirectory(prefix="onepool-bench-cluster-") as logs:
        if opts.url is None:
            print(f"children log to {logs} (removed at the end)", flush=True)
        runs = await measure(opts, Path(logs))
    for run in runs:
        write_records(records_dir / f"{records_name(run.key)}.jsonl", run.records)
    report = build_report(opts, runs, records_dir)
    if opts.report_dir:
        from bench.cluster_report import write_cluster_report

        report["report_files"] = write_cluster_report(Path(opts.report_dir), report, runs, opts.warmup)
    return report


def run_async(coro: Any) -> Any:
    """On uvloop when installed (the load generator's clock shares the loop with nothing slower)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_cluster_bench(opts: ClusterBenchOptions) -> int:
    check_options(opts)
    report = run_async(_bench(opts))
    write_report(opts.json_path, report, summary_text(report))
    return 0


def command_line() -> str:
    return "onepool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
