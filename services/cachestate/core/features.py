"""Controller features: each worker's per-digest WindowStats aggregated over one controller window.

Per worker and window (``close(now)`` ends one):
* request_rate = requests / covered seconds, where covered = the sum of the digests' own ``window_ms``
  (what the worker measured), or the controller window's length when the worker reports none;
* request_rate_delta = (rate - previous window's rate) / window length (0 in a worker's first window);
* hot_user_share = kv_hit_requests / requests; mean_history = history_tokens / requests;
  max_history = max of the digests' max; new_token_fraction = new_tokens / history_tokens;
* emb_hit_rate = emb_hits / (emb_hits + emb_misses) and emb_misses_per_request = emb_misses / requests,
  from the window stats;
* kv_hit_rate and miss_bytes come from the cumulative PoolStats: their difference between the last digest
  of this window and that of the previous one (kv_hits / (kv_hits + kv_misses); emb_miss_bytes), since
  the per-entry byte size is not known here;
* p99_latency_ms = max of the digests' p99; slo_violation_rate = slo_violations / requests;
* alpha, alpha_target and the fitted cost coefficients from the last digest.
Ratios with a zero denominator are 0. Only workers that sent a digest in the window are reported.
Cumulative counters restart with a new incarnation; a worker first seen mid-life (seq > 0) takes its first
digest as the baseline, so a restarted cachestate does not report a worker's whole history as one window.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import schemas as s

__all__ = ["FeatureWindow"]


@dataclass(slots=True)
class _Acc:
    covered_ms: float = 0.0
    requests: int = 0
    kv_hit_requests: int = 0
    history_tokens: int = 0
    max_history: int = 0
    new_tokens: int = 0
    emb_hits: int = 0
    emb_misses: int = 0
    slo_violations: int = 0
    p99_ms: float = 0.0
    alpha: float = 0.0
    alpha_target: float = 0.0
    cost: s.CostCoefficients | None = None
    last_stats: s.PoolStats | None = None


@dataclass(slots=True)
class _Baseline:
    incarnation: str
    stats: s.PoolStats
    rate: float | None = None  # previous window's request rate


_ZERO = s.PoolStats()


def _ratio(num: float, den: float) -> float:
    return min(1.0, num / den) if den > 0 else 0.0


class FeatureWindow:
    def __init__(self, window_s: float, *, start: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._start = start
        self._acc: dict[str, _Acc] = {}
        self._base: dict[str, _Baseline] = {}

    @property
    def window_start(self) -> float:
        return self._start

    def due(self, now: float) -> bool:
        return now - self._start >= self.window_s

    def observe(self, digest: s.WorkerDigest) -> None:
        """Add one digest (from the worker's current incarnation) to the current window."""
        wid = digest.worker_id
        base = self._base.get(wid)
        if base is None or base.incarnation != digest.incarnation:
            # Counters are cumulative per incarnation: from 0 at its start, or from here if joined late.
            start_stats = _ZERO if digest.seq == 0 else digest.stats
            self._base[wid] = _Baseline(digest.incarnation, start_stats, None if base is None else base.rate)
            self._acc.pop(wid, None)
        acc = self._acc.get(wid)
        if acc is None:
            acc = self._acc[wid] = _Acc()
        w = digest.window
        acc.covered_ms += w.window_ms
        acc.requests += w.requests
        acc.kv_hit_requests += w.kv_hit_requests
        acc.history_tokens += w.history_tokens
        acc.max_history = max(acc.max_history, w.max_history_tokens)
        acc.new_tokens += w.new_tokens
        acc.emb_hits += w.emb_hits
        acc.emb_misses += w.emb_misses
        acc.slo_violations += w.slo_violations
        acc.p99_ms = max(acc.p99_ms, w.latency_p99_ms)
        acc.alpha = digest.alpha
        acc.alpha_target = digest.alpha_target
        acc.cost = digest.cost
        acc.last_stats = digest.stats

    def forget(self, worker_id: str) -> None:
        self._acc.pop(worker_id, None)
        self._base.pop(worker_id, None)

    def close(self, now: float) -> list[s.WorkerFeatures]:
        """End the current window at ``now``: one WorkerFeatures per worker seen in it, by worker id."""
        length = max(now - self._start, 1e-6)
        self._start = now
        out: list[s.WorkerFeatures] = []
        for wid in sorted(self._acc):
            acc = self._acc[wid]
            base = self._base[wid]
            covered_s = acc.covered_ms / 1e3 if acc.covered_ms > 0 else length
            rate = acc.requests / covered_s
            delta = 0.0 if base.rate is None else (rate - base.rate) / length
            last = acc.last_stats or base.stats
            kv_hits = max(0, last.kv_hits - base.stats.kv_hits)
            kv_misses = max(0, last.kv_misses - base.stats.kv_misses)
            out.append(
                s.WorkerFeatures(
                    worker_id=wid,
                    window_ms=covered_s * 1e3,
                    request_rate=rate,
                    request_rate_delta=delta,
                    hot_user_share=_ratio(acc.kv_hit_requests, acc.requests),
                    mean_history=acc.history_tokens / acc.requests if acc.requests else 0.0,
                    max_history=acc.max_history,
                    new_token_fraction=_ratio(acc.new_tokens, acc.history_tokens),
                    emb_hit_rate=_ratio(acc.emb_hits, acc.emb_hits + acc.emb_misses),
                    kv_hit_rate=_ratio(kv_hits, kv_hits + kv_misses),
                    miss_bytes=max(0, last.emb_miss_bytes - base.stats.emb_miss_bytes),
                    emb_misses_per_request=acc.emb_misses / acc.requests if acc.requests else 0.0,
                    p99_latency_ms=acc.p99_ms,
                    slo_violation_rate=_ratio(acc.slo_violations, acc.requests),
                    alpha=acc.alpha,
                    alpha_target=acc.alpha_target,
                    cost=acc.cost or s.CostCoefficients(),
                )
            )
            base.stats = last
            base.rate = rate
        self._acc.clear()
        return out
