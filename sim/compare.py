"""``onepool sim --compare``: every alpha policy against the offline optimum, per regime.

For each regime (the same seeded input for every run): the static sweep and alpha\\* (:func:`sim.run.sweep`),
then each policy once. Per policy:

- ``opt_gap``: the mean over decision times after the warm-up and over workers of ``|alpha - alpha*|``,
  with ``alpha`` the worker's pool split when the controller's window closes and ``alpha*`` the optimum of
  the alpha\\* window that contains that time (a static split's gap is ``|a - alpha*|`` the same way);
- ``p99_ms``, ``slo_satisfaction``, ``throughput_rps``: the run's summary (:meth:`SimResult.summary`).

HELM's ``p99_reduction_vs_best_static`` (``1 - helm / best static``) and ``p99_ratio_to_oracle``
(``helm / oracle``). Ablations: HELM with each routing policy (system level) and HELM without each layer
(allocator level). Refill traffic: critical-path and background (prefetch) bytes per regime for HELM with
the incremental reallocation and with the naive one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from services.gateway.core.router import Policy
from services.worker.core.pool import RefillMode
from sim.cluster import SimConfig, SimResult
from sim.run import RunOutcome, SweepOutcome, run_policy, sweep
from workloads.sources import Source

__all__ = ["ABLATIONS", "BASELINES", "COMPARE_REGIMES", "HELM", "compare_regime", "opt_gap"]

COMPARE_REGIMES = ("steady", "trend", "burst")
HELM = "helm"
BASELINES = ("hit-balance", "pi", "predict-greedy", "helm:layers=1")  # helm:layers=1 is the PPO base alone
ABLATIONS = ("helm:adapter=0", "helm:recovery=0")
ROUTING_ABLATIONS = tuple(p.value for p in Policy if p is not Policy.JOINT)


def _star_index(t: np.ndarray, window_s: float, n: int) -> np.ndarray:
    # a decision at time t closes the controller window that ends at t: it belongs to the alpha* window
    # containing t - epsilon
    out: np.ndarray = np.clip(((t - 1e-9) // window_s).astype(np.int64), 0, n - 1)
    return out


def _gap(
    t: np.ndarray, alpha: np.ndarray, alpha_star: Sequence[float], window_s: float, warmup_s: float
) -> float:
    """Mean ``|alpha - alpha*|`` over the decision times ``t`` after ``warmup_s`` and inside alpha*'s span,
    and over workers (``alpha``: decisions x workers)."""
    n = len(alpha_star)
    keep = (t > warmup_s) & (t <= n * window_s + 1e-9)
    if not keep.any():
        return math.nan
    star = np.asarray(alpha_star, dtype=np.float64)[_star_index(t[keep], window_s, n)]
    return float(np.abs(alpha[keep] - star[:, None]).mean())


def opt_gap(result: SimResult, alpha_star: Sequence[float], window_s: float, warmup_s: float) -> float:
    """Mean ``|alpha - alpha*|`` over a run's decision times after ``warmup_s`` and over workers; alpha is
    each worker's split when the controller's window closes."""
    tl = result.timeline
    t = np.asarray(tl.t, dtype=np.float64)
    if len(t) == 0:
        return math.nan
    return _gap(t, np.asarray(tl.alpha, dtype=np.float64), alpha_star, window_s, warmup_s)


def static_gap(
    alpha: float, times: Sequence[float], alpha_star: Sequence[float], window_s: float, warmup_s: float
) -> float:
    """The same mean for a split that never moves, over the same decision ``times`` as the runs."""
    t = np.asarray(times, dtype=np.float64)
    return _gap(t, np.full((len(t), 1), alpha), alpha_star, window_s, warmup_s)


def compare_regime(
    cfg: SimConfig,
    source: Source,
    *,
    warmup_s: float,
    window_s: float,
    policies: Sequence[str],
    routings: Sequence[str] = ROUTING_ABLATIONS,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Everything ``--compare`` reports for one input (see the module docstring)."""
    swept: SweepOutcome = sweep(cfg, source, warmup_s=warmup_s, window_s=window_s, progress=progress)
    star = swept.alpha_star
    runs: dict[str, RunOutcome] = {}
    for spec in policies:
        progress(spec)
        runs[spec] = run_policy(cfg, source, spec, warmup_s=warmup_s)
    for routing in routings if HELM in policies else ():
        name = f"{HELM}+{routing}"
        progress(name)
        runs[name] = run_policy(replace(cfg, routing=Policy(routing)), source, HELM, warmup_s=warmup_s)
    naive = None
    if HELM in runs:
        progress(f"{HELM} (naive refill)")
        naive = run_policy(replace(cfg, refill_mode=RefillMode.NAIVE), source, HELM, warmup_s=warmup_s)

    best = f"static:{swept.best_static_alpha:g}"
    rows: dict[str, dict[str, float]] = {}
    for a, o in swept.static.items():
        times = o.result.timeline.t  # a static run closes the same windows as every other run
        rows[f"static:{a}"] = {**_keys(o), "opt_gap": static_gap(float(a), times, star, window_s, warmup_s)}
    rows["best-static"] = {**rows[best], "alpha": swept.best_static_alpha}
    rows["oracle"] = {
        **_keys(swept.oracle),
        "opt_gap": opt_gap(swept.oracle.result, star, window_s, warmup_s),
    }
    for name, o in runs.items():
        rows[name] = {**_keys(o), "opt_gap": opt_gap(o.result, star, window_s, warmup_s)}
    out: dict[str, Any] = {"policies": rows, "alpha_star": star, "best_static_alpha": swept.best_static_alpha}
    if HELM in runs:
        helm, oracle = rows[HELM]["p99_ms"], rows["oracle"]["p99_ms"]
        out["p99_reduction_vs_best_static"] = 1.0 - helm / rows[best]["p99_ms"]
        out["p99_ratio_to_oracle"] = helm / oracle
        tl = runs[HELM].result.timeline
        t = np.asarray(tl.t, dtype=np.float64)
        out["alpha_series"] = {
            "t": t.tolist(),
            "helm_mean_alpha": np.asarray(tl.alpha, dtype=np.float64).mean(axis=1).tolist() if len(t) else [],
            "alpha_star": [star[i] for i in _star_index(t, window_s, len(star))] if len(t) else [],
        }
        assert naive is not None
        out["refill_bytes"] = {
            "incremental": _refill(runs[HELM].result),
            "naive": _refill(naive.result),
        }
    out["runs"] = {**{f"static:{a}": o for a, o in swept.static.items()}, "oracle": swept.oracle, **runs}
    return out


def _keys(o: RunOutcome) -> dict[str, float]:
    s = o.summary
    return {
        k: s[k]
        for k in ("p99_ms", "p50_ms", "slo_satisfaction", "throughput_rps", "emb_hit_rate", "kv_hit_rate")
    }


def _refill(r: SimResult) -> dict[str, int]:
    return {
        "critical": r.critical_refill_bytes,
        "background": r.prefetch_bytes,
        "chunks_moved": r.chunks_moved,
    }
