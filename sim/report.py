"""The simulator's report: JSON layout helpers, a markdown summary and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.extras import extra_imports

if TYPE_CHECKING:
    from sim.run import RunOutcome, SweepOutcome

__all__ = ["compare_plots", "motivation_plot", "run_plots", "sweep_plots", "write_markdown"]

SUMMARY_KEYS = ("p50_ms", "p99_ms", "slo_satisfaction", "throughput_rps", "emb_hit_rate", "kv_hit_rate")


def _plt() -> Any:
    with extra_imports("plots", "a report's plots"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_plots(outcomes: list[RunOutcome], out: Path) -> list[str]:
    """Latency CDF per policy and alpha per worker over time (one plot per policy)."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in outcomes:
        lat = np.sort(o.result.latency_ms[~np.isnan(o.result.latency_ms)])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=o.policy)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=100)
    plt.close(fig)
    files.append("latency_cdf.png")
    for o in outcomes:
        tl = o.result.timeline
        if not tl.t:
            continue
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(tl.t, np.asarray(tl.alpha), linewidth=0.8)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("alpha per worker")
        ax.set_ylim(0, 1)
        ax.set_title(o.policy)
        fig.tight_layout()
        name = f"alpha_{o.policy.replace(':', '_')}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def sweep_plots(sweep: SweepOutcome, out: Path) -> list[str]:
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    alphas = [float(a) for a in sweep.static]
    p99 = [o.summary["p99_ms"] for o in sweep.static.values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot(alphas, p99, marker="o")
    a1.axhline(sweep.oracle.summary["p99_ms"], color="gray", linestyle="--", label="oracle (alpha*)")
    a1.set_xlabel("static alpha")
    a1.set_ylabel("P99 (ms)")
    a1.legend(fontsize="small")
    a2.step(np.arange(len(sweep.alpha_star)) * sweep.window_s, sweep.alpha_star, where="post")
    a2.set_xlabel("time (s)")
    a2.set_ylabel("alpha*")
    a2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
    return ["sweep.png"]


def motivation_plot(normalised: dict[str, dict[str, float]], out: Path) -> list[str]:
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for regime, row in normalised.items():
        ax.plot([float(a) for a in row], list(row.values()), marker="o", label=regime)
    ax.set_xlabel("static alpha (EMB share of the pool)")
    ax.set_ylabel("P99 / regime's best P99")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "motivation.png", dpi=100)
    plt.close(fig)
    return ["motivation.png"]


def compare_plots(report: dict[str, Any], out: Path) -> list[str]:
    """``--compare``: HELM's mean alpha against alpha* over the three regimes run back to back (regimes
    marked, the controller's error below), and the refill bytes per regime, critical vs background."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    series = report.get("alpha_series", {})
    if series:
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, height_ratios=[3, 1])
        offset = 0.0
        for regime, s in series.items():
            t = np.asarray(s["t"]) + offset
            a1.plot(
                t, s["helm_mean_alpha"], color="C0", label="HELM (mean over workers)" if offset == 0 else None
            )
            a1.step(t, s["alpha_star"], where="pre", color="C1", label="alpha*" if offset == 0 else None)
            a2.plot(t, np.abs(np.asarray(s["helm_mean_alpha"]) - np.asarray(s["alpha_star"])), color="C2")
            a1.axvline(offset, color="gray", linewidth=0.5)
            a1.text(offset + 1, 0.95, regime, fontsize="small", va="top")
            offset = float(t[-1]) if len(t) else offset
        a1.set_ylabel("alpha")
        a1.set_ylim(0, 1)
        a1.legend(fontsize="small", loc="lower right")
        a2.set_ylabel("|alpha - alpha*|")
        a2.set_xlabel("time (s), regimes back to back")
        fig.tight_layout()
        fig.savefig(out / "alpha_vs_star.png", dpi=100)
        plt.close(fig)
        files.append("alpha_vs_star.png")
    refill = report.get("refill_bytes", {})
    if refill:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels, crit, back = [], [], []
        for regime, modes in refill.items():
            for mode, b in modes.items():
                labels.append(f"{regime}\n{mode}")
                crit.append(b["critical"] / 2**20)
                back.append(b["background"] / 2**20)
        x = np.arange(len(labels))
        ax.bar(x, crit, label="critical path")
        ax.bar(x, back, bottom=crit, label="background (prefetch)")
        ax.set_xticks(x, labels, fontsize="small")
        ax.set_ylabel("refill (MiB)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "refill.png", dpi=100)
        plt.close(fig)
        files.append("refill.png")
    return files


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_markdown(out: Path, title: str, report: dict[str, Any], images: list[str]) -> Path:
    """A human summary of the JSON report beside its plots."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Command: `{report.get('command', '')}`", ""]
    policies = report.get("policies")
    if isinstance(policies, dict):
        lines += ["| policy | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
        for name, row in policies.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in SUMMARY_KEYS) + " |")
        lines.append("")
    if "opt_gap" in report:
        for key in ("opt_gap", "p99_ms", "slo_satisfaction", "throughput_rps"):
            table = report[key]
            regimes = list(table)
            names = list(table[regimes[0]]) if regimes else []
            lines += [
                f"## {key}",
                "",
                "| policy | " + " | ".join(regimes) + " |",
                "|---" * (len(regimes) + 1) + "|",
            ]
            lines += [f"| {n} | " + " | ".join(_fmt(table[r].get(n)) for r in regimes) + " |" for n in names]
            lines.append("")
        for key in ("p99_reduction_vs_best_static", "p99_ratio_to_oracle", "best_static_alpha"):
            if report.get(key):
                lines.append(f"- {key}: " + ", ".join(f"{r} {_fmt(v)}" for r, v in report[key].items()))
        lines.append("")
    for key in (
        "best_static_alpha",
        "best_static_p99_ms",
        "alpha_star_mean",
        "oracle_p99_ms",
        "best_static_shift",
        "fixed_split_penalty",
        "sim_requests_per_s",
    ):
        if key in report:
            lines.append(f"- {key}: {_fmt(report[key])}")
    if "physics" in report:
        lines += ["", str(report["physics"])]
    ratios = report.get("setup", {}).get("preset", {}).get("ratios")
    if ratios:
        lines += ["", "Sizing ratios (DESIGN): " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratios.items())]
    lines += [""] + [f"![{img}]({img})" for img in images]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
