"""Request sources: a synthetic regime, a trace file or MovieLens, opened afresh for every run.

Every command that replays requests (``onepool trace gen``, ``onepool sim``, ``onepool bench cluster``)
builds its input here, so ``--regime``, ``--trace`` and ``movielens`` mean the same everywhere, and so
policies compared side by side see identical requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workloads import movielens
from workloads.presets import Preset
from workloads.synthetic import Regime, generate, header_for
from workloads.trace import TraceHeader, TraceRequest, read_trace

__all__ = ["REGIMES", "Source", "open_source"]

REGIMES = ("steady", "trend", "burst", "movielens")


@dataclass(frozen=True)
class Source:
    """Where requests come from: ``open()`` returns a fresh, time-ordered iterator each call."""

    name: str
    duration_s: float
    header: TraceHeader
    open: Callable[[], Iterator[TraceRequest]]
    setup: dict[str, Any]


def _trace_duration(path: Path) -> float:
    last = 0.0
    for req in read_trace(path):
        last = req.t
    return last


def open_source(
    *,
    preset: Preset,
    regime: str | None = None,
    trace: str | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    compression: float = movielens.DEFAULT_COMPRESSION,
) -> Source:
    """Exactly one of ``regime`` and ``trace``; ``duration_s`` cuts a trace or MovieLens short."""
    if (regime is None) == (trace is None):
        raise ValueError("give exactly one of --regime and --trace")
    if trace is not None:
        path = Path(trace)
        header = read_trace(path).header  # fails early, naming the line, on a bad header
        full = _trace_duration(path)
        until = full if duration_s is None else min(duration_s, full)

        def from_file() -> Iterator[TraceRequest]:
            for req in read_trace(path):
                if duration_s is not None and req.t >= duration_s:
                    return
                yield req

        return Source(
            path.name, max(until, 1e-3), header, from_file, {"trace": str(path), **header.to_json()}
        )
    if regime == "movielens":
        ratings = movielens.load_ratings()
        ml_header = movielens.header_for(ratings, compression=compression, seed=seed)
        span = float(ratings.timestamps[-1] - ratings.timestamps[0]) / compression
        until = span if duration_s is None else min(duration_s, span)
        candidates = preset.workload.candidates

        def replay() -> Iterator[TraceRequest]:
            return movielens.replay(
                ratings, compression=compression, candidates=candidates, seed=seed, duration_s=until
            )

        return Source("movielens", until, ml_header, replay, ml_header.to_json())
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    duration = 300.0 if duration_s is None else duration_s
    params = preset.workload
    header = header_for(regime, params, duration_s=duration, seed=seed, preset=preset.name)

    def synthetic() -> Iterator[TraceRequest]:
        return generate(Regime(regime), params, duration_s=duration, seed=seed)

    return Source(regime, duration, header, synthetic, header.to_json())
