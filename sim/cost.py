"""Cost profiles: what the simulator charges a worker's model thread for a batch.

    batch_ms = batch_fixed_ms + sum over requests of (request_ms + ms_per_new_token * new_tokens
               + ms_per_cached_token * cached_tokens + ms_per_candidate * candidates
               + ms_per_emb_miss * emb_misses)

plus ``tick_ms_per_chunk`` per chunk a reallocation tick moves (the relocation copies, between batches) and,
in naive refill mode, the synchronous refill's bytes at ``link_gbps``. Every request's latency adds the time
it spends outside the model (HTTP, gateway, bus, the worker's decoding and reply): ``overhead_ms`` (the
median), or, when the profile carries ``overhead_quantiles_ms`` (the measured distribution's percentiles 0, 1,
..., 100 as ``onepool calibrate`` writes them; any evenly spaced list of two or more), a seeded draw from that
distribution (:class:`QuantileSampler`: the inverse CDF, linear between the given quantiles). Likewise each
batch's priced time is multiplied by a draw from ``batch_factor_quantiles`` when the profile has them: what
:meth:`CostProfile.in_cluster` sets from the measured ``cluster_scale_quantiles`` (the model's time inside a
running local cluster over its price). The counts are
what the real caches said for the request (:mod:`services.worker.core.batch`). A profile is a JSON object with
these keys plus ``name`` and ``source``: ``onepool calibrate`` measures one on this machine; ``sim/profiles/``
ships ``cpu`` (measured here, the command in its ``source``) and ``a100`` (derived from public figures, see
its ``source``).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PROFILE_DIR", "CostProfile", "QuantileSampler", "load_profile"]

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
# optional keys (percentiles 0-100 of a measured distribution; empty: none): the other numbers are required
_DISTRIBUTIONS = ("overhead_quantiles_ms", "cluster_scale_quantiles", "batch_factor_quantiles")
_OVERHEAD_STREAM, _BATCH_STREAM = 0x0E7, 0xBA7  # the draws' own random streams next to the run's seed


@dataclass(frozen=True)
class CostProfile:
    name: str
    source: str
    batch_fixed_ms: float
    request_ms: float
    ms_per_new_token: float
    ms_per_cached_token: float
    ms_per_candidate: float
    ms_per_emb_miss: float
    tick_ms_per_chunk: float
    link_gbps: float
    overhead_ms: float
    overhead_quantiles_ms: tuple[float, ...] = ()  # empty: every request adds overhead_ms
    # measured: the model's time inside a running local cluster over its price here (see in_cluster)
    cluster_scale_quantiles: tuple[float, ...] = ()
    # applied: each batch's priced time times a draw from these (empty: times 1)
    batch_factor_quantiles: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if f.type == "float" and not getattr(self, f.name) >= 0]
        if bad or not self.link_gbps > 0:
            raise ValueError(
                f"cost profile {self.name!r}: {', '.join(bad) or 'link_gbps'} must be >= 0 (> 0)"
            )
        for name in _DISTRIBUTIONS:
            q = getattr(self, name)
            if q and (
                len(q) < 2
                or not all(math.isfinite(x) and x >= 0 for x in q)
                or any(b < a for a, b in itertools.pairwise(q))
            ):
                raise ValueError(
                    f"cost profile {self.name!r}: {name} must be two or more non-decreasing numbers >= 0"
                )

    def request_cost_ms(self, new_tokens: int, cached_tokens: int, candidates: int, emb_misses: int) -> float:
        return (
            self.request_ms
            + self.ms_per_new_token * new_tokens
            + self.ms_per_cached_token * cached_tokens
            + self.ms_per_candidate * candidates
            + self.ms_per_emb_miss * emb_misses
        )

    def in_cluster(self) -> CostProfile:
        """The profile as the model runs inside a running local cluster of this machine: each batch's priced
        time times a draw from ``cluster_scale_quantiles`` (``batch_factor_quantiles``). The coefficients
        are fitted on a worker alone; in the cluster its model thread shares the cores with the cluster's
        other processes and its own event loop, and its batches vary around the price. ``onepool
        calibrate`` measures that distribution; ``--validate`` prices with it. Without one: unchanged."""
        if not self.cluster_scale_quantiles:
            return self
        return replace(
            self,
            name=f"{self.name}@cluster",
            cluster_scale_quantiles=(),
            batch_factor_quantiles=self.cluster_scale_quantiles,
        )

    def transfer_ms(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9) * 1e3

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in _DISTRIBUTIONS:
            out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any], *, where: str = "cost profile") -> CostProfile:
        names = {f.name for f in fields(cls)} - set(_DISTRIBUTIONS)
        missing = sorted(names - raw.keys())
        if missing:
            raise ValueError(f"{where}: missing keys {', '.join(missing)}")
        try:
            numbers = {k: float(raw[k]) for k in names - {"name", "source"}}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: every key but name and source must be a number") from None
        distributions: dict[str, tuple[float, ...]] = {}
        for name in _DISTRIBUTIONS:
            values = raw.get(name, [])
            try:
                if not isinstance(values, list):
                    raise TypeError
                distributions[name] = tuple(float(x) for x in values)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {name} must be a list of numbers") from None
        return cls(
            name=str(raw["name"]),
            source=str(raw["source"]),
            overhead_quantiles_ms=distributions["overhead_quantiles_ms"],
            cluster_scale_quantiles=distributions["cluster_scale_quantiles"],
            batch_factor_quantiles=distributions["batch_factor_quantiles"],
            **numbers,
        )


class QuantileSampler:
    """Seeded draws from a distribution given by evenly spaced quantiles (the inverse CDF, linear between
    them), a block at a time; ``default`` every time when there are none."""

    BLOCK = 4096

    def __init__(self, quantiles: tuple[float, ...], default: float, seed: int, stream: int) -> None:
        self._q = np.asarray(quantiles, dtype=np.float64)
        self._grid = np.linspace(0.0, 1.0, len(self._q))
        self._default = default
        self._rng = np.random.default_rng([seed, stream])
        self._buf: list[float] = []

    @classmethod
    def overhead(cls, cost: CostProfile, seed: int) -> QuantileSampler:
        """Each request's time outside the model."""
        return cls(cost.overhead_quantiles_ms, cost.overhead_ms, seed, _OVERHEAD_STREAM)

    @classmethod
    def batch_factor(cls, cost: CostProfile, seed: int) -> QuantileSampler:
        """Each batch's time over its price."""
        return cls(cost.batch_factor_quantiles, 1.0, seed, _BATCH_STREAM)

    def __call__(self) -> float:
        if not len(self._q):
            return self._default
        if not self._buf:
            draws = np.interp(self._rng.random(self.BLOCK), self._grid, self._q)
            self._buf = draws[::-1].tolist()  # popped from the end: drawn order
        return self._buf.pop()


def load_profile(spec: str) -> CostProfile:
    """A shipped profile by name (``cpu``, ``a100``) or a JSON file written by ``onepool calibrate``."""
    path = PROFILE_DIR / f"{spec}.json" if "/" not in spec and not spec.endswith(".json") else Path(spec)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.json")))
        raise ValueError(f"cost profile {spec!r}: no such file (shipped profiles: {shipped})")
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and "profile" in raw:  # a calibration report: the profile is one key of it
        raw = raw["profile"]
    if not isinstance(raw, dict):
        raise ValueError(f"cost profile {path}: expected a JSON object")
    return CostProfile.from_json(raw, where=f"cost profile {path}")
