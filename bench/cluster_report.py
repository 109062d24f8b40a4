"""The `onepool bench cluster --report DIR` output: report.md and PNG plots (matplotlib, Agg).

Plots: the latency CDF per policy, P99 per 5 s window per policy, alpha (and its target) per worker over
time for each policy, and EMB / KV hit rates per 5 s window per policy. Latency and hit-rate figures leave
the warm-up out; the alpha plots show the whole run with the warm-up's end marked (the moves a policy makes
early are part of what it does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.cluster import WINDOW_S
from shared.extras import extra_imports

if TYPE_CHECKING:
    from bench.cluster import PolicyRun
    from bench.replay import ReplayRecord

__all__ = ["write_cluster_report"]

TABLE_KEYS = (
    "p50_ms",
    "p99_ms",
    "slo_satisfaction",
    "throughput_rps",
    "emb_hit_rate",
    "kv_hit_rate",
    "critical_refill_bytes",
    "failed_requests",
)


def _plt() -> Any:
    with extra_imports("plots", "a report's plots"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _windows(
    records: list[ReplayRecord], since_s: float, value: Callable[[list[ReplayRecord]], float]
) -> tuple[list[float], list[float]]:
    """(window mid-points, value of each non-empty window) over the answered requests after `since_s`."""
    ok = [r for r in records if r.ok and r.t >= since_s]
    if not ok:
        return [], []
    start = since_s
    n = int((ok[-1].t - start) // WINDOW_S) + 1
    xs, ys = [], []
    for k in range(n):
        lo, hi = start + k * WINDOW_S, start + (k + 1) * WINDOW_S
        here = [r for r in ok if lo <= r.t < hi]
        if here:
            xs.append((lo + hi) / 2)
            ys.append(value(here))
    return xs, ys


def _p99(rs: list[ReplayRecord]) -> float:
    return float(np.percentile([r.latency_ms for r in rs], 99))


def _emb(rs: list[ReplayRecord]) -> float:
    hits, misses = sum(r.emb_hits for r in rs), sum(r.emb_misses for r in rs)
    return hits / (hits + misses) if hits + misses else float("nan")


def _kv(rs: list[ReplayRecord]) -> float:
    return sum(r.cached_tokens > 0 for r in rs) / len(rs)


def _save(plt: Any, fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def plots(runs: list[PolicyRun], out: Path, warmup_s: float) -> list[str]:
    plt = _plt()
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        lat = np.sort([r.latency_ms for r in run.records if r.ok and r.t >= warmup_s])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=run.key)
    ax.set_xscale("log")
    ax.set_xlabel("latency from the scheduled send (ms)")
    ax.set_ylabel("fraction of answered requests")
    ax.legend(fontsize="small")
    files.append(_save(plt, fig, out, "latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in runs:
        xs, ys = _windows(run.records, warmup_s, _p99)
        ax.plot(xs, ys, marker=".", label=run.key)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"P99 per {WINDOW_S:g} s window (ms)")
    ax.legend(fontsize="small")
    files.append(_save(plt, fig, out, "p99_over_time.png"))

    with_digests = [run for run in runs if run.samples]
    if with_digests:
        fig, axes = plt.subplots(
            len(with_digests), 1, figsize=(6, 1.2 + 1.6 * len(with_digests)), sharex=True, squeeze=False
        )
        for ax, run in zip(axes[:, 0], with_digests, strict=True):
            for worker in sorted({x.worker for x in run.samples}):
                mine = [x for x in run.samples if x.worker == worker]
                line = ax.plot([x.t for x in mine], [x.alpha for x in mine], linewidth=1, label=worker)
                ax.plot(
                    [x.t for x in mine],
                    [x.alpha_target for x in mine],
                    linewidth=0.8,
                    linestyle="--",
                    color=line[0].get_color(),
                )
            ax.axvline(warmup_s, color="gray", linewidth=0.6)
            ax.set_ylim(0, 1)
            ax.set_ylabel("alpha")
            ax.set_title(run.key, fontsize="small")
            ax.legend(fontsize="x-small", loc="upper right")
        axes[-1, 0].set_xlabel("time (s); dashed: target; grey: end of warm-up")
        files.append(_save(plt, fig, out, "alpha_over_time.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run in runs:
        a1.plot(*_windows(run.records, warmup_s, _emb), marker=".", label=run.key)
        a2.plot(*_windows(run.records, warmup_s, _kv), marker=".", label=run.key)
    a1.set_ylabel(f"EMB hit rate per {WINDOW_S:g} s")
    a2.set_ylabel(f"KV hit rate (requests) per {WINDOW_S:g} s")
    for ax in (a1, a2):
        ax.set_xlabel("time (s)")
        ax.set_ylim(0, 1)
    a1.legend(fontsize="small")
    files.append(_save(plt, fig, out, "hit_rates.png"))
    return files


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any], images: list[str]) -> str:
    setup = report["setup"]
    inp = setup["input"]
    lines = [
        "# onepool bench cluster",
        "",
        f"Command: `{report.get('command', '')}`",
        "",
        f"Input: {inp.get('description') or inp['name']} ({inp['duration_s']:.1f} s). Mode: {setup['mode']}; "
        f"workers: {setup['workers']}; SLO {report['slo_ms']:g} ms; the first {report['warmup_s']:.1f} s "
        "left out of the figures. Latency runs from each request's scheduled send time.",
        "",
        "| policy | " + " | ".join(TABLE_KEYS) + " |",
        "|---" * (len(TABLE_KEYS) + 1) + "|",
    ]
    for key, row in report["policies"].items():
        lines.append(f"| {key} | " + " | ".join(_fmt(row.get(k)) for k in TABLE_KEYS) + " |")
    lines += ["", f"Lowest P99: {report.get('best_p99_policy')}", ""]
    ratios = setup.get("preset", {}).get("ratios")
    if ratios:
        lines.append("Sizing ratios (DESIGN): " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratios.items()))
    lines += ["", f"Host link: {setup['host_link']}.", ""]
    lines += [f"![{img}]({img})" for img in images]
    return "\n".join(lines) + "\n"


def write_cluster_report(
    out: Path, report: dict[str, Any], runs: list[PolicyRun], warmup_s: float
) -> list[str]:
    """Write the plots and report.md into `out`; the names of the files written."""
    out.mkdir(parents=True, exist_ok=True)
    images = plots(runs, out, warmup_s)
    (out / "report.md").write_text(markdown(report, images))
    return ["report.md", *images]
